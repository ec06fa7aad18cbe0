"""DynaExq (arXiv 2511.15015) as an expert provider: every expert resident at low precision, the hot
ones promoted to a high-precision copy.

Every routed expert's int4 copy is loaded into its own low-precision slot at start-up, so a token
never waits for a missing expert. A :class:`HotnessController` keeps an exponential moving average of
how often each expert is used; every ``interval`` decode steps the hottest experts of a layer that
have no high-precision copy are promoted: their bf16 copy is fetched asynchronously into the
high-precision slots, evicting (demoting) the coldest high copy. A step uses a high copy only once its
transfer has landed, else the resident low copy: promotions never block a forward pass. Both slot
classes live in one preallocated pool, so allocation stays deterministic.

Fallback (DESIGN.md: "where even the low-bit copies of all experts do not fit"): when the budget
cannot hold every int4 copy plus a minimal high pool (one token's top-k bf16 slots), the runtime says
so in one line on stderr and keeps the low tier as a cache too: the high pool keeps its top-k slots
(fewer only when even that leaves no room for one token's top-k int4 copies), the rest of the budget
becomes int4 slots, filled at start-up with an even share of every layer's experts and then managed
least recently used; a low copy that is not resident is fetched on demand and the step waits for it
(a stall, as in any offloading preset). Promotions continue as before. Only a budget below one
token's top-k int4 copies is refused. The two tiers share one copy stream, so a demand fetch of a
low copy queues behind promotions already issued.

In the metrics, a hit is a use served by a landed high-precision copy and a miss one served by a low
copy: with every low copy resident nothing is fetched on a miss (missed bytes 0, no stall); in the
fallback a miss whose low copy was not resident fetches it (missed bytes, stall). Prefetches count
promotions; H2D bytes are promotions plus, in the fallback, the low-tier fetches.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from dymoe.errors import BudgetError
from dymoe.models.expert_math import SWIGLU
from dymoe.quant.kernels import decode_workspace, expert_decode_capturable, routed_decode
from dymoe.runtime.cache import ExpertCache, LRUPolicy
from dymoe.runtime.expert_compute import group_by_expert, run_grouped
from dymoe.runtime.metrics import RuntimeMetrics
from dymoe.runtime.offload import RuntimeReporting, bound_math, compile_decode
from dymoe.runtime.prefill import PrefillDequantizer, prefill_capacity
from dymoe.runtime.slot_pool import SlotPool, format_size
from dymoe.runtime.transfer import IndexUpload, TransferEngine


@dataclass(frozen=True)
class HotnessConfig:
    budget_bytes: int
    high: str = "bf16"
    low: str = "int4"
    decay: float = 0.9  # EMA factor per step a layer runs
    interval: int = 4  # decode steps of a layer between promotion rounds


class HotnessController:
    """Long-term hotness per (layer, expert): an exponential moving average of activations."""

    def __init__(self, layers: list[int], num_experts: int, decay: float):
        self.row = {layer: i for i, layer in enumerate(layers)}
        self.hot = torch.zeros(len(layers), num_experts)
        self.decay = decay

    def observe(self, layer: int, experts: list[int]) -> None:
        row = self.hot[self.row[layer]]
        row.mul_(self.decay)
        row[experts] += 1.0 - self.decay

    def hottest(self, layer: int, n: int) -> list[int]:
        return torch.argsort(self.hot[self.row[layer]], descending=True)[:n].tolist()

    def value(self, key) -> float:
        return float(self.hot[self.row[key[0]], key[1]])


class ColdestFirst:
    """Eviction policy of the high-precision copies: demote the coldest by long-term hotness."""

    def __init__(self, controller: HotnessController):
        self.controller = controller

    def on_access(self, key, step) -> None:
        pass

    def on_insert(self, key, step) -> None:
        pass

    def on_remove(self, key) -> None:
        pass

    def victim(self, candidates, incoming=None):
        return min(candidates, key=self.controller.value)


class HotnessExperts(RuntimeReporting):
    """The `dynaexq` preset's :class:`~dymoe.models.moe.ExpertProvider`."""

    def __init__(self, store, config: HotnessConfig, top_k: int, device, dtype: torch.dtype,
                 metrics: RuntimeMetrics | None = None):
        self.store, self.config, self.top_k = store, config, top_k
        self.device, self.dtype = torch.device(device), dtype
        self.metrics = metrics or RuntimeMetrics()
        self.layers = list(store.layers)
        self.num_experts = store.num_experts
        self.low_layout, self.high_layout = store.layout(config.low), store.layout(config.high)
        counts = hotness_slot_counts(config, self.low_layout.nbytes, self.high_layout.nbytes,
                                     len(self.layers) * self.num_experts, top_k)
        n_high, n_low = counts[config.high], counts[config.low]
        self.fallback = n_low < len(self.layers) * self.num_experts
        self.pool = SlotPool(self.device, {config.high: self.high_layout.nbytes, config.low: self.low_layout.nbytes},
                             counts)
        self.controller = HotnessController(self.layers, self.num_experts, config.decay)
        # two caches over the one pool, one per class: an expert may hold a high and a low copy at once
        self.cache = self._new_cache()
        self.low_cache = ExpertCache(self.pool, LRUPolicy, on_evict=self.metrics.evicted)
        self.transfers = TransferEngine(self.device, self.metrics, measure_stalls=True)  # fallback fetches stall
        self.high_per_layer = max(1, n_high // len(self.layers))
        self._steps = {layer: 0 for layer in self.layers}
        self._promotions: dict = {}  # (layer, expert) -> the ticket of its latest high copy
        for precision in (config.high, config.low):
            # the deferred decode's filler slot (decode_prepare): a high slot stays unwritten until a
            # promotion lands, and uninitialised bytes could hold NaN bit patterns
            if self.pool.num_slots(precision):
                self.pool.view(precision, 0).zero_()
        self._load_low_copies()
        self._low_table = torch.tensor([self.pool.offset(config.low, s) for s in range(n_low)], dtype=torch.int64,
                                       device=self.device)
        self._high_table = torch.tensor([self.pool.offset(config.high, s) for s in range(n_high)], dtype=torch.int64,
                                        device=self.device)
        self._upload = IndexUpload(top_k, self.device, rows=4)  # slot ids and rows of both classes
        # the deferred decode's slot and mask rows of both classes, in one copy per step (the host
        # pays per upload, and decode is bound by the host)
        self._padded_upload = IndexUpload(4 * top_k, self.device, rows=1)
        self._classes = ((config.high, self._high_table), (config.low, self._low_table))
        self._prefill = PrefillDequantizer(self.pool.buffer, lambda s: self.pool.offset(config.low, s), self.low_layout,
                                           prefill_capacity(self.low_layout, n_low, self.num_experts, dtype), dtype,
                                           self._wait_copy)
        if self.device.type == "cuda":
            self._prefill.warm_up()  # Triton compiles at start-up, not in the first prefill
        self._workspace = {p: decode_workspace(lay, top_k, 1, self.device)
                           for p, lay in ((config.low, self.low_layout), (config.high, self.high_layout))}
        self.precision_uses = {config.high: 0, config.low: 0}
        self.math = SWIGLU  # the model's, once bound

    def bind(self, model) -> None:
        """Called by the model when it attaches this runtime: the experts compute as its family says,
        and on a GPU the decode kernels (specialised on that activation) compile here, at the width
        the CUDA-graph decode launches (every class over k columns). An eager decode (``--eager``)
        launches each class over as many columns as run at it, compiled on first use."""
        self.math = bound_math(model, self.low_layout)
        for (precision, table), layout in zip(self._classes, (self.high_layout, self.low_layout)):
            if self._workspace[precision] is not None:
                compile_decode(self.pool.buffer, table, layout, self._workspace[precision], (self.top_k,), self.math,
                               self.dtype)

    def _new_cache(self) -> ExpertCache:
        return ExpertCache(self.pool, {self.config.high: ColdestFirst(self.controller), self.config.low: LRUPolicy()},
                           on_evict=self.metrics.evicted)

    def forget_warm_up(self) -> None:
        """Also the hotness the warm-up added and any high copy promoted for it, so the first
        prompt is promoted as it would have been without it. (In the fallback the low copies it
        fetched stay: they hold the same values.)"""
        super().forget_warm_up()  # the high copies' cache emptied once every copy has landed
        self._promotions.clear()
        self.controller.hot.zero_()
        self._steps = dict.fromkeys(self._steps, 0)

    def _load_low_copies(self) -> None:
        """Fill every low slot once (the start-up cost DynaExq pays): all experts, or in the fallback
        an even share of every layer's (expert-major order)."""
        order = [(layer, e) for e in range(self.num_experts) for layer in self.layers]
        for key in order[: self.pool.num_slots(self.config.low)]:
            slot, _ = self.low_cache.insert(key, self.config.low)
            self.pool.view(self.config.low, slot).copy_(self.store.blob(*key, self.config.low))

    # ---- the ExpertProvider interface ------------------------------------------------------------

    def run_experts(self, layer, hidden, expert_ids, expert_weights):
        if hidden.shape[0] > 1:  # prefill: the low copies, grouped
            self.controller.observe(layer, expert_ids.unique().tolist())
            grouping = group_by_expert(expert_ids)
            schedule = None
            if not self.fallback:  # every low copy resident: the layer's experts dequantized in a launch or a few
                schedule = self._prefill.runs([(j, self.low_cache.peek((layer, e)).slot, None)
                                               for j, e in enumerate(grouping[1])])
            return run_grouped(hidden, expert_ids, expert_weights, lambda e: self._low_weights(layer, e), grouping,
                               schedule=schedule, math=self.math)
        experts, high, low = self._admit(layer, expert_ids[0])
        out = None
        for i, (precision, rows, table) in enumerate(((self.config.high, high, self._high_table),
                                                      (self.config.low, low, self._low_table))):
            if rows:
                slots = self._upload([self._slot(layer, experts[j], precision) for j in rows], 2 * i)
                weights = expert_weights[0] if len(rows) == len(experts) else expert_weights[0, self._upload(rows, 2 * i + 1)]
                part = self._decode(hidden, slots, weights, precision, table)
                out = part if out is None else out + part
        self._release(layer, experts, high, low)
        return out

    def _admit(self, layer: int, ids: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
        """Read one token's routing ``ids`` [k] (the step's one host sync), observe it, pin each
        expert's landed high copy or else its low copy (fetching a missing one in the fallback) and
        have the compute stream wait for those fetches: (experts, rows run high, rows run low)."""
        experts = ids.tolist()
        self.controller.observe(layer, experts)
        high = [j for j, e in enumerate(experts) if self._high_ready((layer, e))]
        low = [j for j in range(len(experts)) if j not in high]
        tickets = [self._pin_low((layer, experts[j])) for j in low]  # all fetches start before any wait
        for ticket in tickets:
            self.metrics.miss(layer, ticket.nbytes if ticket is not None else 0)
            if ticket is not None:
                self.transfers.wait(ticket)
        self.precision_uses[self.config.high] += len(high)
        self.precision_uses[self.config.low] += len(low)
        return experts, high, low

    def _release(self, layer: int, experts: list[int], high: list[int], low: list[int]) -> None:
        """After a token's compute is queued: unpin its copies, fence, and every ``interval`` steps
        of the layer promote its hottest experts."""
        for j in high:
            self.cache.unpin((layer, experts[j]))
        for j in low:
            self.low_cache.unpin((layer, experts[j]))
        self.transfers.fence()
        self.metrics.tokens_seen(layer, 1)
        self._steps[layer] += 1
        if self._steps[layer] % self.config.interval == 0:
            self._promote(layer)

    # ---- decode in three steps, for the CUDA-graph decode (dymoe/models/decode_graphs.py) -----------

    @property
    def deferred_decode(self) -> bool:
        """Whether a token's expert compute reads only fixed device rows once prepared, so a CUDA
        graph records it. Which of a token's experts have a landed high copy varies per token, so
        each class runs all k columns: its row holds the slots of the experts that run at it and
        slot 0 of the class elsewhere, whose weight a 0/1 mask row zeroes (the fused kernels skip a
        zero column without reading it). Not on a GPU without Triton
        (:func:`expert_decode_capturable`): there the experts run between the segments."""
        return expert_decode_capturable(self.device)

    def decode_prepare(self, layer, hidden, ids, weights) -> None:
        """Everything before the compute of one token's layer (:meth:`_admit`), then each class's
        :meth:`_class_rows` into the fixed rows :meth:`decode_compute` reads, in one upload."""
        experts, high, low = self._admit(layer, ids)
        values = []
        for (precision, _), rows in zip(self._classes, (high, low)):
            slots, mask = self._class_rows(layer, experts, rows, precision)
            values += slots + mask
        self._padded_upload(values)
        self._deferred = (layer, experts, high, low)

    def decode_compute(self, layer, hidden, weights) -> torch.Tensor:
        """The experts :meth:`decode_prepare` pinned, run on hidden [1, H] with weights [k]: each
        class over all k columns, weights times its mask (device work only)."""
        k = weights.shape[0]
        rows = self._padded_upload.row(0, 4 * k).view(4, k)
        out = None
        for c, (precision, table) in enumerate(self._classes):
            if table.numel():  # the fallback may leave no high slot: that class never runs
                part = self._decode(hidden, rows[2 * c], weights * rows[2 * c + 1].to(weights.dtype), precision, table)
                out = part if out is None else out + part
        return out

    def decode_finish(self, layer) -> None:
        """After the compute is queued: what run_experts does after it (:meth:`_release`)."""
        pending, experts, high, low = self._deferred
        assert pending == layer, f"decode_finish({layer}) after decode_prepare({pending})"
        self._release(layer, experts, high, low)

    def _class_rows(self, layer: int, experts: list[int], rows: list[int], precision: str):
        """(slot ids, 0/1 mask), k entries each, of class ``precision`` for a token's ``experts``
        of which ``rows`` run at it: their slots; elsewhere slot 0 of the class, a valid address
        whose zero weight keeps the kernels from reading it."""
        mask = [int(j in rows) for j in range(len(experts))]
        slots = [self._slot(layer, e, precision) if m else 0 for e, m in zip(experts, mask)]
        return slots, mask

    def _high_ready(self, key) -> bool:
        """A high copy serves only once it has landed; the low copy serves meanwhile (no stall)."""
        if key not in self.cache:
            return False
        ticket = self._promotions.get(key)
        if ticket is not None:
            if not self.transfers.is_done(ticket):
                return False
            self.transfers.wait(ticket)
            del self._promotions[key]
        prefetched = self.cache.is_prefetched(key)
        self.cache.lookup(key)
        self.cache.pin(key)
        self.metrics.hit(key[0], prefetched=prefetched)
        return True

    def _pin_low(self, key):
        """Pin ``key``'s low copy; in the fallback, first fetch it if it is not resident (the ticket to
        wait for; None when it was resident). A step pins at most top-k low copies, and there are at
        least that many low slots, so room is always found."""
        if self.low_cache.lookup(key) is not None:
            self.low_cache.pin(key)
            return None
        slot, _ = self.low_cache.insert(key, self.config.low)
        self.low_cache.pin(key)
        return self.transfers.fetch(key, self.store.blob(*key, self.config.low), self.pool.view(self.config.low, slot))

    def _slot(self, layer: int, expert: int, precision: str) -> int:
        cache = self.low_cache if precision == self.config.low else self.cache
        return cache.peek((layer, expert)).slot

    def _decode(self, hidden, index, weights, precision, table):
        layout = self.high_layout if precision == self.config.high else self.low_layout
        return routed_decode(self.pool.buffer, table, index[None], weights[None], layout, hidden,
                             workspace=self._workspace[precision], math=self.math)

    def _promote(self, layer: int) -> None:
        """Fetch high copies of the layer's hottest experts that lack one (asynchronously)."""
        for e in self.controller.hottest(layer, self.high_per_layer):
            key = (layer, e)
            if key in self.cache:
                continue
            if self.controller.value(key) == 0:  # before make_room: a slot taken and not filled would leak
                return
            slot = self.cache.make_room(self.config.high, incoming=key)
            if slot is None:
                return
            self.cache.insert(key, self.config.high, slot, prefetched=True)
            self._promotions[key] = self.transfers.fetch(key, self.store.blob(layer, e, self.config.high),
                                                         self.pool.view(self.config.high, slot))
            self.metrics.prefetch(layer)

    def _low_weights(self, layer: int, expert: int):
        """Prefill: one expert's low copy, dequantized (made resident first in the fallback)."""
        key = (layer, expert)
        ticket = self._pin_low(key)
        if ticket is not None:
            self.metrics.miss(layer, ticket.nbytes)
            self.transfers.wait(ticket)
        weights = self._prefill.weights(self.low_cache.peek(key).slot)
        self.low_cache.unpin(key)
        self.transfers.fence()  # a later fetch into this slot waits for the dequantization just queued
        return weights


def hotness_slot_counts(config: HotnessConfig, low_bytes: int, high_bytes: int, experts: int,
                        top_k: int) -> dict[str, int]:
    """High and low slot counts for ``config.budget_bytes``: every low copy and the rest high when
    that leaves one token's top-k high slots; else the fallback (module docstring), announced on
    stderr. Raises :class:`BudgetError` below one token's top-k low copies."""
    budget, high, low = config.budget_bytes, config.high, config.low
    all_low = experts * low_bytes
    if budget >= all_low + top_k * high_bytes:
        return {high: (budget - all_low) // high_bytes, low: experts}
    n_high = top_k if budget >= top_k * (high_bytes + low_bytes) else max(0, (budget - top_k * low_bytes) // high_bytes)
    n_low = min(experts, (budget - n_high * high_bytes) // low_bytes)
    if n_low < top_k:
        raise BudgetError(
            f"--device-memory {format_size(budget)} cannot hold one token's {top_k} experts at {low} "
            f"({format_size(top_k * low_bytes)}): raise --device-memory to at least {format_size(top_k * low_bytes)} "
            f"(dynaexq keeps every expert at {low} with {format_size(all_low + top_k * high_bytes)})"
        )
    print(f"dymoe: dynaexq: --device-memory {format_size(budget)} cannot hold every expert at {low} plus "
          f"{top_k} {high} slots ({format_size(all_low + top_k * high_bytes)}): {n_low} of {experts} {low} copies "
          f"({100 * n_low / experts:.0f}%) fit, so the {low} tier is offloaded too (least recently used, misses "
          f"fetched on demand) with {n_high} {high} slots for promotions", file=sys.stderr)
    return {high: n_high, low: n_low}
