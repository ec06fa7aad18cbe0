"""Where the host time of an offloading preset goes: cProfile over decode steps and one prefill.

``python benchmarks/profile_host.py --policy static-int4 --out $OUT`` builds the synthetic
Qwen3-30B-A3B shape (8 layers, skewed routing, weights in pinned host RAM), warms the preset up with
one prompt, then profiles ``--steps`` decode steps (CUDA graphs on) and one ``--prompt``-token
prefill, synchronising the device around each, and prints the functions with the most own time.
Decode with CUDA graphs leaves the host with the runtime's bookkeeping, so this is the profile that
says what to trim. Before it, an unprofiled pass splits a graph decode step's host time per MoE
layer: waiting for the GPU to reach the layer's routing, the runtime's bookkeeping between two
graph replays (``decode_prepare`` and ``decode_finish``: cProfile inflates these calls several times
over), and the rest (the replays' launch calls, the Python around them). Details:
``OUT/profile_host_<policy>.txt``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
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
    parser.add_argument("--policy", default="static-int4")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--routing", default="skewed", type=parse_routing)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--top", type=int, default=22)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = synthetic_config("qwen3-30b-a3b", layers=args.layers)
    config = tiny_config(config) if args.tiny else config
    context = 2 * args.prompt + args.steps + 8
    model = build_dense(config, device, torch.bfloat16, context_len=context, routing=args.routing)
    experts = {l: build_expert_layer(config, l, device, torch.bfloat16) for l in config.moe_layers}
    precisions = tuple(dict.fromkeys(("bf16", *preset_precisions(args.policy))))
    store = MemoryStore.from_experts(experts, precisions=precisions, group_size=128, pin=device.type == "cuda")
    budget = int(args.budget * store.nbytes("bf16"))
    model.attach_experts(preset_provider(store, args.policy, budget, config.num_experts_per_tok, device,
                                         torch.bfloat16))
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    cache = model.new_cache(1)
    token = model(prompt.view(1, -1), 0, cache, last_only=True)[0].argmax()  # warm-up: cache, kernels, graphs
    for i in range(4):
        token = model.decode(token, args.prompt + i, cache).argmax()
    args.out.mkdir(parents=True, exist_ok=True)
    report = io.StringIO()
    graphs = model._graphs.get(cache)
    if graphs is not None and not graphs.whole:
        phases = host_phases(graphs, lambda i, t: model.decode(t, args.prompt + 4 + i, cache).argmax(), token,
                             args.steps)
        print(f"== {args.policy} decode, unprofiled, host us per MoE layer ({len(graphs.moe_at)} layers, "
              f"{args.steps} steps):\n{phases}")
        report.write(f"== decode host phases, us per MoE layer\n{phases}\n")
        token = model.decode(token, args.prompt + 4 + args.steps, cache).argmax()
        args.prompt += args.steps + 1  # the profiled steps go on from here
    for phase in ("decode", "prefill"):
        profiler = cProfile.Profile()
        sync(device)
        started = time.perf_counter()
        profiler.enable()
        if phase == "decode":
            for i in range(args.steps):
                token = model.decode(token, args.prompt + 4 + i, cache).argmax()
        else:
            model(prompt.flip(0).view(1, -1), 0, cache, last_only=True)
        sync(device)
        profiler.disable()
        wall = time.perf_counter() - started
        per = wall / (args.steps if phase == "decode" else 1)
        print(f"== {args.policy} {phase}: {wall * 1e3:.1f} ms wall ({per * 1e3:.2f} ms per "
              f"{'step' if phase == 'decode' else 'prefill'}), own time by function:")
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(args.top)
        text = stream.getvalue()
        report.write(f"== {phase}\n{text}\n")
        lines = text.splitlines()
        head = next(i for i, line in enumerate(lines) if line.strip().startswith("ncalls"))
        print("\n".join(lines[head : head + args.top + 1]))
    (args.out / f"profile_host_{args.policy}.txt").write_text(report.getvalue())


def host_phases(graphs, step, token, steps: int) -> str:
    """Host time of ``steps`` graph decode steps of ``graphs`` (a DecodeGraphs), per MoE layer, as a
    small table: a device synchronisation put before each bookkeeping call between two replays takes
    the wait for the GPU out of the runtime's own routing read."""
    between, times = graphs._between, {"wait for the GPU": 0.0, "between replays": 0.0}

    def timed(s, out):
        started = time.perf_counter()
        torch.cuda.current_stream().synchronize()
        ready = time.perf_counter()
        between(s, out)
        times["wait for the GPU"] += ready - started
        times["between replays"] += time.perf_counter() - ready

    graphs._between = timed
    try:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for i in range(steps):
            token = step(i, token)
        torch.cuda.synchronize()
        total = time.perf_counter() - started
    finally:
        del graphs._between  # back to the class's method
    per = steps * len(graphs.moe_at) / 1e6
    rows = [*times.items(), ("replays and the rest", total - sum(times.values()))]
    lines = [f"  {name:<24} {seconds / per:8.1f}" for name, seconds in rows]
    return "\n".join(lines + [f"  {'step (synchronised)':<24} {total / steps * 1e6:8.1f} us"])


if __name__ == "__main__":
    main()
