"""One-token expert decode on the CPU, the path a CPU-only run takes (no Triton, no graphs).

    python benchmarks/cpu_decode.py [--threads 2] [--reps 7]

1. bf16 experts: the gathered decode (copy the k experts' weights, two batched matmuls) against
   the looped one (a matrix-vector product per expert on its weights in place), for expert sizes
   from tiny to Mixtral's: where ``resident.LOOPED_MIN_WEIGHTS`` should sit.
2. The reference dequantize-then-matmul (``expert_decode(backend="torch")``, what low-bit presets
   run on the CPU) of one Qwen3-30B-A3B layer step (8 experts) per format.
3. A lead, not a path dymoe takes yet: torch's own CPU int4 weight-only kernel
   (``aten._weight_int4pack_mm_for_cpu``, its weights in its own tiled layout, zero = min + 8 x
   scale) on one expert's gate_up projection, with bf16 and float32 activations, against the
   reference, and what converting our packed codes to its layout costs.

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
    lines += ["", *int4pack_lead(args.reps)]
    print("\n" + "\n".join(lines))


def int4pack_lead(reps: int) -> list[str]:
    """Section 3 of the module docstring: lines of the table."""
    from dymoe.quant.reference import dequantize, quantize, unpack_bits

    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return ["torch's CPU int4 kernel: not in this torch"]
    n, k, group = 1536, 2048, 128  # Qwen3-30B-A3B's gate_up of one expert
    q = quantize((torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16(),
                 parse_format("int4", group))

    def convert():
        codes = unpack_bits(q.payload.reshape(n, -1), 4, k).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scales, mins = q.scales.float(), q.mins.float()
        return packed, torch.stack([scales.T, (mins + 8 * scales).T], -1).contiguous()

    packed, scales_zeros = convert()
    x = torch.randn(1, k)
    reference = x @ dequantize(q, torch.float32).T
    lines = [f"torch's CPU int4 kernel, one {n} x {k} int4/g{group} projection, 1 token (a lead):"]
    for dtype in (torch.bfloat16, torch.float32):
        sz = scales_zeros.to(dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, group, sz)
        err = float((y.float() - reference).abs().max() / reference.abs().max())
        ms = median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, group, sz), reps)
        lines.append(f"  int4pack mm, {str(dtype)[6:]} activations: {ms:8.3f} ms (max rel err {err:.1e})")
    lines.append(f"  reference dequantize + matmul:        {median_ms(lambda: x @ dequantize(q, torch.float32).T, reps):8.3f} ms")
    lines.append(f"  convert our codes to its layout:      {median_ms(convert, reps):8.3f} ms")
    return lines


if __name__ == "__main__":
    main()
