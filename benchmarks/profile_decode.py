"""Where the time of one decode step goes: torch.profiler over a few steps of one preset.

``python benchmarks/profile_decode.py --policy resident --layers 8 --out $OUT`` builds the synthetic
Qwen3-30B-A3B shape like ``offload_decode.py`` and prints the top operators by device and by host
time, so a slow preset can be explained before it is optimised. ``--graphs`` profiles the decode
the runtime runs (``model.decode``: CUDA-graph replays) instead of eager forward calls, and prints
per step the wall time against the sum of the kernels' device time: a wall time well above that
sum is launch latency and gaps between small kernels, not slow kernels.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dymoe.bench.synthetic import build_dense, build_expert_layer, synthetic_config, tiny_config
from dymoe.checkpoint.memory_store import MemoryStore
from dymoe.runtime.offload import OffloadConfig, OffloadedExperts
from dymoe.runtime.presets import PRESETS
from dymoe.runtime.resident import ResidentExperts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="resident")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--graphs", action="store_true", help="profile model.decode (CUDA graphs), not eager calls")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = synthetic_config("qwen3-30b-a3b", layers=args.layers)
    config = tiny_config(config) if args.tiny else config
    model = build_dense(config, device, torch.bfloat16, context_len=256)
    experts = {l: build_expert_layer(config, l, device, torch.bfloat16) for l in config.moe_layers}
    if args.policy.startswith("resident"):
        provider = ResidentExperts(experts, gather_decode=args.policy == "resident")
    else:
        store = MemoryStore.from_experts(experts, precisions=(PRESETS[args.policy]["precision"],), pin=True)
        budget = int(args.budget * MemoryStore.from_experts({0: experts[0]}, pin=False).nbytes("bf16") * args.layers)
        provider = OffloadedExperts(store, OffloadConfig(budget_bytes=budget, **PRESETS[args.policy]),
                                    config.num_experts_per_tok, device, torch.bfloat16)
    model.attach_experts(provider)
    cache = model.new_cache(1)
    token = model(torch.arange(64, device=device).view(1, -1), 0, cache, last_only=True)[0].argmax()

    def step(position: int, token: torch.Tensor) -> torch.Tensor:
        if args.graphs:
            return model.decode(token.view(()), position, cache).argmax()
        return model(token.view(1, 1), position, cache, last_only=True)[0].argmax()

    for i in range(8):  # warm-up (and graph capture)
        token = step(64 + i, token)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for i in range(args.steps):
        token = step(72 + i, token)
    sync()
    wall_us = (time.perf_counter() - started) / args.steps * 1e6
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(args.steps):
            token = step(72 + args.steps + i, token)
        sync()
    args.out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(args.out / f"profile_{args.policy}.json"))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        device_us = sum(e.time_range.elapsed_us() for e in kernels) / args.steps
        print(f"{args.policy}, {args.layers} layers, {'graphs' if args.graphs else 'eager'}: wall {wall_us:.0f} us per "
              f"step (unprofiled), kernels {device_us:.0f} us of device time in {len(kernels) / args.steps:.0f} "
              f"launches per step")


if __name__ == "__main__":
    main()
