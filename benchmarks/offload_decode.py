"""Offloaded decode on a synthetic Qwen3-30B-A3B: on-demand, lru, static-int4 and dynaexq at a 25% budget.

One command on the GPU machine: ``python benchmarks/offload_decode.py --out $OUT``.

What it does. Builds the synthetic Qwen3-30B-A3B shape (:mod:`dymoe.bench.synthetic`, random
weights) cut to ``--layers`` layers, encodes every expert as a bf16 and an int4 blob into pinned host
RAM (:class:`~dymoe.checkpoint.memory_store.MemoryStore`: the "store in host RAM" setting), and
gives each preset an expert budget of ``--budget`` (default 25%) of the bf16 expert bytes. For each
preset it runs a ``--prompt``-token prefill (TTFT) and ``--gen`` greedy decode steps, timing each
step between device synchronisations, and reads the runtime metrics of the decode phase: hit rate,
H2D bytes per token, stall time (compute stream waiting for copies, measured with CUDA events).
``resident`` (all experts on the GPU) is the reference: the other presets are fed its greedy tokens
(teacher forcing) and their next-token argmax is compared with its own at every step.

Overlap. For the ``lru`` preset it also records a torch.profiler trace of a cold-cache prefill and a
few decode steps (``OUT/trace_lru.json``, open in chrome://tracing or Perfetto) and computes from it
how much of the host-to-device copy time ran while a compute kernel was running on another stream.

Random weights route almost uniformly, so hit rates here are the worst case of a cache; the
routing of trained models is skewed (see the demo model's card): ``--routing skewed`` gives the
synthetic model a labelled stand-in for it (docs/routing.md). Per-token figures scale with the
number of layers: ``x 48 / layers`` gives the full model's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dymoe.bench.harness import DYNAEXQ_FOOTNOTE, pinned_h2d_bandwidth, sync
from dymoe.bench.routing import parse_routing
from dymoe.bench.synthetic import build_dense, build_expert_layer, synthetic_config, tiny_config
from dymoe.checkpoint.memory_store import MemoryStore
from dymoe.runtime.presets import HOTNESS_PRESETS, preset_precisions, preset_provider
from dymoe.runtime.resident import ResidentExperts

SHAPE = "qwen3-30b-a3b"
FULL_DEPTH = 48


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--budget", type=float, default=0.25, help="expert budget as a fraction of bf16 expert bytes")
    parser.add_argument("--policies", default="resident,resident-grouped,on-demand,lru,static-int4,dynaexq",
                        help="the first one is the reference the others are teacher-forced with")
    parser.add_argument("--trace-steps", type=int, default=6, help="decode steps in the lru profiler trace (0: none)")
    parser.add_argument("--eager", action="store_true", help="decode without CUDA graphs (the pre-graph path)")
    parser.add_argument("--tiny", action="store_true", help="toy widths (CPU smoke test)")
    parser.add_argument("--routing", default="uniform", type=parse_routing, metavar="uniform|skewed[:s=S,r=R,q=Q]",
                        help="how experts are chosen (dymoe bench --help; docs/routing.md); default uniform")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build(args, device):
    config = synthetic_config(SHAPE, layers=args.layers)
    if args.tiny:
        config = tiny_config(config)
    model = build_dense(config, device, torch.bfloat16, seed=args.seed, context_len=args.prompt + args.gen + 8,
                        routing=args.routing)
    experts = {l: build_expert_layer(config, l, device, torch.bfloat16, seed=args.seed) for l in config.moe_layers}
    started = time.perf_counter()
    offloading = [name for name in args.policies.split(",") if not name.startswith("resident")]
    needed = {p for name in offloading for p in preset_precisions(name)}
    precisions = ("bf16", "int4", *sorted(needed - {"bf16", "int4"}))
    store = MemoryStore.from_experts(experts, precisions=precisions, group_size=128, pin=True)
    encode_s = time.perf_counter() - started
    return config, model, experts, store, encode_s


def run_preset(model, provider, prompt, gen, device, forced: list[int] | None = None) -> dict:
    """Prefill, then ``gen`` decode steps. With ``forced`` (the reference's tokens) every step is fed
    the reference token (teacher forcing), so agreement is measured step by step and one near-tie
    flip on a random-weight model does not send the rest of the sequence elsewhere."""
    model.attach_experts(provider)
    cache = model.new_cache(1)
    offloaded = hasattr(provider, "stats")
    sync(device)
    started = time.perf_counter()
    logits = model(prompt.view(1, -1), 0, cache, last_only=True)[0]
    token = logits.argmax()
    sync(device)
    ttft = time.perf_counter() - started
    prefill_metrics = provider.stats()["total"] if offloaded else None
    if offloaded:
        provider.metrics.reset()
    tokens, steps = [int(token)], []
    for i in range(gen - 1):
        feed = torch.tensor(forced[i], device=device) if forced else token
        sync(device)
        t0 = time.perf_counter()
        logits = model.decode(feed, prompt.numel() + i, cache)
        token = logits.argmax()
        sync(device)
        steps.append(time.perf_counter() - t0)
        tokens.append(int(token))
    decode = provider.stats()["total"] if offloaded else None
    return {"ttft_s": ttft, "tpot_median_s": statistics.median(steps), "tpot_mean_s": statistics.fmean(steps),
            "decode_s": sum(steps), "step_s": steps, "tokens": tokens, "prefill_metrics": prefill_metrics,
            "decode_metrics": decode}


def _covered(a: float, b: float, spans: list[tuple[float, float]]) -> float:
    """Length of [a, b) covered by the union of ``spans``."""
    covered, end = 0.0, a
    for s, t in sorted((max(a, s), min(b, t)) for s, t in spans if s < b and t > a):
        s = max(s, end)
        if t > s:
            covered += t - s
            end = t
    return covered


def overlap_from_trace(trace_path: Path) -> dict:
    """How much host-to-device copying and kernel execution ran at the same time (other streams)."""
    events = json.loads(trace_path.read_text()).get("traceEvents", [])
    copies, kernels = [], []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        interval = (e["ts"], e["ts"] + e["dur"], e.get("tid"))
        if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", ""):
            copies.append(interval)
        elif e.get("cat") == "kernel":
            kernels.append(interval)
    copy_us = sum(b - a for a, b, _ in copies)
    kernel_us = sum(b - a for a, b, _ in kernels)
    copy_during_kernels = sum(_covered(a, b, [(ka, kb) for ka, kb, ks in kernels if ks != s]) for a, b, s in copies)
    kernels_during_copies = sum(_covered(a, b, [(ca, cb) for ca, cb, cs in copies if cs != s]) for a, b, s in kernels)
    return {"copies": len(copies), "copy_us": copy_us, "kernel_us": kernel_us,
            "copy_overlapped_us": copy_during_kernels, "kernel_overlapped_us": kernels_during_copies,
            "overlap_share": copy_during_kernels / copy_us if copy_us else 0.0,
            "kernel_overlap_share": kernels_during_copies / kernel_us if kernel_us else 0.0}


def trace_lru(model, provider, prompt, steps, device, out: Path) -> dict:
    """Profile a cold-cache prefill and ``steps`` decode steps of ``provider`` (a fresh one)."""
    from torch.profiler import ProfilerActivity, profile

    model.attach_experts(provider)
    cache = model.new_cache(1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        token = model(prompt.view(1, -1), 0, cache, last_only=True)[0].argmax()
        for i in range(steps):
            token = model(token.view(1, 1), prompt.numel() + i, cache, last_only=True)[0].argmax()
        sync(device)
    path = out / "trace_lru.json"
    prof.export_chrome_trace(str(path))
    return overlap_from_trace(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    out = args.out or Path("bench-out")
    out.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}
    print(" ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    bandwidth = pinned_h2d_bandwidth(device) or float("nan")
    config, model, experts, store, encode_s = build(args, device)
    model.cuda_graphs = not args.eager
    bf16_bytes = store.nbytes("bf16")
    budget = int(args.budget * bf16_bytes)
    print(f"{config.num_layers} layers x {config.num_experts} experts; bf16 experts {bf16_bytes / 2**30:.2f} GiB, "
          f"int4 {store.nbytes('int4') / 2**30:.2f} GiB; budget {budget / 2**30:.2f} GiB; "
          f"encoded in {encode_s:.1f} s; pinned H2D {bandwidth / 1e9:.1f} GB/s", flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=generator).to(device)
    results = {}
    run_preset(model, ResidentExperts(experts), prompt, 8, device)  # warm-up: kernels, cuBLAS, allocator
    forced = None
    for name in args.policies.split(","):
        if name == "resident":
            provider = ResidentExperts(experts)
        elif name == "resident-grouped":
            provider = ResidentExperts(experts, gather_decode=False)
        else:
            provider = preset_provider(store, name, budget, config.num_experts_per_tok, device, torch.bfloat16)
        print(f"running {name} ...", flush=True)
        results[name] = run_preset(model, provider, prompt, args.gen, device, forced)
        forced = forced or results[name]["tokens"]
        if name == "lru" and args.trace_steps:
            fresh = preset_provider(store, name, budget, config.num_experts_per_tok, device, torch.bfloat16)
            results[name]["overlap"] = trace_lru(model, fresh, prompt, args.trace_steps, device, out)
            del fresh
        del provider
    report = {"environment": env, "args": vars(args) | {"out": str(args.out), "routing": args.routing.spec},
              "routing": args.routing.label, "h2d_bytes_per_s": bandwidth,
              "budget_bytes": budget, "bf16_expert_bytes": bf16_bytes, "results": results}
    (out / "offload_decode.json").write_text(json.dumps(report, indent=1, default=str))
    print(table(report, config))
    return report


def table(report: dict, config) -> str:
    results = report["results"]
    reference = next(iter(results.values()))["tokens"]
    scale = FULL_DEPTH / config.num_layers
    lines = [
        f"\n{SHAPE} x {config.num_layers} layers, budget {report['budget_bytes'] / 2**30:.2f} GiB "
        f"({100 * report['budget_bytes'] / report['bf16_expert_bytes']:.0f}% of bf16 experts), "
        f"pinned H2D {report['h2d_bytes_per_s'] / 1e9:.1f} GB/s; TPOT@48L = TPOT x {scale:g}",
        f"routing: {report['routing']}",
        f"{'preset':<12} {'TTFT ms':>9} {'TPOT ms':>9} {'TPOT@48L':>9} {'hit %':>6} {'H2D MiB/tok':>12} "
        f"{'stall %':>8} {'top1 agree':>10}",
    ]
    for name, r in results.items():
        m = r["decode_metrics"]
        steps = len(r["tokens"]) - 1
        agree = (sum(a == b for a, b in zip(r["tokens"], reference)) / len(reference)) if reference else float("nan")
        hit = f"{100 * m['hit_rate']:.1f}" if m else "-"
        mib = f"{m['h2d_bytes'] / steps / 2**20:.1f}" if m else "0"
        stall = f"{100 * m['stall_seconds'] / r['decode_s']:.1f}" if m else "0"
        lines.append(f"{name:<12} {r['ttft_s'] * 1e3:>9.1f} {r['tpot_median_s'] * 1e3:>9.2f} "
                     f"{r['tpot_median_s'] * 1e3 * scale:>9.1f} {hit:>6} {mib:>12} {stall:>8} {agree:>10.3f}")
    if "overlap" in results.get("lru", {}):
        o = results["lru"]["overlap"]
        lines.append(f"lru trace (cold prefill + decode): {o['copies']} H2D copies took {o['copy_us'] / 1e3:.1f} ms, "
                     f"kernels {o['kernel_us'] / 1e3:.1f} ms; {100 * o['kernel_overlap_share']:.0f}% of kernel time ran "
                     f"during a copy, {100 * o['overlap_share']:.0f}% of copy time during a kernel")
    if any(name in HOTNESS_PRESETS for name in results):
        lines += DYNAEXQ_FOOTNOTE
    return "\n".join(lines)


if __name__ == "__main__":
    main()
