"""Fate's cache policies (arXiv 2502.12224) behind the :class:`~dymoe.runtime.cache.EvictionPolicy` protocol.

* :class:`ARCPolicy`: adaptive replacement (Megiddo & Modha, FAST 2003). Resident copies sit in a
  recency list T1 (used once since they arrived) or a frequency list T2 (used again); ghost lists B1
  and B2 remember the keys that recently left each. A request for a ghost of B1 says T1 was too short,
  one of B2 that T2 was, and the target size ``p`` of T1 moves accordingly.
* :class:`ShallowFavouringPolicy`: a per-layer budget. Fate prefetches layer l+1's experts with its
  router applied to layer l's gate input, which is least accurate for the shallow layers, so those
  layers get a larger share of the slots (linearly decreasing weights by default). The victim comes
  from the layer most over its share, chosen there by a per-layer policy (LRU by default).
* :class:`FatePolicy`: the shallow-favouring budget with ARC within each layer (Fate's cache).

The cache only tells a policy about uses, arrivals and departures, so both learn what ARC's
algorithm needs but is not told: the capacity (the most copies ever resident, which is the class's
slot count once it has filled) and, without ``layers=``, the MoE layers (those seen so far, in order).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Collection, Sequence

if TYPE_CHECKING:
    from dymoe.runtime.cache import EvictionPolicy

Key = tuple[int, int]  # (layer, expert), as in dymoe.runtime.cache


class ARCPolicy:
    """Adaptive replacement cache, as the paper's Fig. 4, adapted to the cache's protocol.

    The paper's request for ``x`` arrives here in pieces: ``victim(candidates, x)`` when the class is
    full (adapt ``p`` on a ghost hit, then REPLACE), ``on_remove`` for the copy that left (it becomes
    a ghost), ``on_insert(x)`` (into T1, or into T2 after a ghost hit) and ``on_access(x)``. A demand
    miss is one request though the cache reports an insert and a use, and a prefetched copy's first
    use is the request the prefetch anticipated, so the first use after an insert does not promote
    to T2. Without ``incoming`` (``make_room(precision)``), the ghost hit adapts ``p`` at the insert,
    one replacement late. ``capacity`` (the paper's c) defaults to the most copies ever resident.
    Every operation is O(1) apart from skipping pinned copies at the LRU ends.
    """

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.p = 0.0  # target size of T1
        self.t1: OrderedDict[Key, None] = OrderedDict()  # LRU first
        self.t2: OrderedDict[Key, None] = OrderedDict()
        self.b1: OrderedDict[Key, None] = OrderedDict()
        self.b2: OrderedDict[Key, None] = OrderedDict()
        self._high_water = 0
        self._fresh: set[Key] = set()  # inserted, first use not seen yet
        self._adapted: Key | None = None  # incoming whose ghost hit already moved p in victim()

    @property
    def c(self) -> int:
        return self.capacity if self.capacity is not None else self._high_water

    def on_access(self, key: Key, step: int) -> None:
        if key in self._fresh:
            self._fresh.discard(key)
            (self.t1 if key in self.t1 else self.t2).move_to_end(key)
        elif key in self.t1:
            del self.t1[key]
            self.t2[key] = None
        elif key in self.t2:
            self.t2.move_to_end(key)
        else:  # a use the cache never announced: count it as an arrival
            self.on_insert(key, step)
            self._fresh.discard(key)

    def on_insert(self, key: Key, step: int) -> None:
        if key in self.b1 or key in self.b2:
            if self._adapted != key:
                self._adapt(key)
            self.b1.pop(key, None)
            self.b2.pop(key, None)
            self.t2[key] = None
        else:
            self.t1[key] = None
        self._adapted = None
        self._fresh.add(key)
        self._high_water = max(self._high_water, len(self.t1) + len(self.t2))
        self._trim_ghosts()

    def on_remove(self, key: Key) -> None:
        self._fresh.discard(key)
        if key in self.t1:
            del self.t1[key]
            self.b1[key] = None
        elif key in self.t2:
            del self.t2[key]
            self.b2[key] = None

    def victim(self, candidates: Collection[Key], incoming: Key | None = None) -> Key:
        if incoming is not None and incoming != self._adapted and (incoming in self.b1 or incoming in self.b2):
            self._adapt(incoming)
            self._adapted = incoming
        t1_first = len(self.t1) >= 1 and ((incoming in self.b2 and len(self.t1) == self.p) or len(self.t1) > self.p)
        for order in ((self.t1, self.t2) if t1_first else (self.t2, self.t1)):
            for key in order:  # LRU first; pinned copies are few
                if key in candidates:
                    return key
        raise LookupError("ARCPolicy has no candidate to evict")

    def _adapt(self, key: Key) -> None:
        if key in self.b1:
            self.p = min(float(self.c), self.p + max(1.0, len(self.b2) / len(self.b1)))
        else:
            self.p = max(0.0, self.p - max(1.0, len(self.b1) / len(self.b2)))

    def _trim_ghosts(self) -> None:
        # The paper deletes these ghosts before REPLACE (case IV); afterwards the same keys go, since
        # a replacement only adds at the MRU end. Keeps |T1|+|B1| <= c and all four lists <= 2c.
        c = self.c
        while self.b1 and len(self.t1) + len(self.b1) > c:
            self.b1.popitem(last=False)
        for ghosts in (self.b2, self.b1):
            while ghosts and len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) > 2 * c:
                ghosts.popitem(last=False)


def linear_weights(n: int, ratio: float = 2.0) -> list[float]:
    """``n`` weights falling linearly from ``ratio`` (the shallowest layer) to 1 (the deepest)."""
    if n == 1:
        return [1.0]
    return [ratio - (ratio - 1.0) * i / (n - 1) for i in range(n)]


class ShallowFavouringPolicy:
    """A per-layer split of the class's slots that favours shallow layers (Fate, arXiv 2502.12224).

    Layer l's share of the c slots is ``c * w_l / sum(w)``. ``layers`` is the MoE layers' indices (or
    their number, for 0..n-1); without it, the layers seen so far in ascending order. ``weights``
    (one per layer, shallowest first) default to :func:`linear_weights` with ``ratio``. The victim
    comes from the layer most over its share (ties: the deeper layer), so every layer's count stays
    within a slot of its share while all layers ask; within that layer ``within()`` (one instance per
    layer, LRU by default) chooses, and a policy with a ``capacity`` attribute (ARC) gets its layer's
    share as capacity. The layer is chosen from the copies resident before ``incoming`` arrives:
    counting the arrival in its layer forces a layer at its share to evict its own other unpinned
    experts, which cost 2 points of hit rate on the demo trace at a quarter budget (37.3% vs 39.4%),
    and it keeps the choice the same whether or not the caller names ``incoming``.
    Cost per victim: a sort of the layers, plus the layer policy's own.
    """

    def __init__(self, layers: int | Sequence[int] | None = None, weights: Sequence[float] | None = None,
                 within: Callable[[], "EvictionPolicy"] | None = None, ratio: float = 2.0):
        if within is None:
            from dymoe.runtime.cache import LRUPolicy  # cache.py registers this module's policies

            within = LRUPolicy
        self._learn_layers = layers is None
        numbered = list(range(layers)) if isinstance(layers, int) else layers
        self.layers: list[int] = sorted(numbered) if numbered is not None else []
        if weights is not None and not self._learn_layers and len(weights) != len(self.layers):
            raise ValueError(f"{len(weights)} shallow-favouring weights for {len(self.layers)} layers")
        self._weights, self._ratio, self._within = weights, ratio, within
        self.inner: dict[int, EvictionPolicy] = {}
        self.counts: dict[int, int] = {}
        self._resident = self._high_water = 0
        self.shares: dict[int, float] = {}
        self._shares_for: tuple[int, int] = (-1, -1)  # (capacity, number of layers) they were made for

    def on_access(self, key: Key, step: int) -> None:
        self._layer(key[0]).on_access(key, step)

    def on_insert(self, key: Key, step: int) -> None:
        self._layer(key[0]).on_insert(key, step)
        self.counts[key[0]] += 1
        self._resident += 1
        self._high_water = max(self._high_water, self._resident)

    def on_remove(self, key: Key) -> None:
        policy = self.inner.get(key[0])
        if policy is not None:
            policy.on_remove(key)
            self.counts[key[0]] -= 1
            self._resident -= 1

    def victim(self, candidates: Collection[Key], incoming: Key | None = None) -> Key:
        if incoming is not None:
            self._layer(incoming[0])
        shares = self._current_shares()
        arriving = incoming[0] if incoming is not None else None
        over = {l: n - shares.get(l, 0.0) for l, n in self.counts.items() if n}
        for layer in sorted(over, key=lambda l: (-over[l], -l)):  # ties: the deeper layer gives
            try:
                return self.inner[layer].victim(candidates, incoming if layer == arriving else None)
            except (LookupError, StopIteration):
                continue  # every copy of that layer is pinned
        raise LookupError("ShallowFavouringPolicy has no candidate to evict")

    def _layer(self, layer: int) -> "EvictionPolicy":
        policy = self.inner.get(layer)
        if policy is None:
            if self._learn_layers:
                self.layers = sorted([*self.layers, layer])
            elif layer not in self.layers:
                raise ValueError(f"expert of layer {layer}, but the shallow-favouring policy was given "
                                 f"layers {self.layers}")
            policy = self.inner[layer] = self._within()
            self.counts[layer] = 0
        return policy

    def _current_shares(self) -> dict[int, float]:
        capacity = max(self._high_water, self._resident)
        if self._shares_for != (capacity, len(self.layers)):
            weights = self._weights if self._weights is not None else linear_weights(len(self.layers), self._ratio)
            if len(weights) < len(self.layers):
                raise ValueError(f"{len(weights)} shallow-favouring weights, but experts of {len(self.layers)} "
                                 f"layers arrived ({self.layers}); give one weight per MoE layer")
            total = sum(weights[:len(self.layers)])
            self.shares = {l: capacity * w / total for l, w in zip(self.layers, weights)}
            for layer, policy in self.inner.items():
                if hasattr(policy, "capacity"):
                    policy.capacity = max(1, round(self.shares[layer]))
            self._shares_for = (capacity, len(self.layers))
        return self.shares


class FatePolicy(ShallowFavouringPolicy):
    """Fate's cache: the shallow-favouring per-layer budget with :class:`ARCPolicy` within each layer."""

    def __init__(self, layers: int | Sequence[int] | None = None, weights: Sequence[float] | None = None,
                 ratio: float = 2.0):
        super().__init__(layers, weights, within=ARCPolicy, ratio=ratio)


class LeastStalePolicy:
    """Evict the copy whose next use is furthest away, as far as the layer order tells.

    A forward pass visits the MoE layers in order, so where each layer stands in the cycle is known
    exactly; only whether an expert will be chosen is not. Each copy is ranked by ``m * n + d``:
    ``m`` = how many times its layer has come by since the copy's last use without choosing it
    (LRU counted in passes, not events), ``d`` = how many layer steps until its layer comes again
    (the current layer counts a whole pass: its copies that are not pinned were used by an earlier
    wave or not chosen), ``n`` = the number of MoE layers; the highest rank leaves. Where every
    copy was used in the last pass (a long prefill, or a budget that holds most of the experts)
    this evicts the layer just passed, not the one about to come: LRU does the opposite and, once
    the experts a pass needs exceed the slots, misses on nearly every one of them. Fresh
    prefetches of a coming layer rank below everything (``m = -1``).

    Our reading of the idea behind SpecMD's Least-Stale eviction (arXiv 2602.03921: expert access
    follows the layer order, not temporal locality); the paper's exact rule may differ.

    A pass starts when a use is of a shallower layer than the one before. Per layer, copies are kept
    in order of last use, so the candidate of a layer is its first unpinned copy and a victim costs
    one look per layer (plus pinned copies skipped). ``layers`` (indices, or their number) fixes the
    cycle; without it the layers seen so far, in ascending order.
    """

    def __init__(self, layers: int | Sequence[int] | None = None):
        self._learn_layers = layers is None
        numbered = list(range(layers)) if isinstance(layers, int) else layers
        self.layers: list[int] = sorted(numbered) if numbered is not None else []
        self._index = {l: i for i, l in enumerate(self.layers)}
        self.by_layer: dict[int, OrderedDict[Key, int]] = {l: OrderedDict() for l in self.layers}  # key -> pass
        self.passes = 0
        self.current: int | None = None  # the layer of the latest use

    def on_access(self, key: Key, step: int) -> None:
        layer = key[0]
        self._learn(layer)
        if self.current is not None and self._index[layer] < self._index[self.current]:
            self.passes += 1
        self.current = layer
        self._stamp(key)

    def on_insert(self, key: Key, step: int) -> None:
        self._learn(key[0])
        self._stamp(key)  # a demand insert is also accessed; a prefetch is stamped as of now

    def on_remove(self, key: Key) -> None:
        entries = self.by_layer.get(key[0])
        if entries is not None:
            entries.pop(key, None)

    def rank(self, key: Key, incoming: Key | None = None) -> int:
        """``m * n + d`` of a resident copy (class docstring); the highest leaves first. An
        ``incoming`` copy of a shallower layer than the latest use starts the next pass already."""
        layer, n = key[0], len(self.layers)
        passes, at = self.passes, self._index[self.current] if self.current is not None else -1
        if incoming is not None and incoming[0] in self._index and self._index[incoming[0]] < at:
            passes, at = passes + 1, self._index[incoming[0]]
        ahead = self._index[layer] > at  # its layer has not come yet in this pass
        stale = passes - self.by_layer[layer][key] - (1 if ahead else 0)
        distance = self._index[layer] - at if ahead else n - at + self._index[layer]
        return stale * n + distance

    def victim(self, candidates: Collection[Key], incoming: Key | None = None) -> Key:
        best, best_rank = None, None
        for entries in self.by_layer.values():
            key = next((k for k in entries if k in candidates), None)  # its layer's least recent unpinned copy
            if key is None:
                continue
            rank = self.rank(key, incoming)
            if best_rank is None or rank > best_rank:
                best, best_rank = key, rank
        if best is None:
            raise LookupError("LeastStalePolicy has no candidate to evict")
        return best

    def _stamp(self, key: Key) -> None:
        entries = self.by_layer[key[0]]
        entries[key] = self.passes
        entries.move_to_end(key)

    def _learn(self, layer: int) -> None:
        if layer in self._index:
            return
        if not self._learn_layers:
            raise ValueError(f"expert of layer {layer}, but the least-stale policy was given layers {self.layers}")
        self.layers = sorted([*self.layers, layer])
        self._index = {l: i for i, l in enumerate(self.layers)}
        self.by_layer.setdefault(layer, OrderedDict())
