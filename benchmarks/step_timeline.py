"""Where a one-token expert step's time goes, program by program: the split-K step's two launches
stamped with the GPU's global timer, cold, in the graphs the other kernel benchmarks time.

    python benchmarks/step_timeline.py --out OUT                       # CUDA + Triton, < 1 minute
    python benchmarks/step_timeline.py --out OUT --models qwen3-30b-a3b --formats int4/g128 \\
        --set-down split_k=1 --set-gate-up block_n=64

Each case runs ``choose_config``'s step in two launches (the one-launch form has no launch
boundary to trace), its input packed ahead as the router packs it for the one-class runtimes, 20
steps from one CUDA graph, each over another copy of the experts. With ``launch_decode(trace=)``
every program writes the global timer at its start, when its wait returned, when its sums were
done, when its counter's atomic returned and (the finisher of its row block) when the finisher's
stores were issued (``split_k.TRACE_FIELDS``). Per step, relative to the first gate_up program's
start, the script prints the medians over the graph's steps (the first two left out) of:

- ``gate_up``: when the last program started (``started``), the last wait returned (``waited``),
  the median and last program had their sums (``summed``), the last counter returned (``counted``),
  the last finisher was done (``h``: all of ``h`` written);
- ``down``: the first program's start (before ``h`` when pdl starts it early), the first and last
  wait returned, the median and last sums, the last finisher (``end``: ``y`` written);
- ``next``: the next step's first gate_up start (the period of the graph's steps), so ``next - end``
  is the gap between one step and the next.

Each case is also timed with and without tracing (the traced step must cost about the same, or
the stamps themselves moved the times), and its traced output checked to equal the untraced one
bit for bit. ``--set-gate-up`` / ``--set-down FIELD=VALUE`` run a second config of the same case
next to the default (``LaunchConfig`` fields, as ``benchmarks/sass_stats.py --set``). Writes
OUT/step_timeline.json (every program's stamps of one step per case, too).
"""

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

from expert_kernels import MODELS, bench_steps, cold_steps, copy_bandwidth, variant_case  # benchmarks/
from sass_stats import parse_sets
from step_phases import each_case, write_json

DEFAULT_MODELS = ("qwen3-30b-a3b", "olmoe")
DEFAULT_FORMATS = ("int4/g128", "int2/g64", "int3/g128")
SKIP_STEPS = 2  # the graph's first steps follow the replay's own launch
START, WAITED, SUMMED, COUNTED, FINISHED, SM = range(6)  # the fields of split_k.TRACE_FIELDS
COLUMNS = ("gate_up started", "gate_up waited", "gate_up summed (median)", "gate_up summed", "gate_up counted",
           "h", "down first start", "down first waited", "down waited", "down summed (median)", "down summed",
           "end", "next")


def step_points(gate_up: np.ndarray, down: np.ndarray, next_start: float | None) -> dict:
    """One step's points in microseconds after its first gate_up start, from the two launches'
    trace rows ([programs, TRACE_FIELDS] int64 nanoseconds; a finisher's FINISHED is nonzero,
    every other program's zero). ``next_start``: the next step's first gate_up start (ns), or None."""
    t0 = gate_up[:, START].min()

    def us(value) -> float:
        return float(value - t0) / 1e3

    gate_finish, down_finish = gate_up[gate_up[:, FINISHED] > 0], down[down[:, FINISHED] > 0]
    if not len(gate_finish) or not len(down_finish):
        raise ValueError("a launch's trace has no finisher stamps: were the buffers zeroed and the step traced?")
    points = {
        "gate_up started": us(gate_up[:, START].max()), "gate_up waited": us(gate_up[:, WAITED].max()),
        "gate_up summed (median)": us(np.median(gate_up[:, SUMMED])), "gate_up summed": us(gate_up[:, SUMMED].max()),
        "gate_up counted": us(gate_up[:, COUNTED].max()), "h": us(gate_finish[:, FINISHED].max()),
        "down first start": us(down[:, START].min()), "down first waited": us(down[:, WAITED].min()),
        "down waited": us(down[:, WAITED].max()), "down summed (median)": us(np.median(down[:, SUMMED])),
        "down summed": us(down[:, SUMMED].max()), "end": us(down_finish[:, FINISHED].max()),
        "next": us(next_start) if next_start is not None else None,
        "down started before h": int((down[:, START] < gate_finish[:, FINISHED].max()).sum()),
        "gate_up finishers": len(gate_finish), "down finishers": len(down_finish),
        "programs": (len(gate_up), len(down)), "sms": (len(np.unique(gate_up[:, SM])), len(np.unique(down[:, SM]))),
    }
    order = [gate_up[:, START] <= gate_up[:, WAITED], gate_up[:, WAITED] <= gate_up[:, SUMMED],
             gate_up[:, SUMMED] <= gate_up[:, COUNTED], down[:, START] <= down[:, WAITED],
             down[:, WAITED] <= down[:, SUMMED], down[:, SUMMED] <= down[:, COUNTED]]
    points["in order"] = bool(all(o.all() for o in order)) and points["down waited"] <= points["end"]
    return points


def timeline(traces: list[tuple[np.ndarray, np.ndarray]], skip: int = SKIP_STEPS) -> dict:
    """The medians of :func:`step_points` over the steps of one graph replay (``traces``: per step,
    the gate_up and down trace rows), the first ``skip`` left out, and the timer's finest step
    seen (ns between distinct stamps)."""
    steps = [step_points(g, d, traces[i + 1][0][:, START].min() if i + 1 < len(traces) else None)
             for i, (g, d) in enumerate(traces)][skip:]
    if not steps:
        raise ValueError(f"{len(traces)} traced steps, {skip} of them left out: nothing to summarise")
    summary = {c: float(np.median([s[c] for s in steps if s[c] is not None])) for c in COLUMNS
               if any(s[c] is not None for s in steps)}
    summary.update({k: steps[0][k] for k in ("gate_up finishers", "down finishers", "programs", "sms")})
    summary["down started before h"] = float(np.median([s["down started before h"] for s in steps]))
    summary["in order"] = all(s["in order"] for s in steps)
    stamps = np.unique(np.concatenate([np.concatenate([g[:, :FINISHED].ravel(), d[:, :FINISHED].ravel()])
                                       for g, d in traces]))
    summary["timer_step_ns"] = int(np.diff(stamps).min()) if len(stamps) > 1 else None
    return summary


def traced_case(model: str, precision: str, group: int, device, sets: tuple[dict, dict]) -> list[dict]:
    """The default step of one shape and format (and, with ``sets``, changes of gate_up's and
    down's ``LaunchConfig`` fields: :func:`sass_stats.parse_sets`), traced and timed: one row per
    config."""
    from dymoe.quant.kernels.split_k import TRACE_FIELDS
    from dymoe.quant.kernels.triton_experts import _launches, choose_config, launch_decode, pdl_supported, trace_rows

    _, name, layout, pool, offsets, combine, x, ws, plan, ref, nbytes = variant_case(model, precision, group, device)
    k = MODELS[model][2]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    chosen = tuple(dataclasses.replace(choose_config(plan, kernel, k, 1, sms), one_launch=False)
                   for kernel in ("gate_up", "down"))
    if chosen[0].split_k is None:
        raise ValueError(f"{name} runs the tiled kernels at one token: nothing split-K to trace")
    configs = {"default": chosen}
    if sets[0] or sets[1]:
        configs["set"] = (dataclasses.replace(chosen[0], **sets[0]), dataclasses.replace(chosen[1], **sets[1]))
    big, steps = cold_steps(pool, offsets, nbytes)
    rows = []
    for label, (gu_cfg, d_cfg) in configs.items():
        gate_up, down = _launches(plan, k, 1, sms, False, gu_cfg, d_cfg, pdl=pdl_supported(device))
        packed = None
        if gate_up.packed:  # the input packed ahead, as the router packs it (one-class runtimes)
            launch_decode(big, steps[0], plan, x, combine, ws, gu_cfg, d_cfg)
            packed = ws.input_packed.clone()
        buffers = [(torch.zeros(trace_rows(gate_up.grid) * TRACE_FIELDS.value, dtype=torch.int64, device=device),
                    torch.zeros(trace_rows(down.grid) * TRACE_FIELDS.value, dtype=torch.int64, device=device))
                   for _ in steps]

        def step(o, trace=None):
            return launch_decode(big, o, plan, x, combine, ws, gu_cfg, d_cfg, x_packed=packed, trace=trace)

        plain_out = step(steps[0]).clone()
        traced_out = step(steps[0], buffers[0]).clone()
        plain = bench_steps(step, args=steps) * 1e3
        traced = bench_steps(lambda a: step(*a), args=list(zip(steps, buffers))) * 1e3  # buffers: the last replay's
        torch.cuda.synchronize()
        traces = [(g.view(-1, TRACE_FIELDS.value).cpu().numpy(), d.view(-1, TRACE_FIELDS.value).cpu().numpy())
                  for g, d in buffers]
        rel = float((traced_out.float() - ref).norm() / ref.norm())
        row = {"model": model, "format": name, "config": label, "mb": nbytes / 2**20,
               "configs": [dataclasses.asdict(c) for c in (gu_cfg, d_cfg)],
               "grids": [gate_up.grid, down.grid], "us": plain, "traced_us": traced,
               "same_output": bool(torch.equal(plain_out, traced_out)), "rel_err": rel,
               **timeline(traces), "programs_of_one_step": [t.tolist() for t in traces[SKIP_STEPS]]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "programs_of_one_step"}), flush=True)
    return rows


def table(rows: list[dict], copy_gbps: float) -> str:
    short = {"gate_up started": "gu start", "gate_up waited": "gu wait", "gate_up summed (median)": "gu sum50",
             "gate_up summed": "gu sum", "gate_up counted": "gu count", "h": "h", "down first start": "d start",
             "down first waited": "d wait0", "down waited": "d wait", "down summed (median)": "d sum50",
             "down summed": "d sum", "end": "end", "next": "next"}
    lines = [f"one-token expert step, traced (us after the first gate_up start; medians over a 20-step graph's "
             f"steps), cold; device copy {copy_gbps:.0f} GB/s",
             f"{'model':14s} {'format':9s} {'config':7s} {'step':>5s} {'traced':>6s} "
             + " ".join(f"{s:>8s}" for s in short.values()) + "  % of copy  checks"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:14s} {r['format']:9s} failed: {r['error']}")
            continue
        pct = r["mb"] * 2**20 / (r["us"] * 1e-6) / (copy_gbps * 1e9) * 100
        checks = ("ok" if r["same_output"] and r["in order"] else "!! " + ", ".join(
            w for w, bad in (("output differs", not r["same_output"]), ("stamps out of order", not r["in order"]))
            if bad))
        lines.append(f"{r['model']:14s} {r['format']:9s} {r['config']:7s} {r['us']:5.1f} {r['traced_us']:6.1f} "
                     + " ".join(f"{r.get(c, float('nan')):8.2f}" for c in short) + f"  {pct:8.0f}%  {checks}")
    lines.append("gu: gate_up, d: down; sum50: the median program's sums done; wait0: the first down wait to "
                 "return; h / end: the last finisher's stores issued; next: the next step's first start")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for step_timeline.json")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(MODELS))
    parser.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS, help="e.g. int4/g128 int2/g64 int8")
    parser.add_argument("--set-gate-up", action="append", default=[], metavar="FIELD=VALUE",
                        help="also run the step with this LaunchConfig field of gate_up changed (repeatable)")
    parser.add_argument("--set-down", action="append", default=[], metavar="FIELD=VALUE",
                        help="the same for down")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        print("benchmarks/step_timeline.py needs a CUDA GPU and Triton (pip install -e .[gpu])")
        return 2
    from dymoe.quant.kernels.triton_experts import LaunchConfig

    try:
        sets = (parse_sets(args.set_gate_up, LaunchConfig), parse_sets(args.set_down, LaunchConfig))
    except ValueError as exc:
        parser.error(str(exc))
    device = torch.device("cuda")
    copy_gbps = copy_bandwidth(device)
    rows = each_case(args.models, args.formats, lambda *case: traced_case(*case, device, sets))
    write_json(args.out / "step_timeline.json", {"device": torch.cuda.get_device_name(device),
                                                 "copy_gbps": copy_gbps, "rows": rows}, indent=None)
    print()
    print(table(rows, copy_gbps))
    ok = all("error" not in r and r["same_output"] and r["in order"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
