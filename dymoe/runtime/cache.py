"""ExpertCache: which (layer, expert) copies occupy which pool slots, and who leaves when one is needed.

The cache maps an expert key ``(layer, expert)`` to ``(precision, slot)`` in a :class:`SlotPool` and
counts pins: an expert pinned for the current layer's compute is never evicted. Which unpinned copy
leaves is a policy's choice, behind one small protocol (:class:`EvictionPolicy`): the cache tells it
about uses (``on_access``), arrivals (``on_insert``) and departures (``on_remove``), and asks it for a
``victim`` among the evictable copies of the precision class that is full. Each precision class has
its own policy instance, so a high-precision and a low-precision tier are ranked separately (as
DynaExq's two pools are).

A use is counted once: by :meth:`ExpertCache.lookup` on a hit, or by :meth:`ExpertCache.insert` for
a demand miss. A prefetched copy arrives without a use; its first use is a *prefetch hit*
(:meth:`ExpertCache.is_prefetched`). :meth:`ExpertCache.peek` asks without counting.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Mapping, NamedTuple, Protocol, Sequence

from dymoe.errors import BudgetError
from dymoe.runtime.policies import ARCPolicy, FatePolicy, LeastStalePolicy, ShallowFavouringPolicy
from dymoe.runtime.slot_pool import SlotPool

Key = tuple[int, int]  # (layer, expert)


class Residency(NamedTuple):
    precision: str
    slot: int


class AllPinnedError(BudgetError):
    """A slot is needed but every copy of that precision class is pinned."""


class EvictionPolicy(Protocol):
    """Ranks the copies of one precision class. ``step`` is the cache's clock (one tick per event)."""

    def on_access(self, key: Key, step: int) -> None: ...
    def on_insert(self, key: Key, step: int) -> None: ...
    def on_remove(self, key: Key) -> None: ...

    def victim(self, candidates: Collection[Key], incoming: Key | None) -> Key:
        """One of ``candidates`` (the unpinned resident copies) to evict so ``incoming`` fits.

        ``candidates`` supports ``in``, ``len`` and iteration; a policy that keeps its own order
        should scan that and test membership (pinned copies are few) rather than iterate all
        candidates. ``incoming`` lets a per-layer budget (Fate) prefer a victim of the same layer.
        """
        ...


class LRUPolicy:
    """Least recently used (accessed or inserted) leaves first."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def on_access(self, key: Key, step: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    on_insert = on_access

    def on_remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Collection[Key], incoming: Key | None = None) -> Key:
        return next(k for k in self._order if k in candidates)

    def ranked(self) -> Iterator[Key]:
        """Every copy in the order :meth:`victim` would take them (for several victims at once)."""
        return iter(self._order)


class LFUPolicy:
    """Fewest uses leaves first; ties go to the least recently used or inserted.

    Use counts belong to the expert, not to the copy, so they survive eviction: an expert that was
    popular before it left is kept longer when it returns (arXiv 2511.05814 reports LFU beating LRU
    for expert caches). A heap with lazy deletion keeps ``victim`` O(log n) per stale entry.
    """

    def __init__(self) -> None:
        self.uses: dict[Key, int] = {}
        self._last: dict[Key, int] = {}  # resident keys only
        self._heap: list[tuple[int, int, Key]] = []

    def on_access(self, key: Key, step: int) -> None:
        self.uses[key] = self.uses.get(key, 0) + 1
        self._stamp(key, step)

    def on_insert(self, key: Key, step: int) -> None:
        self._stamp(key, step)

    def on_remove(self, key: Key) -> None:
        self._last.pop(key, None)

    def victim(self, candidates: Collection[Key], incoming: Key | None = None) -> Key:
        skipped = []
        try:
            while self._heap:
                uses, last, key = self._heap[0]
                if self._last.get(key) != last or self.uses.get(key, 0) != uses:
                    heapq.heappop(self._heap)  # stale: used or stamped again since
                elif key in candidates:
                    return key
                else:
                    skipped.append(heapq.heappop(self._heap))  # pinned: keep for later
            raise LookupError("LFUPolicy has no candidate to evict")
        finally:
            for item in skipped:
                heapq.heappush(self._heap, item)

    def _stamp(self, key: Key, step: int) -> None:
        self._last[key] = step
        heapq.heappush(self._heap, (self.uses.get(key, 0), step, key))


class BeladyPolicy:
    """The offline optimum: evict the copy whose next use is furthest in the future (or never).

    Given the whole sequence of uses of this precision class in order, it counts ``on_access``
    calls to know where it is, so it needs exactly the uses of ``trace`` to be reported, in order;
    a use off the trace raises. It gives the oracle hit rate DESIGN.md asks every budget to show.
    """

    def __init__(self, trace: Sequence[Key]):
        self._trace = list(trace)
        self._uses: dict[Key, list[int]] = {}
        for i, key in enumerate(self._trace):
            self._uses.setdefault(key, []).append(i)
        self._position = 0  # index of the next use

    def on_access(self, key: Key, step: int) -> None:
        if self._position >= len(self._trace) or self._trace[self._position] != key:
            expected = self._trace[self._position] if self._position < len(self._trace) else "end of trace"
            raise ValueError(f"BeladyPolicy: use of {key} at position {self._position}, trace says {expected}")
        self._position += 1

    def on_insert(self, key: Key, step: int) -> None:
        pass

    def on_remove(self, key: Key) -> None:
        pass

    def next_use(self, key: Key) -> float:
        uses = self._uses.get(key, ())
        i = bisect_right(uses, self._position - 1)
        return uses[i] if i < len(uses) else float("inf")

    def victim(self, candidates: Collection[Key], incoming: Key | None = None) -> Key:
        # Ties (several never used again) go to the smallest key, so runs are reproducible.
        return max(sorted(candidates), key=self.next_use)


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRUPolicy, "lfu": LFUPolicy, "arc": ARCPolicy, "shallow": ShallowFavouringPolicy, "fate": FatePolicy,
    "least-stale": LeastStalePolicy,
}


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy by preset name (``lru``, ``lfu``, ``arc``, ``shallow``, ``fate``, ``least-stale``: see
    :mod:`dymoe.runtime.policies`); Belady needs a trace, so build it directly."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name]()


@dataclass
class _Entry:
    precision: str
    slot: int
    pins: int = 0
    prefetched: bool = False


class _Evictable:
    """The unpinned resident keys of one class, as a read-only collection (no list is built)."""

    def __init__(self, cache: "ExpertCache", precision: str):
        self._cache, self._precision = cache, precision

    def __contains__(self, key) -> bool:
        entry = self._cache._entries.get(key)
        return entry is not None and entry.precision == self._precision and entry.pins == 0

    def __iter__(self) -> Iterator[Key]:
        return (k for k in self._cache._by_class[self._precision] if self._cache._entries[k].pins == 0)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class ExpertCache:
    """Residency map over a :class:`SlotPool`, with pin counts and per-class eviction policies.

    ``policy`` is a preset name, a factory called once per precision class (e.g. ``LRUPolicy``), a
    single policy instance (only for a pool of one class), or a mapping class -> policy instance.
    ``on_evict(key)``, when given, hears of every eviction (e.g. ``RuntimeMetrics.evicted``).
    """

    def __init__(self, pool: SlotPool, policy="lru", on_evict: Callable[[Key], None] | None = None):
        self.pool = pool
        self.policies: dict[str, EvictionPolicy] = _policies_for(pool.classes, policy)
        self.on_evict = on_evict
        self.clock = 0
        self.evictions = 0
        self._entries: dict[Key, _Entry] = {}
        self._by_class: dict[str, dict[Key, None]] = {c: {} for c in pool.classes}  # insertion-ordered
        self._evictable = {c: _Evictable(self, c) for c in pool.classes}

    # -- queries --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def peek(self, key: Key) -> Residency | None:
        """Where ``key`` lives, without counting a use (for prefetchers and reports)."""
        entry = self._entries.get(key)
        return None if entry is None else Residency(entry.precision, entry.slot)

    def lookup(self, key: Key) -> Residency | None:
        """Where ``key`` lives, counting a use on a hit; ``None`` on a miss."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self.policies[entry.precision].on_access(key, self._tick())
        return Residency(entry.precision, entry.slot)

    def is_prefetched(self, key: Key) -> bool:
        """True while a copy inserted by a prefetch has not been pinned for compute yet."""
        entry = self._entries.get(key)
        return entry is not None and entry.prefetched

    def is_pinned(self, key: Key) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.pins > 0

    def resident(self, precision: str | None = None) -> list[Key]:
        """Resident keys (of one class, or all) in insertion order."""
        classes = [precision] if precision is not None else self.pool.classes
        return [k for c in classes for k in self._by_class[c]]

    def use_resident(self, keys: Sequence[Key], precision: str) -> int | None:
        """A decode step's hit path in one call: when every one of ``keys`` (distinct) is resident
        at ``precision``, count a use of each (in order) and pin each, as :meth:`lookup` and
        :meth:`pin` would, and return how many of them a prefetch brought in; otherwise change
        nothing and return None."""
        found = self._entries
        entries = [found.get(key) for key in keys]
        if any(entry is None or entry.precision != precision for entry in entries):
            return None
        policy, prefetched = self.policies[precision], 0
        for key, entry in zip(keys, entries):
            self.clock += 1
            policy.on_access(key, self.clock)
            entry.pins += 1
            prefetched += entry.prefetched
            entry.prefetched = False
        return prefetched

    def slots(self, keys: Sequence[Key]) -> list[int]:
        """The slots of resident ``keys`` (as :meth:`peek` would give, without its records)."""
        return [self._entry(key).slot for key in keys]

    def unpin_all(self, keys: Sequence[Key]) -> None:
        """:meth:`unpin` each of ``keys``."""
        for key in keys:
            self.unpin(key)

    # -- pins -----------------------------------------------------------------------------------

    def pin(self, key: Key) -> Residency:
        """Keep ``key`` resident until the matching :meth:`unpin` (pins nest); ends its prefetched state."""
        entry = self._entry(key)
        entry.pins += 1
        entry.prefetched = False
        return Residency(entry.precision, entry.slot)

    def unpin(self, key: Key) -> None:
        entry = self._entry(key)
        if entry.pins == 0:
            raise ValueError(f"expert {key} is not pinned")
        entry.pins -= 1

    # -- arrivals and departures ----------------------------------------------------------------

    def make_room(self, precision: str, incoming: Key | None = None) -> int | None:
        """A slot of ``precision`` now owned by the caller, evicting one unpinned copy if the class
        is full; ``None`` if every copy of the class is pinned (run what is pinned, then retry)."""
        return self._make_room(precision, incoming)[0]

    def choose_victims(self, precision: str, n: int) -> list[Key]:
        """Up to ``n`` unpinned copies of ``precision`` in the order the class's policy would evict
        them, left in place (a caller pins them until :meth:`hand_over`: the mapped decode's ring).
        One pass over the policy's order where it keeps one (``ranked``, LRU's), else ``victim``
        asked ``n`` times (each pick pinned meanwhile, so the next is another)."""
        policy, evictable = self.policies[precision], self._evictable[precision]
        ranked = getattr(policy, "ranked", None)
        if ranked is not None:
            return list(itertools.islice((key for key in ranked() if key in evictable), n))
        chosen: list[Key] = []
        try:
            while len(chosen) < n and next(iter(evictable), None) is not None:
                chosen.append(policy.victim(evictable, None))
                self._entries[chosen[-1]].pins += 1
        finally:
            for key in chosen:
                self._entries[key].pins -= 1
        return chosen

    def hand_over(self, victim: Key, key: Key) -> int:
        """``victim`` leaves (an eviction, pinned or not) and ``key`` takes its slot (a use, as a
        demand :meth:`insert`); returns the slot."""
        entry = self._forget(victim)
        self._count_eviction(victim)
        return self.insert(key, entry.precision, slot=entry.slot)[0]

    def insert(self, key: Key, precision: str, slot: int | None = None, *, prefetched: bool = False) -> tuple[int, list[Key]]:
        """Make ``key`` resident at ``precision``; returns (its slot, the keys evicted for it).

        ``slot`` is one already obtained from :meth:`make_room`; without it the cache finds one,
        evicting through the class's policy. A demand insert (``prefetched=False``) counts as a use.
        Raises :class:`AllPinnedError` when no slot can be freed.
        """
        if key in self._entries:
            raise ValueError(f"expert {key} is already resident")
        evicted: list[Key] = []
        if slot is None:
            slot, evicted = self._free_slot(precision, key)
        self._entries[key] = _Entry(precision, slot, prefetched=prefetched)
        self._by_class[precision][key] = None
        policy = self.policies[precision]
        policy.on_insert(key, self._tick())
        if not prefetched:
            policy.on_access(key, self._tick())
        return slot, evicted

    def remove(self, key: Key) -> None:
        """Drop ``key``'s copy and free its slot (e.g. a demotion); a pinned copy cannot leave."""
        if self._entry(key).pins:
            raise ValueError(f"expert {key} is pinned and cannot leave")
        entry = self._forget(key)
        self.pool.release(entry.precision, entry.slot)

    def drop_layer(self, layer: int) -> None:
        """Remove every unpinned copy of one layer (the on-demand preset: load, run, drop)."""
        for key in [k for k, e in self._entries.items() if k[0] == layer and not e.pins]:
            self.remove(key)

    # -- internals ------------------------------------------------------------------------------

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _entry(self, key: Key) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(f"expert {key} is not resident")
        return entry

    def _forget(self, key: Key) -> _Entry:
        """Drop ``key``'s entry (its slot stays the caller's to release or reuse)."""
        entry = self._entries.pop(key)
        del self._by_class[entry.precision][key]
        self.policies[entry.precision].on_remove(key)
        return entry

    def _evict(self, key: Key) -> None:
        self.remove(key)
        self._count_eviction(key)

    def _count_eviction(self, key: Key) -> None:
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(key)

    def _make_room(self, precision: str, incoming: Key | None) -> tuple[int | None, list[Key]]:
        slot = self.pool.acquire(precision)
        if slot is not None:
            return slot, []
        evictable = self._evictable[precision]
        if next(iter(evictable), None) is None:
            return None, []
        victim = self.policies[precision].victim(evictable, incoming)
        self._evict(victim)
        return self.pool.acquire(precision), [victim]

    def _free_slot(self, precision: str, incoming: Key) -> tuple[int, list[Key]]:
        slot, evicted = self._make_room(precision, incoming)
        if slot is None:
            n = self.pool.num_slots(precision)
            raise AllPinnedError(
                f"no {precision} slot for expert {incoming}: all {n} {precision} slots hold pinned "
                f"experts. The expert pool must hold at least one layer's top-k experts; raise --device-memory"
            )
        return slot, evicted


def _policies_for(classes: Sequence[str], policy) -> dict[str, EvictionPolicy]:
    if isinstance(policy, str):
        return {c: make_policy(policy) for c in classes}
    if isinstance(policy, Mapping):
        missing = set(classes) - set(policy)
        if missing:
            raise ValueError(f"no eviction policy for precision classes {sorted(missing)}")
        return dict(policy)
    if callable(policy):  # a factory: a policy class or e.g. lambda: BeladyPolicy(trace)
        return {c: policy() for c in classes}
    if len(classes) > 1:
        raise ValueError("one policy instance cannot rank several precision classes; pass a factory or a mapping")
    return {c: policy for c in classes}
