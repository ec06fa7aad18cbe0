"""Mapped decode: an offloaded decode step as one CUDA graph, the cache kept a step behind.

The segmented decode (dymoe/models/decode_graphs.py) stops after every MoE layer's router: the
host reads the routing, fetches what is missing and uploads slot ids while the GPU waits, a dozen
to a hundred microseconds a layer. Here the expert kernels find each expert through a device table
instead: [MoE layers, experts] -> byte offset, from the pool buffer, of where a copy lies. That is
its slot when one holds it, else its blob in the pinned host store (pinned memory is mapped into
the GPU's address space, so an offset from the pool buffer reaches it). The router's ids index the
table inside the graph, so a step is one graph, as the resident model's is.

A miss is filled by the GPU itself, within the step: before each layer's experts one launch
(:mod:`dymoe.runtime.mapped_fill`) copies every routed blob the table places on the host into the
next slot of a ring the host set aside, all its programs sharing the bytes, and the experts then
read the slot. A miss crosses the link once, as in the segmented decode, with no host wait. Where
the ring has run out, the experts read the blob in place over the link (no slot, a miss again the
next time). The step's last launch points the filled entries at their slots.

The ring holds free slots, then the copies the preset's policy would evict next: pinned, so the
policy picks others, and usable until a fill takes the slot, which then points the copy's entry
back at the host (so setting slots aside costs no cache capacity). A fill stops before a slot whose
copy its own layer hits. The ring holds twice the most misses of the last steps (within bounds),
since step t may use what the host set aside for step t+1.

The host runs the cache a step behind the GPU. After launching step t it reads step t-1's record
(the ids, and what was filled where), enters each fill into the cache in its slot's victim's
place, counts hits and misses, and tops the ring up for step t+1 (sent behind step t on the
compute stream).

Prefill, or any step outside the graph decode, takes the usual path: the last step is settled, the
ring's free slots go back to the pool and its victims are unpinned, and the table is rebuilt from
the cache before the next step. The kernels read the same bytes wherever they lie, so logits do not depend on what is cached
(invariant 2). It applies to one precision class with no prefetcher, on a GPU with Triton (bf16
through the fused kernels, compute capability 8.0+), when the pinned host store holds every blob
of that class.

``DYMOE_MAPPED_DECODE``: ``auto`` (the default) maps a GPU runtime whose pool holds 90% of its
class's experts, where it was measured faster; where many experts miss, copies that overlap the
layer's hits win (see ``MAPPED``). ``1`` maps wherever it applies, also on the CPU, where the same
bookkeeping runs, the fill and the experts through torch (or the Triton kernels under the
interpreter): that is how the tests check it. ``0`` never.
"""

from __future__ import annotations

import collections
import contextlib
import sys

import numpy as np
import torch

from dymoe.checkpoint.memory_store import MemoryStore
from dymoe.env import env_choice
from dymoe.quant.kernels import decode_routing, expert_decode, interpreting, kernels_run_on, sm_count, triton_available
from dymoe.runtime.resident import blob_stacks, decode_experts

Key = tuple[int, int]  # (layer, expert)
HIT, READ_IN_PLACE = -2, -1  # a step record's outcomes other than the ring position a miss was filled from
RECENT = 4  # steps whose misses size the ring


def _setting() -> str:
    return env_choice("DYMOE_MAPPED_DECODE", {
        "auto": f"where it applies and the pool holds {COVERAGE:.0%} of its class's experts",
        "1": "wherever it applies (on the CPU too: the tests)",
        "0": "never: the segmented decode, one host synchronisation per MoE layer"}, "auto")


COVERAGE = 0.9
MAPPED = _setting()
# auto: measured on an H100 (synthetic Qwen3-30B-A3B shape, 64 tokens), segmented -> mapped ms per
# token: static-int4 at 25% (its pool holds 94% of the int4 experts) 1.57 -> 1.22, lru at 100%
# 2.10 -> 1.89; but lru at 50% 4.73 -> 5.87 and at 25% 7.19 -> 10.07: where many experts miss, the
# fill launch (a kernel reading the link at ~45 GB/s, before the layer's experts) loses to copies
# at ~55 GB/s that overlap the layer's hits (docs/decode.md, "Mapped decode").


def mapped_decode_for(runtime) -> "MappedDecode | None":
    """``runtime``'s (an :class:`~dymoe.runtime.offload.OffloadedExperts`) mapped decode where
    ``DYMOE_MAPPED_DECODE`` asks for it and it applies, else None. ``auto`` (the default) asks
    where the pool holds :data:`COVERAGE` of its class's experts; ``1`` asks wherever it applies,
    and where it does not, one line on stderr says why."""
    if MAPPED == "0":
        return None
    reason = _why_not(runtime)
    if reason is not None:
        if MAPPED == "1":
            print(f"dymoe: DYMOE_MAPPED_DECODE=1 does not apply: {reason}; decoding with one host "
                  "synchronisation per MoE layer", file=sys.stderr)
        return None
    if MAPPED == "auto" and not _covered(runtime):
        return None
    return MappedDecode(runtime)


def _covered(runtime) -> bool:
    """``auto``'s rule: a GPU (on the CPU the mapped decode is the tests' reference) and a pool with
    slots for :data:`COVERAGE` of its class's experts (few misses once warm)."""
    experts = runtime.store.num_experts * len(runtime.store.layers)
    return runtime.device.type == "cuda" and runtime.pool.num_slots(runtime.precision) >= COVERAGE * experts


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
    if not kernels_run_on(runtime.device):
        return "the Triton expert kernels need compute capability 8.0+"
    if not store.buffer.is_pinned():
        return "the host memory tier is not pinned"
    if runtime.precision == "bf16" and not runtime._kernels_bf16:
        return "bf16 experts here do not decode through the fused kernels (DYMOE_RESIDENT_DECODE, compute capability)"
    return None


class MappedDecode:
    """The device table of one offloading runtime's class, the ring of slots its fills take, and the
    host's bookkeeping a step late.

    :meth:`step` brackets one decode step (:class:`~dymoe.models.decode_graphs.DecodeGraphs`);
    inside it the runtime's one-token ``run_experts`` calls :meth:`compute` (device work only).
    :meth:`suspend` hands the cache back to the usual path (prefill)."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.precision = runtime.precision
        store, pool = runtime.store, runtime.pool
        self.layers = list(store.layers)
        self.rows = {layer: r for r, layer in enumerate(self.layers)}
        self.cuda = runtime.device.type == "cuda"
        self.k, self.experts, self.nbytes = runtime.top_k, store.num_experts, runtime.layout.nbytes
        base = store.buffer.data_ptr() - pool.buffer.data_ptr()
        self.away = np.array([[base + store.host_offset(layer, e, self.precision) for e in range(self.experts)]
                              for layer in self.layers], dtype=np.int64)  # where each blob lies on the host
        if (self.away % 16).any() or self.nbytes % 16 or pool.buffer.numel() % 16:
            raise AssertionError("the fill launch copies 16-byte aligned blobs")
        # the ring: up to a step's uses, or a quarter of the class's slots, per step; twice that set aside
        self.most = min(max(self.k, pool.num_slots(self.precision) // 4), len(self.layers) * self.k)
        self.cap = 2 * self.most
        self.ring = np.zeros(self.cap, dtype=np.int64)  # the slot at each ring position, modulo cap
        self.victims: list[Key | None] = [None] * self.cap  # the cached copy it holds until filled
        # what the inbox says of each position: the slot's byte offset, the victim's flat table index
        # (-1: none) and the victim's host entry
        self._ring_rows = np.zeros((3, self.cap), dtype=np.int64)
        self.head = 0  # ring positions the settled steps took
        self.tail = 0  # ring positions set aside so far
        self._misses: collections.deque[int] = collections.deque(maxlen=RECENT)
        self._sent_tail = -1
        self._device_buffers(runtime.device)
        self._parity = 0
        self._unsettled: int | None = None  # the parity of a step whose record the host has not read
        self.active = False  # inside step(): run_experts computes through the table
        self.steps = 0  # decode steps run through the table
        self.dirty = True  # the cache changed outside step() (prefill): rebuild the table first
        self.kernels = self.cuda or (interpreting() and triton_available()
                                     and (self.precision != "bf16" or runtime._kernels_bf16))
        self._programs = sm_count(runtime.device) if self.cuda else 4  # the fill's (4 under the interpreter: the tests)

    def _device_buffers(self, device) -> None:
        """Everything the recorded step reads or writes, allocated once, and their pinned mirrors."""
        rows, pinned = len(self.layers), self.cuda
        self.table = torch.tensor(self.away, device=device)  # (a copy: from_numpy would share self.away on the CPU)
        self.inbox = torch.zeros(1 + 3 * self.cap, dtype=torch.int64, device=device)  # the ring's end, then the ring
        self._staging = [torch.zeros(self.inbox.shape, dtype=torch.int64, pin_memory=pinned) for _ in range(2)]
        self._staged: list = [None, None]  # the event after each staging buffer's last send
        self._stage = 0
        self.heads = torch.zeros(rows + 1, dtype=torch.int64, device=device)  # ring positions taken before each row
        self.record = torch.zeros(rows, 2, self.k, dtype=torch.int64, device=device)  # ids, outcomes
        self.offsets = torch.zeros(rows, self.k, dtype=torch.int64, device=device)  # what the experts read
        self._record_host = [torch.zeros(self.record.shape, dtype=torch.int64, pin_memory=pinned) for _ in range(2)]
        self._record_ready: list = [None, None]
        self._words = self.runtime.pool.buffer.view(torch.int32)

    # ---- one step ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self):
        """One decode step: the table brought up to date, the step's expert compute through it,
        then its record queued for the host and the previous step's settled."""
        if self.dirty:
            self._rebuild()
        self._send()
        self.active = True
        self.steps += 1
        try:
            yield
        except BaseException:
            self._abandon()
            raise
        finally:
            self.active = False
        self._end()

    def compute(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                x_packed: torch.Tensor | None = None) -> torch.Tensor:
        """One token through its experts ``ids`` [k] of ``layer``: the layer's misses filled into
        ring slots, then the experts read wherever the table (or the fill) points (``x_packed``:
        hidden as the runtime's :meth:`input_packing` step takes it, filled by the router)."""
        r, runtime = self.rows[layer], self.runtime
        last = r == len(self.layers) - 1
        if not self.kernels:
            self._fill_reference(r, ids)
            out = self._reference(hidden, weights, r)
            if last:
                self._apply_reference()
            return out
        from dymoe.runtime.mapped_fill import launch_apply, launch_fill

        launch_fill(self._words, ids, self.table, self.inbox, self.heads, self.record, self.offsets, r, self.cap,
                    self.nbytes, self._programs)
        out = expert_decode(runtime.pool.buffer, self.offsets[r], runtime.layout, hidden, weights.view(1, -1),
                            backend="triton", workspace=runtime._workspaces.get(self.precision), math=runtime.math,
                            x_packed=x_packed)
        if last:
            launch_apply(self.table, self.inbox, self.heads, self.record, self.cap)
        return out

    def settle_pending(self) -> None:
        """Read the last step's record now (before reporting metrics or leaving the graph decode)."""
        if self._unsettled is not None:
            parity, self._unsettled = self._unsettled, None
            self._settle(parity)

    def suspend(self) -> None:
        """Before the usual path changes the cache (prefill): the last step settled, the ring given
        up (its free slots back to the pool, its victims unpinned), and the table rebuilt before
        the next step."""
        if self.dirty:
            return
        self.settle_pending()
        self._give_up_ring(evict=False)
        self.tail = self.head

    def _abandon(self) -> None:
        """A step that did not finish (an exception inside it, a Ctrl-C): which ring slots its fills
        took is unknown, so once the device is idle every slot the ring offered is given up (its
        victims evicted, free slots back to the pool), and the table is rebuilt before the next step."""
        self.active = False
        if self.cuda:
            torch.cuda.current_stream(self.runtime.device).synchronize()
        self.settle_pending()  # the step before finished: its record is whole
        self._give_up_ring(evict=True)
        self.head = self.tail
        self.heads[0] = self.head  # where the device takes the next ring position from

    def _give_up_ring(self, evict: bool) -> None:
        """Positions head..tail out of the ring: free slots back to the pool, victims unpinned, and
        with ``evict`` removed (a fill may have overwritten them); the table is rebuilt next step."""
        cache, pool = self.runtime.cache, self.runtime.pool
        for position in range(self.head, self.tail):
            victim = self.victims[position % self.cap]
            if victim is None:
                pool.release(self.precision, int(self.ring[position % self.cap]))
            else:
                cache.unpin(victim)
                if evict:
                    cache.remove(victim)
        self._sent_tail = -1
        self.dirty = True

    @property
    def free_in_ring(self) -> int:
        """Free slots the ring holds for fills (out of the cache's and the pool's reach)."""
        return sum(self.victims[p % self.cap] is None for p in range(self.head, self.tail))

    # ---- the host's part --------------------------------------------------------------------------

    def _end(self) -> None:
        parity = self._parity
        self._record_host[parity].copy_(self.record, non_blocking=self.cuda)
        self._record_ready[parity] = self._event()
        previous, self._unsettled = self._unsettled, parity
        self._parity ^= 1
        if previous is not None:
            self._settle(previous)
        self._reserve()
        self._send()  # queued behind this step: the next one reads it

    def _settle(self, parity: int) -> None:
        """A finished step's record: its fills enter the cache at their slots, uses are counted."""
        if self._record_ready[parity] is not None:
            self._record_ready[parity].synchronize()
        record = self._record_host[parity].numpy()
        runtime = self.runtime
        metrics, cache = runtime.metrics, runtime.cache
        misses = 0
        for r, layer in enumerate(self.layers):
            for e, outcome in zip(record[r, 0].tolist(), record[r, 1].tolist()):
                if outcome == HIT:
                    metrics.hit(layer)
                    cache.lookup((layer, e))  # the eviction order (None: evicted since, for the ring)
                    continue
                misses += 1
                metrics.miss(layer, self.nbytes)
                metrics.transfer(layer, self.nbytes)  # the fill's copy, or the experts' read in place
                if outcome != READ_IN_PLACE:
                    self._enter((layer, e), outcome)
            metrics.tokens_seen(layer, 1)
        runtime.precision_uses[self.precision] += len(self.layers) * self.k
        self._misses.append(misses)

    def _enter(self, key: Key, position: int) -> None:
        """A fill at ring ``position`` into the cache, in its slot's victim's place (the device
        table already points at the slot, and the victim's entry at its host blob)."""
        if position != self.head:
            raise AssertionError(f"ring position {position} filled, {self.head} expected next")
        cache, slot, victim = self.runtime.cache, int(self.ring[position % self.cap]), self.victims[position % self.cap]
        if victim is None:
            cache.insert(key, self.precision, slot=slot)
        else:
            cache.hand_over(victim, key)
        self.head += 1

    def _reserve(self) -> None:
        """Top the ring up to twice the most misses of the last steps: free slots, then the copies
        the preset's policy would evict next, pinned (so it picks others) and usable until a fill
        takes their slot."""
        target = min(self.most, max(self.k, max(self._misses, default=self.most)))
        cache, pool = self.runtime.cache, self.runtime.pool
        want = 2 * target - (self.tail - self.head)  # below 0 when the misses fell: nothing to add
        free = []
        while len(free) < want and (slot := pool.acquire(self.precision)) is not None:
            free.append(slot)
        for slot in free:
            self._offer(slot, None, -1, 0)
        for victim in cache.choose_victims(self.precision, max(0, want - len(free))):
            r = self.rows[victim[0]]
            self._offer(cache.pin(victim).slot, victim, r * self.experts + victim[1], self.away[r, victim[1]])

    def _offer(self, slot: int, victim: Key | None, flat: int, away: int) -> None:
        """Ring position ``tail``: ``slot``, holding ``victim`` (flat table index ``flat``, host entry
        ``away``) or nothing."""
        at = self.tail % self.cap
        self.ring[at], self.victims[at] = slot, victim
        self._ring_rows[:, at] = self.runtime.pool.offset(self.precision, slot), flat, away
        self.tail += 1

    def _send(self) -> None:
        """The ring to the device, queued on the compute stream (nothing when unchanged)."""
        if self.tail == self._sent_tail:
            return
        stage = self._stage
        if self._staged[stage] is not None:  # its previous send has read it (long done, in practice)
            self._staged[stage].synchronize()
        inbox = self._staging[stage].numpy()
        inbox[0] = self.tail
        inbox[1:] = self._ring_rows.reshape(-1)  # (positions outside head..tail are never read)
        self.inbox.copy_(self._staging[stage], non_blocking=self.cuda)
        self._staged[stage] = self._event()
        self._stage ^= 1
        self._sent_tail = self.tail

    def _rebuild(self) -> None:
        """The table from the cache as it stands (after the ring is set aside): a cached expert's
        slot once its copy has landed (the compute stream waits for any still on its way), else
        the host."""
        runtime = self.runtime
        self._misses.clear()
        self._misses.append(self.most)  # after a prefill the first steps miss most (their prompt's experts were cached)
        self._reserve()
        table = self.away.copy()
        for key in runtime.cache.resident(self.precision):
            ticket = runtime.transfers.pending(key)
            if ticket is not None:
                runtime.transfers.wait(ticket)
            table[self.rows[key[0]], key[1]] = runtime.pool.offset(self.precision, runtime.cache.peek(key).slot)
        self.table.copy_(torch.from_numpy(table))
        self._send()
        self.dirty = False

    def _event(self):
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    # ---- the CPU reference ------------------------------------------------------------------------

    def _fill_reference(self, r: int, ids: torch.Tensor) -> None:
        """:mod:`~dymoe.runtime.mapped_fill`'s fill launch of row ``r``, through torch."""
        pool, n, cap, inbox = self.runtime.pool.buffer, self.nbytes, self.cap, self.inbox
        experts = ids.tolist()
        entries = [int(self.table[r, e]) for e in experts]
        hits = {r * self.experts + e for e, entry in zip(experts, entries) if 0 <= entry < pool.numel()}
        head, end = int(self.heads[r]), int(inbox[0])
        taken, stopped = 0, False  # stopped: at a slot whose copy this layer hits
        for j, (e, entry) in enumerate(zip(experts, entries)):
            offset, outcome = entry, HIT
            if not 0 <= entry < pool.numel():
                outcome, at = READ_IN_PLACE, 1 + (head + taken) % cap
                stopped = stopped or head + taken >= end or int(inbox[at + cap]) in hits
                if not stopped:
                    offset, outcome = int(inbox[at]), head + taken
                    pool[offset:offset + n].copy_(self._bytes_at(entry))
                    if inbox[at + cap] >= 0:
                        self.table.view(-1)[inbox[at + cap]] = inbox[at + 2 * cap]
                    taken += 1
            self.record[r, 0, j], self.record[r, 1, j], self.offsets[r, j] = e, outcome, offset
        self.heads[r + 1] = head + taken

    def _apply_reference(self) -> None:
        """:mod:`~dymoe.runtime.mapped_fill`'s table update after a step, through torch."""
        for r in range(len(self.layers)):
            for e, position in zip(*self.record[r].tolist()):
                if position >= 0:
                    self.table[r, e] = self.inbox[1 + position % self.cap]
        self.heads[0] = self.heads[-1]

    def _reference(self, hidden, weights, r):
        """:meth:`compute`'s experts through the torch code: the k blobs gathered from where the
        row's offsets point into a scratch buffer, then the runtime's arithmetic for its class
        (for bf16 the resident model's, so invariant 2 holds here too)."""
        runtime, n, k = self.runtime, self.nbytes, weights.shape[0]
        scratch = torch.cat([self._bytes_at(offset) for offset in self.offsets[r].tolist()])
        slots = torch.arange(k)
        if self.precision == "bf16":
            gate_up, down, *biases = blob_stacks(scratch, 0, n, k, runtime.layout)
            return decode_experts(hidden, slots, weights, gate_up, down, runtime.dtype, tuple(biases) or None,
                                  runtime.math)
        offsets, combine = decode_routing(slots * n, slots[None], weights[None])
        return expert_decode(scratch, offsets, runtime.layout, hidden, combine, backend="torch", math=runtime.math)

    def _bytes_at(self, offset: int) -> torch.Tensor:
        """The blob at ``offset`` from the pool buffer: in the pool, or in the host store."""
        runtime, n = self.runtime, self.nbytes
        pool, host = runtime.pool.buffer, runtime.store.buffer
        if 0 <= offset <= pool.numel() - n:
            return pool[offset:offset + n]
        start = offset + pool.data_ptr() - host.data_ptr()
        if not 0 <= start <= host.numel() - n:
            raise AssertionError(f"table offset {offset} points neither into the pool nor into the host store")
        return host[start:start + n]
