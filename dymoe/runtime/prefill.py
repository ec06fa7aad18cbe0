"""Prefill through low-bit slots: a wave's experts of one precision dequantized a batch per launch.

Prefill runs every expert on dozens of tokens, so it is compute-bound once the weights are bf16:
the runtime dequantizes the low-bit experts it is about to run into a :class:`DequantWorkspace`
(:func:`dymoe.quant.kernels.dequantize_experts`: one Triton launch for many experts on the GPU,
the torch reference elsewhere, the same values) and runs the grouped bf16 matmuls on the result
(docs/kernels.md, "Prefill").

The runtime announces a wave's experts in the order it will ask for them (:meth:`plan`), each with
the copy it must wait for (None when resident). They are dequantized in chunks of the workspace's
capacity; within a chunk the resident experts form one batch and those still in flight another.
:meth:`runs` launches each batch when the schedule reaches it and hands it over as an
:class:`~dymoe.runtime.expert_compute.ExpertRun` (one grouped GEMM over the workspace rows, no
copy), which ``run_grouped`` computes before asking for the next. So resident experts are still
computed while the misses' copies land (the order the offloading schedule is built for), and a
chunk is overwritten only after the previous one's matmuls were queued on the same stream.
:meth:`weights` serves one expert at a time (DynaExq's fallback).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from dymoe.checkpoint.blob import BlobLayout
from dymoe.quant.kernels import DequantWorkspace, dequantize_experts
from dymoe.runtime.expert_compute import ExpertRun

# Workspace bytes per precision class. It lives outside the expert budget, like activations; a
# Qwen3-30B-A3B layer's 128 experts take 1.2 GB in bf16, a Mixtral-8x7B expert 352 MB, so the cap
# keeps it near 1 GiB and a layer needing more runs in chunks (a launch each).
WORKSPACE_BYTES = 1 << 30


def prefill_capacity(layout: BlobLayout, slots: int, num_experts: int, dtype: torch.dtype,
                     max_bytes: int = WORKSPACE_BYTES) -> int:
    """Experts a workspace holds: the most a layer can run at once at this precision (its slot
    count, at most the layer's experts), capped at ``max_bytes`` but never below one."""
    h, i = layout.hidden_size, layout.intermediate_size
    expert_bytes = 3 * h * i * torch.empty((), dtype=dtype).element_size()
    return max(1, min(slots, num_experts, max_bytes // expert_bytes))


@dataclass
class _Batch:
    first: int  # workspace position of its first expert
    offsets: list[int]  # blob byte offsets in the pool
    keys: list = field(default_factory=list)  # the caller's names of its experts, in workspace order
    tickets: list = field(default_factory=list)  # copies to wait for before the launch
    done: bool = False


class PrefillDequantizer:
    """One precision class's prefill workspace and the batches planned into it (module docstring)."""

    def __init__(self, pool: torch.Tensor, slot_offset: Callable[[int], int], layout: BlobLayout, capacity: int,
                 dtype: torch.dtype, wait: Callable[[object], None]):
        self.pool = pool  # the slot pool's uint8 buffer
        self.slot_offset = slot_offset
        self.layout = layout
        self.workspace = DequantWorkspace.allocate(layout, capacity, pool.device, dtype)
        self.wait = wait  # makes the compute stream wait for a copy (TransferEngine.wait)
        self.launches = 0
        self._where: dict[int, tuple[_Batch, int]] = {}  # slot -> (batch, workspace position)

    def plan(self, members: list[tuple[object, int, object | None]]) -> list[_Batch]:
        """The wave's experts of this class as (key: the caller's name for it, slot, ticket or None),
        in the order they will be asked for; replaces the previous plan. Returns the batches in
        launch order."""
        self._where.clear()
        capacity = self.workspace.capacity
        batches = []
        for start in range(0, len(members), capacity):
            chunk = members[start:start + capacity]
            first = 0
            for group in ([m for m in chunk if m[2] is None], [m for m in chunk if m[2] is not None]):
                if not group:
                    continue
                batch = _Batch(first, [self.slot_offset(slot) for _, slot, _ in group], [key for key, _, _ in group],
                               [t for _, _, t in group if t is not None])
                for j, (_, slot, _) in enumerate(group):
                    self._where[slot] = (batch, first + j)
                first += len(group)
                batches.append(batch)
        return batches

    def runs(self, members: list[tuple[object, int, object | None]]) -> Iterator[ExpertRun]:
        """Plan ``members`` (key, slot, ticket) and yield each batch as an :class:`ExpertRun` over
        the workspace, dequantized right before it is yielded: the consumer computes it before
        asking for the next, which may overwrite the same workspace rows."""
        for batch in self.plan(members):
            yield ExpertRun(batch.keys, *self.launch(batch))

    def launch(self, batch: _Batch) -> tuple[torch.Tensor, ...]:
        """Dequantize ``batch`` (once: after waiting for its copies) and return its stacks
        gate_up [n, 2I, H] and down [n, H, I], views into the workspace, then for biased experts
        their biases [n, 2I] and [n, H] (copied out of the slots with them, so a slot may be reused
        as soon as the batch is dequantized)."""
        views = self.workspace.views(batch.first, len(batch.offsets))
        biases = self.workspace.bias_views(batch.first, len(batch.offsets))
        if not batch.done:
            for ticket in batch.tickets:
                self.wait(ticket)
            dequantize_experts(self.pool, device_indices(batch.offsets, self.pool.device), self.layout, *views,
                               biases=biases)
            batch.done = True
            self.launches += 1
        return views if biases is None else (*views, *biases)

    def weights(self, slot: int) -> tuple[torch.Tensor, ...]:
        """(gate_up [2I, H], down [H, I]) of the expert in ``slot`` (and its biases, if it has them),
        views into the workspace (valid
        until the next chunk is dequantized); launches its batch on first use. A slot asked for
        outside the plan (or a second time: its contents may have changed) is dequantized alone
        after dropping the plan; the plan's other experts are then dequantized one by one as they
        are asked for (slower, still correct)."""
        if slot not in self._where:
            self.plan([(slot, slot, None)])
        batch, position = self._where.pop(slot)
        return tuple(stack[position - batch.first] for stack in self.launch(batch))

    def warm_up(self) -> None:
        """Dequantize slot 0 once, whatever it holds, so Triton compiles the kernel at start-up rather
        than in the first prompt's prefill (seconds). Leaves no plan behind."""
        self.weights(0)
        self._where.clear()


def device_indices(offsets: list[int], device: torch.device) -> torch.Tensor:
    """Byte offsets (or slot indices) as int64 on ``device``; on CUDA through pinned memory and an asynchronous copy,
    since a pageable copy would make the host wait for the stream (the caching host allocator keeps
    the pinned block until the copy is done)."""
    if device.type != "cuda":
        return torch.tensor(offsets, dtype=torch.int64)
    return torch.tensor(offsets, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
