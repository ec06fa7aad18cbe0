"""Fused expert kernels on the GPU: correctness against the float32 reference, then speed.

    python benchmarks/expert_kernels.py --out DIR [--quick] [--sweep]
    python benchmarks/expert_kernels.py --out DIR --variants [--models M ...] [--formats int4/g128 ...]

1. Correctness: for each model's expert shape, each format and group size, and 1 and 8 tokens,
   the Triton decode step (``expert_decode``) on fresh random blobs in a pool against
   ``reference_decode`` (dequantize-then-matmul in float32); relative error (Frobenius) must stay
   under 1e-2. The kernels' scratch is filled with NaN before each run and checked fully written.
2. Bandwidth: one decode step (1 token, the model's top-k experts) per format, as bytes of the
   experts' stored parts over the median time, and as a fraction of the measured device-to-device
   copy bandwidth (read + write bytes over time).
3. One MoE layer step (Qwen3-30B-A3B shape, 8 experts, 1 token) per precision: Triton against the
   torch path the runtime uses today (bf16: gathered strided slots; low bit: dequantize each expert,
   then matmul) and, for int4, against ``torch._weight_int4pack_mm`` (tinygemm) when available;
   then precision mixes (some experts bf16, the rest int4; int4 with int2) run as the mixed
   presets run them, one call per precision.

Prints a table last and writes DIR/kernels.json with the environment and every measurement.
``--sweep`` also times a few tile configurations per format (for tuning ``choose_config``).
``--variants`` runs only the one-token step of every model shape and format under the old tiled
kernels, ``choose_config``'s pick and split-K variations: correctness of each and % of copy
bandwidth, a table last, DIR/variants.json (docs/kernels.md, "One token: split-K").
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

if importlib.util.find_spec("dymoe") is None:  # not installed: this checkout's (PYTHONPATH may name another)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dymoe.checkpoint.blob import blob_layout, unpack_expert  # noqa: E402
from dymoe.quant.formats import parse_format  # noqa: E402
from dymoe.quant.kernels import decode_routing, expert_decode, kernel_plan, reference_decode  # noqa: E402
from dymoe.quant.kernels.reference import random_pool  # noqa: E402
from dymoe.runtime.expert_compute import run_grouped  # noqa: E402
from dymoe.runtime.resident import gathered_decode  # noqa: E402

MODELS = {  # hidden, expert intermediate, top-k
    "qwen3-30b-a3b": (2048, 768, 8),
    "mixtral-8x7b": (4096, 14336, 2),
    "olmoe": (2048, 1024, 8),
    "deepseek-v2-lite": (2048, 1408, 6),
}
FORMATS = [("bf16", 0), ("int8", 0), ("int4", 64), ("int4", 128), ("int3", 64), ("int3", 128), ("int2", 64),
           ("int2", 128)]
MAX_REL_ERR = 1e-2
SPARE_SLOTS = 4
COLD_BYTES = 192 << 20  # experts a cold timing cycles through: ~4x an H100's L2 (50 MB)
GRAPH_STEPS = 20  # steps per CUDA graph replay: back to back, as a model's layers run them


def fmt_name(precision: str, group: int) -> str:
    return f"{precision}/g{group}" if group else precision


def layout_of(precision: str, group: int, hidden: int, inter: int):
    return blob_layout(parse_format(precision, group or 128), hidden, inter)


def stored_bytes(layout) -> int:
    return sum(p.nbytes for p in layout.parts)


def routed(table: torch.Tensor, tokens: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(table.numel(), generator=g)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=g), dim=-1)
    return decode_routing(table, ids.to(table.device), weights.to(table.device))


def bench(fn) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def bench_graph(fn) -> float:
    """Median milliseconds of one ``fn`` replayed from a CUDA graph of GRAPH_STEPS calls: the GPU
    time without the Python and launch overhead of eager calls (what the step costs once the
    runtime captures it with the model's other layers). Until 2026-12-06 this was a graph of one
    call, whose replay's own launch (~5-10 us) counted in every step: the short Qwen3-shape steps
    read about half their graph-of-20 bandwidth that way."""
    return bench_steps(fn)


def cold_steps(pool, offsets, nbytes: int, steps: int = GRAPH_STEPS) -> tuple[torch.Tensor, list]:
    """A pool of copies of ``pool`` and, per step, the offsets of the same experts in another copy,
    cycling through at least COLD_BYTES of experts (at most ``steps`` copies): a step then reads
    its weights from device memory, as a model's layers do, rather than from an L2 cache that
    still holds the step before's (a Qwen3-30B-A3B int4 step is 20 MB, an H100's L2 50 MB)."""
    copies = max(1, min(steps, -(-COLD_BYTES // nbytes)))
    stride = -(-pool.numel() // 256) * 256  # slots stay 256-byte aligned
    big = torch.empty(copies * stride, dtype=pool.dtype, device=pool.device)
    for i in range(copies):
        big[i * stride:i * stride + pool.numel()] = pool
    return big, [offsets + (i % copies) * stride for i in range(steps)]


def bench_steps(fn, steps: int = GRAPH_STEPS, args: list | None = None) -> float:
    """Median milliseconds of one call of ``fn`` when ``steps`` calls are replayed from one CUDA
    graph (the GPU time of back-to-back steps, without the graph launch's host floor); with
    ``args``, one call ``fn(a)`` per entry instead (:func:`cold_steps`'s offsets)."""
    calls = [fn] * steps if args is None else [lambda a=a: fn(a) for a in args]
    calls[0]()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls[0]()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return bench(graph.replay) / len(calls)


def launch_floor(device) -> dict:
    """Eager time of an empty Triton launch (the host floor of one kernel launch) and of two (our
    step), and of one empty launch replayed from a graph."""
    import triton

    @triton.jit
    def empty(x_ptr):
        pass

    x = torch.empty(1, device=device)
    one = bench(lambda: empty[(1,)](x))
    two = bench(lambda: (empty[(1,)](x), empty[(1,)](x)))
    return {"empty_launch_us": one * 1e3, "two_launches_us": two * 1e3,
            "empty_graph_us": bench_graph(lambda: empty[(1,)](x)) * 1e3}


# ---- 1. correctness ----------------------------------------------------------------------------


def check_one(model: str, precision: str, group: int, tokens: int, seed: int, device) -> dict:
    from dymoe.quant.kernels.triton_experts import DecodeWorkspace

    hidden, inter, k = MODELS[model]
    layout = layout_of(precision, group, hidden, inter)
    pool, table = random_pool(layout, k + SPARE_SLOTS, seed=seed, device=device)
    offsets, combine = routed(table, tokens, k, seed)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(device, torch.bfloat16)
    plan = kernel_plan(layout)
    workspace = DecodeWorkspace.allocate(plan, offsets.numel(), tokens, device)
    for scratch in workspace.scratch():
        scratch.fill_(float("nan"))
    out = expert_decode(pool, offsets, layout, x, combine, backend="triton", workspace=workspace)
    torch.cuda.synchronize()
    ref = reference_decode(pool, offsets, layout, x.float(), combine)
    active = combine.abs().sum(0) > 0
    written = bool(out.isfinite().all()) and scratch_written(workspace, plan, active, tokens)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    return {"model": model, "format": fmt_name(precision, group), "tokens": tokens, "experts": int(active.sum()),
            "rel_err": rel, "fully_written": written, "ok": written and rel < MAX_REL_ERR}


def scratch_written(workspace, plan, active: torch.Tensor, tokens: int) -> bool:
    """Whether the step wrote every scratch value it reads (the caller NaN-poisons the scratch
    first): hidden of the active experts and the down partials, in the tiled, split-K or packed
    (int4/int3/int2) layout (whose 32-bit words are finite as float32 wherever they hold finite float16 pairs
    or float32 values)."""
    from dymoe.quant.kernels.triton_experts import (_CODES_PER_WORD, choose_config, k_slices, packed_words,
                                                     runs_packed, uses_gemv)

    experts = active.numel()
    if not uses_gemv(plan, tokens):  # the tiled kernels
        h, partial = workspace.views(plan, experts, tokens)
        return bool(partial.isfinite().all()) and bool(h[active].isfinite().all())
    sms = torch.cuda.get_device_properties(active.device).multi_processor_count
    configs = [choose_config(plan, kernel, experts, 1, sms) for kernel in ("gate_up", "down")]
    kp, i = plan.down.padded_cols, plan.intermediate_size
    if runs_packed(plan, *configs):
        words = packed_words(i, plan.bits)
        h = workspace.hidden_transposed.view(torch.int32)[:experts * words].view(experts, words)[active]
        h = h.view(torch.float32)
        packed_x = workspace.input_packed[:packed_words(plan.hidden_size, plan.bits)].view(torch.float32)
        written = bool(packed_x.isfinite().all())
    else:
        cpw = _CODES_PER_WORD[plan.bits]
        columns = torch.arange(i, device=active.device)
        transposed = (columns % cpw) * (kp // cpw) + columns // cpw  # split_k._transposed
        h = workspace.hidden_transposed[:experts * kp].view(experts, kp)[active][:, transposed]
        written = True
    slices = k_slices(plan, kp, configs[1])[0]
    partial = workspace.partial[:experts * slices * plan.hidden_size]
    return written and bool(h.isfinite().all()) and bool(partial.isfinite().all())


def correctness(device, quick: bool, deadline: float) -> list[dict]:
    rows, seed = [], 0
    for tokens in (1,) if quick else (1, 8):
        for model in MODELS:
            for precision, group in FORMATS:
                seed += 1
                if time.time() > deadline:
                    rows.append({"model": model, "format": fmt_name(precision, group), "tokens": tokens,
                                 "skipped": "time budget"})
                    continue
                try:
                    rows.append(check_one(model, precision, group, tokens, seed, device))
                except Exception as exc:  # record and go on: one failure must not hide the others
                    rows.append({"model": model, "format": fmt_name(precision, group), "tokens": tokens,
                                 "ok": False, "error": f"{type(exc).__name__}: {exc}",
                                 "trace": traceback.format_exc()[-2000:]})
                r = rows[-1]
                print(f"check {model:17s} {r['format']:9s} T={tokens}: "
                      + (f"rel_err {r['rel_err']:.2e} written {r['fully_written']}" if "rel_err" in r
                         else r.get("error", r.get("skipped", ""))), flush=True)
    return rows


# ---- 2. bandwidth ------------------------------------------------------------------------------


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n / ms / 1e6


def decode_case(model: str, precision: str, group: int, device, tokens: int = 1):
    from dymoe.quant.kernels.triton_experts import DecodeWorkspace

    hidden, inter, k = MODELS[model]
    layout = layout_of(precision, group, hidden, inter)
    pool, table = random_pool(layout, k + SPARE_SLOTS, seed=7, device=device)
    offsets, combine = routed(table, tokens, k, 7)
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    workspace = DecodeWorkspace.allocate(kernel_plan(layout), offsets.numel(), tokens, device)
    return layout, pool, table, offsets, combine, x, workspace, k


def bandwidth(device, copy_gbps: float) -> list[dict]:
    rows = []
    for model in MODELS:
        for precision, group in FORMATS:
            try:
                layout, pool, _, offsets, combine, x, ws, k = decode_case(model, precision, group, device)
                step = lambda: expert_decode(pool, offsets, layout, x, combine, backend="triton", workspace=ws)  # noqa: E731
                ms, graph_ms = bench(step), bench_graph(step)
                nbytes = k * stored_bytes(layout)
                big, per_step = cold_steps(pool, offsets, nbytes)
                cold_ms = bench_steps(lambda o: expert_decode(big, o, layout, x, combine, backend="triton",
                                                              workspace=ws), args=per_step)
                gbps, graph_gbps, cold_gbps = nbytes / ms / 1e6, nbytes / graph_ms / 1e6, nbytes / cold_ms / 1e6
                rows.append({"model": model, "format": fmt_name(precision, group), "bytes": nbytes, "ms": ms,
                             "graph_ms": graph_ms, "cold_ms": cold_ms, "floor_us": nbytes / copy_gbps / 1e3,
                             "GBps": gbps, "fraction_of_copy": gbps / copy_gbps, "graph_GBps": graph_gbps,
                             "graph_fraction_of_copy": graph_gbps / copy_gbps,
                             "cold_fraction_of_copy": cold_gbps / copy_gbps})
                print(f"bandwidth {model:17s} {fmt_name(precision, group):9s} floor {nbytes / copy_gbps / 1e3:6.1f} us"
                      f" eager {ms * 1e3:7.1f} us ({gbps / copy_gbps:.0%}) graph {graph_ms * 1e3:7.1f} us "
                      f"({graph_gbps / copy_gbps:.0%}) cold {cold_ms * 1e3:7.1f} us ({cold_gbps / copy_gbps:.0%} of copy)",
                      flush=True)
            except Exception as exc:
                rows.append({"model": model, "format": fmt_name(precision, group), "error": repr(exc)})
                print(f"bandwidth {model} {fmt_name(precision, group)}: {exc!r}", flush=True)
    return rows


# ---- 3. one layer step against the torch paths ---------------------------------------------------


def torch_step(layout, pool, table, ids, weights, x):
    """The step as the runtime runs it today (see dymoe/runtime/offload.py)."""
    h, i = layout.hidden_size, layout.intermediate_size
    if layout.format.is_raw:
        stride = int(table[1] - table[0])
        words = pool.view(torch.bfloat16)
        gate_offset = layout.part("gate.weight").offset // 2
        gate_up = words.as_strided((table.numel(), 2 * i, h), (stride // 2, h, 1), gate_offset)
        down = words.as_strided((table.numel(), h, i), (stride // 2, i, 1), layout.part("down.weight").offset // 2)
        return lambda: gathered_decode(x, ids[0], weights[0].to(x.dtype), gate_up, down)
    offsets = table.tolist()

    def weights_of(e):
        gate, up, down = unpack_expert(pool[offsets[e]:offsets[e] + layout.nbytes], layout, torch.bfloat16)
        return torch.cat([gate, up]), down

    return lambda: run_grouped(x, ids, weights.to(x.dtype), weights_of)


def int4pack_step(hidden: int, inter: int, k: int, group: int, device):
    """8 experts through torch._weight_int4pack_mm (tinygemm), random int4 weights; None if absent."""
    if not hasattr(torch, "_weight_int4pack_mm"):
        return None, "torch._weight_int4pack_mm not available"
    try:
        def pack(n, kk):
            codes = torch.randint(0, 16, (n, kk), dtype=torch.int32, device=device)
            packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            w = torch._convert_weight_to_int4pack(packed, 8)
            sz = torch.rand(kk // group, n, 2, device=device, dtype=torch.bfloat16) * 0.01
            return w, sz

        experts = [(pack(2 * inter, hidden), pack(hidden, inter)) for _ in range(k)]
        x = torch.randn(1, hidden, device=device, dtype=torch.bfloat16)
        w = torch.rand(k, device=device)

        def step():
            y = torch.zeros(1, hidden, device=device, dtype=torch.bfloat16)
            for j, ((gu, gu_sz), (d, d_sz)) in enumerate(experts):
                g, u = torch._weight_int4pack_mm(x, gu, group, gu_sz).chunk(2, dim=-1)
                y += w[j] * torch._weight_int4pack_mm(F.silu(g) * u, d, group, d_sz)
            return y

        step()
        return step, None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def layer_step(device, copy_gbps: float) -> list[dict]:
    model = "qwen3-30b-a3b"
    hidden, inter, k = MODELS[model]
    rows = []
    for precision, group in FORMATS:
        try:
            layout, pool, table, offsets, combine, x, ws, _ = decode_case(model, precision, group, device)
            g = torch.Generator().manual_seed(7)
            ids = torch.stack([torch.randperm(table.numel(), generator=g)[:k]]).to(device)
            weights = torch.softmax(torch.randn(1, k, generator=g), dim=-1).to(device)
            offsets, combine = decode_routing(table, ids, weights)
            step = lambda: expert_decode(pool, offsets, layout, x, combine, backend="triton", workspace=ws)  # noqa: E731
            triton_ms, graph_ms = bench(step), bench_graph(step)
            torch_ms = bench(torch_step(layout, pool, table, ids, weights, x))
            row = {"model": model, "format": fmt_name(precision, group), "triton_us": triton_ms * 1e3,
                   "graph_us": graph_ms * 1e3, "floor_us": k * stored_bytes(layout) / copy_gbps / 1e3,
                   "torch_us": torch_ms * 1e3, "speedup": torch_ms / triton_ms}
            if precision == "int4":
                step, why = int4pack_step(hidden, inter, k, group, device)
                row["int4pack_us"] = bench(step) * 1e3 if step else None
                row["int4pack_note"] = why
            rows.append(row)
            print(f"layer step {fmt_name(precision, group):9s} triton {row['triton_us']:8.1f} us  "
                  f"graph {row['graph_us']:7.1f} us  "
                  f"torch {row['torch_us']:9.1f} us  int4pack {row.get('int4pack_us')}", flush=True)
        except Exception as exc:
            rows.append({"format": fmt_name(precision, group), "error": repr(exc),
                         "trace": traceback.format_exc()[-2000:]})
            print(f"layer step {fmt_name(precision, group)}: {exc!r}", flush=True)
    rows += mixed_layer_steps(device, copy_gbps)
    return rows


MIXES = ((("bf16", 128), ("int4", 128), 2), (("bf16", 128), ("int4", 128), 4), (("int4", 128), ("int2", 128), 4))


def mixed_layer_steps(device, copy_gbps: float) -> list[dict]:
    """One Qwen3 layer step with its k experts in two precisions, as the mixed presets run it (the
    runtime's two-class decode: each class's call gets all k columns, its own experts' weights and
    zero elsewhere, so an expert of the other class is never read): ``high`` experts at the first
    format, the rest at the second. Rows like :func:`layer_step`'s, without a torch column."""
    model = "qwen3-30b-a3b"
    k = MODELS[model][2]
    rows = []
    for (p_hi, g_hi), (p_lo, g_lo), high in MIXES:
        name = f"{p_hi}x{high}+{fmt_name(p_lo, g_lo)}x{k - high}"
        try:
            cases = [decode_case(model, p, g, device) for p, g in ((p_hi, g_hi), (p_lo, g_lo))]
            x = cases[0][5]
            calls = []
            for i, (layout, pool, _, offsets, combine, _, ws, _) in enumerate(cases):
                mask = torch.zeros_like(combine)
                if i == 0:
                    mask[:, :high] = 1.0
                else:
                    mask[:, high:] = 1.0
                calls.append((layout, pool, offsets, combine * mask, ws))

            def step():
                out = None
                for layout, pool, offsets, combine, ws in calls:
                    part = expert_decode(pool, offsets, layout, x, combine, backend="triton", workspace=ws)
                    out = part if out is None else out + part
                return out

            floor = (high * stored_bytes(cases[0][0]) + (k - high) * stored_bytes(cases[1][0])) / copy_gbps / 1e3
            row = {"model": model, "format": name, "triton_us": bench(step) * 1e3, "graph_us": bench_graph(step) * 1e3,
                   "floor_us": floor}
            rows.append(row)
            print(f"layer step {name:20s} triton {row['triton_us']:8.1f} us  graph {row['graph_us']:7.1f} us  "
                  f"floor {floor:6.1f} us", flush=True)
        except Exception as exc:
            rows.append({"format": name, "error": repr(exc), "trace": traceback.format_exc()[-2000:]})
            print(f"layer step {name}: {exc!r}", flush=True)
    return rows


# ---- tile sweep ---------------------------------------------------------------------------------


def sweep(device, deadline: float) -> list[dict]:
    """Time tile configurations (same for both kernels, replayed from a CUDA graph) for the decode
    step (1 token) of two shapes, to tune ``choose_config``."""
    from dymoe.quant.kernels.triton_experts import LaunchConfig, launch_decode

    rows = []
    configs = [LaunchConfig(bn, bk, w, 3) for bn, bk, w in
               ((8, 128, 1), (16, 128, 1), (16, 256, 1), (32, 128, 1), (32, 256, 1), (16, 256, 2), (32, 256, 4),
                (64, 256, 4))]
    for model in ("qwen3-30b-a3b", "mixtral-8x7b"):
        for precision, group in (("int8", 0), ("int4", 128), ("int4", 64), ("int2", 64)):
            layout, pool, _, offsets, combine, x, ws, k = decode_case(model, precision, group, device)
            plan = kernel_plan(layout)
            default = bench_graph(lambda: launch_decode(pool, offsets, plan, x, combine, ws))
            best = None
            for cfg in configs:
                if time.time() > deadline:
                    break
                try:
                    ms = bench_graph(lambda: launch_decode(pool, offsets, plan, x, combine, ws, cfg, cfg))
                except Exception as exc:
                    rows.append({"model": model, "format": fmt_name(precision, group), "config": repr(cfg),
                                 "error": repr(exc)[:300]})
                    continue
                rows.append({"model": model, "format": fmt_name(precision, group), "config": cfg.__dict__,
                             "us": ms * 1e3, "GBps": k * stored_bytes(layout) / ms / 1e6})
                best = min(best or (ms, cfg), (ms, cfg), key=lambda r: r[0])
            if best:
                c = best[1]
                print(f"sweep {model:17s} {fmt_name(precision, group):9s} default {default * 1e3:6.1f} us, best "
                      f"{best[0] * 1e3:6.1f} us at n{c.block_n} k{c.block_k} w{c.num_warps}", flush=True)
    return rows


# ---- variants of the one-token step (--variants) ------------------------------------------------

VARIANT_MODELS = ("mixtral-8x7b", "deepseek-v2-lite", "olmoe", "qwen3-30b-a3b")  # big shapes first
VARIANT_FORMATS = [("bf16", 0), ("int8", 0), ("int4", 128), ("int4", 64), ("int3", 128), ("int3", 64), ("int2", 64),
                   ("int2", 128)]


def variant_candidates(plan, k: int, sms: int, forms: bool = False, blocks: tuple = (),
                       chosen_only: bool = False) -> tuple[list, list]:
    """(first pass, second pass) of (name, (gate_up config, down config)): first the old tiled
    path and choose_config's pick (and split-K's defaults where the pick is tiled), then split-K
    variations around the defaults and the best tile of the 2026-11-22 sweep. ``forms``: only
    choose_config's pick and the same step's other launch forms: in one launch or apart
    (``LaunchConfig.one_launch``), each with and without ``LaunchConfig.preload``, and split-K's
    defaults sized for each of ``blocks`` blocks per SM."""
    from dymoe.quant.kernels.triton_experts import (PACKED_BITS, LaunchConfig, choose_config, pdl_supported,
                                                    split_config, tiled_config)

    gemv = plan.bits < 16
    packable = plan.bits in PACKED_BITS
    h, i = plan.hidden_size, plan.intermediate_size
    tiled = (tiled_config(plan, i, k, sms, gemv), tiled_config(plan, h, k, sms, gemv))
    chosen = (choose_config(plan, "gate_up", k, 1, sms), choose_config(plan, "down", k, 1, sms))

    def split(k_scale: float = 1.0, **knobs):
        configs = []
        for kernel in ("gate_up", "down"):
            block_k = int(split_config(plan, kernel, k, sms).block_k * k_scale)
            config = split_config(plan, kernel, k, sms, block_k=max(block_k, plan.group_size, 16), **knobs)
            # int4/int3/int2: the variations are of the packed path (the float32 one is in the first pass)
            configs.append(dataclasses.replace(config, packed=packable))
        return tuple(configs)

    first = [("tiled (old default)", tiled), ("choose_config", chosen)]
    if chosen[0].split_k is None:
        first.append(("split default", split()))  # packed where the format has that path
        if packable:  # int3 on its tiled path (DYMOE_PACKED_DECODE=0): also the float32 split-K path
            first.append(("split float32", tuple(dataclasses.replace(c, packed=False) for c in split())))
    elif packable:  # packed activation vectors in float16 arithmetic against the float32 path
        other = not chosen[0].packed
        first.append(("split packed" if other else "split float32",
                      tuple(dataclasses.replace(c, packed=other) for c in chosen)))
    base = chosen if chosen[0].split_k is not None else split()
    if packable:  # the packed path in one call per group against one per block_k step (the default)
        first.append(("split packed per group",
                      tuple(dataclasses.replace(c, packed=True, block_steps=False) for c in base)))
    if chosen_only:
        return [("choose_config", chosen)], []
    if forms:  # one launch (work items by ticket) or apart, preload or not, against the pick
        names = {(False, False): "split apart", (False, True): "split apart preload",
                 (True, False): "split one launch", (True, True): "split one launch preload"}
        preload = hasattr(base[0], "preload")  # (an older package, timed side by side: no preload)
        picked = (base[0].one_launch, preload and base[0].preload)
        return [("choose_config", chosen)] + [
            (name, tuple(dataclasses.replace(c, one_launch=one, **({"preload": pre} if preload else {}))
                         for c in base))
            for (one, pre), name in names.items() if (one, pre) != picked and (preload or not pre)] + [
            (f"split {n} blocks/SM", split(blocks_per_sm=n)) for n in blocks], []
    if pdl_supported(torch.device("cuda")):  # programmatic dependent launch, against the default's setting
        other = not base[0].pdl
        first.append(("split pdl" if other else "split no pdl", tuple(dataclasses.replace(c, pdl=other) for c in base)))
    second = [("split n32", split(block_n=32)), ("split n128", split(block_n=128)),
              ("split w8", split(num_warps=8)), ("split 3 blocks/SM", split(blocks_per_sm=3)),
              ("split 12 blocks/SM", split(blocks_per_sm=12)), ("split stages 1", split(num_stages=1)),
              ("split k x2", split(k_scale=2)), ("split k /2", split(k_scale=0.5))]
    if packable:  # packed: more rows per thread share each activation pair load
        second = [("split n256", split(block_n=256)), ("split n512", split(block_n=512)),
                  ("split w2", split(num_warps=2))] + second
    if plan.bits == 4:  # int4's default caps registers at 128 (4 blocks per SM instead of 3): the uncapped one
        def capped(cap: int | None, **knobs):
            return tuple(dataclasses.replace(c, max_registers=cap) for c in split(**knobs))

        second = [("split 96 registers", capped(96)), ("split 96 registers, 5 blocks/SM", capped(96, blocks_per_sm=5)),
                  ("split no register cap", capped(None)), ("split 4 blocks/SM", split(blocks_per_sm=4)),
                  ("split 8 blocks/SM", split(blocks_per_sm=8))] + second
    if gemv:
        best_tile = LaunchConfig(block_n=16, block_k=256, num_warps=2, num_stages=3)  # Qwen3 int4's best
        second.append(("tiled n16 k256 w2", (best_tile, best_tile)))
    return first, second


def describe(configs: tuple, plan) -> str:
    """Both launches' tiles in one short string: row block, K step and, for split-K, the K slices
    each launch really uses (gate_up/down)."""
    from dymoe.quant.kernels.triton_experts import k_slices

    gu, d = configs
    if gu.split_k is None:
        return f"tiled n{gu.block_n}/{d.block_n} k{gu.block_k}/{d.block_k} w{gu.num_warps}"
    slices = (k_slices(plan, plan.gate.padded_cols, gu)[0], k_slices(plan, plan.down.padded_cols, d)[0])
    return (f"split n{gu.block_n}/{d.block_n} k{gu.block_k}/{d.block_k} w{gu.num_warps} s{gu.num_stages} "
            f"slices {slices[0]}/{slices[1]}")


def check_variant(pool, offsets, plan, x, combine, ws, configs, ref) -> dict:
    """One step with NaN-poisoned scratch against the reference: relative error, result finite,
    counters left at zero."""
    from dymoe.quant.kernels.triton_experts import launch_decode

    for scratch in ws.scratch():
        scratch.fill_(float("nan"))
    out = launch_decode(pool, offsets, plan, x, combine, ws, *configs)
    torch.cuda.synchronize()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    finite = bool(out.isfinite().all())
    reset = not (bool(ws.counters.any()) or bool(ws.gate_up_counters.any()) or bool(ws.step_counters.any()))
    return {"rel_err": rel, "finite": finite, "counters_reset": reset, "ok": finite and reset and rel < MAX_REL_ERR}


def run_variant(case, name: str, configs: tuple, copy_gbps: float) -> dict:
    from dymoe.quant.kernels.triton_experts import launch_decode

    model, fmt, layout, pool, offsets, combine, x, ws, plan, ref, nbytes = case
    row = {"model": model, "format": fmt, "variant": name, "config": describe(configs, plan),
           "configs": [c.__dict__ for c in configs]}
    try:
        row.update(check_variant(pool, offsets, plan, x, combine, ws, configs, ref))
        ms = bench_steps(lambda: launch_decode(pool, offsets, plan, x, combine, ws, *configs))
        big, per_step = cold_steps(pool, offsets, nbytes)
        cold = bench_steps(lambda o: launch_decode(big, o, plan, x, combine, ws, *configs), args=per_step)
        row.update(us=ms * 1e3, fraction_of_copy=nbytes / ms / 1e6 / copy_gbps, cold_us=cold * 1e3,
                   cold_fraction_of_copy=nbytes / cold / 1e6 / copy_gbps)
        print(f"variant {model:17s} {fmt:9s} {name:20s} {row['config']:48s} {row['us']:8.1f} us "
              f"{row['fraction_of_copy']:5.0%} of copy, cold {row['cold_us']:6.1f} us "
              f"{row['cold_fraction_of_copy']:4.0%}  {'ok' if row['ok'] else '!! WRONG'} "
              f"(rel {row['rel_err']:.1e}{'' if row['finite'] else ', NaN'}"
              f"{'' if row['counters_reset'] else ', counters not reset'})", flush=True)
    except Exception as exc:  # a compile error in one candidate must not hide the others
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000], trace=traceback.format_exc()[-3000:])
        print(f"!! FAILED variant {model} {fmt} {name} ({row['config']}): {row['error'][:400]}", flush=True)
    return row


def variant_case(model: str, precision: str, group: int, device):
    hidden, inter, k = MODELS[model]
    layout, pool, _, offsets, combine, x, ws, _ = decode_case(model, precision, group, device)
    ref = reference_decode(pool, offsets, layout, x.float(), combine)
    return (model, fmt_name(precision, group), layout, pool, offsets, combine, x, ws, kernel_plan(layout), ref,
            k * stored_bytes(layout))


def variants(device, copy_gbps: float, deadline: float, models, formats, forms: bool = False,
             blocks: tuple = (), chosen_only: bool = False) -> list[dict]:
    """The one-token decode step of every model shape and format under the old tiled kernels,
    choose_config's pick and split-K variations: correctness and % of copy bandwidth. Two passes
    (old and pick first for every shape, then the variations) so that the time budget cuts the
    variations, not the comparison that matters: the first pass stops only past 1.5x the budget
    (slow first compiles; a second run finds them in Triton's cache)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    start = time.time()
    rows = []
    for first_pass in (True,) if forms or chosen_only else (True, False):  # (forms: no second pass)
        pass_deadline = start + 1.5 * (deadline - start) if first_pass else deadline
        for model in models:
            for precision, group in formats:
                if time.time() > pass_deadline:
                    rows.append({"model": model, "format": fmt_name(precision, group), "first_pass": first_pass,
                                 "skipped": "time budget"})
                    print(f"variant {model} {fmt_name(precision, group)}: skipped (time budget)", flush=True)
                    continue
                try:
                    case = variant_case(model, precision, group, device)
                    plan, k = case[8], MODELS[model][2]
                    first, second = variant_candidates(plan, k, sms, forms, blocks, chosen_only)
                except Exception as exc:
                    rows.append({"model": model, "format": fmt_name(precision, group), "ok": False,
                                 "error": f"{type(exc).__name__}: {exc}"[:2000]})
                    print(f"!! FAILED variant setup {model} {fmt_name(precision, group)}: {exc!r}", flush=True)
                    continue
                for name, configs in first if first_pass else second:
                    if not first_pass and time.time() > deadline:
                        break
                    rows.append(run_variant(case, name, configs, copy_gbps))
                del case
                torch.cuda.empty_cache()
    return rows


def variants_table(rows: list[dict], models, formats) -> str:
    """Per model and format: % of copy of the old tiled path, choose_config's pick and the best
    candidate, and any failure."""
    lines = ["one-token decode step, top-k experts, CUDA graph of 20 steps: % of device copy bandwidth",
             f"{'model':17s} {'format':9s} {'old':>5s} {'chosen':>6s} {'best':>5s}  best variant / chosen config"]
    for model in models:
        for p, g in formats:
            fmt = fmt_name(p, g)
            mine = [r for r in rows if r.get("model") == model and r.get("format") == fmt and "us" in r]
            if not mine:
                lines.append(f"{model:17s} {fmt:9s} no result")
                continue
            by = {r["variant"]: r for r in mine}
            good = [r for r in mine if r.get("ok")]
            best = max(good, key=lambda r: r["fraction_of_copy"]) if good else None

            def pct(r):
                return f"{r['fraction_of_copy']:.0%}" if r else "-"

            chosen = by.get("choose_config")
            lines.append(f"{model:17s} {fmt:9s} {pct(by.get('tiled (old default)')):>5s} {pct(chosen):>6s} "
                         f"{pct(best):>5s}  {best['variant'] + ': ' + best['config'] if best else '-'}"
                         f"  / {chosen['config'] if chosen else '-'}")
    bad = [r for r in rows if r.get("ok") is False]
    lines.append(f"\n{len(bad)} candidate(s) failed or wrong" + (":" if bad else ""))
    for r in bad:
        lines.append(f"  !! {r.get('model')} {r.get('format')} {r.get('variant', 'setup')}: "
                     f"{r.get('error', '') or 'rel %.1e finite %s counters reset %s' % (r.get('rel_err', -1), r.get('finite'), r.get('counters_reset'))}"[:300])
    return "\n".join(lines)


# ---- report -------------------------------------------------------------------------------------


def table(result: dict) -> str:
    copy, floor = result["copy_GBps"], result["launch_floor"]
    lines = [f"device: {result['env']['device']}   d2d copy: {copy:.0f} GB/s   empty Triton launch: "
             f"{floor['empty_launch_us']:.1f} us eager (two: {floor['two_launches_us']:.1f} us), "
             f"{floor['empty_graph_us']:.1f} us from a graph",
             f"correctness: {result['checks_ok']}/{result['checks_run']} ok (rel err < {MAX_REL_ERR}, "
             f"max {result['max_rel_err']:.2e}), {result['checks_skipped']} skipped",
             "",
             "decode step, 1 token, top-k experts: % of copy bandwidth, eager / CUDA graph / CUDA graph cold",
             f"{'model':17s} " + " ".join(f"{fmt_name(p, g):>12s}" for p, g in FORMATS)]
    for model in MODELS:
        cells = []
        for p, g in FORMATS:
            r = next((r for r in result["bandwidth"] if r.get("model") == model and r["format"] == fmt_name(p, g)), {})
            cells.append(f"{r['fraction_of_copy']:.0%}/{r['graph_fraction_of_copy']:.0%}/"
                         f"{r['cold_fraction_of_copy']:.0%}" if "GBps" in r else "err")
        lines.append(f"{model:17s} " + " ".join(f"{c:>12s}" for c in cells))
    lines += ["", "one layer step, Qwen3-30B-A3B shape, 8 experts, 1 token (us; floor = bytes / copy bandwidth;",
              "mixes: experts x count per precision):",
              f"{'format':20s} {'floor':>6s} {'graph':>7s} {'triton':>7s} {'torch':>9s} {'speedup':>8s} {'int4pack':>9s}"]
    for r in result["layer_step"]:
        if "error" in r:
            lines.append(f"{r['format']:20s} error: {r['error'][:80]}")
            continue
        if "torch_us" not in r:  # a mixed step (mixed_layer_steps): no torch column
            lines.append(f"{r['format']:20s} {r['floor_us']:6.1f} {r['graph_us']:7.1f} {r['triton_us']:7.1f}")
            continue
        i4 = r.get("int4pack_us")
        lines.append(f"{r['format']:20s} {r['floor_us']:6.1f} {r['graph_us']:7.1f} {r['triton_us']:7.1f} "
                     f"{r['torch_us']:9.1f} {r['speedup']:7.1f}x {(f'{i4:9.1f}' if i4 else '-'):>9s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for kernels.json")
    parser.add_argument("--quick", action="store_true", help="correctness at 1 token only")
    parser.add_argument("--sweep", action="store_true", help="also time a few tile configurations")
    parser.add_argument("--variants", action="store_true",
                        help="only the one-token step under the old tiled kernels, choose_config's pick and "
                             "split-K variations: correctness and %% of copy bandwidth (writes variants.json)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="--variants: these model shapes only")
    parser.add_argument("--formats", nargs="+", help="--variants: these formats only, e.g. int4/g128 int8")
    parser.add_argument("--forms", action="store_true",
                        help="--variants: only choose_config's step against the same step's other launch forms: "
                             "in one launch or apart (LaunchConfig.one_launch), with and without each program's "
                             "first weights loaded before it waits (LaunchConfig.preload)")
    parser.add_argument("--chosen", action="store_true",
                        help="--variants: only choose_config's step (hot and cold), every shape and format")
    parser.add_argument("--blocks-per-sm", type=int, nargs="+", default=[], metavar="N",
                        help="--forms: also split-K's defaults sized for N blocks per SM (split_config's "
                             "blocks_per_sm), for each N")
    parser.add_argument("--budget-s", type=float, help="skip remaining checks/sweeps/variants after this "
                                                       "(default 200 s, 240 s with --variants)")
    args = parser.parse_args(argv)
    if (args.forms or args.chosen or args.blocks_per_sm) and not args.variants:
        parser.error("--forms, --chosen and --blocks-per-sm select --variants candidates: add --variants")
    if args.forms and args.chosen:
        parser.error("--forms and --chosen are two candidate sets: give one")
    if args.blocks_per_sm and not args.forms:
        parser.error("--blocks-per-sm adds --forms candidates: add --forms")
    if not torch.cuda.is_available():
        print("benchmarks/expert_kernels.py needs a CUDA GPU and Triton (pip install -e .[gpu])")
        return 2
    import triton

    start = time.time()
    device = torch.device("cuda")
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "argv": sys.argv}
    if args.variants:
        return main_variants(args, env, device, start)
    args.budget_s = args.budget_s or 200.0
    checks = correctness(device, args.quick, start + args.budget_s * 0.55)
    t_checks = time.time() - start
    copy_gbps = copy_bandwidth(device)
    bw = bandwidth(device, copy_gbps)
    steps = layer_step(device, copy_gbps)
    floor = launch_floor(device)
    swept = sweep(device, start + args.budget_s) if args.sweep else []
    run = [c for c in checks if "skipped" not in c]
    result = {"env": env, "copy_GBps": copy_gbps, "checks": checks, "checks_run": len(run),
              "checks_ok": sum(bool(c.get("ok")) for c in run), "checks_skipped": len(checks) - len(run),
              "max_rel_err": max((c.get("rel_err", 0.0) for c in run), default=0.0),
              "bandwidth": bw, "layer_step": steps, "launch_floor": floor, "sweep": swept,
              "seconds": {"checks": t_checks, "total": time.time() - start}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(result, indent=1, default=str))
    print()
    print(table(result))
    print(f"\n{time.time() - start:.0f} s; wrote {args.out / 'kernels.json'}")
    return 0 if result["checks_ok"] == result["checks_run"] else 1


def main_variants(args, env: dict, device, start: float) -> int:
    """--variants: copy bandwidth, then :func:`variants`; exit 1 if any candidate failed or was wrong."""
    models = args.models or VARIANT_MODELS
    formats = VARIANT_FORMATS
    if args.formats:
        formats = [f for f in VARIANT_FORMATS if fmt_name(*f) in args.formats]
        if len(formats) != len(args.formats):
            print(f"--formats: choose from {', '.join(fmt_name(*f) for f in VARIANT_FORMATS)}")
            return 2
    copy_gbps = copy_bandwidth(device)
    print(f"d2d copy: {copy_gbps:.0f} GB/s", flush=True)
    rows = variants(device, copy_gbps, start + (args.budget_s or 240.0), models, formats, args.forms,
                    tuple(args.blocks_per_sm), args.chosen)
    result = {"env": env, "copy_GBps": copy_gbps, "graph_steps": GRAPH_STEPS, "variants": rows,
              "seconds": time.time() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "variants.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"\ndevice: {env['device']}   triton {env['triton']}   d2d copy: {copy_gbps:.0f} GB/s")
    print(variants_table(rows, models, formats))
    print(f"\n{time.time() - start:.0f} s; wrote {args.out / 'variants.json'}")
    return 1 if any(r.get("ok") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
