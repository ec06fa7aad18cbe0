"""Mapped decode: an offloaded decode step as one CUDA graph, the cache kept a step behind.

The segmented decode (dymoe/models/decode_graphs.py) stops after every MoE layer's router: the
host reads the routing, fetches what is missing and uploads slot ids while the GPU waits, a dozen
to a hundred microseconds a layer. Here the expert kernels find each expert through a device table
instead: [MoE layers, experts] -> byte offset, from the pool buffer, of where a copy lies. That is
its slot when one holds it, else its blob in the pinned host store, which the kernels then read
over the link (pinned memory is mapped into the GPU's address space). The router's ids index the
table inside the graph, so a step is one graph, as the resident model's is.

The host runs the cache a step behind the GPU. After launching step t it reads step t-1's routing
(copied to pinned memory after that step), counts hits and misses, updates the eviction order and
starts copies of the missed experts into slots. A table entry moves:

- to a slot only once the copy into it has landed (the host polls the copy's event before an upload);
- back to the host in the upload before a copy reuses its slot: the upload is queued on the compute
  stream behind every step that may still read the slot, and the copy waits for an event recorded
  after the upload (the transfer engine's fence).

Uploads run between steps on the compute stream, so a step reads one table throughout, and the
kernels read the same bytes wherever they lie: logits do not depend on what is cached (invariant 2).

What it costs: a missed expert is read over the link by the kernels, then copied once more into
its slot, and an expert missed at step t is still read from the host at t+1 (its copy starts after
t+1 is launched). Eviction decisions come a step late. It applies to one precision class with no
prefetcher, on a GPU with Triton (bf16 through the fused kernels, compute capability 8.0+), when
the pinned host store holds every blob of that class.

Off unless ``DYMOE_MAPPED_DECODE=1``: measured faster once nearly every expert hits, slower while
many still miss (see ``MAPPED``). On the CPU the same bookkeeping runs and each step's experts are
read wherever the table points, through the torch reference (or the Triton kernels under the
interpreter): that is how the tests check it.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch

from dymoe.checkpoint.memory_store import MemoryStore
from dymoe.env import env_choice
from dymoe.quant.kernels import decode_routing, expert_decode, interpreting, triton_available
from dymoe.runtime.resident import blob_stacks, decode_experts

Key = tuple[int, int]  # (layer, expert)

def _setting() -> str:
    return env_choice("DYMOE_MAPPED_DECODE", {
        "1": "wherever it applies (on the CPU too: the tests)",
        "0": "never: the segmented decode, one host synchronisation per MoE layer"}, "0")


MAPPED = _setting()
# Off by default: on an H100 it won in steady state (static-int4 with every int4 copy fitting, 256
# tokens: 1.34 -> 1.11 ms per token) but lost while experts still miss (the same over 64 tokens:
# 1.53 -> 1.71 ms), since a miss crosses the link twice and the two crossings compete
# (docs/decode.md, "Mapped decode").


def mapped_decode_for(runtime) -> "MappedDecode | None":
    """``runtime``'s (an :class:`~dymoe.runtime.offload.OffloadedExperts`) mapped decode where
    ``DYMOE_MAPPED_DECODE=1`` asks for it and it applies, else None; asked for where it does not
    apply, one line on stderr says why."""
    if MAPPED != "1":
        return None
    reason = _why_not(runtime)
    if reason is not None:
        print(f"dymoe: DYMOE_MAPPED_DECODE=1 does not apply: {reason}; decoding with one host "
              "synchronisation per MoE layer", file=sys.stderr)
        return None
    return MappedDecode(runtime)


def _why_not(runtime) -> str | None:
    """Why the mapped decode cannot serve ``runtime``, or None when it can."""
    config, store = runtime.config, runtime.store
    if runtime.low is not None:
        return "the preset runs two precision classes"
    if config.prefetch_depth:
        return "the preset prefetches (its guesses would come a step late)"
    if not config.keep_across_layers:
        return "the preset keeps no expert across layers"
    if not isinstance(store, MemoryStore) or not store.holds_every(runtime.precision):
        return (f"the host memory tier does not hold every {runtime.precision} expert "
                "(raise --host-memory)")
    if runtime.device.type != "cuda":
        return None  # the CPU reference (the tests)
    if not triton_available():
        return "Triton is not installed (the gpu extra)"
    if not store.buffer.is_pinned():
        return "the host memory tier is not pinned"
    if runtime.precision == "bf16" and not runtime._kernels_bf16:
        return "bf16 experts here do not decode through the fused kernels (DYMOE_RESIDENT_DECODE, compute capability)"
    return None


class MappedDecode:
    """The device table of one offloading runtime's class, and the host's bookkeeping a step late.

    :meth:`step` brackets one decode step (:class:`~dymoe.models.decode_graphs.DecodeGraphs`);
    inside it the runtime's one-token ``run_experts`` calls :meth:`compute` (device work only)."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.precision = runtime.precision
        store, pool = runtime.store, runtime.pool
        self.layers = list(store.layers)
        self.rows = {layer: r for r, layer in enumerate(self.layers)}
        self.cuda = runtime.device.type == "cuda"
        base = store.buffer.data_ptr() - pool.buffer.data_ptr()
        self.away = np.array([[base + store.host_offset(layer, e, self.precision) for e in range(store.num_experts)]
                              for layer in self.layers], dtype=np.int64)  # where each blob lies on the host
        self.master = self.away.copy()  # what the next upload holds
        self._current = self.master.copy()  # what the device table holds
        self.table = torch.from_numpy(self.master).to(runtime.device)
        self._staging = [torch.empty(self.master.shape, dtype=torch.int64, pin_memory=self.cuda) for _ in range(2)]
        self._staged: list = [None, None]  # the event after each staging buffer's last upload
        self._stage = 0
        self.ids = torch.zeros(len(self.layers), runtime.top_k, dtype=torch.int64, device=runtime.device)
        self._ids_host = [torch.empty(self.ids.shape, dtype=torch.int64, pin_memory=self.cuda) for _ in range(2)]
        self._ids_ready: list = [None, None]
        self._serving: list = [None, None]  # the table each of the last two steps read
        self._parity = 0
        self._unsettled: int | None = None  # the parity of a step whose routing the host has not read
        self._landing: dict[Key, tuple[int, object]] = {}  # copies whose table entry still points away
        self.active = False  # inside step(): run_experts computes through the table
        self.dirty = True  # the cache changed outside step() (prefill): rebuild the table first
        self.kernels = self.cuda or (interpreting() and triton_available()
                                     and (self.precision != "bf16" or runtime._kernels_bf16))

    # ---- one step ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self):
        """One decode step: the table brought up to date, the step's expert compute through it,
        then its routing queued for the host and the previous step's settled."""
        if self.dirty:
            self._rebuild()
        self._land()  # copies started after the last step was launched have landed by now, mostly
        self._upload()
        self._serving[self._parity] = self._current
        self.active = True
        try:
            yield
        finally:
            self.active = False
        self._end()

    def compute(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token through its experts ``ids`` [k] of ``layer``, read wherever the table points."""
        r = self.rows[layer]
        self.ids[r].copy_(ids)
        if self.kernels:
            return self.runtime._run_slots(hidden, ids, weights, self.precision, table=self.table[r], backend="triton")
        return self._reference(hidden, ids, weights, r)

    def settle_pending(self) -> None:
        """Read the last step's routing now (before reporting metrics)."""
        if self._unsettled is not None:
            parity, self._unsettled = self._unsettled, None
            self._settle(parity)

    # ---- the host's part --------------------------------------------------------------------------

    def _end(self) -> None:
        parity = self._parity
        self._ids_host[parity].copy_(self.ids, non_blocking=self.cuda)
        self._ids_ready[parity] = self._record()
        previous, self._unsettled = self._unsettled, parity
        self._parity ^= 1
        if previous is not None:
            self._settle(previous)

    def _settle(self, parity: int) -> None:
        """A finished step's routing: metrics, the eviction order, copies of its misses."""
        if self._ids_ready[parity] is not None:
            self._ids_ready[parity].synchronize()
        routing = self._ids_host[parity].tolist()
        served = self._serving[parity]
        fetches: dict[Key, int] = {}
        for layer, experts in zip(self.layers, routing):
            self._count(layer, experts, served[self.rows[layer]], fetches)
        self._upload()
        runtime = self.runtime
        if fetches:
            runtime.transfers.fence()  # the copies wait for the upload that took their slots away
        for key, slot in fetches.items():
            src = runtime.store.blob(*key, self.precision)
            self._landing[key] = (slot, runtime.transfers.fetch(key, src, runtime.pool.view(self.precision, slot)))

    def _count(self, layer: int, experts: list[int], served: np.ndarray, fetches: dict[Key, int]) -> None:
        """One layer of a finished step: a use the table served from the host is a miss (its bytes
        crossed the link); every expert not cached gets a slot (the eviction policy picks it)."""
        runtime, r = self.runtime, self.rows[layer]
        metrics, cache, nbytes = runtime.metrics, runtime.cache, runtime.layout.nbytes
        for e in experts:
            if served[e] == self.away[r, e]:
                metrics.miss(layer, nbytes)
                metrics.transfer(layer, nbytes)
            else:
                metrics.hit(layer)
            key = (layer, e)
            if cache.lookup(key) is None:
                slot, evicted = cache.insert(key, self.precision)
                for victim in evicted:
                    self._unmap(victim)
                    fetches.pop(victim, None)
                fetches[key] = slot
        metrics.tokens_seen(layer, 1)
        runtime.precision_uses[self.precision] += len(experts)

    def _unmap(self, key: Key) -> None:
        self.master[self.rows[key[0]], key[1]] = self.away[self.rows[key[0]], key[1]]
        self._landing.pop(key, None)

    def _land(self) -> None:
        """Point the entries of landed copies at their slots."""
        transfers, pool = self.runtime.transfers, self.runtime.pool
        for key, (slot, ticket) in list(self._landing.items()):
            if transfers.is_done(ticket):
                del self._landing[key]
                transfers.settled(ticket)
                self.master[self.rows[key[0]], key[1]] = pool.offset(self.precision, slot)

    def _rebuild(self) -> None:
        """The table from the cache as it stands: a landed copy's slot, else the host."""
        runtime = self.runtime
        self.master[:] = self.away
        self._landing.clear()
        for key in runtime.cache.resident(self.precision):
            slot = runtime.cache.peek(key).slot
            ticket = runtime.transfers.pending(key)
            if ticket is None:
                self.master[self.rows[key[0]], key[1]] = runtime.pool.offset(self.precision, slot)
            else:
                self._landing[key] = (slot, ticket)
        self._upload()
        self.dirty = False

    def _upload(self) -> None:
        """The master table to the device, queued on the compute stream (nothing when unchanged)."""
        if np.array_equal(self.master, self._current):
            return
        stage = self._stage
        if self._staged[stage] is not None:  # its previous upload has read it (long done, in practice)
            self._staged[stage].synchronize()
        self._staging[stage].numpy()[:] = self.master
        self.table.copy_(self._staging[stage], non_blocking=self.cuda)
        self._staged[stage] = self._record()
        self._stage ^= 1
        self._current = self.master.copy()

    def _record(self):
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    # ---- the CPU reference ------------------------------------------------------------------------

    def _reference(self, hidden, ids, weights, r):
        """:meth:`compute` through the torch code: the k blobs gathered from wherever the table
        points into a scratch buffer, then the runtime's arithmetic for its class (for bf16 the
        resident model's, so invariant 2 holds here too)."""
        runtime, n = self.runtime, self.runtime.layout.nbytes
        scratch = torch.cat([self._bytes_at(offset) for offset in self.table[r][ids].tolist()])
        slots = torch.arange(ids.shape[0])
        if self.precision == "bf16":
            gate_up, down, *biases = blob_stacks(scratch, 0, n, ids.shape[0], runtime.layout)
            return decode_experts(hidden, slots, weights, gate_up, down, runtime.dtype, tuple(biases) or None,
                                  runtime.math)
        offsets, combine = decode_routing(slots * n, slots[None], weights[None])
        return expert_decode(scratch, offsets, runtime.layout, hidden, combine, backend="torch", math=runtime.math)

    def _bytes_at(self, offset: int) -> torch.Tensor:
        """The blob at ``offset`` from the pool buffer: in the pool, or in the host store."""
        runtime, n = self.runtime, self.runtime.layout.nbytes
        pool, host = runtime.pool.buffer, runtime.store.buffer
        if 0 <= offset <= pool.numel() - n:
            return pool[offset:offset + n]
        start = offset + pool.data_ptr() - host.data_ptr()
        if not 0 <= start <= host.numel() - n:
            raise AssertionError(f"table offset {offset} points neither into the pool nor into the host store")
        return host[start:start + n]
