"""One-token expert decode on the CPU, the path a CPU-only run takes (no Triton, no graphs).

    python benchmarks/cpu_decode.py [--threads 2] [--reps 7]

1. bf16 experts: the gathered decode (copy the k experts' weights, two batched matmuls) against
   the looped one (a matrix-vector product per expert on its weights in place), for expert sizes
   from tiny to Mixtral's: where ``resident.LOOPED_MIN_WEIGHTS`` should sit.
2. The reference dequantize-then-matmul (``expert_decode(backend="torch")``, what low-bit presets
   run on the CPU) of one Qwen3-30B-A3B layer step (8 experts) per format.

Medians of ``--reps`` calls after two warm-ups, milliseconds; a table last.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dymoe.checkpoint.blob import blob_layout  # noqa: E402
from dymoe.quant.formats import parse_format  # noqa: E402
from dymoe.quant.kernels import decode_routing, expert_decode  # noqa: E402
from dymoe.quant.kernels.reference import random_pool  # noqa: E402
from dymoe.runtime.resident import LOOPED_MIN_WEIGHTS, gathered_decode, looped_decode  # noqa: E402

SIZES = ((64, 64, 32, 8), (64, 256, 128, 8), (64, 512, 256, 8), (64, 1024, 512, 8), (128, 2048, 768, 8),
         (8, 4096, 14336, 2))  # (experts, hidden, intermediate, top-k); the last two: Qwen3-30B-A3B, Mixtral
FORMATS = (("bf16", 128), ("int8", 128), ("int4", 128), ("int3", 128), ("int2", 128))


def median_ms(fn, reps: int) -> float:
    fn(), fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as CI's machine)")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads",
             "", f"bf16 decode, one token (looped from {LOOPED_MIN_WEIGHTS} weights per projection):",
             f"{'experts x H x I, k':24s} {'gathered':>9s} {'looped':>9s}"]
    for e, h, i, k in SIZES:
        g = torch.Generator().manual_seed(0)
        gate_up = (torch.randn(e, 2 * i, h, generator=g) * 0.02).bfloat16()
        down = (torch.randn(e, h, i, generator=g) * 0.02).bfloat16()
        x = torch.randn(1, h, generator=g).bfloat16()
        ids = torch.randperm(e, generator=g)[:k]
        w = torch.softmax(torch.randn(k, generator=g), 0).bfloat16()
        row = [median_ms(lambda f=f: f(x, ids, w, gate_up, down), args.reps) for f in (gathered_decode, looped_decode)]
        lines.append(f"{f'{e} x {h} x {i}, {k}':24s} {row[0]:9.2f} {row[1]:9.2f}")
        print(lines[-1], flush=True)
    lines += ["", "reference dequantize-then-matmul, Qwen3-30B-A3B layer step (8 experts, 1 token):"]
    for precision, group in FORMATS:
        layout = blob_layout(parse_format(precision, group), 2048, 768)
        pool, table = random_pool(layout, 8, seed=0)
        offsets, combine = decode_routing(table, torch.arange(8)[None], torch.full((1, 8), 0.125))
        x = torch.randn(1, 2048).bfloat16()
        ms = median_ms(lambda: expert_decode(pool, offsets, layout, x, combine, backend="torch"), args.reps)
        lines.append(f"{precision}/g{group}: {ms:8.1f} ms")
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
