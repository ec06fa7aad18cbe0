"""SlotPool: one preallocated device buffer carved into fixed-size expert slots per precision class.

Every expert copy on the device lives in a slot. A precision class ("bf16", "int4", ...) has one slot
size (the byte size of one expert blob at that precision, rounded up to :data:`ALIGN`), so allocation
is a free-list pop: deterministic, O(log n) and fragmentation-free, as in DynaExq's two fixed-slot
pools. The buffer is allocated once, in the constructor; slot views are precomputed, so the hot path
(``acquire`` / ``view`` / ``release``) never allocates device memory (invariant 3 of DESIGN.md).

``resplit`` moves capacity between classes at run time, only by whole slots and only slots that
are free: retired slots become holes in the buffer and new slots are carved from holes first-fit, so
the buffer (and the budget) is never exceeded and no expert copy ever moves.
"""

from __future__ import annotations

import heapq
import math
from typing import Mapping

import torch

from dymoe.errors import BudgetError

# Slot offsets and strides are multiples of this: any dtype view of a slot is aligned, and
# 256 bytes is what cudaMalloc guarantees, so vectorised kernels may assume it.
ALIGN = 256

_FREE, _USED, _RETIRED = 0, 1, 2


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def format_size(n: int) -> str:
    """Bytes as MiB or GiB with two decimals, rounded *up* so a printed minimum is never too small."""
    unit, scale = ("GiB", 1024**3) if n >= 1024**3 else ("MiB", 1024**2)
    return f"{math.ceil(n * 100 / scale) / 100:.2f} {unit}"


class SlotPool:
    """Fixed-size slots per precision class in one uint8 device buffer.

    ``slot_bytes`` maps each class to the byte size of one expert blob at that precision; ``counts``
    gives the number of slots per class. Classes are laid out one after another in the order of
    ``slot_bytes``. Use :meth:`from_budget` to size the pool from a device budget.
    """

    def __init__(
        self,
        device: torch.device | str,
        slot_bytes: Mapping[str, int],
        counts: Mapping[str, int],
        *,
        align: int = ALIGN,
    ):
        unknown = set(counts) - set(slot_bytes)
        if unknown:
            raise ValueError(f"slot counts for unknown precision classes {sorted(unknown)}")
        if any(b <= 0 for b in slot_bytes.values()):
            raise ValueError(f"slot sizes must be positive, got {dict(slot_bytes)}")
        self.device = torch.device(device)
        self.align = align
        self._slot_bytes = dict(slot_bytes)
        self._stride = {c: round_up(b, align) for c, b in slot_bytes.items()}
        total = sum(self._stride[c] * counts.get(c, 0) for c in slot_bytes)
        self.buffer = torch.empty(total, dtype=torch.uint8, device=self.device)
        self._offsets: dict[str, list[int | None]] = {}
        self._views: dict[str, list[torch.Tensor | None]] = {}
        self._state: dict[str, list[int]] = {}
        self._free: dict[str, list[int]] = {}
        self._retired: dict[str, list[int]] = {c: [] for c in slot_bytes}
        self._holes: list[tuple[int, int]] = []  # (offset, length), sorted, merged
        offset = 0
        for cls in slot_bytes:
            n = counts.get(cls, 0)
            self._offsets[cls] = [offset + i * self._stride[cls] for i in range(n)]
            self._views[cls] = [self._make_view(cls, o) for o in self._offsets[cls]]
            self._state[cls] = [_FREE] * n
            self._free[cls] = list(range(n))  # sorted, hence already a heap
            offset += n * self._stride[cls]

    # -- sizing ---------------------------------------------------------------------------------

    @staticmethod
    def plan(
        budget_bytes: int,
        slot_bytes: Mapping[str, int],
        split: Mapping[str, float | int],
        *,
        min_slots: Mapping[str, int] | None = None,
        reserved_bytes: int = 0,
        align: int = ALIGN,
    ) -> dict[str, int]:
        """Slot counts per class that fit ``budget_bytes - reserved_bytes``.

        ``split`` gives each class either an exact slot count (an ``int``) or a fraction (a
        ``float``) of the bytes left after the reserved bytes, the fixed counts and every class's
        ``min_slots``; classes absent from ``split`` get only their minimum. Whole slots that still
        fit after flooring go to the fraction classes with the largest remainders, so small budgets
        are not wasted. ``reserved_bytes`` is what the rest of the run keeps on the device (dense
        weights, KV cache, scratch). Raises :class:`BudgetError` naming the minimum and the
        ``--device-memory`` flag when the budget cannot hold ``min_slots`` (e.g. one layer's top-k).
        """
        min_slots = dict(min_slots or {})
        stride = {c: round_up(b, align) for c, b in slot_bytes.items()}
        _check_split(split, slot_bytes, min_slots)
        counts = {c: max(int(split[c]), min_slots.get(c, 0)) if _is_count(split.get(c)) else min_slots.get(c, 0)
                  for c in slot_bytes}
        minimum = reserved_bytes + sum(stride[c] * min_slots.get(c, 0) for c in slot_bytes)
        if budget_bytes < minimum:
            raise BudgetError(_too_small(budget_bytes, minimum, min_slots, stride, reserved_bytes))
        left = budget_bytes - reserved_bytes - sum(stride[c] * counts[c] for c in slot_bytes)
        if left < 0:
            fixed = reserved_bytes + sum(stride[c] * counts[c] for c in slot_bytes)
            raise BudgetError(
                f"--device-memory {format_size(budget_bytes)} cannot hold the fixed slot counts "
                f"{ {c: n for c, n in counts.items() if n} } ({format_size(fixed)} with the reserved "
                f"bytes); raise --device-memory to at least {format_size(fixed)} or lower the counts"
            )
        return _share_fractions(counts, split, stride, left)

    @classmethod
    def from_budget(
        cls,
        device: torch.device | str,
        budget_bytes: int,
        slot_bytes: Mapping[str, int],
        split: Mapping[str, float | int],
        *,
        min_slots: Mapping[str, int] | None = None,
        reserved_bytes: int = 0,
        align: int = ALIGN,
    ) -> "SlotPool":
        """A pool sized by :meth:`plan`; its buffer never exceeds ``budget_bytes - reserved_bytes``."""
        counts = cls.plan(budget_bytes, slot_bytes, split, min_slots=min_slots,
                          reserved_bytes=reserved_bytes, align=align)
        return cls(device, slot_bytes, counts, align=align)

    # -- the hot path ---------------------------------------------------------------------------

    def acquire(self, cls: str) -> int | None:
        """The lowest free slot of ``cls`` (deterministic), now in use; ``None`` when all are taken."""
        free = self._free[cls]
        if not free:
            return None
        slot = heapq.heappop(free)
        self._state[cls][slot] = _USED
        return slot

    def release(self, cls: str, slot: int) -> None:
        """Give a slot back. Releasing a slot that is not in use is a bug and raises."""
        if not 0 <= slot < len(self._state[cls]) or self._state[cls][slot] != _USED:
            raise ValueError(f"{cls} slot {slot} is not in use")
        self._state[cls][slot] = _FREE
        heapq.heappush(self._free[cls], slot)

    def view(self, cls: str, slot: int) -> torch.Tensor:
        """The slot's bytes (exactly ``slot_bytes(cls)`` of them) as a uint8 view of the buffer."""
        view = self._views[cls][slot]
        if view is None:
            raise ValueError(f"{cls} slot {slot} was retired by resplit")
        return view

    # -- capacity -------------------------------------------------------------------------------

    def resplit(self, target: Mapping[str, int]) -> dict[str, int]:
        """Move capacity towards ``target`` slot counts; returns the counts actually reached.

        Shrinking retires only free slots (highest offset first); growing carves slots from the
        holes left by retired ones (lowest offset first), in the order of ``target``. A class whose
        slots are busy, or a hole too small, simply stops short of its target: nothing in use moves,
        and the buffer never grows.
        """
        for cls, n in target.items():
            if cls not in self._slot_bytes or n < 0:
                raise ValueError(f"bad resplit target {cls}={n}")
        for cls, n in target.items():
            self._shrink(cls, self.num_slots(cls) - n)
        for cls, n in target.items():
            self._grow(cls, n - self.num_slots(cls))
        return self.counts

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self._slot_bytes)

    @property
    def counts(self) -> dict[str, int]:
        return {c: self.num_slots(c) for c in self._slot_bytes}

    @property
    def capacity_bytes(self) -> int:
        """Bytes of device memory the pool holds (its one buffer); constant after construction."""
        return self.buffer.numel()

    def slot_bytes(self, cls: str) -> int:
        return self._slot_bytes[cls]

    def num_slots(self, cls: str) -> int:
        return sum(1 for s in self._state[cls] if s != _RETIRED)

    def num_free(self, cls: str) -> int:
        return len(self._free[cls])

    def offset(self, cls: str, slot: int) -> int:
        """Byte offset of a slot in :attr:`buffer` (for kernels that take one base pointer)."""
        return self._offsets[cls][slot]

    # -- internals ------------------------------------------------------------------------------

    def _make_view(self, cls: str, offset: int) -> torch.Tensor:
        return self.buffer[offset : offset + self._slot_bytes[cls]]

    def _shrink(self, cls: str, n: int) -> None:
        free = sorted(self._free[cls], key=lambda s: self._offsets[cls][s], reverse=True)[: max(n, 0)]
        for slot in free:
            self._holes.append((self._offsets[cls][slot], self._stride[cls]))
            self._offsets[cls][slot] = None
            self._views[cls][slot] = None
            self._state[cls][slot] = _RETIRED
            heapq.heappush(self._retired[cls], slot)
        if free:
            retired = set(free)
            self._free[cls] = [s for s in self._free[cls] if s not in retired]
            heapq.heapify(self._free[cls])
            self._holes = _merge(self._holes)

    def _grow(self, cls: str, n: int) -> None:
        stride = self._stride[cls]
        for _ in range(n):
            hole = next((i for i, (_, length) in enumerate(self._holes) if length >= stride), None)
            if hole is None:
                return
            offset, length = self._holes[hole]
            if length == stride:
                del self._holes[hole]
            else:
                self._holes[hole] = (offset + stride, length - stride)
            self._add_slot(cls, offset)

    def _add_slot(self, cls: str, offset: int) -> None:
        if self._retired[cls]:
            slot = heapq.heappop(self._retired[cls])
            self._offsets[cls][slot] = offset
            self._views[cls][slot] = self._make_view(cls, offset)
            self._state[cls][slot] = _FREE
        else:
            slot = len(self._state[cls])
            self._offsets[cls].append(offset)
            self._views[cls].append(self._make_view(cls, offset))
            self._state[cls].append(_FREE)
        heapq.heappush(self._free[cls], slot)

    def __repr__(self) -> str:
        used = {c: self.num_slots(c) - self.num_free(c) for c in self._slot_bytes}
        return f"SlotPool({format_size(self.capacity_bytes)} on {self.device}, slots={self.counts}, used={used})"


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_split(split, slot_bytes, min_slots) -> None:
    unknown = (set(split) | set(min_slots)) - set(slot_bytes)
    if unknown:
        raise ValueError(f"split or min_slots name unknown precision classes {sorted(unknown)}")
    fractions = [v for v in split.values() if not _is_count(v)]
    if any(not isinstance(v, float) or v < 0 for v in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"split values must be slot counts (int) or fractions (float) summing to <= 1, got {dict(split)}")
    if any(_is_count(v) and v < 0 for v in split.values()) or any(v < 0 for v in min_slots.values()):
        raise ValueError("slot counts must be >= 0")


def _share_fractions(counts, split, stride, left: int) -> dict[str, int]:
    fractional = [c for c, v in split.items() if not _is_count(v) and v > 0]
    shares = {c: split[c] * left / stride[c] for c in fractional}
    for c in fractional:
        counts[c] += int(shares[c])
        left -= int(shares[c]) * stride[c]
    for c in sorted(fractional, key=lambda c: (-(shares[c] - int(shares[c])), c)):
        if stride[c] <= left:
            counts[c] += 1
            left -= stride[c]
    return counts


def _too_small(budget, minimum, min_slots, stride, reserved) -> str:
    parts = [f"{n} {c} slot{'s' if n != 1 else ''} of {format_size(stride[c])}" for c, n in min_slots.items() if n]
    if reserved:
        parts.append(f"{format_size(reserved)} for resident weights and buffers")
    return (
        f"--device-memory {format_size(budget)} is too small: the run needs at least {format_size(minimum)} "
        f"({' + '.join(parts) or 'nothing'}); raise --device-memory to {format_size(minimum)} or more"
    )


def _merge(holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for offset, length in sorted(holes):
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((offset, length))
    return merged
