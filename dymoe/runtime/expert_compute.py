"""The expert computation shared by every runtime: tokens grouped by expert, SwiGLU per expert.

Tokens are sorted by expert so each chosen expert runs one matmul pair over all its tokens; the
router weight is applied before the scatter-add back into token order. ``weights_of(e)`` returns
expert e's (gate_up [2I, H], down [H, I]) in the compute dtype, wherever they live (a resident
stack, a pool slot, or a dequantized low-bit copy).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

ExpertWeightsFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def dequantized_expert(blob: torch.Tensor, layout, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2I, H], down [H, I]) of one expert blob, dequantized by the reference code."""
    from dymoe.checkpoint.blob import unpack_expert

    gate, up, down = unpack_expert(blob, layout, dtype)
    return torch.cat([gate, up]), down


def swiglu_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


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


def run_grouped(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    weights_of: ExpertWeightsFn,
    grouping: tuple[torch.Tensor, list[int], list[int]] | None = None,
    schedule: Iterable[int] | None = None,
) -> torch.Tensor:
    """sum_j w[n, j] * expert_{ids[n, j]}(hidden[n]) for every token n; hidden [N, H].

    ``schedule`` gives the order in which the grouped experts (indices into the grouping's expert
    list) are computed — an offloading runtime runs resident experts first and fetches between
    steps. Each expert's rows land at their sorted position and are combined once at the end, so
    the result is bit-identical whatever the schedule.
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
    for j in range(len(experts)) if schedule is None else schedule:
        gate_up, down = weights_of(experts[j])
        start, stop = starts[j], starts[j] + counts[j]
        if not grouped:
            rows[start:stop] = swiglu_expert(x[start:stop], gate_up, down)
            continue
        batch = batch or GroupedBatch.for_rows(x, (gate_up, down))
        if batch.add(gate_up, down, start, stop):
            batch.flush(x, rows)
    if batch is not None:
        batch.flush(x, rows)
    rows = rows * expert_weights.reshape(-1)[order].unsqueeze(-1)
    return torch.zeros_like(hidden).index_add_(0, tokens, rows)


# ---- grouped GEMM (prefill on the GPU) -----------------------------------------------------------

GROUPED_BYTES = 256 * 2**20  # weights copied per grouped launch; transient device memory outside the budget


def grouped_mm_usable(x: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs here: bf16 on a CUDA device of compute capability 9.0+."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def grouped_swiglu(x: torch.Tensor, offsets: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Rows x [M, H] sorted by group through stacks gate_up [G, 2I, H] and down [G, H, I]: group g
    takes rows offsets[g-1]:offsets[g] (int32 ends on the device). Two launches for all groups."""
    h = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offsets)
    gate, up = h.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offsets)


class GroupedBatch:
    """Experts' weights copied into a stack as they become ready, then run by one grouped GEMM.

    Prefill through the per-expert loop is bound by the host: some five launches per expert and
    up to a few hundred experts per layer. Copying each expert's weights into the stack on the
    compute stream, right when the runtime hands them over, keeps the runtime's slot reuse safe:
    a later fetch into the same slot waits for the compute queued so far, which includes the copy.
    """

    def __init__(self, capacity: int, gate_up_shape, down_shape, device, dtype):
        self.gate_up = torch.empty(capacity, *gate_up_shape, device=device, dtype=dtype)
        self.down = torch.empty(capacity, *down_shape, device=device, dtype=dtype)
        self.ranges: list[tuple[int, int]] = []

    @classmethod
    def for_rows(cls, x: torch.Tensor, first: tuple[torch.Tensor, torch.Tensor]) -> "GroupedBatch":
        gate_up, down = first
        capacity = max(1, GROUPED_BYTES // (gate_up.nbytes + down.nbytes))
        return cls(capacity, gate_up.shape, down.shape, x.device, x.dtype)

    def add(self, gate_up: torch.Tensor, down: torch.Tensor, start: int, stop: int) -> bool:
        """Queue one expert's rows start:stop; True when the stack is full (flush now)."""
        i = len(self.ranges)
        self.gate_up[i].copy_(gate_up)
        self.down[i].copy_(down)
        self.ranges.append((start, stop))
        return len(self.ranges) == self.gate_up.shape[0]

    def flush(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        if not self.ranges:
            return
        index = torch.cat([torch.arange(a, b) for a, b in self.ranges]).to(x.device, non_blocking=True)
        ends = torch.tensor([b - a for a, b in self.ranges]).cumsum(0).to(device=x.device, dtype=torch.int32)
        n = len(self.ranges)
        rows[index] = grouped_swiglu(x[index], ends, self.gate_up[:n], self.down[:n])
        self.ranges = []
