"""How fast the GPU reads pinned host memory over the link: the copy engine against kernels that
read it in place (what the mapped decode's expert kernels do with a missed expert, and what a fill
launch copying missed experts into slots would do).

    python benchmarks/host_read.py --out results/host_read      # CUDA + Triton, < 1 minute

For each size (one int4 Qwen3-30B-A3B expert is ~2.5 MB, a bf16 one 9.4 MB), median of 20 timed
runs, GB/s:

- ``memcpy``: ``copy_`` from pinned host memory into device memory (the copy engine, what the
  transfer engine does);
- ``read``: one Triton launch in which each program reads 16 KB of the host buffer in place (through
  its offset from a device buffer, as the mapped decode's table holds it) and writes one word;
- ``read, N programs``: the same bytes read by only N programs (a missed expert's share of a decode
  launch's programs: each reads many 16 KB pieces in turn);
- ``fill``: a Triton launch copying the host buffer into device memory, 16 KB per program.
"""

import argparse
import json
from pathlib import Path

import torch

SIZES_MB = (2.5, 10, 40)
WORDS = 4096  # int32 per program piece: 16 KB
FEW = (48, 132)  # programs in the "few programs" rows


def kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def read(base, offset, out, n_words, pieces, WORDS: tl.constexpr):
        acc = tl.zeros((WORDS,), dtype=tl.int32)
        for piece in range(tl.program_id(0), pieces, tl.num_programs(0)):
            offs = piece * WORDS + tl.arange(0, WORDS)
            acc += tl.load(base + offset + offs, mask=offs < n_words, other=0)
        tl.store(out + tl.program_id(0), tl.sum(acc, axis=0))

    @triton.jit
    def fill(base, offset, dst, n_words, WORDS: tl.constexpr):
        offs = tl.program_id(0) * WORDS + tl.arange(0, WORDS)
        tl.store(dst + offs, tl.load(base + offset + offs, mask=offs < n_words), mask=offs < n_words)

    return read, fill, triton.cdiv


def timed(fn, runs: int = 20) -> float:
    """Median seconds of ``fn`` over ``runs`` runs, CUDA events around each."""
    fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for host_read.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/host_read.py needs a CUDA GPU and Triton (pip install -e .[gpu])")
        return 2
    read, fill, cdiv = kernels()
    base = torch.zeros(64, dtype=torch.int32, device="cuda")
    rows, ok = [], True
    for mb in SIZES_MB:
        nbytes = int(mb * 2**20) // 16 * 16
        host = torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32).pin_memory()
        offset = (host.data_ptr() - base.data_ptr()) // 4
        dev = torch.empty_like(host, device="cuda")
        pieces = cdiv(host.numel(), WORDS)
        row = {"MB": mb, "memcpy": nbytes / timed(lambda: dev.copy_(host, non_blocking=True)) / 1e9}
        for programs in (pieces, *FEW):
            out = torch.zeros(programs, dtype=torch.int32, device="cuda")
            launch = lambda: read[(programs,)](base, offset, out, host.numel(), pieces, WORDS=WORDS, num_warps=4)
            row["read" if programs == pieces else f"read, {programs} programs"] = nbytes / timed(launch) / 1e9
            ok = ok and int(out.sum(dtype=torch.int64).remainder(1 << 32)) == int(
                host.sum(dtype=torch.int64).remainder(1 << 32))
        dev.zero_()
        row["fill"] = nbytes / timed(lambda: fill[(pieces,)](base, offset, dev, host.numel(), WORDS=WORDS,
                                                              num_warps=4)) / 1e9
        ok = ok and bool(torch.equal(dev.cpu(), host))
        rows.append(row)
    result = {"device": torch.cuda.get_device_name(), "checks_ok": ok, "GBps": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_read.json").write_text(json.dumps(result, indent=1))
    columns = list(rows[0])[1:]
    print(f"device: {result['device']}   sums and fill correct: {ok}")
    print(f"{'MB':>6}" + "".join(f"{c:>20}" for c in columns))
    for row in rows:
        print(f"{row['MB']:>6}" + "".join(f"{row[c]:>20.1f}" for c in columns))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
