"""Prefill through low-bit slots on the GPU: the dequantize kernel's correctness and speed, then a layer.

    python benchmarks/prefill_kernels.py --out DIR [--sweep]     # GPU (Triton)
    python benchmarks/prefill_kernels.py --out DIR --tiny        # CPU smoke run: small shapes, torch backend

1. Correctness: for the expert shapes of Qwen3-30B-A3B (hidden 2048, moe_intermediate 768) and
   Mixtral-8x7B (4096, 14336), every format and group size, ``dequantize_experts`` on fresh random
   blobs in a pool, slots in an odd order, into a NaN-poisoned workspace, against the torch
   reference (``unpack_expert``): max abs difference (the kernel is meant to be bit-exact), every
   output written, the workspace outside the call untouched.
2. Speed: the time to dequantize 32 experts in one launch (median), and its bandwidth (stored bytes
   read + workspace bytes written, over the time) as a fraction of a device-to-device copy's
   (bytes read + written); the torch reference's time for the same 32 experts next to it.
3. One simulated prefill layer step on the Qwen3-30B-A3B shape: 512 tokens x top-8 of 128
   experts, grouped matmuls per expert (``run_grouped``) with the weights from (a) bf16 slots read
   in place, (b) int4/g128 slots through the reference dequantize (the runtime before the kernel),
   (c) int4/g128 slots through ``PrefillDequantizer`` (the runtime now); ms per layer.

Prints a table last and writes DIR/prefill_kernels.json (or the --out file if it ends in .json) with
the environment and every measurement. ``--sweep`` also times a few tile configurations.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dymoe.quant.kernels import DequantWorkspace, dequantize_experts, triton_available  # noqa: E402
from dymoe.quant.kernels.reference import random_pool  # noqa: E402
from dymoe.runtime.expert_compute import dequantized_expert, group_by_expert, run_grouped  # noqa: E402
from dymoe.runtime.prefill import PrefillDequantizer, prefill_capacity  # noqa: E402
from benchmarks.expert_kernels import fmt_name, layout_of, stored_bytes  # noqa: E402  (the decode kernels' script)

MODELS = {"qwen3-30b-a3b": (2048, 768), "mixtral-8x7b": (4096, 14336)}  # hidden, expert intermediate
TINY_MODELS = {"tiny-a": (160, 48), "tiny-b": (256, 96)}  # padded last groups at 64 and 128
FORMATS = [("bf16", 0), ("int8", 0), ("int4", 64), ("int4", 128), ("int3", 64), ("int3", 128), ("int2", 64),
           ("int2", 128)]
TIMED_EXPERTS = 32
CHECKED_EXPERTS = 4
STEP = dict(tokens=512, top_k=8, experts=128, model="qwen3-30b-a3b", format=("int4", 128))
TINY_STEP = dict(tokens=64, top_k=4, experts=16, model="tiny-b", format=("int4", 128))
SWEEP = [(32, 512, 4), (16, 512, 4), (64, 256, 4), (32, 1024, 8), (16, 256, 2), (64, 512, 8)]


def timed_ms(fn, device, reps: int = 0) -> float:
    """Median milliseconds of ``fn``: triton.testing.do_bench on the GPU, a few timed calls on CPU
    (``reps`` > 0: that many single calls after one warm-up, for slow reference paths)."""
    if device.type == "cuda" and not reps:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(reps or 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    """Device-to-device (on CPU: memory-to-memory) copy bandwidth in GB/s, bytes read plus written."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), device)
    return 2 * n / ms / 1e6


def free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- 1. correctness ------------------------------------------------------------------------------


def check(model: str, hidden: int, inter: int, precision: str, group: int, device, dtype, backend: str) -> dict:
    layout = layout_of(precision, group, hidden, inter)
    pool, table = random_pool(layout, CHECKED_EXPERTS + 2, seed=11, device=device, spare_bytes=256)
    order = torch.tensor([4, 1, 5, 0], device=device)[:CHECKED_EXPERTS]  # odd slot order, two never read
    offsets = table[order]
    out = DequantWorkspace.allocate(layout, CHECKED_EXPERTS + 2, device, dtype)
    out.gate_up.fill_(float("nan"))
    out.down.fill_(float("nan"))
    gate_up, down = out.views(1, CHECKED_EXPERTS)
    dequantize_experts(pool, offsets, layout, gate_up, down, backend=backend)
    ref = DequantWorkspace.allocate(layout, CHECKED_EXPERTS, device, dtype)
    dequantize_experts(pool, offsets, layout, ref.gate_up, ref.down, backend="torch")
    written = bool(gate_up.isfinite().all() and down.isfinite().all())
    untouched = bool(out.gate_up[0].isnan().all() and out.gate_up[-1].isnan().all()
                     and out.down[0].isnan().all() and out.down[-1].isnan().all())
    diff = max(float((gate_up.float() - ref.gate_up.float()).abs().max()),
               float((down.float() - ref.down.float()).abs().max())) if written else float("nan")
    exact = torch.equal(gate_up, ref.gate_up) and torch.equal(down, ref.down)
    row = {"model": model, "format": fmt_name(precision, group), "max_abs_diff": diff, "bit_exact": exact,
           "fully_written": written, "outside_untouched": untouched, "ok": exact and written and untouched}
    del pool, out, ref
    free(device)
    return row


# ---- 2. speed ------------------------------------------------------------------------------------


def speed(model: str, hidden: int, inter: int, precision: str, group: int, device, dtype, backend: str,
          copy_gbps: float, config=None, reference: bool = True) -> dict:
    layout = layout_of(precision, group, hidden, inter)
    pool, offsets = random_pool(layout, TIMED_EXPERTS, seed=12, device=device)
    ws = DequantWorkspace.allocate(layout, TIMED_EXPERTS, device, dtype)
    ms = timed_ms(lambda: dequantize_experts(pool, offsets, layout, ws.gate_up, ws.down, backend=backend,
                                             config=config), device)
    nbytes = TIMED_EXPERTS * stored_bytes(layout) + ws.gate_up.numel() * ws.gate_up.element_size() \
        + ws.down.numel() * ws.down.element_size()
    gbps = nbytes / ms / 1e6
    row = {"model": model, "format": fmt_name(precision, group), "experts": TIMED_EXPERTS, "bytes": nbytes,
           "us": ms * 1e3, "GBps": gbps, "fraction_of_copy": gbps / copy_gbps}
    if config is not None:
        row["config"] = [config.block_r, config.block_c, config.num_warps]
    if reference:
        row["reference_us"] = 1e3 * timed_ms(
            lambda: dequantize_experts(pool, offsets, layout, ws.gate_up, ws.down, backend="torch"), device, reps=3)
    del pool, ws
    free(device)
    return row


def sweep(models: dict, device, dtype, copy_gbps: float) -> list[dict]:
    from dymoe.quant.kernels.dequant import DequantConfig

    rows = []
    for model, (hidden, inter) in models.items():
        for precision, group in (("int8", 0), ("int4", 128), ("int2", 64)):
            for r, c, w in SWEEP:
                try:
                    rows.append(speed(model, hidden, inter, precision, group, device, dtype, "triton", copy_gbps,
                                      DequantConfig(r, c, w), reference=False))
                except Exception as exc:  # a tile that does not compile must not end the run
                    rows.append({"model": model, "format": fmt_name(precision, group), "config": [r, c, w],
                                 "error": repr(exc)})
    return rows


# ---- 3. one prefill layer step -------------------------------------------------------------------


def routing(step: dict, device):
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(step["tokens"], step["experts"], generator=g)
    weights, ids = torch.softmax(logits, dim=-1).topk(step["top_k"], dim=-1)
    return ids.to(device), (weights / weights.sum(-1, keepdim=True)).to(device)


def layer_step(models: dict, step: dict, device, dtype, backend: str) -> dict:
    hidden, inter = models[step["model"]]
    ids, weights = routing(step, device)
    x = torch.randn(step["tokens"], hidden, generator=torch.Generator().manual_seed(14)).to(device, dtype)
    weights = weights.to(dtype)
    result = {"model": step["model"], "tokens": step["tokens"], "top_k": step["top_k"], "experts": step["experts"]}

    bf16 = layout_of("bf16", 0, hidden, inter)
    pool, table = random_pool(bf16, step["experts"], seed=15, device=device)
    offsets = table.tolist()

    def bf16_slot(e):  # read in place, as OffloadedExperts does (upcast on CPU, where compute is float32)
        blob = pool[offsets[e]:offsets[e] + bf16.nbytes]
        gate_up, down = _bf16_views(blob, bf16)
        return (gate_up, down) if dtype == torch.bfloat16 else (gate_up.to(dtype), down.to(dtype))

    result["bf16_slots_ms"] = timed_ms(lambda: run_grouped(x, ids, weights, bf16_slot), device)
    del pool
    free(device)

    precision, group = step["format"]
    low = layout_of(precision, group, hidden, inter)
    pool, table = random_pool(low, step["experts"], seed=16, device=device)
    offsets = table.tolist()

    def reference_slot(e):
        return dequantized_expert(pool[offsets[e]:offsets[e] + low.nbytes], low, dtype)

    result["reference_ms"] = timed_ms(lambda: run_grouped(x, ids, weights, reference_slot), device, reps=3)
    capacity = prefill_capacity(low, step["experts"], step["experts"], dtype)
    dequantizer = PrefillDequantizer(pool, lambda s: offsets[s], low, capacity, dtype, wait=lambda ticket: None)
    kernel_out = {}

    def kernel_step():  # as the runtime runs a wave: ExpertRun batches straight from the workspace
        grouping = group_by_expert(ids)
        runs = dequantizer.runs([(j, e, None) for j, e in enumerate(grouping[1])])
        kernel_out["y"] = run_grouped(x, ids, weights, dequantizer.weights, grouping, schedule=runs)

    result["kernel_ms"] = timed_ms(kernel_step, device)
    reference_y = run_grouped(x, ids, weights, reference_slot)
    kernel_step()
    result["kernel_equals_reference"] = torch.equal(kernel_out["y"], reference_y)
    result["kernel_max_abs_diff"] = float((kernel_out["y"].float() - reference_y.float()).abs().max())
    result["workspace_experts"] = capacity
    result["format"] = fmt_name(precision, group)
    result["backend"] = backend
    del pool, dequantizer
    free(device)
    return result


def _bf16_views(blob, layout):
    gate, up, down = (layout.part(f"{p}.weight") for p in ("gate", "up", "down"))
    h, i = layout.hidden_size, layout.intermediate_size
    gate_up = blob[gate.offset:up.offset + up.nbytes].view(torch.bfloat16).view(2 * i, h)
    return gate_up, blob[down.offset:down.offset + down.nbytes].view(torch.bfloat16).view(h, i)


# ---- report --------------------------------------------------------------------------------------


def table(result: dict) -> str:
    env, checks = result["env"], result["checks"]
    ok = [c for c in checks if c.get("ok")]
    diffs = [c["max_abs_diff"] for c in checks if c.get("max_abs_diff", -1) >= 0]  # NaN: not fully written
    lines = [f"device: {env['device']}   backend: {env['backend']}   workspace dtype: {env['dtype']}   "
             f"copy: {result['copy_GBps']:.0f} GB/s",
             f"correctness: {len(ok)}/{len(checks)} bit-exact, fully written, outside untouched "
             f"(max abs diff {max(diffs, default=0.0):.3g})",
             "",
             f"dequantize {TIMED_EXPERTS} experts in one call, one launch on Triton "
             "(read stored + write workspace, % of copy):",
             f"{'model':15s} {'format':9s} {'us':>9s} {'GB/s':>7s} {'% copy':>7s} {'torch ref us':>13s}"]
    for r in result["speed"]:
        if "error" in r:
            lines.append(f"{r['model']:15s} {r['format']:9s} error: {r['error'][:70]}")
            continue
        lines.append(f"{r['model']:15s} {r['format']:9s} {r['us']:9.1f} {r['GBps']:7.1f} "
                     f"{r['fraction_of_copy']:7.0%} {r.get('reference_us', float('nan')):13.0f}")
    if result.get("sweep"):
        best = {}
        for r in result["sweep"]:
            key = (r["model"], r["format"])
            if "us" in r and (key not in best or r["us"] < best[key]["us"]):
                best[key] = r
        lines += ["", "sweep, best tile (block_r, block_c, warps):"]
        lines += [f"{m:15s} {f:9s} {r['config']} {r['us']:9.1f} us {r['fraction_of_copy']:6.0%}"
                  for (m, f), r in best.items()]
    s = result["layer_step"]
    if "error" in s:
        lines += ["", f"prefill layer step: error: {s['error'][:100]}"]
    else:
        lines += ["", f"prefill layer step, {s['model']} shape, {s['tokens']} tokens x top-{s['top_k']} of "
                      f"{s['experts']} experts (ms per layer):",
                  f"(a) bf16 slots in place         {s['bf16_slots_ms']:9.2f}",
                  f"(b) {s['format']:9s} reference dequant {s['reference_ms']:9.2f}",
                  f"(c) {s['format']:9s} prefill kernel  {s['kernel_ms']:9.2f}   "
                  f"(b)/(c) {s['reference_ms'] / s['kernel_ms']:.1f}x, "
                  f"(c)/(a) {s['kernel_ms'] / s['bf16_slots_ms']:.2f}x, "
                  f"{s['workspace_experts']} experts per launch",
                  f"    (c) equals (b): {s['kernel_equals_reference']} (max abs diff {s['kernel_max_abs_diff']:.3g})"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for prefill_kernels.json (or a .json file)")
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU with the torch backend (smoke run)")
    parser.add_argument("--sweep", action="store_true", help="also time a few tile configurations (GPU)")
    args = parser.parse_args(argv)
    if args.tiny:
        device, dtype, backend, models, step = torch.device("cpu"), torch.float32, "torch", TINY_MODELS, TINY_STEP
    elif torch.cuda.is_available() and triton_available():
        device, dtype, backend, models, step = torch.device("cuda"), torch.bfloat16, "triton", MODELS, STEP
    else:
        print("benchmarks/prefill_kernels.py needs a CUDA GPU and Triton (pip install -e .[gpu]); "
              "--tiny runs small shapes on CPU")
        return 2
    start = time.time()
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "backend": backend, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "argv": sys.argv}
    if backend == "triton":
        import triton

        env["triton"] = triton.__version__
    checks, speeds = [], []
    copy_gbps = copy_bandwidth(device)
    for model, (hidden, inter) in models.items():
        for precision, group in FORMATS:
            for rows, fn in ((checks, check), (speeds, speed)):
                extra = (copy_gbps,) if fn is speed else ()
                try:
                    rows.append(fn(model, hidden, inter, precision, group, device, dtype, backend, *extra))
                except Exception as exc:
                    rows.append({"model": model, "format": fmt_name(precision, group), "error": repr(exc)})
                print(f"{fn.__name__:5s} {model:15s} {fmt_name(precision, group):9s} {rows[-1]}", flush=True)
    try:
        step_result = layer_step(models, step, device, dtype, backend)
    except Exception as exc:
        step_result = {"error": repr(exc)}
    swept = sweep(models, device, dtype, copy_gbps) if args.sweep and backend == "triton" else []
    result = {"env": env, "copy_GBps": copy_gbps, "checks": checks, "speed": speeds, "layer_step": step_result,
              "sweep": swept, "seconds": time.time() - start}
    out = args.out if args.out.suffix == ".json" else args.out / "prefill_kernels.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print()
    print(table(result))
    print(f"\n{time.time() - start:.0f} s; wrote {out}")
    return 0 if all(c.get("ok") for c in checks) and "error" not in step_result else 1


if __name__ == "__main__":
    sys.exit(main())
