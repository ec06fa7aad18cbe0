"""Expert blobs held in host memory, with the read interface of :class:`ExpertStore`.

Two uses: synthetic real-shape models (benchmarks generate weights straight into host RAM, no
disk), and the pinned host tier (``--host-memory``): as many blobs of an on-disk store as the
budget allows are copied once into one pinned buffer, so host-to-device copies of them run
asynchronously at full link speed; the rest stay as mmap views of the store and go through the
transfer engine's pinned staging buffers.
"""

from __future__ import annotations

from typing import Iterable

import torch

from dymoe.checkpoint.blob import BlobLayout, blob_layout, encode_expert
from dymoe.quant.formats import parse_format

Key = tuple[int, int, str]  # (layer, expert, precision)


def _pinned_or_plain(nbytes: int, pin: bool) -> torch.Tensor:
    if pin and torch.cuda.is_available():
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return torch.empty(nbytes, dtype=torch.uint8)


class MemoryStore:
    """Blobs packed back to back in one host buffer (pinned when a GPU is present and asked for)."""

    def __init__(self, layouts: dict[str, BlobLayout], buffer: torch.Tensor, offsets: dict[Key, int],
                 layers: tuple[int, ...], num_experts: int, fallback=None):
        self._layouts = layouts
        self.buffer = buffer
        self._offsets = offsets
        self._layers = layers
        self._num_experts = num_experts
        self._fallback = fallback

    # ---- the ExpertStore read interface ------------------------------------------------------

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(self._layouts)

    @property
    def layers(self) -> tuple[int, ...]:
        return self._layers

    @property
    def num_experts(self) -> int:
        return self._num_experts

    def layout(self, precision: str) -> BlobLayout:
        return self._layouts[precision]

    def blob(self, layer: int, expert: int, precision: str) -> torch.Tensor:
        offset = self._offsets.get((layer, expert, precision))
        if offset is None:
            return self._fallback.blob(layer, expert, precision)
        return self.buffer[offset : offset + self._layouts[precision].nbytes]

    def host_offset(self, layer: int, expert: int, precision: str) -> int | None:
        """Where a blob starts in :attr:`buffer`; None when this tier does not hold it."""
        return self._offsets.get((layer, expert, precision))

    def holds_every(self, precision: str) -> bool:
        """Whether :attr:`buffer` holds every expert's blob at ``precision``."""
        return all((layer, e, precision) in self._offsets for layer in self._layers for e in range(self._num_experts))

    def is_pinned(self, layer: int, expert: int, precision: str) -> bool:
        return (layer, expert, precision) in self._offsets and self.buffer.is_pinned()

    def nbytes(self, precision: str | None = None) -> int:
        precisions = [precision] if precision else self.precisions
        return sum(self._layouts[p].nbytes * len(self._layers) * self._num_experts for p in precisions)

    @property
    def resident_bytes(self) -> int:
        return self.buffer.numel()

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def from_experts(
        cls, experts: dict[int, tuple[torch.Tensor, ...]], precisions: Iterable[str] = ("bf16",),
        group_size: int = 128, pin: bool = True,
    ) -> "MemoryStore":
        """Encode stacked experts (gate_up [E, 2I, H], down [E, H, I] per layer, followed for families
        with biased experts by the biases gate_up [E, 2I], down [E, H]) into blobs."""
        layers = tuple(sorted(experts))
        gate_up0, down0, *biased = experts[layers[0]]
        num_experts, hidden, width = gate_up0.shape[0], gate_up0.shape[2], down0.shape[2]
        layouts = {p: blob_layout(parse_format(p, group_size), hidden, width, bias=bool(biased)) for p in precisions}
        keys = [(l, e, p) for p in layouts for l in layers for e in range(num_experts)]
        offsets, total = _pack_offsets(keys, layouts)
        buffer = _pinned_or_plain(total, pin)
        for (layer, expert, precision), offset in offsets.items():
            gate_up, down, *biases = experts[layer]
            blob = encode_expert(gate_up[expert, :width], gate_up[expert, width:], down[expert], layouts[precision],
                                 bias=tuple(b[expert] for b in biases) or None)
            buffer[offset : offset + blob.numel()].copy_(blob)
        return cls(layouts, buffer, offsets, layers, num_experts)

    @classmethod
    def pin_from(cls, store, budget_bytes: int, order: Iterable[Key] | None = None) -> "MemoryStore":
        """The host tier: copy blobs of ``store`` (in ``order``, default layer-major) into pinned
        memory until ``budget_bytes`` is used; the others are served from ``store`` itself."""
        layouts = {p: store.layout(p) for p in store.precisions}
        if order is None:
            order = [(l, e, p) for p in layouts for l in store.layers for e in range(store.num_experts)]
        chosen, used = [], 0
        for key in order:
            size = layouts[key[2]].nbytes
            if used + size > budget_bytes:
                break
            chosen.append(key)
            used += size
        offsets, total = _pack_offsets(chosen, layouts)
        buffer = _pinned_or_plain(total, pin=True)
        for (layer, expert, precision), offset in offsets.items():
            buffer[offset : offset + layouts[precision].nbytes].copy_(store.blob(layer, expert, precision))
        return cls(layouts, buffer, offsets, store.layers, store.num_experts, fallback=store)


def _pack_offsets(keys: list[Key], layouts: dict[str, BlobLayout]) -> tuple[dict[Key, int], int]:
    offsets, total = {}, 0
    for key in keys:
        offsets[key] = total
        total += layouts[key[2]].nbytes  # blob sizes are multiples of 4096: every blob stays aligned
    return offsets, total
