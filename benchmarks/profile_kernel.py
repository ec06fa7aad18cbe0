"""One decode step's kernels, run a few times, for a profiler to attach to (Nsight Compute).

``ncu --set full -k regex:split_kernel -c 4 -o OUT/int4 python benchmarks/profile_kernel.py --model
mixtral-8x7b --format int4/g128`` profiles the two split-K launches of two steps (the first step
compiles and warms up before the profiled ones). Without a profiler it prints the step's time, so
the same command line says what was profiled.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from expert_kernels import MODELS, decode_case  # noqa: E402  (benchmarks/expert_kernels.py)

from dymoe.quant.kernels import kernel_plan  # noqa: E402
from dymoe.quant.kernels.triton_experts import launch_decode  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mixtral-8x7b", choices=list(MODELS))
    parser.add_argument("--format", default="int4/g128", help="e.g. int4/g128, int8, bf16")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    precision, _, group = args.format.partition("/g")
    layout, pool, _, offsets, combine, x, workspace, _ = decode_case(args.model, precision, int(group or 0), "cuda")
    plan = kernel_plan(layout)
    launch_decode(pool, offsets, plan, x, combine, workspace)  # compile and warm up
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        launch_decode(pool, offsets, plan, x, combine, workspace)
    torch.cuda.synchronize()
    print(f"{args.model} {args.format}: {(time.perf_counter() - started) / args.steps * 1e6:.1f} us per step (eager)")


if __name__ == "__main__":
    main()
