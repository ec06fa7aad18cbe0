"""DynaExq (arXiv 2511.15015) as an expert provider: every expert resident at low precision, the hot
ones promoted to a high-precision copy.

Every routed expert's int4 copy is loaded into its own low-precision slot at start-up, so a token
never waits for a missing expert. A :class:`HotnessController` keeps an exponential moving average of
how often each expert is used; every ``interval`` decode steps the hottest experts of a layer that
have no high-precision copy are promoted: their bf16 copy is fetched asynchronously into the
high-precision slots, evicting (demoting) the coldest high copy. A step uses a high copy only once its
transfer has landed, else the resident low copy: promotions never block a forward pass. Both slot
classes live in one preallocated pool, so allocation stays deterministic.

In the metrics, a hit is a use served by a landed high-precision copy and a miss one served by the
resident low copy (nothing is fetched on a miss); prefetches count promotions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dymoe.errors import BudgetError
from dymoe.quant.kernels import decode_routing, decode_workspace, expert_decode
from dymoe.runtime.cache import ExpertCache
from dymoe.runtime.expert_compute import dequantized_expert, run_grouped
from dymoe.runtime.metrics import RuntimeMetrics
from dymoe.runtime.offload import RuntimeReporting
from dymoe.runtime.slot_pool import SlotPool
from dymoe.runtime.transfer import TransferEngine


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
        self.store, self.config = store, config
        self.device, self.dtype = torch.device(device), dtype
        self.metrics = metrics or RuntimeMetrics()
        self.layers = list(store.layers)
        self.num_experts = store.num_experts
        self.low_layout, self.high_layout = store.layout(config.low), store.layout(config.high)
        n_low = len(self.layers) * self.num_experts
        low_bytes = n_low * self.low_layout.nbytes
        n_high = (config.budget_bytes - low_bytes) // self.high_layout.nbytes
        if n_high < top_k:
            need = low_bytes + top_k * self.high_layout.nbytes
            raise BudgetError(
                f"dynaexq keeps every expert at {config.low} on the device ({low_bytes / 2**20:.1f} MiB) plus high "
                f"copies: give --device-memory at least {need / 2**20:.1f} MiB, or use --policy static-{config.low}"
            )
        self.pool = SlotPool(self.device, {config.high: self.high_layout.nbytes, config.low: self.low_layout.nbytes},
                             {config.high: n_high, config.low: n_low})
        self.controller = HotnessController(self.layers, self.num_experts, config.decay)
        self.cache = ExpertCache(self.pool, {config.high: ColdestFirst(self.controller), config.low: ColdestFirst(self.controller)},
                                 on_evict=self.metrics.evicted)
        self.transfers = TransferEngine(self.device, self.metrics)
        self.high_per_layer = max(1, n_high // len(self.layers))
        self._steps = {layer: 0 for layer in self.layers}
        self._load_low_copies()
        self._low_table = torch.tensor([self.pool.offset(config.low, s) for s in range(n_low)], dtype=torch.int64,
                                       device=self.device)
        self._high_table = torch.tensor([self.pool.offset(config.high, s) for s in range(n_high)], dtype=torch.int64,
                                        device=self.device)
        self._workspace = {p: decode_workspace(lay, top_k, 1, self.device)
                           for p, lay in ((config.low, self.low_layout), (config.high, self.high_layout))}
        self.precision_uses = {config.high: 0, config.low: 0}

    def _low_slot(self, layer: int, expert: int) -> int:
        return self.layers.index(layer) * self.num_experts + expert

    def _load_low_copies(self) -> None:
        """Every expert's low copy into its own slot, once (the start-up cost DynaExq pays)."""
        for layer in self.layers:
            for e in range(self.num_experts):
                self.pool.view(self.config.low, self._low_slot(layer, e)).copy_(self.store.blob(layer, e, self.config.low))

    # ---- the ExpertProvider interface ------------------------------------------------------------

    def run_experts(self, layer, hidden, expert_ids, expert_weights):
        if hidden.shape[0] > 1:  # prefill: the resident low copies, grouped
            self.controller.observe(layer, expert_ids.unique().tolist())
            return run_grouped(hidden, expert_ids, expert_weights, lambda e: self._dequantize_low(layer, e))
        experts = expert_ids[0].tolist()  # the step's one host sync
        self.controller.observe(layer, experts)
        high = [j for j, e in enumerate(experts) if self._high_ready((layer, e))]
        low = [j for j in range(len(experts)) if j not in high]
        out = None
        for precision, rows, table in ((self.config.high, high, self._high_table), (self.config.low, low, self._low_table)):
            if rows:
                slots = [self._slot(layer, experts[j], precision) for j in rows]
                part = self._decode(hidden, slots, expert_weights[0, rows], precision, table)
                out = part if out is None else out + part
                self.precision_uses[precision] += len(rows)
        for j in high:
            self.cache.unpin((layer, experts[j]))
        self.transfers.fence()
        self.metrics.tokens_seen(layer, 1)
        self._steps[layer] += 1
        if self._steps[layer] % self.config.interval == 0:
            self._promote(layer)
        return out

    def _high_ready(self, key) -> bool:
        """A high copy serves only once it has landed; the low copy serves meanwhile (no stall)."""
        if key not in self.cache:
            self.metrics.miss(key[0], 0)
            return False
        ticket = self.transfers.pending(key)
        if ticket is not None and not self.transfers.is_done(ticket):
            self.metrics.miss(key[0], 0)
            return False
        if ticket is not None:
            self.transfers.wait(ticket)
        prefetched = self.cache.is_prefetched(key)
        self.cache.lookup(key)
        self.cache.pin(key)
        self.metrics.hit(key[0], prefetched=prefetched)
        return True

    def _slot(self, layer: int, expert: int, precision: str) -> int:
        if precision == self.config.low:
            return self._low_slot(layer, expert)
        return self.cache.peek((layer, expert)).slot

    def _decode(self, hidden, slots, weights, precision, table):
        index = torch.tensor(slots, device=self.device)
        layout = self.high_layout if precision == self.config.high else self.low_layout
        offsets, combine = decode_routing(table, index[None], weights[None])
        return expert_decode(self.pool.buffer, offsets, layout, hidden, combine, workspace=self._workspace[precision])

    def _promote(self, layer: int) -> None:
        """Fetch high copies of the layer's hottest experts that lack one (asynchronously)."""
        for e in self.controller.hottest(layer, self.high_per_layer):
            key = (layer, e)
            if key in self.cache:
                continue
            slot = self.cache.make_room(self.config.high, incoming=key)
            if slot is None or self.controller.value(key) == 0:
                return
            self.cache.insert(key, self.config.high, slot, prefetched=True)
            self.transfers.fetch(key, self.store.blob(layer, e, self.config.high), self.pool.view(self.config.high, slot))
            self.metrics.prefetch(layer)

    def _dequantize_low(self, layer: int, expert: int):
        return dequantized_expert(self.pool.view(self.config.low, self._low_slot(layer, expert)), self.low_layout,
                                  self.dtype)
