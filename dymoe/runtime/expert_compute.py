"""The expert computation shared by every runtime: tokens grouped by expert, SwiGLU per expert.

Tokens are sorted by expert so each chosen expert runs one matmul pair over all its tokens; the
router weight is applied before the scatter-add back into token order. ``weights_of(e)`` returns
expert e's (gate_up [2I, H], down [H, I]) in the compute dtype, wherever they live (a resident
stack, a pool slot, or a dequantized low-bit copy), followed by its biases (gate_up [2I], down [H])
for families that have them. What an expert computes is :mod:`dymoe.models.expert_math`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from dymoe.models.expert_math import SWIGLU, ExpertMath, expert_forward

ExpertWeightsFn = Callable[[int], tuple[torch.Tensor, ...]]  # (gate_up, down) or (gate_up, down, biases...)


def dequantized_expert(blob: torch.Tensor, layout, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(gate_up [2I, H], down [H, I]) of one expert blob, dequantized by the reference code, then
    its biases (gate_up [2I], down [H]) when the blob has them."""
    from dymoe.checkpoint.blob import expert_biases, unpack_expert

    gate, up, down = unpack_expert(blob, layout, dtype)
    biases = expert_biases(blob, layout)
    return (torch.cat([gate, up]), down, *(b.to(dtype) for b in biases or ()))


def group_by_expert(expert_ids: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """Order of (token, slot) assignments sorted by expert, the experts used, and their counts.

    The counts come back to the host once per layer: the runtime must know which experts to
    fetch anyway, so this is the one synchronisation the step needs.
    """
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    experts_list, counts_list = torch.stack([experts, counts]).tolist()  # one device->host sync
    return order, experts_list, counts_list


@dataclass
class ExpertRun:
    """Several of a grouping's experts whose weights already sit in stacks (a prefill workspace
    of dequantized low-bit experts): ``indices`` into the grouping's expert list, their weights
    ``gate_up[i]`` [2I, H] and ``down[i]`` [H, I]. They run as one grouped GEMM, with no copy."""

    indices: list[int]
    gate_up: torch.Tensor  # [n, 2I, H]
    down: torch.Tensor  # [n, H, I]
    gate_up_bias: torch.Tensor | None = None  # [n, 2I], families with biased experts
    down_bias: torch.Tensor | None = None  # [n, H]

    def weights(self, i: int) -> tuple[torch.Tensor, ...]:
        """The i-th expert's weights as ``weights_of`` returns them."""
        if self.gate_up_bias is None:
            return self.gate_up[i], self.down[i]
        return self.gate_up[i], self.down[i], self.gate_up_bias[i], self.down_bias[i]


def run_grouped(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    weights_of: ExpertWeightsFn,
    grouping: tuple[torch.Tensor, list[int], list[int]] | None = None,
    schedule: Iterable[int | ExpertRun] | None = None,
    math: ExpertMath = SWIGLU,
) -> torch.Tensor:
    """sum_j w[n, j] * expert_{ids[n, j]}(hidden[n]) for every token n; hidden [N, H].

    ``schedule`` gives the order in which the grouped experts (indices into the grouping's expert
    list) are computed — an offloading runtime runs resident experts first and fetches between
    steps — and may hand over several at once as an :class:`ExpertRun` (computed as soon as it is
    yielded, so the schedule may then reuse the stacks). Each expert's rows land at their sorted
    position and are combined once at the end, so the result is bit-identical whatever the schedule.
    ``math``: the family's expert activation (with biases: GPT-OSS), also through the grouped GEMMs.
    """
    k = expert_ids.shape[1]
    order, experts, counts = grouping or group_by_expert(expert_ids)
    starts = [0]
    for count in counts[:-1]:
        starts.append(starts[-1] + count)
    tokens = order // k
    x = hidden[tokens]
    rows = torch.empty_like(x)
    grouped, batch = len(experts) > 1 and grouped_mm_usable(x), None
    for item in range(len(experts)) if schedule is None else schedule:
        if isinstance(item, ExpertRun):
            ranges = [(starts[j], starts[j] + counts[j]) for j in item.indices]
            if grouped:
                biases = (item.gate_up_bias, item.down_bias) if item.gate_up_bias is not None else None
                _grouped_rows(x, rows, ranges, item.gate_up, item.down, biases, math)
            else:
                for i, (start, stop) in enumerate(ranges):
                    rows[start:stop] = expert_forward(x[start:stop], *item.weights(i), math=math)
            continue
        weights = weights_of(experts[item])
        start, stop = starts[item], starts[item] + counts[item]
        if not grouped:
            rows[start:stop] = expert_forward(x[start:stop], *weights, math=math)
            continue
        batch = batch or GroupedBatch.for_rows(x, weights, math)
        if batch.add(weights, start, stop):
            batch.flush(x, rows)
    if batch is not None:
        batch.flush(x, rows)
    rows = rows * expert_weights.reshape(-1)[order].unsqueeze(-1)
    return combine_rows(rows, order, k)


def combine_rows(rows: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Rows [N*k, H] in expert order (``order`` the sort of the flat routing, already weighted)
    summed per token in router order: [N, H]. A sum over the k axis, not ``index_add_``, whose
    CUDA kernel adds with atomics in whatever order the blocks run (a resident prefill then
    differed from itself, and from an offloaded one, in the last bits: invariant 2); the one-token
    decode paths sum in the same order."""
    flat = torch.empty_like(rows)
    flat[order] = rows
    return flat.view(-1, k, rows.shape[-1]).sum(1)


# ---- grouped GEMM (prefill on the GPU) -----------------------------------------------------------

GROUPED_BYTES = 256 * 2**20  # weights copied per grouped launch; transient device memory outside the budget
MAX_GROUPS = 1023  # torch._grouped_mm takes fewer than 1024 groups ("Can't process more than 1024 groups")


def grouped_mm_usable(x: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs here: bf16 on a CUDA device of compute capability 9.0+."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def grouped_experts(x: torch.Tensor, offsets: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   biases: tuple[torch.Tensor, torch.Tensor] | None = None, math: ExpertMath = SWIGLU) -> torch.Tensor:
    """Rows x [M, H] sorted by group through stacks gate_up [G, 2I, H] and down [G, H, I]: group g
    takes rows offsets[g-1]:offsets[g] (int32 ends on the device). Two grouped GEMMs for all groups;
    ``biases`` (gate_up [G, 2I], down [G, H]) are added per row's group and ``math`` gives the
    activation (GPT-OSS's experts), still without a host synchronisation."""
    h = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offsets)
    group = None
    if biases is not None:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
        group = torch.repeat_interleave(torch.arange(len(offsets), device=x.device), counts, output_size=x.shape[0])
        h = h + biases[0][group]
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(math.glu(gate, up), down.transpose(-2, -1), offs=offsets)
    return y if group is None else y + biases[1][group]


class GroupedBatch:
    """Experts' weights copied into a stack as they become ready, then run by one grouped GEMM.

    Prefill through the per-expert loop is bound by the host: some five launches per expert and
    up to a few hundred experts per layer. Copying each expert's weights into the stack on the
    compute stream, right when the runtime hands them over, keeps the runtime's slot reuse safe:
    a later fetch into the same slot waits for the compute queued so far, which includes the copy.
    """

    def __init__(self, capacity: int, first: tuple[torch.Tensor, ...], device, dtype, math: ExpertMath = SWIGLU):
        """Stacks for ``capacity`` experts shaped like ``first`` ((gate_up, down) or with biases)."""
        self.stacks = [torch.empty(capacity, *t.shape, device=device, dtype=dtype) for t in first]
        self.math = math
        self.ranges: list[tuple[int, int]] = []

    @classmethod
    def for_rows(cls, x: torch.Tensor, first: tuple[torch.Tensor, ...], math: ExpertMath = SWIGLU) -> "GroupedBatch":
        capacity = max(1, GROUPED_BYTES // sum(t.nbytes for t in first))
        return cls(capacity, first, x.device, x.dtype, math)

    def add(self, weights: tuple[torch.Tensor, ...], start: int, stop: int) -> bool:
        """Queue one expert's rows start:stop; True when the stack is full (flush now)."""
        i = len(self.ranges)
        for stack, t in zip(self.stacks, weights):
            stack[i].copy_(t)
        self.ranges.append((start, stop))
        return len(self.ranges) == self.stacks[0].shape[0]

    def flush(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        if not self.ranges:
            return
        n = len(self.ranges)
        gate_up, down, *biases = (stack[:n] for stack in self.stacks)
        _grouped_rows(x, rows, self.ranges, gate_up, down, tuple(biases) or None, self.math)
        self.ranges = []


def _grouped_rows(x: torch.Tensor, rows: torch.Tensor, ranges: list[tuple[int, int]], gate_up: torch.Tensor,
                  down: torch.Tensor, biases: tuple[torch.Tensor, torch.Tensor] | None = None,
                  math: ExpertMath = SWIGLU) -> None:
    """rows[a:b] = expert g's output for x[a:b] for the g-th range, through one grouped GEMM pair:
    a slice when the ranges follow each other (the usual case), else gathered and scattered."""
    ends = torch.tensor([b - a for a, b in ranges]).cumsum(0).to(device=x.device, dtype=torch.int32)
    if all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1)):
        first, last = ranges[0][0], ranges[-1][1]
        rows[first:last] = grouped_experts(x[first:last], ends, gate_up, down, biases, math)
        return
    index = torch.cat([torch.arange(a, b) for a, b in ranges]).to(x.device, non_blocking=True)
    rows[index] = grouped_experts(x[index], ends, gate_up, down, biases, math)
