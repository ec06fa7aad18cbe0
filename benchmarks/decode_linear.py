"""One decode token through a layer's dense projections and router: ``linear_decode`` against cuBLAS.

``python benchmarks/decode_linear.py --out $OUT`` (GPU). For the dense projections of
Qwen3-30B-A3B, Mixtral-8x7B, OLMoE, DeepSeek-V2-Lite (latent attention, shared experts),
Qwen1.5-MoE-A2.7B (shared expert) and GPT-OSS-20B, one token (bf16):

- checks: ``linear_decode`` equals ``F.linear`` bit for bit on integer inputs (every float32 sum
  exact whatever its order) and lies within bf16 rounding of a float64 reference on random ones;
  each router's ``route_decode`` picks the experts ``route`` picks on F.linear's logits, with the
  same weights bit for bit (integer inputs);
- times, per call, replayed from a CUDA graph of 20 calls that cycle through copies of the weight
  (at least 256 MB of them, so the weight is read from memory as in a model, not from L2): F.linear,
  ``linear_decode`` with the default cut, and with ``--sweep`` every cut of a small grid (the best
  one printed); routers: F.linear then ``route`` (two launches) against ``route_decode`` (one);
  ``linear_decode`` / ``route_decode`` also unchained (``DYMOE_DENSE_PDL=0``: each call starts
  after the one before has ended), where the default chains them (programmatic dependent launch:
  a call loads its first weights while the one before runs).
  Each time is also given as a share of the device-to-device copy bandwidth (bytes of W / time,
  against a 1 GB copy's bytes / time).

Prints a table; JSON in ``OUT/decode_linear.json``. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from expert_kernels import bench_steps  # (benchmarks/: this script's folder)

from dymoe.models import fused
from dymoe.models.fused import linear_config, linear_decode, route, route_decode

SHAPES = {  # name: (N, K, router top-k or 0, bias)
    "qwen3-30b-a3b qkv": (5120, 2048, 0, False),
    "qwen3-30b-a3b o_proj": (2048, 4096, 0, False),
    "qwen3-30b-a3b router": (128, 2048, 8, False),
    "mixtral-8x7b qkv": (6144, 4096, 0, False),
    "mixtral-8x7b o_proj": (4096, 4096, 0, False),
    "mixtral-8x7b router": (8, 4096, 2, False),
    "olmoe qkv": (6144, 2048, 0, False),
    "olmoe o_proj": (2048, 2048, 0, False),
    "olmoe router": (64, 2048, 8, False),
    "deepseek-v2-lite q_proj": (3072, 2048, 0, False),
    "deepseek-v2-lite kv_a": (576, 2048, 0, False),
    "deepseek-v2-lite kv_b": (4096, 512, 0, False),
    "deepseek-v2-lite shared gate_up": (5632, 2048, 0, False),
    "deepseek-v2-lite shared down": (2048, 2816, 0, False),
    "deepseek-v2-lite router": (64, 2048, 6, False),
    "qwen1.5-moe shared gate_up": (11264, 2048, 0, False),
    "qwen1.5-moe shared down": (2048, 5632, 0, False),
    "qwen1.5-moe router": (60, 2048, 4, False),
    "gpt-oss-20b qkv": (5120, 2880, 0, True),
    "gpt-oss-20b o_proj": (2880, 4096, 0, True),
    "gpt-oss-20b router": (32, 2880, 4, True),
}
CALLS = 20
COLD_BYTES = 256 << 20


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (a copy of N bytes moves 2N: read and written, as
    benchmarks/expert_kernels.py counts it), from a 1 GB copy."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * a.numel() * 10 / (begin.elapsed_time(end) * 1e-3)


def time_calls(call, copies: int) -> float:
    """Microseconds per ``call(i)`` (i = the weight copy it reads), from a graph of CALLS calls
    cycling through the copies (expert_kernels.bench_steps)."""
    return 1e3 * bench_steps(call, args=[i % copies for i in range(CALLS)])


def time_unchained(call, copies: int) -> float:
    """:func:`time_calls` with the fused kernels' programmatic dependent launch off."""
    chained, fused.DENSE_PDL = fused.DENSE_PDL, False
    try:
        return time_calls(call, copies)
    finally:
        fused.DENSE_PDL = chained


def ints(*shape) -> torch.Tensor:
    return torch.randint(-3, 4, shape, device="cuda").bfloat16()


def check(n: int, k: int, top_k: int, bias: bool) -> dict:
    """The checks of the module docstring for one shape."""
    w, x, b = ints(n, k) / 16, ints(1, k), ints(n) / 4 if bias else None
    exact = torch.equal(linear_decode(x, w, b), F.linear(x, w, b))
    wr, xr = torch.randn(n, k, device="cuda").bfloat16() * 0.02, torch.randn(1, k, device="cuda").bfloat16()
    br = torch.randn(n, device="cuda").bfloat16() if bias else None
    want = F.linear(xr.double(), wr.double(), br.double() if bias else None)
    error = ((linear_decode(xr, wr, br).double() - want).abs().max() / want.abs().max()).item()
    out = dict(exact=exact, error=error)
    if top_k:
        logits = F.linear(x, w, b)
        for sigmoid in (False, True):
            ref = route(logits, top_k, sigmoid=sigmoid, normalize=True, scaling=1.0, dtype=x.dtype)
            got = route_decode(x, w, b, top_k, sigmoid=sigmoid, normalize=True, scaling=1.0)
            out[f"route_{'sigmoid' if sigmoid else 'softmax'}"] = (torch.equal(got[0], ref[0])
                                                                   and torch.equal(got[1], ref[1]))
    return out


def sweep_configs(n: int, k: int, sms: int):
    """A small grid of cuts: rows per block, columns per step, programs per SM; 4 warps (and 8 for
    the widest steps)."""
    for block_n, block_k, per_sm in itertools.product((4, 8, 16), (128, 256, 512, 1024), (1, 2, 4, 8)):
        yield linear_config(n, k, per_sm * sms, block_n, block_k, 4)
    for block_n, per_sm in itertools.product((8, 16), (1, 2, 4)):
        yield linear_config(n, k, per_sm * sms, block_n, 1024, 8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--sweep", action="store_true", help="also time a grid of cuts, print the best")
    parser.add_argument("--shapes", nargs="+", help="only the shapes whose names contain one of these")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e9:.0f} GB/s, {sms} SMs", flush=True)
    rows, failed = [], False
    for name, (n, k, top_k, bias) in SHAPES.items():
        if args.shapes and not any(s in name for s in args.shapes):
            continue
        checks = check(n, k, top_k, bias)
        ok = checks["exact"] and checks["error"] < 1e-2 and all(v for key, v in checks.items() if key.startswith("route"))
        failed |= not ok
        nbytes = n * k * 2
        copies = max(2, min(CALLS, -(-COLD_BYTES // nbytes)))
        weights = [torch.randn(n, k, device="cuda").bfloat16() * 0.02 for _ in range(copies)]
        b = torch.randn(n, device="cuda").bfloat16() if bias else None
        x = torch.randn(1, k, device="cuda").bfloat16()
        default = linear_config(n, k, 2 * sms)
        if top_k:
            cublas = time_calls(lambda i: route(F.linear(x, weights[i], b), top_k, sigmoid=False, normalize=True,
                                                scaling=1.0, dtype=x.dtype), copies)

            def call(i):
                return route_decode(x, weights[i], b, top_k, sigmoid=False, normalize=True, scaling=1.0)
        else:
            cublas = time_calls(lambda i: F.linear(x, weights[i], b), copies)

            def call(i):
                return linear_decode(x, weights[i], b)
        ours, unchained = time_calls(call, copies), time_unchained(call, copies)
        row = dict(shape=name, n=n, k=k, router_top_k=top_k, mb=nbytes / 1e6, checks=checks, cublas_us=cublas,
                   ours_us=ours, unchained_us=unchained, chained=fused.chained(x.device) != {},
                   default=list(vars(default).values()))
        if args.sweep:
            timed = []
            for config in dict.fromkeys(sweep_configs(n, k, sms)):
                call = ((lambda i, c=config: route_decode(x, weights[i], b, top_k, sigmoid=False, normalize=True,
                                                          scaling=1.0, config=c)) if top_k
                        else (lambda i, c=config: linear_decode(x, weights[i], b, c)))
                timed.append((time_calls(call, copies), config))
            best_us, best = min(timed, key=lambda t: t[0])
            row.update(best_us=best_us, best=list(vars(best).values()),
                       sweep=[(us, list(vars(c).values())) for us, c in sorted(timed, key=lambda t: t[0])[:8]])
        rows.append(row)
        share = lambda us: 100 * nbytes / (us * 1e-6) / bandwidth  # noqa: E731
        best_text = f"  best {row['best_us']:6.1f} us ({share(row['best_us']):3.0f}%) {row['best']}" if "best" in row else ""
        print(f"{name:<32} {nbytes / 1e6:6.2f} MB  {'ok  ' if ok else 'FAIL'} err {checks['error']:.1e}  "
              f"cublas{' +route' if top_k else ''} {cublas:6.1f} us ({share(cublas):3.0f}%)  "
              f"ours {ours:6.1f} us ({share(ours):3.0f}%) x{cublas / ours:.2f}  unchained {unchained:6.1f} us"
              f"{best_text}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_linear.json").write_text(json.dumps(dict(
        device=torch.cuda.get_device_name(), copy_gbs=bandwidth / 1e9, sms=sms, rows=rows), indent=1))
    print(f"\n{'all checks ok' if not failed else 'CHECKS FAILED'}; median speed-up "
          f"x{sorted(r['cublas_us'] / r['ours_us'] for r in rows)[len(rows) // 2]:.2f} over {len(rows)} shapes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
