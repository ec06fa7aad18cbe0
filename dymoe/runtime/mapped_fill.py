"""Triton kernels of the mapped decode (:mod:`dymoe.runtime.mapped`), imported only where they run
(the ``gpu`` extra): the fill launch before each MoE layer's experts and the table update after a
step's last one.

The fill launch of one layer reads the layer's k routed expert ids and their table entries. An
entry outside the pool is an expert whose blob lies in the pinned host store; the launch copies
each such blob into the next slot of the ring the host set aside, as long as the ring lasts, all
programs sharing the bytes of every missed blob. It writes the k byte offsets the expert kernels
then read (the slot for a filled expert, the table's entry for the others) and a record of the
layer for the host to read a step later: the ids, and per expert the ring position it was filled
from, -1 where the ring had run out (read in place over the link), -2 for a hit.

A ring slot may still hold a cached copy, the eviction policy's pick, kept usable until a fill
needs its slot. The launch then points that copy's entry back at the host, and it stops filling
before a slot whose copy the layer itself is using (the rest of its misses are read in place).

No program writes an entry the launch reads: one program's write could reach another before that
one read it. The evicted copies' entries are not routed in the layer (above); the filled ones are,
so the step's last launch (:func:`launch_apply`) points them at their slots, where the next step
finds them.
"""

import torch
import triton
import triton.language as tl

WORDS = 4096  # int32 words a program copies at a time: 16 KB (benchmarks/host_read.py)


@triton.jit
def _fill_kernel(words, ids, table, inbox, heads, record, offsets, row, k, n_experts, cap, pool_bytes, blob_words,
                 KP: tl.constexpr, WORDS: tl.constexpr):
    j = tl.arange(0, KP)
    valid = j < k
    expert = tl.load(ids + j, mask=valid, other=0)
    entry = tl.load(table + row * n_experts + expert, mask=valid, other=0)
    away = valid & ((entry < 0) | (entry >= pool_bytes))
    rank = tl.cumsum(away.to(tl.int64), axis=0) - away.to(tl.int64)
    position = tl.load(heads + row) + rank  # heads[row]: the ring positions the layers before took
    offered = away & (position < tl.load(inbox))  # inbox[0]: the end of the ring the host set aside
    ring = inbox + 1 + position % cap
    slot = tl.load(ring, mask=offered, other=0)
    victim = tl.load(ring + cap, mask=offered, other=-1)  # the flat index of the copy a slot holds, or -1
    held = (victim[:, None] == row * n_experts + expert[None, :]) & (valid & ~away)[None, :]
    clash = offered & (tl.sum(held.to(tl.int32), axis=1) > 0)  # its copy is a hit of this layer
    filled = offered & (rank < tl.min(tl.where(clash, rank, KP), axis=0))
    taken = tl.sum(filled.to(tl.int64), axis=0)
    pieces = tl.cdiv(blob_words, WORDS)
    for f in range(tl.program_id(0), taken * pieces, tl.num_programs(0)):
        pick = filled & (rank == f // pieces)
        src = tl.sum(tl.where(pick, entry, 0), axis=0) // 4
        dst = tl.sum(tl.where(pick, slot, 0), axis=0) // 4
        at = (f % pieces) * WORDS + tl.arange(0, WORDS)
        keep = at < blob_words
        tl.store(words + dst + at, tl.load(words + src + at, mask=keep), mask=keep)
    if tl.program_id(0) == 0:
        tl.store(offsets + row * k + j, tl.where(filled, slot, entry), mask=valid)
        tl.store(record + row * 2 * k + j, expert, mask=valid)
        tl.store(record + row * 2 * k + k + j, tl.where(filled, position, tl.where(away, -1, -2)), mask=valid)
        tl.store(heads + row + 1, tl.load(heads + row) + taken)
        evicted = filled & (victim >= 0)
        tl.store(table + victim, tl.load(ring + 2 * cap, mask=evicted, other=0), mask=evicted)


@triton.jit
def _apply_kernel(table, inbox, heads, record, k, n_experts, cap, rows, KP: tl.constexpr):
    r = tl.program_id(0)
    j = tl.arange(0, KP)
    valid = j < k
    expert = tl.load(record + r * 2 * k + j, mask=valid, other=0)
    position = tl.load(record + r * 2 * k + k + j, mask=valid, other=-2)
    filled = valid & (position >= 0)
    slot = tl.load(inbox + 1 + position % cap, mask=filled, other=0)
    tl.store(table + r * n_experts + expert, slot, mask=filled)
    if r == 0:
        tl.store(heads, tl.load(heads + rows))  # the next step starts where this one ended


def launch_fill(words: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, inbox: torch.Tensor,
                heads: torch.Tensor, record: torch.Tensor, offsets: torch.Tensor, row: int, cap: int,
                blob_bytes: int, programs: int) -> None:
    """The fill launch of MoE row ``row`` (see the module docstring): ``words`` the pool buffer as
    int32; ``ids`` [k] the router's ids; ``table`` [rows, experts]; ``inbox`` [1 + 3 cap] (the ring's
    end, then per ring position the slot's byte offset, the flat table index of the copy it holds
    or -1, and that copy's host entry); ``heads`` [rows + 1]; ``record`` [rows, 2, k];
    ``offsets`` [rows, k]; ``programs`` copy the missed blobs."""
    rows, n_experts = table.shape
    k = ids.shape[0]
    _fill_kernel[(programs,)](words, ids, table, inbox, heads, record, offsets, row, k, n_experts, cap,
                              words.numel() * 4, blob_bytes // 4, KP=triton.next_power_of_2(k), WORDS=WORDS,
                              num_warps=4)


def launch_apply(table: torch.Tensor, inbox: torch.Tensor, heads: torch.Tensor, record: torch.Tensor,
                 cap: int) -> None:
    """After a step's last fill: every filled table entry to its slot, and the next step's head."""
    rows, n_experts = table.shape
    k = record.shape[2]
    _apply_kernel[(rows,)](table, inbox, heads, record, k, n_experts, cap, rows, KP=triton.next_power_of_2(k),
                           num_warps=1)
