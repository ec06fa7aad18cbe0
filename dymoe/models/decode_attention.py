"""One decode token's attention over a CUDA graph's masked span of the KV cache, split over the keys
(Triton; imported only where it runs, the ``gpu`` extra).

The graph decode attends over a fixed power-of-two prefix of the cache (its span) and hides the
entries past the token's position, which it reads from the device. SDPA's memory-efficient kernel
(the one that takes a mask) runs one program per key-value head for a single query, so on a Qwen3
layer (4 key-value heads) 4 programs walk every key while the other SMs idle: 13 us a layer at a
256-entry span on an H100, and it grows with the span.

Here the span is cut into ``splits`` chunks of keys. A program of the first launch takes one
key-value head and one chunk, and attends with all of that head's query heads at once (a [G, D]
tile, G padded to 16 rows for ``tl.dot``); it stops at the position, so chunks past it cost a
program that writes an empty partial. Each program keeps a running maximum, denominator and
weighted sum (the online softmax) and writes them for its chunk, then counts itself done on its
key-value head's counter; the head's last program to finish combines the chunks, rescaled to the
largest maximum, writes the output in the query's dtype and resets the counter (one launch: a
second one for the combine cost as much as the attention itself at short spans).
Scores, the softmax and the sums are float32; the probabilities meet the values in the cache's
dtype, as in flash attention.

GPT-OSS's layers take two more things: a sliding window (a program starts at the window's first
key, so chunks before it are empty too) and attention sinks (the combine adds exp(sinks[h]) to each
head's denominator, a term that weighs no value).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dymoe.models.fused import chained, decode_counters
from dymoe.models.fused_kernels import _chain
from dymoe.quant.kernels import interpreting

BLOCK_N = 64  # keys a program reads at a time
ROWS = 16  # tl.dot's smallest tile: the query heads of one key-value head, padded


# a span's chunking is a kernel argument, not a specialisation: no recompiling as the context grows
@triton.jit(do_not_specialize=["chunk", "n_splits"])
def _split_kernel(q, k, v, index, part_m, part_l, part_acc, counters, sinks, out, chunk, n_splits, scale, window,
                  G, D, DV, sq_h, sq_d, sk_h, sk_n, sk_d, sv_h, sv_n, sv_d, so_h, so_d,
                  GP: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, BLOCK_N: tl.constexpr,
                  WINDOW: tl.constexpr, SINKS: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr = False):
    _chain(PDL)  # (q, the caches' new row and the counters come from the launches before)
    kv = tl.program_id(0)
    s = tl.program_id(1)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    q_tile = tl.load(q + (kv * G + g)[:, None] * sq_h + d[None, :] * sq_d,
                     mask=(g[:, None] < G) & (d[None, :] < D), other=0.0)
    if F32_DOT:  # the interpreter's bf16 arithmetic is wrong (numpy): its tiles go through float32
        q_tile = q_tile.to(tl.float32)
    last = tl.load(index)  # keys 0..index are the token's; with a window only its latest ``window``
    hi = tl.minimum(s * chunk + chunk, last + 1)
    lo = s * chunk
    if WINDOW:
        lo = tl.maximum(lo, last - window + 1)
    m = tl.full([GP], float("-inf"), tl.float32)
    den = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DVP], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < hi
        k_tile = tl.load(k + kv * sk_h + n[:, None] * sk_n + d[None, :] * sk_d,
                         mask=valid[:, None] & (d[None, :] < D), other=0.0)
        if F32_DOT:
            k_tile = k_tile.to(tl.float32)
        scores = tl.dot(q_tile, tl.trans(k_tile)) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_m = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - new_m)
        p = tl.exp(scores - new_m[:, None])
        den = den * alpha + tl.sum(p, 1)
        v_tile = tl.load(v + kv * sv_h + n[:, None] * sv_n + dv[None, :] * sv_d,
                         mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
        if F32_DOT:
            v_tile = v_tile.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile)
        m = new_m
    rows = (kv * n_splits + s) * GP + g
    tl.store(part_m + rows, m)
    tl.store(part_l + rows, den)
    tl.store(part_acc + rows[:, None] * DVP + dv[None, :], acc)
    tl.debug_barrier()  # every thread's stores happen before the release below
    if tl.atomic_add(counters + kv, 1, sem="acq_rel") == n_splits - 1:  # the head's last chunk combines
        _combine(part_m, part_l, part_acc, sinks, out, kv, n_splits, G, DV, so_h, so_d, GP, DVP, SINKS)
        tl.store(counters + kv, 0)  # every chunk has counted: ready for the next call


@triton.jit
def _combine(part_m, part_l, part_acc, sinks, out, kv, n_splits, G, DV, so_h, so_d,
             GP: tl.constexpr, DVP: tl.constexpr, SINKS: tl.constexpr):
    """Key-value head ``kv``'s output from its chunks' partials, rescaled to the largest maximum
    (the partials were written by other programs, so the loads bypass L1: ``.cg``)."""
    g = tl.arange(0, GP)
    dv = tl.arange(0, DVP)
    top = tl.full([GP], float("-inf"), tl.float32)
    for s in range(0, n_splits):
        top = tl.maximum(top, tl.load(part_m + (kv * n_splits + s) * GP + g, cache_modifier=".cg"))
    den = tl.zeros([GP], tl.float32)
    if SINKS:  # one more term in each head's denominator, exp(sinks[h]), weighing no value
        sink = tl.load(sinks + kv * G + g, mask=g < G, other=float("-inf")).to(tl.float32)
        top = tl.maximum(top, sink)
        den = tl.exp(sink - top)
    acc = tl.zeros([GP, DVP], tl.float32)
    for s in range(0, n_splits):
        rows = (kv * n_splits + s) * GP + g
        weight = tl.exp(tl.load(part_m + rows, cache_modifier=".cg") - top)  # 0 past the position (-inf)
        den += weight * tl.load(part_l + rows, cache_modifier=".cg")
        acc += weight[:, None] * tl.load(part_acc + rows[:, None] * DVP + dv[None, :], cache_modifier=".cg")
    tl.store(out + (kv * G + g)[:, None] * so_h + dv[None, :] * so_d, acc / den[:, None],
             mask=(g[:, None] < G) & (dv[None, :] < DV))


def chunking(span: int, kv_heads: int, programs: int) -> tuple[int, int]:
    """(keys per chunk, chunks) a span is cut into: whole blocks of :data:`BLOCK_N` keys, about
    ``programs`` programs over the key-value heads."""
    blocks = triton.cdiv(span, BLOCK_N)
    per = triton.cdiv(blocks, max(1, programs // kv_heads))
    return per * BLOCK_N, triton.cdiv(blocks, per)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, scale: float,
                     programs: int, sinks: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Attention of one token's q [1, H, 1, D] over k [1, Hkv, span, D] and v [1, Hkv, span, DV]
    (any strides), keys 0..``index`` (a one-element int64 device tensor) visible, only the latest
    ``window`` of them when given, and with ``sinks`` [H] one more term exp(sinks[h]) in each head's
    denominator (GPT-OSS): [1, H, 1, DV] in q's dtype. ``programs``: about how many programs the
    first launch should run (twice the SMs)."""
    h, d, hkv, span, dv = q.shape[1], q.shape[3], k.shape[1], k.shape[2], v.shape[3]
    groups = h // hkv
    gp = max(ROWS, triton.next_power_of_2(groups))
    chunk, splits = chunking(span, hkv, programs)
    dvp = max(ROWS, triton.next_power_of_2(dv))  # tl.dot's operands need 16 along each dimension
    part_m = torch.empty(hkv * splits * gp, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(hkv * splits * gp * dvp, device=q.device, dtype=torch.float32)
    out = torch.empty(1, h, 1, dv, device=q.device, dtype=q.dtype)
    _split_kernel[(hkv, splits)](q, k, v, index, part_m, part_l, part_acc, decode_counters(q.device),
                                 sinks if sinks is not None else part_m, out, chunk, splits, scale, window or 0,
                                 groups, d, dv,
                                 q.stride(1), q.stride(3), k.stride(1), k.stride(2), k.stride(3),
                                 v.stride(1), v.stride(2), v.stride(3), out.stride(1), out.stride(3),
                                 GP=gp, DP=max(ROWS, triton.next_power_of_2(d)), DVP=dvp, BLOCK_N=BLOCK_N,
                                 WINDOW=window is not None, SINKS=sinks is not None, F32_DOT=interpreting(),
                                 **chained(q.device))
    return out
