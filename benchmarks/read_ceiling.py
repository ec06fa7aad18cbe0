"""How close a kernel that only reads N bytes gets to the device copy bandwidth, per N: the ceiling
of a one-token decode step of that many bytes, which can do no better than read its weights once.

    python benchmarks/read_ceiling.py --out results/read_ceiling      # CUDA + Triton, < 1 minute

For each size it times, replayed from one CUDA graph of 20 back-to-back launches as
``benchmarks/expert_kernels.py`` times a decode step:

- ``read``: one Triton launch in which each program reads 16 KB (as a split-K decode item does) and
  writes one word, over the same buffer every launch (as the kernel benchmark re-reads one step's
  experts; a buffer under the L2 cache's size may be served partly from it);
- ``read, cold``: the same over buffers taken in turn from a set larger than the L2 cache;
- ``copy``: ``torch`` copying the buffer (bytes read plus written, as the copy bandwidth counts).

Each is a share of the copy bandwidth measured on 1 GiB (the figure the kernel benchmark divides by).
A decode step of N bytes that is a chain of several dependent launches sits below the ``read`` line
of its size.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from expert_kernels import bench_steps, copy_bandwidth  # benchmarks/expert_kernels.py: the same timers and copy figure

SIZES_MB = (4, 8, 12, 20, 40, 80, 160, 640)
STEPS = 20
WORDS = 4096  # int32 per program: 16 KB
COLD_BYTES = 512 << 20  # the rotating set, well past an H100's (50 MB) or H200's L2


def read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read(src, out, n_words, WORDS: tl.constexpr):
        offs = tl.program_id(0) * WORDS + tl.arange(0, WORDS)
        tl.store(out + tl.program_id(0), tl.sum(tl.load(src + offs, mask=offs < n_words, other=0), axis=0))

    return read, triton.cdiv


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for read_ceiling.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/read_ceiling.py needs a CUDA GPU and Triton (pip install -e .[gpu])")
        return 2
    read, cdiv = read_kernel()
    copy_gbps = copy_bandwidth(torch.device("cuda"))
    rows, ok = [], True
    for mb in SIZES_MB:
        nbytes = mb << 20
        bufs = [torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
                for _ in range(max(1, -(-COLD_BYTES // nbytes)))]
        programs = cdiv(nbytes // 4, WORDS)
        out = torch.empty(programs, dtype=torch.int32, device="cuda")
        launch = [lambda b=b: read[(programs,)](b, out, b.numel(), WORDS=WORDS, num_warps=4) for b in bufs]
        launch[0]()
        expected = bufs[0].view(-1, WORDS).sum(1, dtype=torch.int64).remainder(1 << 32)
        ok = ok and bool(torch.equal(out.to(torch.int64).remainder(1 << 32), expected))
        same = bench_steps(launch[0], STEPS)
        cold = bench_steps(lambda call: call(), args=[launch[i % len(launch)] for i in range(STEPS)])
        dst = torch.empty_like(bufs[0])
        copy = bench_steps(lambda src=bufs[0], dst=dst: dst.copy_(src), STEPS)
        row = {"MB": mb, "read_us": same * 1e3, "read_cold_us": cold * 1e3, "copy_us": copy * 1e3,
               "read_of_copy": nbytes / same / 1e6 / copy_gbps, "read_cold_of_copy": nbytes / cold / 1e6 / copy_gbps,
               "copy_of_copy": 2 * nbytes / copy / 1e6 / copy_gbps}
        rows.append(row)
        bufs.clear()
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "copy_GBps": copy_gbps, "sums_ok": ok, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "read_ceiling.json").write_text(json.dumps(result, indent=1))
    print(f"device: {result['device']}   d2d copy (1 GiB): {copy_gbps:.0f} GB/s   read sums correct: {ok}")
    print(f"{'MB':>5s} {'read us':>8s} {'% copy':>7s} {'cold us':>8s} {'% copy':>7s} {'copy us':>8s} {'% copy':>7s}")
    for r in rows:
        print(f"{r['MB']:5d} {r['read_us']:8.1f} {r['read_of_copy']:7.0%} {r['read_cold_us']:8.1f} "
              f"{r['read_cold_of_copy']:7.0%} {r['copy_us']:8.1f} {r['copy_of_copy']:7.0%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
