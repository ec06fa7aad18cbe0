"""One decode token's attention in the graph decode: the split kernel against SDPA's masked one.

``python benchmarks/decode_attention.py --out $OUT`` (GPU). For the attention shapes of
Qwen3-30B-A3B, Mixtral-8x7B, OLMoE, DeepSeek-V2-Lite (its latent attention expanded to 16 heads
of 192/128 dims) and GPT-OSS-20B (attention sinks; its full and its 128-key sliding layers, whose
other path is the written-out softmax of ``attend_with_sinks``) and spans of 128 to 8192 cache
entries, with the token at 3/4 of the span: the split kernel's largest error against a float64
reference (relative to the largest output), and both paths' time per call, replayed from a CUDA
graph of 20 calls. Prints a table; JSON in
``OUT/decode_attention.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from dymoe.models import fused
from dymoe.models.layers import StaticPosition, _attend, attend_with_sinks

SHAPES = {  # query heads, key-value heads, head dim, value head dim, sinks, sliding window
    "qwen3-30b-a3b": (32, 4, 128, 128, False, None),
    "mixtral-8x7b": (32, 8, 128, 128, False, None),
    "olmoe": (16, 16, 128, 128, False, None),
    "deepseek-v2-lite": (16, 16, 192, 128, False, None),
    "gpt-oss-20b full": (64, 8, 64, 64, True, None),
    "gpt-oss-20b sliding": (64, 8, 64, 64, True, 128),
}
CALLS = 20


def time_path(setting: str, attend) -> float:
    """Microseconds per call of ``attend()`` with ``DYMOE_DECODE_ATTENTION=setting``, from a graph."""
    fused.ATTENTION = setting
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            attend()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            attend()
    times = []
    for _ in range(10):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1e3 / CALLS)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--spans", type=int, nargs="+", default=[128, 512, 2048, 8192])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name, (h, hkv, d, dv, has_sinks, window) in SHAPES.items():
        for span in args.spans:
            index = 3 * span // 4
            q = torch.randn(1, h, 1, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, hkv, span, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(1, hkv, span, dv, device="cuda", dtype=torch.bfloat16)
            sinks = torch.randn(h, device="cuda", dtype=torch.bfloat16) if has_sinks else None
            position = torch.tensor([index], device="cuda")
            start = StaticPosition(position, span, (torch.arange(span, device="cuda") <= position).view(1, span))
            attend = (functools.partial(attend_with_sinks, q, k, v, start, sinks, window) if has_sinks
                      else functools.partial(_attend, q, k, v, start))
            fused.ATTENTION = "split"
            got = attend()[0, :, 0].double()
            first = 0 if window is None else max(0, index - window + 1)
            keys, values = (t[0, :, first : index + 1].double().repeat_interleave(h // hkv, 0) for t in (k, v))
            scores = torch.einsum("hd,hnd->hn", q[0, :, 0].double(), keys) * d**-0.5
            if sinks is not None:
                scores = torch.cat([scores, sinks.double()[:, None]], -1)
            want = torch.einsum("hn,hnd->hd", torch.softmax(scores, -1)[:, : keys.shape[1]], values)
            error = ((got - want).abs().max() / want.abs().max()).item()
            sdpa, split = time_path("sdpa", attend), time_path("split", attend)
            rows.append(dict(shape=name, span=span, position=index, error=error, sdpa_us=sdpa, split_us=split))
            print(f"{name:<20} span {span:>5}: error {error:.1e}  sdpa {sdpa:7.1f} us  split {split:6.1f} us  "
                  f"x{sdpa / split:.1f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_attention.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows),
                                                               indent=1))
    worst = max(r["error"] for r in rows)
    print(f"\n{torch.cuda.get_device_name()}: worst error {worst:.1e} ({'ok' if worst < 1e-2 else 'FAIL'}); "
          f"median speed-up x{sorted(r['sdpa_us'] / r['split_us'] for r in rows)[len(rows) // 2]:.1f}")


if __name__ == "__main__":
    main()
