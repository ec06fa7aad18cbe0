"""The slab step (one launch of independent programs, dymoe/quant/kernels/slab.py) against the
default split-K step, cold, per model shape and packed format.

    python benchmarks/slab_step.py --out results/slab          # CUDA + Triton, a few minutes
    python benchmarks/slab_step.py --out OUT --models qwen3-30b-a3b --formats int4/g128 --budget-s 120

For each shape and format: the default step given its input packed ahead (``x_packed``, as the
router packs it in a decode layer), every slab config of :func:`candidates`, and a launch that only
reads the step's bytes, each timed as ``benchmarks/expert_kernels.py`` times a step (20 steps
replayed from one CUDA graph, each over another copy of the experts: cold). Each slab config is
checked first: its hidden scratch NaN-poisoned, the output against the float32 reference (relative
error under 1e-2), the same output bit for bit on a second run, the accumulator and counter left at
zero. Writes OUT/slab_step.json and prints a table last.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from expert_kernels import MODELS, bench_steps, cold_steps, copy_bandwidth, fmt_name, variant_case  # benchmarks/
from read_ceiling import read_kernel  # benchmarks/read_ceiling.py: a launch that only reads
from step_phases import parse_format  # benchmarks/step_phases.py

DEFAULT_MODELS = ("qwen3-30b-a3b", "olmoe", "deepseek-v2-lite", "mixtral-8x7b")
DEFAULT_FORMATS = ("int4/g128", "int2/g64", "int3/g128", "int4/g64")


def candidates(plan, wide: bool) -> list:
    """Slab configs to time: ``wide`` (Qwen3-30B-A3B's int4/g128) slabs of one, two and four chunks,
    gate/up steps of 512 or 1024 columns, down blocks of 256 or 512 rows, 4 or 8 warps (eight
    combinations, one with down's first block loaded first, one without rotation, since each compiles for ~10 s); else one: a slab of one chunk, 4 warps."""
    from dymoe.quant.kernels.slab import SlabConfig, slab_fits
    from dymoe.quant.kernels.triton_experts import chunk_values

    chunk = chunk_values(plan.bits)
    if wide:
        configs = [SlabConfig(chunk, 512, 512, 4), SlabConfig(chunk, 1024, 512, 4), SlabConfig(chunk, 512, 256, 4),
                   SlabConfig(chunk, 512, 512, 8), SlabConfig(chunk, 512, 512, 4, down_first=True),
                   SlabConfig(chunk, 512, 512, 4, rotate=False),
                   SlabConfig(2 * chunk, 512, 512, 4),
                   SlabConfig(2 * chunk, 512, 512, 8), SlabConfig(2 * chunk, 1024, 512, 8),
                   SlabConfig(4 * chunk, 512, 256, 8)]
    else:
        configs = [SlabConfig(chunk, 512, 512, 4)]
    return [c for c in configs if slab_fits(plan, c)]


def check(big, offsets, plan, x, xp, combine, ws, config, ref) -> dict:
    """One slab step with its hidden scratch poisoned against the reference, and again: the same bits."""
    from dymoe.quant.kernels.slab import launch_slab

    ws.hidden_transposed.view(torch.int32).fill_(-1)  # float16 pairs 0xFFFF: NaN where h is read unwritten
    out = launch_slab(big, offsets, plan, x, combine, ws, config, x_packed=xp)
    again = launch_slab(big, offsets, plan, x, combine, ws, config, x_packed=xp)
    torch.cuda.synchronize()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    reset = ws.counters_at_zero()
    same = bool(torch.equal(out, again))
    return {"rel_err": rel, "finite": bool(out.isfinite().all()), "reset": reset, "deterministic": same,
            "ok": rel < 1e-2 and bool(out.isfinite().all()) and reset and same}


def shape_rows(model: str, precision: str, group: int, device, deadline: float, copy_gbps: float) -> list[dict]:
    import triton

    from dymoe.quant.kernels.slab import launch_slab
    from dymoe.quant.kernels.split_k import _pack_input_kernel
    from dymoe.quant.kernels.triton_experts import PACK_BLOCK, chunk_values, launch_decode, packed_words

    _, name, layout, pool, offsets, combine, x, ws, plan, ref, nbytes = variant_case(model, precision, group, device)
    h = plan.hidden_size
    xp = torch.empty(packed_words(h, plan.bits), dtype=torch.int32, device=device)
    _pack_input_kernel[(triton.cdiv(h, PACK_BLOCK),)](x, xp, H=h, C=triton.cdiv(h, chunk_values(plan.bits)),
                                                      BITS=plan.bits, BLOCK=PACK_BLOCK, num_warps=4)
    big, steps = cold_steps(pool, offsets, nbytes)

    def pct(us: float) -> float:
        return nbytes / (us * 1e-6) / (copy_gbps * 1e9) * 100

    base = {"model": model, "format": name, "mb": nbytes / 2**20}
    default = launch_decode(big, steps[0], plan, x, combine, ws, x_packed=xp)
    rows = [dict(base, form="default (prepacked)",
                 us=bench_steps(lambda o: launch_decode(big, o, plan, x, combine, ws, x_packed=xp), args=steps) * 1e3)]
    read, cdiv = read_kernel()
    words = 4096
    sink = torch.empty(cdiv(big.numel() // 4, words), dtype=torch.int32, device=device)
    flat, per_step, first = big.view(torch.int32), nbytes // 4, int(offsets.min())
    starts = [(int(o.min()) - first) // 4 for o in steps]
    rows.append(dict(base, form="read only", us=bench_steps(
        lambda s: read[(cdiv(per_step, words),)](flat[s:], sink, per_step, WORDS=words), args=starts) * 1e3))
    wide = model == "qwen3-30b-a3b" and precision == "int4" and group == 128
    for config in candidates(plan, wide):
        if time.monotonic() > deadline:
            rows.append(dict(base, form=str(config), skipped="time budget"))
            continue
        try:
            checked = check(big, steps[0], plan, x, xp, combine, ws, config, ref)
            checked["vs_default"] = ((launch_slab(big, steps[0], plan, x, combine, ws, config, x_packed=xp).float()
                                      - default.float()).norm() / ref.norm()).item()
            us = bench_steps(lambda o, c=config: launch_slab(big, o, plan, x, combine, ws, c, x_packed=xp),
                             args=steps) * 1e3
            first = (" first" if config.down_first else "") + ("" if config.rotate else " norot")
            rows.append(dict(base, form=f"slab {config.slab} g{config.g_step} d{config.d_block} w{config.num_warps}{first}",
                             us=us, **checked))
        except Exception as exc:  # one config's failure (a compile error) should not hide the others
            rows.append(dict(base, form=str(config), error=f"{type(exc).__name__}: {exc}"))
        print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        if "us" in r:
            r["pct_of_copy"] = pct(r["us"])
    return rows


def table(rows: list[dict], copy_gbps: float) -> str:
    lines = [f"one-token expert step, cold, us per step (20-step graphs); device copy {copy_gbps:.0f} GB/s",
             f"{'model':17s} {'format':9s} {'MB':>5s} {'form':28s} {'us':>7s} {'% copy':>7s}  check"]
    for r in rows:
        if "us" not in r:
            lines.append(f"{r['model']:17s} {r['format']:9s} {r['mb']:5.1f} {r['form']:28s} "
                         f"{r.get('error') or r.get('skipped')}")
            continue
        ok = "" if "ok" not in r else ("ok" if r["ok"] else "FAILED") + f" rel {r['rel_err']:.1e}" \
            f" vs default {r['vs_default']:.1e}"
        lines.append(f"{r['model']:17s} {r['format']:9s} {r['mb']:5.1f} {r['form']:28s} {r['us']:7.1f} "
                     f"{r['pct_of_copy']:6.0f}%  {ok}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for slab_step.json")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(MODELS))
    parser.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS, help="e.g. int4/g128 int2/g64")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop timing new slab configs past this")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/slab_step.py needs a CUDA GPU and Triton (pip install -e .[gpu])")
        return 2
    device = torch.device("cuda")
    deadline = time.monotonic() + args.budget_s
    copy_gbps = copy_bandwidth(device)
    rows = []
    for model in args.models:
        for text in args.formats:
            precision, group = parse_format(text)
            try:
                rows += shape_rows(model, precision, group, device, deadline, copy_gbps)
            except Exception as exc:
                rows.append({"model": model, "format": fmt_name(precision, group), "mb": 0.0, "form": "-",
                             "error": f"{type(exc).__name__}: {exc}"})
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "slab_step.json.tmp"
    tmp.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "copy_gbps": copy_gbps,
                               "rows": rows}, indent=1))
    tmp.replace(args.out / "slab_step.json")
    print()
    print(table(rows, copy_gbps))
    return 0 if all("error" not in r and r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
