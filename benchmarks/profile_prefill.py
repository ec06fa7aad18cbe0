"""Where a prefill's time goes, per preset: wall time, what it moved, GPU kernel time, host time.

``python benchmarks/profile_prefill.py --out $OUT`` builds the suite's model (synthetic
Qwen3-30B-A3B shape, 8 layers, skewed routing, experts in pinned host RAM), and for each preset at
the budget: one 32-token prompt and 32 decode steps (the suite's warm cache), then ``--repeats``
prefills of ``--prompt`` tokens (different prompts), each timed between device synchronisations,
with its misses and host-to-device bytes; then one more prefill under ``torch.profiler`` (GPU
kernel time by kernel, total) and one under cProfile (host time by function). The table printed
last is the one to compare across code versions (run it twice in one device call: the GPU differs
between calls). Details: ``OUT/profile_prefill.txt``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path

import torch

from dymoe.bench.harness import sync
from dymoe.bench.routing import parse_routing
from dymoe.bench.synthetic import build_dense, build_expert_layer, synthetic_config, tiny_config
from dymoe.checkpoint.memory_store import MemoryStore
from dymoe.runtime.presets import preset_precisions, preset_provider


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default="on-demand,lru,static-int4,fate")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--routing", default="skewed", type=parse_routing)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (a CPU smoke run)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--label", default="", help="a name for this code version in the table")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    policies = args.policies.split(",")
    config = synthetic_config("qwen3-30b-a3b", layers=args.layers)
    config = tiny_config(config) if args.tiny else config
    context = args.prompt + 64
    model = build_dense(config, device, torch.bfloat16, context_len=context, routing=args.routing)
    experts = {l: build_expert_layer(config, l, device, torch.bfloat16) for l in config.moe_layers}
    precisions = tuple(dict.fromkeys(p for policy in policies for p in ("bf16", *preset_precisions(policy))))
    store = MemoryStore.from_experts(experts, precisions=precisions, group_size=128, pin=device.type == "cuda")
    budget = int(args.budget * store.nbytes("bf16"))
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator).to(device)
               for n in [32] + [args.prompt] * (args.repeats + 2)]
    args.out.mkdir(parents=True, exist_ok=True)
    details = io.StringIO()
    rows = []
    for policy in policies:
        provider = preset_provider(store, policy, budget, config.num_experts_per_tok, device, torch.bfloat16)
        model.attach_experts(provider)
        cache = model.new_cache(1)
        token = model(prompts[0].view(1, -1), 0, cache, last_only=True)[0].argmax()
        for i in range(32):
            token = model.decode(token, 32 + i, cache).argmax()
        times, moved, misses = [], [], []
        for prompt in prompts[1 : 1 + args.repeats]:
            provider.metrics.reset()
            sync(device)
            started = time.perf_counter()
            model(prompt.view(1, -1), 0, model.new_cache(1), last_only=True)[0].argmax()
            sync(device)
            times.append(time.perf_counter() - started)
            total = provider.metrics.total()
            moved.append(total.h2d_bytes)
            misses.append(total.misses)
        gpu_ms, kernels = _gpu_profile(model, prompts[-2], device, args.top)
        host_text = _host_profile(model, prompts[-1], device, args.top)
        rows.append((policy, statistics.median(times) * 1e3, min(times) * 1e3, statistics.mean(moved) / 2**20,
                     statistics.mean(misses), gpu_ms))
        details.write(f"== {args.label} {policy}: prefill ms {[round(t * 1e3, 1) for t in times]}, "
                      f"H2D MiB {[round(m / 2**20) for m in moved]}, misses {misses}\n")
        details.write(f"GPU kernels (total {gpu_ms:.1f} ms):\n{kernels}\nhost (cProfile):\n{host_text}\n")
        del provider
        model.attach_experts(None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (args.out / f"profile_prefill{'_' + args.label if args.label else ''}.txt").write_text(details.getvalue())
    print(details.getvalue())
    print(f"prefill of {args.prompt} tokens, synthetic:qwen3-30b-a3b x {args.layers} layers, {args.budget:.0%} budget, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} {args.label}")
    print(f"{'preset':14} {'median ms':>10} {'min ms':>8} {'H2D MiB':>9} {'misses':>7} {'GPU ms':>8}")
    for policy, median, best, mib, miss, gpu in rows:
        print(f"{policy:14} {median:10.1f} {best:8.1f} {mib:9.0f} {miss:7.0f} {gpu:8.1f}")


def _gpu_profile(model, prompt, device, top: int) -> tuple[float, str]:
    """GPU kernel time of one prefill: (total ms, a table of the kernels with the most time)."""
    if device.type != "cuda":
        return 0.0, "(no GPU)"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(prompt.view(1, -1), 0, model.new_cache(1), last_only=True)
        sync(device)
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events) / 1e3
    table = events.table(sort_by="device_time_total", row_limit=top, max_name_column_width=60)
    return total, table


def _host_profile(model, prompt, device, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    model(prompt.view(1, -1), 0, model.new_cache(1), last_only=True)
    sync(device)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    return stream.getvalue()


if __name__ == "__main__":
    main()
