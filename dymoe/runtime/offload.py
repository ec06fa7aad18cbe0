"""OffloadedExperts: the per-layer "fetch and run" step over a slot pool, a cache and transfers.

For one MoE layer and the routing of its tokens:

1. group the (token, slot) assignments by expert (the one host synchronisation of the step: the
   runtime must know which experts to fetch);
2. decide each expert's precision: the single precision of a static preset, or a mixed-precision
   rule (:mod:`dymoe.runtime.precision`): DyMoE's per-token importance (the experts holding most
   of a token's router weight run at the high precision, the rest at the low one) or Fate's
   popularity (decode all high; in prefill the experts few tokens chose run low); every expert of
   a critical layer runs high;
3. look every needed expert up in the :class:`ExpertCache`; pin the hits (a copy at the other
   precision serves when the policy allows it, instead of a stall);
4. start a host-to-device copy for each miss into a free or evicted slot (pinned experts are never
   evicted); if every slot is pinned, first run the experts already present and unpin them
   (waves), so a budget of one token's top-k slots per class is always enough;
5. run the hits first, while the misses are in flight, then each miss once its copy has landed
   (the compute stream waits on that copy's event only);
6. unpin; the `on-demand` preset also drops everything, so nothing is kept across layers; with a
   prefetch depth, the next layers' experts predicted by the cross-layer gate are fetched ahead.

bf16 slots are read in place (a single-precision bf16 runtime decodes with the resident model's
exact arithmetic, so it is bit-identical to it), except in the CUDA-graph decode of a two-class
runtime (:meth:`OffloadedExperts.decode_compute`), which runs them through the fused kernels
too. Low-bit slots go through :func:`dymoe.quant.kernels.expert_decode` for one token (fused
dequantize-GEMV in Triton on the GPU, the torch reference elsewhere); for prefill
a wave's low-bit experts are dequantized a batch per launch into a preallocated workspace (:mod:`dymoe.runtime.prefill`) and run through the same bf16 matmuls.

On a GPU, a single-class runtime without a prefetcher whose experts all lie in pinned host memory
and whose pool holds 90% of them (``DYMOE_MAPPED_DECODE=auto``) decodes a token through
:mod:`dymoe.runtime.mapped` instead: the step copies its own misses into slots set aside a step
earlier, and steps 1-6 move a step behind the GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from dymoe.checkpoint.blob import BlobLayout, expert_biases
from dymoe.errors import BudgetError, StoreError
from dymoe.models.expert_math import SWIGLU, ExpertMath
from dymoe.quant.kernels import (InputPacking, decode_workspace, expert_decode_capturable, input_packing,
                                 routed_decode)
from dymoe.runtime.cache import ExpertCache
from dymoe.runtime import expert_compute
from dymoe.runtime.expert_compute import ExpertRun, group_by_expert, run_grouped
from dymoe.runtime.mapped import MappedDecode, mapped_decode_for
from dymoe.runtime.metrics import RuntimeMetrics
from dymoe.runtime.precision import make_precision_rule
from dymoe.runtime.prefill import PrefillDequantizer, device_indices, prefill_capacity
from dymoe.runtime.resident import blob_stacks, decode_experts, kernels_decode, kernels_decode_experts
from dymoe.runtime.slot_pool import SlotPool
from dymoe.runtime.transfer import IndexUpload, TransferEngine


@dataclass(frozen=True)
class OffloadConfig:
    """Which copies to keep on the device, and how many: the knobs a policy preset sets."""

    budget_bytes: int
    precision: str = "bf16"  # the (high) precision experts are fetched at
    eviction: str = "lru"  # an ExpertCache policy name: "lru", "lfu", "arc", "shallow", "fate"
    keep_across_layers: bool = True  # False: the on-demand preset (load, run, drop)
    measure_stalls: bool = True  # CUDA event pairs around each wait (no host sync; cheap)
    prefetch_depth: int = 0  # Fate's cross-layer gate: prefetch the next d MoE layers' experts (decode)
    # mixed precision (off when low_precision is None): two slot classes and a rule choosing between them
    low_precision: str | None = None
    high_share: float = 0.5  # share of the budget for high-precision slots
    precision_rule: str = "importance"  # "importance" (DyMoE) or "popularity" (Fate): runtime/precision.py
    important_mass: float = 0.5  # importance: a token's experts, by router weight, until this mass run high
    popularity_floor: float = 0.5  # popularity: prefill experts with fewer tokens than this x tokens*k/experts run low
    critical_layers: tuple[int, ...] = ()  # depth floor: these MoE layer indices always run high (-1 = last)
    substitute: bool = True  # a resident copy at the other precision serves instead of a stall

    @property
    def precisions(self) -> tuple[str, ...]:
        return (self.precision,) if self.low_precision is None else (self.precision, self.low_precision)


class RuntimeReporting:
    """``stats()``, ``report()`` and ``forget_warm_up()`` of an expert runtime that has ``transfers``,
    ``metrics``, ``precision_uses`` and a ``cache`` made by ``_new_cache()`` (and the wait its prefill
    dequantizer is given)."""

    def stats(self) -> dict:
        """The runtime metrics as a dict (resolves pending CUDA stall timings first)."""
        self.transfers.collect_stalls()
        return {**self.metrics.to_dict(), "precision_uses": dict(self.precision_uses)}

    def report(self) -> str:
        self.transfers.collect_stalls()
        return self.metrics.format_table()

    def forget_warm_up(self) -> None:
        """Forget the engine's warm-up tokens (``Engine.warm_up``): what they cached, with the
        eviction policy's history (which copies are resident decides the precision some experts
        run at, in dymoe's substitution and dynaexq's promotions), and what was counted, pending
        counts settled first so that none lands after the reset."""
        self.transfers.synchronize()
        for key in self.cache.resident():
            self.cache.remove(key)
        self.cache = self._new_cache()
        self.stats()
        self.metrics.reset()
        self.precision_uses = dict.fromkeys(self.precision_uses, 0)

    def _wait_copy(self, ticket) -> None:
        """The compute stream waits for a copy, through whatever engine ``transfers`` is now (tests swap it)."""
        self.transfers.wait(ticket)


def bound_math(model, layout) -> ExpertMath:
    """How ``model``'s experts compute, checked against the store's blobs (biases or none)."""
    math = ExpertMath.of(model.config)
    if math.bias != layout.has_bias:
        raise StoreError(f"the expert store's blobs {'carry' if layout.has_bias else 'lack'} expert biases, "
                         f"but {model.config.family} experts {'have' if math.bias else 'have no'} biases: "
                         "the store belongs to another model; convert this one again")
    return math


def compile_decode(buffer, table, layout, workspace, widths, math, dtype, packing=None) -> None:
    """Launch the fused decode kernels once per routing width in ``widths`` over the first slots of
    ``table`` (whatever they hold, each slot again where it has fewer than n), so Triton compiles
    them at start-up, not in the first tokens; with ``packing`` (an :class:`InputPacking` for the
    widest step) that step on a prepacked input too."""
    hidden = torch.zeros(1, layout.hidden_size, device=buffer.device, dtype=dtype)
    for n in widths if table.numel() else ():
        slots = (torch.arange(n, device=buffer.device) % table.numel()).view(1, -1)
        weights = torch.full((1, n), 1.0 / n, device=buffer.device, dtype=dtype)
        for x_packed in (None, packing.buffer) if packing is not None and n == max(widths) else (None,):
            routed_decode(buffer, table, slots, weights, layout, hidden, workspace=workspace, math=math,
                          x_packed=x_packed)


class OffloadedExperts(RuntimeReporting):
    """An :class:`~dymoe.models.moe.ExpertProvider` whose experts live in an expert store."""

    def __init__(self, store, config: OffloadConfig, top_k: int, device, dtype: torch.dtype,
                 metrics: RuntimeMetrics | None = None):
        self.store = store
        self.config = config
        self.precision = config.precision
        self.low = config.low_precision
        self.layouts: dict[str, BlobLayout] = {p: store.layout(p) for p in config.precisions}
        self.layout = self.layouts[self.precision]
        self.device = torch.device(device)
        self.dtype = dtype
        self.metrics = metrics or RuntimeMetrics()
        counts = self._slot_counts(config, top_k)
        self.pool = SlotPool(self.device, {p: self.layouts[p].nbytes for p in counts}, counts)
        self.cache = self._new_cache()
        self.transfers = TransferEngine(self.device, self.metrics, measure_stalls=config.measure_stalls)
        self._views = {s: self._weights_view(self.pool.view(self.precision, s)) for s in range(counts[self.precision])}
        stacks = self._stacked_views(counts[self.precision]) or ()
        self._stacks = stacks[:2] or None
        self._bias_stacks = stacks[2:] or None
        self.math = SWIGLU  # the model's, once bound
        self._slot_tables = {p: torch.tensor([self.pool.offset(p, s) for s in range(n)], dtype=torch.int64,
                                             device=self.device) for p, n in counts.items()}
        self._prefill = {p: PrefillDequantizer(self.pool.buffer, functools.partial(self.pool.offset, p), self.layouts[p],
                                               prefill_capacity(self.layouts[p], n, store.num_experts, dtype), dtype,
                                               self._wait_copy) for p, n in counts.items() if p != "bf16"}
        # bf16 slots read in place need no workspace, except in the two-class deferred decode,
        # which runs them through the fused kernels (decode_compute), and where the resident model
        # decodes through them too (kernels_decode: a GPU with Triton, by default)
        self._kernels_bf16 = kernels_decode(self.device, dtype)
        self._workspaces = {p: decode_workspace(self.layouts[p], top_k, 1, self.device)
                            for p in counts if p != "bf16" or self._stacks is None or self.low is not None
                            or self._kernels_bf16}
        # one class of int4, int3 or int2 slots: the router packs each token's input for the step
        # (input_packing); None where the step packs nothing or the torch path runs
        self._packing = input_packing(self.layouts[self.precision], top_k, self.device) if self.low is None else None
        self.predictor: CrossLayerPredictor | None = None
        self._upload = IndexUpload(top_k, self.device, rows=2 * len(config.precisions))  # slot ids, rows per class
        # the two-class deferred decode's per-class slot and mask rows, in one copy per step (the
        # host pays per upload, and decode is bound by the host)
        self._padded_upload = (IndexUpload(2 * len(config.precisions) * top_k, self.device, rows=1)
                               if self.low is not None else None)
        for precision in config.precisions if self.low is not None else ():
            # the padding's filler slot (_class_rows): the Triton kernels skip a zero column's weights
            # but still read its int8 row scales and biases, times zero; an uninitialised slot could
            # hold NaN bit patterns, a written one holds a real (finite) blob
            self.pool.view(precision, 0).zero_()
        self.rule = make_precision_rule(config.precision_rule, important_mass=config.important_mass,
                                        popularity_floor=config.popularity_floor, num_experts=store.num_experts)
        self._critical: set[int] = set()
        self.precision_uses: dict[str, int] = {p: 0 for p in config.precisions}  # expert runs per precision
        self.top_k = top_k
        # the one-graph decode step where it applies (dymoe/runtime/mapped.py; DecodeGraphs reads it)
        self.mapped_decode: MappedDecode | None = mapped_decode_for(self)

    def stats(self) -> dict:
        if self.mapped_decode is not None:
            self.mapped_decode.settle_pending()  # the last step's routing is read a step late
        return super().stats()

    def report(self) -> str:
        if self.mapped_decode is not None:
            self.mapped_decode.settle_pending()
        return super().report()

    def _new_cache(self) -> ExpertCache:
        return ExpertCache(self.pool, self.config.eviction, on_evict=self.metrics.evicted)

    def forget_warm_up(self) -> None:
        if self.mapped_decode is not None:
            self.mapped_decode.suspend()  # the ring's slots back to the pool; the table follows the cache
        super().forget_warm_up()

    def _slot_counts(self, config: OffloadConfig, top_k: int) -> dict[str, int]:
        """Whole slots per precision class within the budget: each class holds one token's top-k,
        and the budget beyond that is split by ``high_share`` (so a small budget shifts bytes to the
        class that would fall short, instead of refusing a budget that fits both)."""
        size = {p: self.layouts[p].nbytes for p in config.precisions}
        floor = sum(top_k * n for n in size.values())
        if config.budget_bytes < floor:
            what = " + ".join(f"{top_k} {p}" for p in config.precisions)
            raise BudgetError(
                f"--device-memory leaves room for fewer experts than one token needs ({what}): "
                f"give at least {_mib(floor)} for experts"
            )
        if self.low is None:
            return {self.precision: config.budget_bytes // size[self.precision]}
        spare = config.budget_bytes - floor
        high = top_k + int(spare * config.high_share) // size[self.precision]
        low = top_k + (spare - (high - top_k) * size[self.precision]) // size[self.low]
        return {self.precision: high, self.low: low}

    def bind(self, model) -> None:
        """Called by the model when it attaches this runtime: the prefetcher needs the routers, the
        depth floor needs the MoE layer indices; the experts compute as the model's family says
        (and the decode kernels, compiled here, are specialised on that activation)."""
        self.math = bound_math(model, self.layout)
        layers = [block.layer for block in model.moe_blocks]
        self._critical = {layers[i] for i in self.config.critical_layers if -len(layers) <= i < len(layers)}
        if self.config.prefetch_depth:
            self.predictor = CrossLayerPredictor.from_model(model, self.config.prefetch_depth)
        if self.device.type == "cuda":
            self._compile_kernels()

    # ---- the ExpertProvider interface ------------------------------------------------------------

    def input_packing(self, layer: int) -> InputPacking | None:
        """Where a one-token step wants its input packed ahead (one class of int4, int3 or int2
        slots on the Triton path; the same target for every layer, which the router fills right
        before each step), else None (:class:`~dymoe.models.moe.ExpertProvider`)."""
        return self._packing

    def run_experts(self, layer, hidden, expert_ids, expert_weights, packed_input: InputPacking | None = None):
        mapped = self.mapped_decode
        x_packed = packed_input.buffer if packed_input is not None else None
        if mapped is not None:
            if mapped.active and hidden.shape[0] == 1:
                return mapped.compute(layer, hidden, expert_ids[0], expert_weights[0], x_packed)
            mapped.suspend()  # the cache changes below: the table is rebuilt before the next step
        if hidden.shape[0] == 1:
            out = self._decode_one(layer, hidden, expert_ids[0], expert_weights[0], x_packed)
        else:
            out = self._run_grouped(layer, hidden, expert_ids, expert_weights)
        self._after_layer(layer, hidden.shape[0])
        return out

    def _after_layer(self, layer: int, tokens: int) -> None:
        if not self.config.keep_across_layers:
            self.cache.drop_layer(layer)
        self.metrics.tokens_seen(layer, tokens)

    def _run_grouped(self, layer, hidden, expert_ids, expert_weights):
        grouping = group_by_expert(expert_ids)
        wanted = self._wanted_grouped(layer, expert_ids, expert_weights, grouping[1], grouping[2])
        tickets: dict[int, object] = {}
        return run_grouped(
            hidden, expert_ids, expert_weights, lambda e: self._weights(layer, e, tickets), grouping,
            schedule=self._schedule(layer, grouping[1], wanted, tickets), math=self.math,
        )

    def _decode_one(self, layer, hidden, ids, weights, x_packed=None):
        """One token: make its k experts resident, then run them from their slots — bf16 ones with
        the arithmetic of :func:`~dymoe.runtime.resident.decode_experts` (bit-identical to the
        resident model's decode), low-bit ones through the fused kernels (``x_packed``: the input
        as :meth:`input_packing`'s step takes it, for a class that runs every expert)."""
        experts, used = self._admit(layer, hidden, ids, weights)
        out = None
        for precision in self.config.precisions:
            rows = [j for j, e in enumerate(experts) if used[e] == precision]
            if rows:
                packed = x_packed if len(rows) == len(experts) else None
                part = self._decode_rows(layer, hidden, [experts[j] for j in rows], weights, rows, precision, packed)
                out = part if out is None else out + part
        self._release(layer, experts)
        return out

    def routing_row(self, layer, hidden, ids, weights) -> torch.Tensor:
        """One token's routing ``ids`` [k] and what the runtime reads with it, as one int64 device
        row: the predictor's guesses for the next layers (d x k ids), then, where the precision
        rule splits a token's experts, how many run high. Device work only, so the CUDA-graph
        decode records it with the router (dymoe/models/decode_graphs.py) and the host reads the
        row in the step's one transfer."""
        parts = [ids.view(-1)]
        predicted = self.predictor.predict(layer, hidden) if self.predictor else None
        if predicted is not None:
            parts.append(predicted.reshape(-1).to(torch.int64))
        if self._mixed(layer):
            parts.append(self.rule.decode_high(weights).view(1).to(torch.int64))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _mixed(self, layer: int) -> bool:
        """Whether the precision rule may split a token's experts between the classes here."""
        return self.low is not None and layer not in self._critical and self.rule.decode_mixed

    def _admit(self, layer, hidden, ids, weights, row=None) -> tuple[list[int], dict[int, str]]:
        """Read the token's routing (``row``: :meth:`routing_row` if already made), make its experts
        resident (fetching the misses, prefetching the predicted ones) and have the compute stream
        wait for their copies: (experts, precision used)."""
        k = ids.shape[0]
        # the step's one host sync: the runtime must know what to fetch (plus the prefetcher's
        # guesses and how many experts are important, in the same transfer)
        flat = (self.routing_row(layer, hidden, ids, weights) if row is None else row).tolist()
        experts = flat[:k]
        mixed = self._mixed(layer)
        guesses = [flat[k + i * k : k + (i + 1) * k] for i in range((len(flat) - mixed) // k - 1)]
        n_high = flat[-1] if mixed else k
        wanted = {e: (self.precision if j < n_high else self.low) for j, e in enumerate(experts)}
        tickets: dict[int, object] = {}
        used = self._start_wave(layer, experts, wanted, tickets)
        if len(used) < len(experts):
            raise BudgetError(f"layer {layer}: fewer free expert slots than one token's top-k; raise --device-memory")
        if guesses:
            self._prefetch(self.predictor.targets(layer), guesses)
        for ticket in tickets.values():
            self.transfers.wait(ticket)
        return experts, used

    def _release(self, layer, experts: list[int]) -> None:
        self.cache.unpin_all([(layer, e) for e in experts])
        self.transfers.fence()

    def _decode_rows(self, layer, hidden, experts, weights, rows, precision, x_packed=None):
        row = 2 * self.config.precisions.index(precision)
        slots = self._upload(self._slots(layer, experts), row)
        if len(rows) < weights.shape[0]:
            weights = weights[self._upload(rows, row + 1)]
        return self._run_slots(hidden, slots, weights, precision, x_packed)

    def _slots(self, layer: int, experts: list[int]) -> list[int]:
        return self.cache.slots([(layer, e) for e in experts])

    def _run_slots(self, hidden, slots, weights, precision, x_packed=None):
        """One token through the experts in ``slots`` (device int64) of one class: device work only
        (``x_packed``: hidden packed for a low-bit class's step, :meth:`input_packing`)."""
        if precision == "bf16" and self._kernels_bf16:  # as the resident model decodes then
            return kernels_decode_experts(hidden, slots, weights, self.pool.buffer, self._slot_tables["bf16"],
                                          self.layouts["bf16"], self._workspaces.get("bf16"), self.math)
        if precision == "bf16" and self._stacks is not None:
            gate_up, down = self._stacks
            return decode_experts(hidden, slots, weights, gate_up, down, self.dtype, self._bias_stacks, self.math)
        return self._run_fused(hidden, slots, weights, precision, x_packed)

    def _run_fused(self, hidden, slots, weights, precision, x_packed=None):
        """:meth:`_run_slots` through :func:`expert_decode`, whatever the class: a slot whose weight
        is zero is skipped without reading its weights."""
        return routed_decode(self.pool.buffer, self._slot_tables[precision], slots[None], weights[None],
                             self.layouts[precision], hidden, workspace=self._workspaces.get(precision), math=self.math,
                             x_packed=x_packed)

    # ---- decode in three steps, for the CUDA-graph decode (dymoe/models/decode_graphs.py) -----------

    @property
    def deferred_decode(self) -> bool:
        """Whether a token's expert compute reads only fixed device rows once prepared, so a CUDA
        graph records it (with the next layer's attention), leaving the host its bookkeeping. With
        one class the k experts run as k slots of that class from one row of slot ids. With two,
        the split between the classes varies per token, so each class runs all k columns: its
        row holds the slots of the experts that run at it and a filler slot elsewhere, whose
        weight a 0/1 mask row zeroes (the fused kernels skip a zero column without reading it).
        Not on a GPU without Triton (:func:`expert_decode_capturable`): the torch reference reads
        the slot offsets on the host, so there the experts run between the segments."""
        if self.low is None and self.precision == "bf16" and self._stacks is not None:
            return True  # read in place by decode_experts (the resident model's arithmetic)
        return expert_decode_capturable(self.device)

    def decode_prepare(self, layer, hidden, ids, weights, row=None) -> None:
        """Everything before the compute of one token's layer: :meth:`_admit` (``row``: its
        :meth:`routing_row`, recorded with the router), then the slot ids (and, with two classes,
        each class's slot row and mask row) into the fixed rows :meth:`decode_compute` reads."""
        experts, used = self._admit(layer, hidden, ids, weights, row)
        if self.low is None:
            self._upload(self._slots(layer, experts), 0)
        else:
            self._upload_padded_rows(layer, experts, used)
        self._deferred = (layer, experts)

    def decode_compute(self, layer, hidden, weights, packed_input: InputPacking | None = None) -> torch.Tensor:
        """The experts :meth:`decode_prepare` admitted, run on hidden [1, H] with weights [k]
        (``packed_input``: as :meth:`run_experts` takes it)."""
        k = weights.shape[0]
        if self.low is None:
            x_packed = packed_input.buffer if packed_input is not None else None
            return self._run_slots(hidden, self._upload.row(0, k), weights, self.precision, x_packed)
        rows = self._padded_rows(k)
        out = None
        for precision in self._decode_classes(layer):
            c = self.config.precisions.index(precision)
            part = self._run_fused(hidden, rows[2 * c], weights * rows[2 * c + 1].to(weights.dtype), precision)
            out = part if out is None else out + part
        return out

    def decode_finish(self, layer) -> None:
        """After the compute is queued: unpin, fence, and what run_experts does after a layer."""
        pending, experts = self._deferred
        assert pending == layer, f"decode_finish({layer}) after decode_prepare({pending})"
        self._release(layer, experts)
        self._after_layer(layer, 1)

    def _decode_classes(self, layer: int) -> tuple[str, ...]:
        """The classes a decode step of ``layer`` may run experts at: only the high one in a critical
        layer (depth floor) or where the rule runs every decode expert high and no copy at the other
        precision may substitute (Fate's); both otherwise. Fixed per layer, so a recording may
        leave out the other class's launches."""
        if self.low is None or layer in self._critical or not (self.rule.decode_mixed or self.config.substitute):
            return (self.precision,)
        return self.config.precisions

    def _upload_padded_rows(self, layer: int, experts: list[int], used: dict[int, str]) -> None:
        """Each class's :meth:`_class_rows` for a token's ``experts``, in one upload."""
        classes = self._decode_classes(layer)
        stray = [e for e in experts if used[e] not in classes]
        if stray:  # _decode_classes and _start_wave disagree: the compute would drop these experts
            raise AssertionError(f"layer {layer}: experts {stray} run outside the classes {classes}")
        values = []
        for precision in self.config.precisions:
            slots, mask = self._class_rows(layer, experts, used, precision)
            values += slots + mask
        self._padded_upload(values)

    def _padded_rows(self, k: int) -> torch.Tensor:
        """The rows :meth:`_upload_padded_rows` uploaded, as [2 * classes, k] (a fixed address):
        class c's slot ids at row 2c, its 0/1 mask at row 2c+1."""
        return self._padded_upload.row(0, 2 * len(self.config.precisions) * k).view(-1, k)

    def _class_rows(self, layer: int, experts: list[int], used: dict[int, str], precision: str):
        """(slot ids, 0/1 mask), k entries each, of class ``precision`` for a token's ``experts``:
        the slot of each expert that runs at ``precision``; elsewhere slot 0 of the class, a valid
        address whose zero weight keeps the kernels from reading it."""
        mask = [int(used[e] == precision) for e in experts]
        slots = [self.cache.peek((layer, e)).slot if m else 0 for e, m in zip(experts, mask)]
        return slots, mask

    def _compile_kernels(self) -> None:
        """Run each fused decode kernel variant the decode may launch (:meth:`_launch_widths`, the
        model's activation) once at start-up (on whatever the slots hold), so Triton's compilation —
        seconds on first use — is not paid by the first generated tokens."""
        for precision, workspace in self._workspaces.items():
            if workspace is not None:
                compile_decode(self.pool.buffer, self._slot_tables[precision], self.layouts[precision], workspace,
                               self._launch_widths(precision), self.math, self.dtype,
                               self._packing if precision == self.precision else None)
        for dequantizer in self._prefill.values():  # and the prefill dequantize (one compile per precision)
            dequantizer.warm_up()

    def _launch_widths(self, precision: str) -> tuple[int, ...]:
        """How many routing columns a decode launch of ``precision``'s fused kernels may take: k
        (one class, and every class of the deferred two-class decode); any count from 1 to k in
        the eager two-class decode (:meth:`_decode_one` splits a token's experts between the
        classes), except for bf16 slots it reads in place."""
        in_place = precision == "bf16" and self._stacks is not None
        return tuple(range(1, self.top_k + 1)) if self.low is not None and not in_place else (self.top_k,)

    # ---- precision ----------------------------------------------------------------------------------

    def _wanted_grouped(self, layer, expert_ids, expert_weights, experts, counts) -> dict[int, str]:
        """Prefill: the precision each used expert should run at, as the rule chooses."""
        if self.low is None or layer in self._critical:
            return {e: self.precision for e in experts}
        high = self.rule.prefill_high(expert_ids, expert_weights, experts, counts)
        return {e: self.precision if e in high else self.low for e in experts}

    # ---- fetching ---------------------------------------------------------------------------------

    def _schedule(self, layer: int, experts: list[int], wanted: dict[int, str], tickets: dict):
        """Yield the order to compute the layer's experts in: resident ones first (their compute
        overlaps the misses' copies), in waves that fit the pool; unpin each wave after it ran."""
        pending = sorted(range(len(experts)), key=lambda j: (layer, experts[j]) not in self.cache)
        while pending:
            used = self._start_wave(layer, [experts[j] for j in pending], wanted, tickets)
            if not used:
                raise BudgetError(f"no free expert slot for layer {layer}: raise --device-memory")
            yield from self._wave_order(layer, experts, pending[: len(used)], used, tickets)
            for e in used:
                self.cache.unpin((layer, e))
            self.transfers.fence()  # the next wave may reuse these slots once their compute is done
            pending = pending[len(used) :]

    def _start_wave(self, layer: int, experts: list[int], wanted: dict[int, str], tickets: dict) -> dict[int, str]:
        """Pin resident experts and start fetches for missing ones, while slots last; returns the
        precision each admitted expert will run at (insertion order = admission order)."""
        if self.low is None:  # one class: every resident copy is at the wanted precision
            keys = [(layer, e) for e in experts]
            if not self.transfers.any_pending(keys):
                prefetched = self.cache.use_resident(keys, self.precision)
                if prefetched is not None:  # all hits: the loop below in one pass (decode is bound by the host)
                    self.metrics.hits(layer, len(keys), prefetched)
                    self.precision_uses[self.precision] += len(keys)
                    return dict.fromkeys(experts, self.precision)
        used: dict[int, str] = {}
        floor = layer in self._critical  # depth floor: never run below the high precision here
        for e in experts:
            key = (layer, e)
            resident = self.cache.peek(key)
            if resident is not None and resident.precision != wanted[e] and not self._may_substitute(key, resident, floor):
                self.cache.remove(key)  # the wrong precision and no substitution: refetch
                resident = None
            if resident is not None:
                prefetched = self.cache.is_prefetched(key)
                self.cache.lookup(key)
                self.cache.pin(key)
                self.metrics.hit(layer, prefetched=prefetched)
                in_flight = self.transfers.pending(key)  # a prefetch that has not landed yet
                if in_flight is not None:
                    tickets[e] = in_flight
                used[e] = resident.precision
                self.precision_uses[resident.precision] += 1
                continue
            precision, slot = self._room(key, wanted[e], floor)
            if slot is None:
                break  # every slot pinned by this wave: run it, then continue
            self.cache.insert(key, precision, slot)
            self.cache.pin(key)
            src = self.store.blob(layer, e, precision)
            tickets[e] = self.transfers.fetch(key, src, self.pool.view(precision, slot))
            self.metrics.miss(layer, src.numel())
            used[e] = precision
            self.precision_uses[precision] += 1
        return used

    def _may_substitute(self, key, resident, floor: bool) -> bool:
        """Whether a resident copy at the other precision may serve: a high copy always may; a
        low-bit one (DyMoE: rather than wait for the high copy) when substitution is on and the
        layer has no precision floor. A copy pinned by this step must serve as it is."""
        if resident.precision == self.precision or self.cache.is_pinned(key):
            return True
        return self.config.substitute and not floor

    def _room(self, key, precision: str, floor: bool) -> tuple[str, int | None]:
        slot = self.cache.make_room(precision, incoming=key)
        if slot is None and self.low is not None and self.config.substitute and not floor:
            other = self.low if precision == self.precision else self.precision
            return other, self.cache.make_room(other, incoming=key)
        return precision, slot

    def _prefetch(self, layers: list[int], guesses: list[list[int]]) -> None:
        """Start copies of predicted experts that are not resident, while unpinned slots last.

        Issued after the current layer's demand copies (one copy stream keeps them first) and
        before its compute, so they overlap this layer's compute and the next layer's attention.
        The rule says which copy: DyMoE's look-ahead moves the low one (cheaper), Fate's the high
        one (what decode runs)."""
        precision = self.low if self.low is not None and self.rule.prefetch_low else self.precision
        for layer, experts in zip(layers, guesses):
            for e in experts:
                key = (layer, e)
                if key in self.cache:
                    continue
                slot = self.cache.make_room(precision, incoming=key)
                if slot is None:
                    return
                self.cache.insert(key, precision, slot, prefetched=True)
                self.transfers.fetch(key, self.store.blob(layer, e, precision), self.pool.view(precision, slot))
                self.metrics.prefetch(layer)

    # ---- weights ------------------------------------------------------------------------------------

    def _weights(self, layer: int, expert: int, tickets: dict):
        ticket = tickets.pop(expert, None)
        if ticket is not None:
            self.transfers.wait(ticket)
        _, slot = self.cache.peek((layer, expert))  # bf16 (low-bit ones run as ExpertRuns); peek: counted already
        weights = self._views[slot]
        if self.dtype != torch.bfloat16:  # float32 compute (CPU): upcasting bf16 is exact
            return tuple(w.to(self.dtype) for w in weights)
        return weights

    def _weights_view(self, blob: torch.Tensor):
        """(gate_up [2I, H], down [H, I]) read in place from a bf16 slot, then its biases if the blobs
        carry them; None for low-bit slots."""
        if self.precision != "bf16":
            return None
        gate, up, down = (self.layout.part(f"{p}.weight") for p in ("gate", "up", "down"))
        if up.offset != gate.offset + gate.nbytes:
            raise ValueError("bf16 blob layout does not keep gate and up adjacent")
        h, i = self.layout.hidden_size, self.layout.intermediate_size
        gate_up = blob[gate.offset : up.offset + up.nbytes].view(torch.bfloat16).view(2 * i, h)
        down_view = blob[down.offset : down.offset + down.nbytes].view(torch.bfloat16).view(h, i)
        return (gate_up, down_view, *(expert_biases(blob, self.layout) or ()))

    def _stacked_views(self, slots: int):
        """bf16 slots as strided stacks over the pool buffer (:func:`blob_stacks`: [S, 2I, H] and
        [S, H, I], then the biases where the blobs carry them), when the slots are evenly spaced
        (always, unless a resplit moved some); None otherwise."""
        if self.precision != "bf16" or slots == 0:
            return None
        offsets = [self.pool.offset(self.precision, s) for s in range(slots)]
        stride = offsets[1] - offsets[0] if slots > 1 else self.layout.nbytes
        if any(o != offsets[0] + i * stride for i, o in enumerate(offsets)) or stride % 2:
            return None
        return blob_stacks(self.pool.buffer, offsets[0], stride, slots, self.layout)

    def _wave_order(self, layer: int, experts: list[int], wave: list[int], used: dict[int, str], tickets: dict):
        """A wave's experts (indices into ``experts``) in run order, as :class:`ExpertRun` batches
        yielded where their first expert stands (so resident experts still run while the misses'
        copies land): each low-bit class's from its prefill dequantizer's workspace, the bf16 ones
        gathered from the slot stacks (:meth:`_gathered_runs`); bf16 experts one by one only where
        the slots are not evenly spaced."""
        runs = {}
        for precision, dequantizer in self._prefill.items():
            members = [(j, self.cache.peek((layer, experts[j])).slot, tickets.pop(experts[j], None))
                       for j in wave if used[experts[j]] == precision]
            if members:
                for batch in dequantizer.plan(members):
                    runs[batch.keys[0]] = functools.partial(self._dequantized_run, dequantizer, batch)
        one_by_one = {j for j in wave if used[experts[j]] not in self._prefill}
        if self._stacks is not None:
            members = [(j, self.cache.peek((layer, experts[j])).slot, tickets.pop(experts[j], None))
                       for j in wave if j in one_by_one]
            for chunk in self._gathered_chunks(members):
                runs[chunk[0][0]] = functools.partial(self._gathered_run, chunk)
            one_by_one = set()
        for j in wave:
            if j in runs:
                yield runs[j]()
            elif j in one_by_one:
                yield j

    def _dequantized_run(self, dequantizer, batch) -> ExpertRun:
        return ExpertRun(batch.keys, *dequantizer.launch(batch))

    def _gathered_chunks(self, members: list[tuple[int, int, object | None]]) -> list[list]:
        """bf16 members (key, slot, ticket) in batches of at most ``GROUPED_BYTES`` of weights, the
        resident ones (no copy to wait for) apart from those still landing."""
        gate_up, down = self._stacks
        capacity = max(1, expert_compute.GROUPED_BYTES // (gate_up[0].nbytes + down[0].nbytes))
        chunks = []
        for group in ([m for m in members if m[2] is None], [m for m in members if m[2] is not None]):
            chunks += [group[i:i + capacity] for i in range(0, len(group), capacity)]
        return chunks

    def _gathered_run(self, chunk: list[tuple[int, int, object | None]]) -> ExpertRun:
        """bf16 slots gathered from the slot stacks in one launch per stack (rather than two copies
        per expert), after waiting for their copies; computed before the wave unpins its slots."""
        for _, _, ticket in chunk:
            if ticket is not None:
                self.transfers.wait(ticket)
        index = device_indices([slot for _, slot, _ in chunk], self.device)
        stacks = [t.index_select(0, index) for t in (*self._stacks, *(self._bias_stacks or ()))]
        if self.dtype != torch.bfloat16:  # float32 compute (CPU): upcasting bf16 is exact
            stacks = [t.to(self.dtype) for t in stacks]
        return ExpertRun([key for key, _, _ in chunk], *stacks)


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
        guesses = [self.routers[t].predict(hidden)[0] for t in targets]  # (ids [1, k], weights)
        return torch.cat(guesses)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"
