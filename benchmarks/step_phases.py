"""Where a one-token expert step's time goes: each launch of the split-K step alone and the
chain, cold, per model shape and format.

    python benchmarks/step_phases.py --out results/phases             # CUDA + Triton, ~1-2 minutes
    python benchmarks/step_phases.py --out OUT --models qwen3-30b-a3b --formats int4/g128

The step (``choose_config``'s, as ``expert_decode`` runs it) is timed as ``benchmarks/expert_kernels.py``
times it: 20 steps replayed from one CUDA graph, each over another copy of the experts (cold, as a
model's layers read them). Then its launches taken apart (``one_launch`` off where the default runs
one launch): all three in turn, the input's packing alone, gate_up alone, down alone, and
packing then gate_up. The launches alone are what each costs when the one before it has long
finished; the differences along the chain are the waits between them. ``read`` is a launch that
only reads the step's bytes (``benchmarks/read_ceiling.py``'s kernel), the floor of any step of
that size; ``read+read`` reads the same bytes in two such launches one after the other, the first
two thirds of them (gate_up reads two of an expert's three matrices) and then the rest: the floor of
a step that is a chain of two launches, as the split-K step is.

For the packed formats (int4, int3, int2) a second table: the step given its input packed ahead
(``prepacked``, as the router's launch packs it: ``InputPacking``), the model's router alone
(``route_decode``, bf16 weights of the model's expert count) without and with that packing, and
the two in a chain each way: the router then the step that packs, against the router that packs
then the prepacked step (what a decode layer runs now).
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from expert_kernels import MODELS, bench_steps, cold_steps, copy_bandwidth, fmt_name, variant_case  # benchmarks/expert_kernels.py
from read_ceiling import read_kernel  # benchmarks/read_ceiling.py: a launch that only reads

DEFAULT_MODELS = ("qwen3-30b-a3b", "olmoe", "mixtral-8x7b")
DEFAULT_FORMATS = ("bf16", "int8", "int4/g128", "int2/g64", "int3/g128")
PHASES = ("step", "apart", "pack", "gate_up", "down", "pack+gate_up", "read", "read+read")
ROUTER_PHASES = ("prepacked", "prepacked.alt", "route", "route.pack", "route+step", "route.pack+step")
ROUTED_EXPERTS = {"qwen3-30b-a3b": 128, "mixtral-8x7b": 8, "olmoe": 64, "deepseek-v2-lite": 64}


def parse_format(text: str) -> tuple[str, int]:
    """``int4/g128`` -> ("int4", 128); ``int8``, ``bf16`` -> group 0 (no groups)."""
    precision, _, group = text.partition("/g")
    if precision in ("int4", "int3", "int2"):
        return precision, int(group or 128)
    return precision, 0


def phases(model: str, precision: str, group: int, device) -> dict:
    """Microseconds per step of each entry of PHASES for one shape and format, cold."""
    from dymoe.quant.kernels import interpreting
    from dymoe.quant.kernels.triton_experts import _launches, choose_config, launch_decode, pdl_supported

    _, name, layout, pool, offsets, combine, x, ws, plan, _, nbytes = variant_case(model, precision, group, device)
    k = MODELS[model][2]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    chosen = tuple(choose_config(plan, kernel, k, 1, sms) for kernel in ("gate_up", "down"))
    apart = tuple(dataclasses.replace(c, one_launch=False) for c in chosen)
    gate_up, down = _launches(plan, k, 1, sms, interpreting(), *apart, pdl=pdl_supported(device))  # (as launch_decode)
    big, steps = cold_steps(pool, offsets, nbytes)
    payload, scales = big.view(gate_up.payload or plan.payload_dtype), big.view(torch.float16)
    hidden = ws.hidden_transposed.view(torch.int32) if gate_up.packed else ws.hidden_transposed
    out = torch.empty_like(x)
    packed_x = ws.input_packed if gate_up.packed else x  # (as launch_decode passes them)

    def pack(_):
        if gate_up.prep is not None:
            gate_up.prep.kernel[gate_up.prep.grid](x, ws.input_packed, **gate_up.prep.kwargs)

    def gate_up_only(o):
        gate_up.kernel[gate_up.grid](payload, scales, o, o, combine, packed_x, hidden, ws.gate_up_partial,
                                     ws.gate_up_counters, k, **gate_up.kwargs)

    def down_only(o):
        down.kernel[down.grid](payload, scales, o, o, combine, hidden, ws.partial, out, ws.counters, k, **down.kwargs)

    read, cdiv = read_kernel()
    words = 4096  # 16 KB per program, as read_ceiling.py reads
    sink = torch.empty(cdiv(big.numel() // 4, words), dtype=torch.int32, device=device)
    flat = big.view(torch.int32)
    per_step = nbytes // 4
    first = int(offsets.min())
    read_args = [(int(o.min()) - first) // 4 for o in steps]  # the start of each step's copy of the pool

    def read_words(start, count):
        read[(cdiv(count, words),)](flat[start:], sink, count, WORDS=words)

    first_part = per_step * 2 // 3 // words * words  # gate_up's share, in whole programs

    def read_twice(start):
        read_words(start, first_part)
        read_words(start + first_part, per_step - first_part)

    timed = {"step": lambda o: launch_decode(big, o, plan, x, combine, ws, *chosen)}
    row = {"model": model, "format": name, "mb": nbytes / 2**20, "one_launch": chosen[0].one_launch}
    if gate_up.packed:
        other = tuple(dataclasses.replace(c, one_launch=not c.one_launch) for c in chosen)
        router, row["prepacked_same"] = router_phases(
            model, plan, x, ws, lambda o, x_packed=None, configs=chosen: launch_decode(
                big, o, plan, x, combine, ws, *configs, x_packed=x_packed), steps[0], chosen, other)
        timed.update(router)
    if gate_up.split:  # split-K: the launches can be taken apart (the tiled bf16 step is two launches)
        timed.update({
            "apart": lambda o: launch_decode(big, o, plan, x, combine, ws, *apart),
            "gate_up": gate_up_only, "down": down_only})
        if gate_up.prep is not None:
            timed.update({"pack": pack, "pack+gate_up": lambda o: (pack(o), gate_up_only(o))})
    for phase, fn in timed.items():
        row[phase] = bench_steps(fn, args=steps) * 1e3
    row["read"] = bench_steps(lambda start: read_words(start, per_step), args=read_args) * 1e3
    row["read+read"] = bench_steps(read_twice, args=read_args) * 1e3
    return row


def router_phases(model: str, plan, x: torch.Tensor, ws, step, offsets, chosen, other) -> tuple[dict, dict]:
    """ROUTER_PHASES's functions of a step's offsets (``step(o, x_packed=None, configs=...)`` runs
    the step; ``other``: the configs of the other launch form, one launch or two), and the checks:
    whether the router's packed input holds the words the step's packing launch writes (in
    ``ws``), whether the prepacked step gives the self-packing step's output bit for bit in the
    default form and in the other, and (for information) how far the two forms' outputs are apart."""
    from dymoe.models.fused import route_decode
    from dymoe.quant.kernels import InputPacking
    from dymoe.quant.kernels.triton_experts import packed_words

    h, k = plan.hidden_size, MODELS[model][2]
    weight = (torch.randn(ROUTED_EXPERTS[model], h, device=x.device) / h**0.5).bfloat16()
    pack = InputPacking(torch.zeros(packed_words(h, plan.bits), dtype=torch.int32, device=x.device), plan.bits, h)
    route = dict(sigmoid=False, normalize=True, scaling=1.0)
    route_decode(x, weight, None, k, pack=pack, **route)  # the packed input the prepacked step reads
    two = next(configs for configs in (chosen, other) if not configs[0].one_launch)
    step(offsets, configs=two)  # (the packing launch writes ws.input_packed)
    words = torch.equal(ws.input_packed[:pack.buffer.numel()], pack.buffer)
    outs = {(form, pre): step(offsets, pack.buffer if pre else None, configs)
            for form, configs in (("default", chosen), ("other", other)) for pre in (True, False)}
    apart = outs["default", False].float() - outs["other", False].float()
    same = {"words": words, "default": torch.equal(outs["default", True], outs["default", False]),
            "other": torch.equal(outs["other", True], outs["other", False]),
            "forms_rel": float(apart.norm() / outs["default", False].float().norm())}
    return {"prepacked": lambda o: step(o, pack.buffer), "prepacked.alt": lambda o: step(o, pack.buffer, other),
            "route": lambda o: route_decode(x, weight, None, k, **route),
            "route.pack": lambda o: route_decode(x, weight, None, k, pack=pack, **route),
            "route+step": lambda o: (route_decode(x, weight, None, k, **route), step(o)),
            "route.pack+step": lambda o: (route_decode(x, weight, None, k, pack=pack, **route), step(o, pack.buffer))}, same


def table(rows: list[dict], copy_gbps: float) -> str:
    lines = [f"one-token expert step, cold, us per step (20-step graphs); device copy {copy_gbps:.0f} GB/s",
             f"{'model':15s} {'format':9s} {'MB':>5s} " + " ".join(f"{p:>12s}" for p in PHASES)
             + "  step % of copy"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:15s} {r['format']:9s} failed: {r['error']}")
            continue
        pct = r["mb"] * 2**20 / (r["step"] * 1e-6) / (copy_gbps * 1e9) * 100
        note = " (one launch)" if r["one_launch"] else ""
        lines.append(f"{r['model']:15s} {r['format']:9s} {r['mb']:5.1f} "
                     + " ".join(f"{r[p]:12.1f}" if r.get(p) is not None else f"{'-':>12s}" for p in PHASES)
                     + f"  {pct:5.0f}%{note}")
    lines.append("'-': not a launch of that step (bf16 and int8 pack no input; bf16 runs the tiled kernels);"
                 " apart: pack, gate_up, down in turn (the step itself unless it says one launch)")
    packed = [r for r in rows if r.get("prepacked") is not None]
    if packed:
        lines += ["", "the router packs the input (InputPacking), us per step, cold; route: the model's router "
                  "(route_decode), .pack: packing too; prepacked.alt: the other launch form (one launch or two)",
                  f"{'model':15s} {'format':9s} " + " ".join(f"{p:>14s}" for p in ROUTER_PHASES)
                  + "  step -> prepacked % of copy; same words, outputs (default, other form)"]
        for r in packed:
            pct = [r["mb"] * 2**20 / (r[p] * 1e-6) / (copy_gbps * 1e9) * 100 for p in ("step", "prepacked")]
            lines.append(f"{r['model']:15s} {r['format']:9s} " + " ".join(f"{r[p]:14.1f}" for p in ROUTER_PHASES)
                         + f"  {pct[0]:5.0f}% -> {pct[1]:3.0f}%  " + " ".join(
                             "yes" if r["prepacked_same"][key] else "NO" for key in ("words", "default", "other")))
    return "\n".join(lines)


def each_case(models, formats, run) -> list[dict]:
    """The rows ``run(model, precision, group)`` returns (a list) for every model and format, each
    case's failure a row with its error (one shape's failure should not hide the others)."""
    rows = []
    for model in models:
        for text in formats:
            precision, group = parse_format(text)
            try:
                rows += run(model, precision, group)
            except Exception as exc:
                rows.append({"model": model, "format": fmt_name(precision, group),
                             "error": f"{type(exc).__name__}: {exc}"[:1000]})
                print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    return rows


def write_json(path: Path, payload: dict, indent: int | None = 1) -> None:
    """``payload`` as JSON at ``path``, written to a temporary name first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=indent))
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for step_phases.json")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(MODELS))
    parser.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS, help="e.g. int4/g128 int8 bf16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/step_phases.py needs a CUDA GPU and Triton (pip install -e .[gpu])")
        return 2
    device = torch.device("cuda")
    copy_gbps = copy_bandwidth(device)

    def run(model, precision, group):
        row = phases(model, precision, group, device)
        print(json.dumps(row), flush=True)
        return [row]

    rows = each_case(args.models, args.formats, run)
    write_json(args.out / "step_phases.json", {"device": torch.cuda.get_device_name(device),
                                               "copy_gbps": copy_gbps, "rows": rows})
    print()
    print(table(rows, copy_gbps))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
