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
    for j in range(len(experts)) if schedule is None else schedule:
        gate_up, down = weights_of(experts[j])
        start, stop = starts[j], starts[j] + counts[j]
        rows[start:stop] = swiglu_expert(x[start:stop], gate_up, down)
    rows = rows * expert_weights.reshape(-1)[order].unsqueeze(-1)
    return torch.zeros_like(hidden).index_add_(0, tokens, rows)
