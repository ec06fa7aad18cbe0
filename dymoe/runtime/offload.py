"""OffloadedExperts: the per-layer "fetch and run" step over a slot pool, a cache and transfers.

For one MoE layer and the routing of its tokens:

1. group the (token, slot) assignments by expert (the one host synchronisation of the step: the
   runtime must know which experts to fetch);
2. look every needed expert up in the :class:`ExpertCache`; pin the hits;
3. start a host-to-device copy for each miss into a free or evicted slot (pinned experts are never
   evicted); if every slot is pinned, first run the experts already present and unpin them
   (waves), so a budget of one token's top-k slots is always enough;
4. run the hits first, while the misses are in flight, then each miss once its copy has landed
   (the compute stream waits on that copy's event only);
5. unpin; the `on-demand` preset also drops everything, so nothing is kept across layers.

The compute is the shared grouped SwiGLU of :mod:`dymoe.runtime.expert_compute`; bf16 slots are
read in place. Low-bit slots go through :func:`dymoe.quant.kernels.expert_decode` for one token
(fused dequantize-GEMV in Triton on the GPU, the torch reference elsewhere) and through the
reference dequantize-then-matmul for prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dymoe.checkpoint.blob import BlobLayout, unpack_expert
from dymoe.errors import BudgetError
from dymoe.runtime.cache import ExpertCache
from dymoe.runtime.expert_compute import group_by_expert, run_grouped
from dymoe.runtime.metrics import RuntimeMetrics
from dymoe.quant.kernels import decode_routing, decode_workspace, expert_decode
from dymoe.runtime.resident import gathered_decode
from dymoe.runtime.slot_pool import SlotPool
from dymoe.runtime.transfer import TransferEngine


@dataclass(frozen=True)
class OffloadConfig:
    """Which copies to keep on the device, and how many: the knobs a policy preset sets."""

    budget_bytes: int
    precision: str = "bf16"
    eviction: str = "lru"  # "lru" | "lfu"
    keep_across_layers: bool = True  # False: the on-demand preset (load, run, drop)
    measure_stalls: bool = True  # CUDA event pairs around each wait (no host sync; cheap)
    prefetch_depth: int = 0  # Fate's cross-layer gate: prefetch the next d MoE layers' experts (decode)


class OffloadedExperts:
    """An :class:`~dymoe.models.moe.ExpertProvider` whose experts live in an expert store."""

    def __init__(self, store, config: OffloadConfig, top_k: int, device, dtype: torch.dtype,
                 metrics: RuntimeMetrics | None = None):
        self.store = store
        self.config = config
        self.precision = config.precision
        self.layout: BlobLayout = store.layout(config.precision)
        self.device = torch.device(device)
        self.dtype = dtype
        self.metrics = metrics or RuntimeMetrics()
        slots = config.budget_bytes // self.layout.nbytes
        if slots < top_k:
            raise BudgetError(
                f"--device-memory leaves room for {slots} {config.precision} experts, but one token needs "
                f"{top_k}: give at least {_mib(top_k * self.layout.nbytes)} for experts"
            )
        self.pool = SlotPool(self.device, {config.precision: self.layout.nbytes}, {config.precision: slots})
        self.cache = ExpertCache(self.pool, config.eviction, on_evict=self.metrics.evicted)
        self.transfers = TransferEngine(self.device, self.metrics, measure_stalls=config.measure_stalls)
        self._views = [self._weights_view(self.pool.view(config.precision, s)) for s in range(slots)]
        self._stacks = self._stacked_views(slots)
        # low-bit decode reads the packed slots in place (fused dequantize + GEMV, Triton on GPU)
        self._slot_table = torch.tensor([self.pool.offset(config.precision, s) for s in range(slots)],
                                        dtype=torch.int64, device=self.device)
        self._workspace = decode_workspace(self.layout, top_k, 1, self.device) if self._stacks is None else None
        self.predictor: CrossLayerPredictor | None = None

    def bind(self, model) -> None:
        """Called by the model when it attaches this runtime: the prefetcher needs the routers."""
        if self.config.prefetch_depth:
            self.predictor = CrossLayerPredictor.from_model(model, self.config.prefetch_depth)

    # ---- the ExpertProvider interface ------------------------------------------------------------

    def run_experts(self, layer, hidden, expert_ids, expert_weights):
        if hidden.shape[0] == 1:
            out = self._decode_one(layer, hidden, expert_ids[0], expert_weights[0])
        else:
            out = self._run_grouped(layer, hidden, expert_ids, expert_weights)
        if not self.config.keep_across_layers:
            self.cache.drop_layer(layer)
        self.metrics.tokens_seen(layer, hidden.shape[0])
        return out

    def _run_grouped(self, layer, hidden, expert_ids, expert_weights):
        grouping = group_by_expert(expert_ids)
        tickets: dict[int, object] = {}
        out = run_grouped(
            hidden, expert_ids, expert_weights, lambda e: self._weights(layer, e, tickets), grouping,
            schedule=self._schedule(layer, grouping[1], tickets),
        )
        return out

    def _decode_one(self, layer, hidden, ids, weights):
        """One token: make its k experts resident, then gather their slots and run two batched
        matmuls — the arithmetic of :func:`~dymoe.runtime.resident.gathered_decode`, so the result
        is bit-identical to the resident model's decode."""
        predicted = self.predictor.predict(layer, hidden) if self.predictor else None
        if predicted is None:
            experts = ids.tolist()  # the step's one host sync: the runtime must know what to fetch
        else:  # the same one sync carries the guesses for the next layers
            experts, *guesses = torch.cat([ids.view(1, -1), predicted]).tolist()
        tickets: dict[int, object] = {}
        wave = self._start_wave(layer, experts, tickets)
        if len(wave) < len(experts):
            raise BudgetError(f"layer {layer}: fewer free expert slots than one token's top-k; raise --device-memory")
        if predicted is not None:
            self._prefetch(self.predictor.targets(layer), guesses)
        for ticket in tickets.values():
            self.transfers.wait(ticket)
        slots = torch.tensor([self.cache.peek((layer, e)).slot for e in experts], device=self.device)
        if self._stacks is not None:  # bf16: the resident model's arithmetic, bit for bit
            gate_up, down = self._stacks
            out = gathered_decode(hidden, slots, weights, gate_up, down, self.dtype)
        else:
            offsets, combine = decode_routing(self._slot_table, slots[None], weights[None])
            out = expert_decode(self.pool.buffer, offsets, self.layout, hidden, combine, workspace=self._workspace)
        for e in experts:
            self.cache.unpin((layer, e))
        self.transfers.fence()
        return out

    # ---- fetching ---------------------------------------------------------------------------------

    def _schedule(self, layer: int, experts: list[int], tickets: dict):
        """Yield the order to compute the layer's experts in: resident ones first (their compute
        overlaps the misses' copies), in waves that fit the pool; unpin each wave after it ran."""
        pending = sorted(range(len(experts)), key=lambda j: (layer, experts[j]) not in self.cache)
        while pending:
            wave = self._start_wave(layer, [experts[j] for j in pending], tickets)
            if not wave:
                raise BudgetError(f"no free expert slot for layer {layer}: raise --device-memory")
            yield from pending[: len(wave)]
            for e in wave:
                self.cache.unpin((layer, e))
            self.transfers.fence()  # the next wave may reuse these slots once their compute is done
            pending = pending[len(wave) :]

    def _start_wave(self, layer: int, experts: list[int], tickets: dict) -> list[int]:
        """Pin the resident experts and start fetches for the missing ones, while slots last."""
        wave = []
        for e in experts:
            key = (layer, e)
            if key in self.cache:
                prefetched = self.cache.is_prefetched(key)
                self.cache.lookup(key)
                self.cache.pin(key)
                self.metrics.hit(layer, prefetched=prefetched)
                in_flight = self.transfers.pending(key)  # a prefetch that has not landed yet
                if in_flight is not None:
                    tickets[e] = in_flight
            else:
                slot = self.cache.make_room(self.precision)
                if slot is None:
                    break  # every slot pinned by this wave: run it, then continue
                self.cache.insert(key, self.precision, slot)
                self.cache.pin(key)
                src = self.store.blob(layer, e, self.precision)
                tickets[e] = self.transfers.fetch(key, src, self.pool.view(self.precision, slot))
                self.metrics.miss(layer, src.numel())
            wave.append(e)
        return wave

    def _prefetch(self, layers: list[int], guesses: list[list[int]]) -> None:
        """Start copies of predicted experts that are not resident, while unpinned slots last.

        Issued after the current layer's demand copies (one copy stream keeps them first) and
        before its compute, so they overlap this layer's compute and the next layer's attention."""
        for layer, experts in zip(layers, guesses):
            for e in experts:
                key = (layer, e)
                if key in self.cache:
                    continue
                slot = self.cache.make_room(self.precision, incoming=key)
                if slot is None:
                    return
                self.cache.insert(key, self.precision, slot, prefetched=True)
                self.transfers.fetch(key, self.store.blob(layer, e, self.precision), self.pool.view(self.precision, slot))
                self.metrics.prefetch(layer)

    def _weights(self, layer: int, expert: int, tickets: dict):
        ticket = tickets.pop(expert, None)
        if ticket is not None:
            self.transfers.wait(ticket)
        _, slot = self.cache.peek((layer, expert))  # peek: the use was counted when the wave started
        if self.precision != "bf16":
            return self._dequantize(slot)
        gate_up, down = self._views[slot]
        if self.dtype != torch.bfloat16:  # float32 compute (CPU): upcasting bf16 is exact
            return gate_up.to(self.dtype), down.to(self.dtype)
        return gate_up, down

    def _weights_view(self, blob: torch.Tensor):
        """(gate_up [2I, H], down [H, I]) read in place from a bf16 slot; None for low-bit slots."""
        if self.precision != "bf16":
            return None
        gate, up, down = (self.layout.part(f"{p}.weight") for p in ("gate", "up", "down"))
        if up.offset != gate.offset + gate.nbytes:
            raise ValueError("bf16 blob layout does not keep gate and up adjacent")
        h, i = self.layout.hidden_size, self.layout.intermediate_size
        gate_up = blob[gate.offset : up.offset + up.nbytes].view(torch.bfloat16).view(2 * i, h)
        return gate_up, blob[down.offset : down.offset + down.nbytes].view(torch.bfloat16).view(h, i)

    def _stacked_views(self, slots: int):
        """bf16 slots as two strided stacks [S, 2I, H] and [S, H, I] over the pool buffer, when the
        slots are evenly spaced (always, unless a resplit moved some); None otherwise."""
        if self.precision != "bf16" or slots == 0:
            return None
        offsets = [self.pool.offset(self.precision, s) for s in range(slots)]
        stride = offsets[1] - offsets[0] if slots > 1 else self.layout.nbytes
        if any(o != offsets[0] + i * stride for i, o in enumerate(offsets)) or stride % 2:
            return None
        gate, up, down = (self.layout.part(f"{p}.weight") for p in ("gate", "up", "down"))
        h, i = self.layout.hidden_size, self.layout.intermediate_size
        words = self.pool.buffer[offsets[0] :].view(torch.bfloat16)
        gate_up = words.as_strided((slots, 2 * i, h), (stride // 2, h, 1), gate.offset // 2)
        down_stack = words.as_strided((slots, h, i), (stride // 2, i, 1), down.offset // 2)
        return gate_up, down_stack

    def _dequantize(self, slot: int):
        gate, up, down = unpack_expert(self.pool.view(self.precision, slot), self.layout, self.dtype)
        return torch.cat([gate, up]), down

    # ---- reporting --------------------------------------------------------------------------------

    def stats(self) -> dict:
        """The runtime metrics as a dict (resolves pending CUDA stall timings first)."""
        self.transfers.collect_stalls()
        return self.metrics.to_dict()

    def report(self) -> str:
        self.transfers.collect_stalls()
        return self.metrics.format_table()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class CrossLayerPredictor:
    """Fate's cross-layer gate (arXiv 2502.12224): the hidden state entering MoE layer l is close
    to the one entering l+1, so applying layer l+1's router to it predicts l+1's experts (Fate
    reports ~97% accuracy on its models; the demo model's card measures 76-81% recall for l+1)."""

    def __init__(self, routers: dict[int, object], depth: int):
        self.routers = routers
        self.layers = sorted(routers)
        self.depth = depth

    @classmethod
    def from_model(cls, model, depth: int) -> "CrossLayerPredictor":
        return cls({block.layer: block.gate for block in model.moe_blocks}, depth)

    def targets(self, layer: int) -> list[int]:
        """The MoE layers after ``layer`` to prefetch for."""
        i = self.layers.index(layer)
        return self.layers[i + 1 : i + 1 + self.depth]

    def predict(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Predicted expert ids [d, k] for :meth:`targets` from one token's hidden [1, H]; None at the end."""
        targets = self.targets(layer)
        if not targets:
            return None
        guesses = [self.routers[t](hidden)[0] for t in targets]  # (ids [1, k], weights)
        return torch.cat(guesses)
