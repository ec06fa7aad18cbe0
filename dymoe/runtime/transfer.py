"""TransferEngine: host-to-device copies of expert blobs into pool slots.

On CUDA every copy runs on the engine's one copy stream and records one event; :meth:`wait` makes
the *compute* stream wait on that event, so the host does not block and compute runs on until the
expert it needs next. A copy is asynchronous only from pinned memory: a blob that is not pinned (an
mmap view of the store beyond the host-RAM tier) is copied by a background thread, chunk by chunk,
through a ring of pinned staging buffers, then to the device.

Why one copy stream and one background thread: a slot can be reused while a copy into it is still in
flight (a prefetched expert evicted before it landed). Copies issued in fetch order on one stream
land in that order, so the newest copy into a slot always wins; one H2D stream already saturates
the link. Pinned fetches take the direct path only when no staged copy is queued, for the same reason.
Measured on the H100 machine (64 bf16 Qwen3-30B-A3B experts, 9.4 MB each): 52.7 GB/s from pinned
memory; 14.3 GB/s staged through 3 x 8 MiB buffers and 20.8 GB/s through 4 x 32 MiB (the default),
where the host memcpy on the one background thread is the limit.

Before a copy overwrites a slot, the compute that may still read the slot's previous expert must be
done. By default every copy waits for all compute queued when it was issued (safe, but a prefetch
then cannot overlap the layer being computed). A runtime that calls :meth:`fence` after each layer's
unpins lets copies wait only for the compute queued before that fence: unpinned slots were last read
by then, so the prefetch for layer l+1 overlaps layer l.

On CPU the same interface copies synchronously (the tickets come back done and the copy time is the
stall), or, with ``threaded=True``, on one background thread (stall = time :meth:`wait` blocks).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from dymoe.runtime.metrics import RuntimeMetrics

Key = tuple[int, int]  # (layer, expert)


@dataclass(eq=False)
class Ticket:
    """One transfer. Opaque to callers except ``key`` and ``nbytes``; ask the engine about it."""

    key: Key
    nbytes: int
    event: object | None = None  # torch.cuda.Event recorded on the copy stream after the copy
    future: Future | None = None  # the background part (staging, or the whole copy on CPU)
    src: torch.Tensor | None = field(default=None, repr=False)  # kept alive until the copy lands
    waited: bool = False


class TransferEngine:
    """Copies expert blobs (host uint8 tensors) into slot views (device uint8 tensors)."""

    def __init__(
        self,
        device: torch.device | str,
        metrics: RuntimeMetrics | None = None,
        *,
        staging_bytes: int = 32 << 20,
        staging_buffers: int = 4,
        threaded: bool = False,
        measure_stalls: bool = False,
    ):
        self.device = torch.device(device)
        self.metrics = metrics if metrics is not None else RuntimeMetrics()
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            # with an explicit index, torch's stream and device calls skip a lookup of the current
            # device through the environment: ~20 us a call, thousands per token (profile_host.py)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.measure_stalls = measure_stalls
        self.bytes_moved = 0
        self.transfers = 0
        self._stall_seconds = 0.0
        self._inflight: dict[Key, Ticket] = {}
        self._worker = ThreadPoolExecutor(1, "dymoe-h2d") if self.cuda or threaded else None
        self._queued = 0  # background jobs not yet issued (CUDA) or done (CPU)
        self._lock = threading.Lock()
        if self.cuda:
            self._init_cuda(staging_bytes, staging_buffers)

    def _init_cuda(self, staging_bytes: int, staging_buffers: int) -> None:
        if staging_bytes <= 0 or staging_buffers <= 0:
            raise ValueError("staging needs at least one buffer of at least one byte")
        self.stream = torch.cuda.Stream(self.device)
        self._staging = [torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(staging_buffers)]
        self._staging_free = [torch.cuda.Event() for _ in range(staging_buffers)]
        self._next_staging = 0
        self._fence = None  # set by fence(); None: copies wait for all compute queued so far
        self._stall_pairs: deque = deque()  # (layer, before, after) timing events, measured lazily

    # -- the interface ----------------------------------------------------------------------------

    def fetch(self, key: Key, src: torch.Tensor, dst: torch.Tensor) -> Ticket:
        """Start copying ``src`` (a host uint8 blob) into ``dst`` (a slot view of the same size)."""
        if src.numel() != dst.numel() or src.dtype != torch.uint8 or dst.dtype != torch.uint8:
            raise ValueError(f"expert {key}: blob of {src.numel()} bytes ({src.dtype}) does not match "
                             f"its slot of {dst.numel()} bytes ({dst.dtype})")
        self.bytes_moved += src.numel()
        self.transfers += 1
        self.metrics.transfer(key[0], src.numel())
        ticket = self._fetch_cuda(key, src, dst) if self.cuda else self._fetch_cpu(key, src, dst)
        if not ticket.waited:
            self._inflight[key] = ticket
        return ticket

    def wait(self, ticket: Ticket) -> None:
        """Make the compute (current) stream wait for the copy; on CUDA the host waits only for a
        staged copy still queued on the background thread, never for the device."""
        if ticket.waited:
            return
        if ticket.future is not None and not ticket.future.done():
            started = time.perf_counter()
            ticket.future.result()
            self._add_stall(ticket.key[0], time.perf_counter() - started)
        elif ticket.future is not None:
            ticket.future.result()  # re-raise a failed background copy
        if ticket.event is not None:
            self._wait_event(ticket)
        ticket.waited = True
        if not self.cuda:
            ticket.src = None  # landed; on CUDA the copy may still be reading it
        if self._inflight.get(ticket.key) is ticket:
            del self._inflight[ticket.key]

    def is_done(self, ticket: Ticket) -> bool:
        """True when the bytes have landed (never blocks)."""
        if ticket.future is not None and not ticket.future.done():
            return False
        return ticket.event is None or ticket.event.query()

    def pending(self, key: Key) -> Ticket | None:
        """The latest transfer of ``key`` not yet waited on (a prefetch a demand step must wait for)."""
        return self._inflight.get(key)

    def any_pending(self, keys) -> bool:
        """Whether any of ``keys`` has a transfer not yet waited on (:meth:`pending`)."""
        inflight = self._inflight
        return bool(inflight) and any(key in inflight for key in keys)

    def fence(self) -> None:
        """Mark that every slot unpinned so far is free to overwrite once the compute queued so far is
        done; later copies wait for this point only (see the module docstring). A no-op on CPU."""
        if self.cuda:
            self._fence = self._mark_compute()

    @property
    def stall_seconds(self) -> float:
        """Total stall so far; on CUDA with ``measure_stalls`` this synchronises pending timings."""
        self.collect_stalls()
        return self._stall_seconds

    def collect_stalls(self) -> None:
        """Resolve pending stall timings into the metrics (blocks until those waits have happened)."""
        while self.cuda and self._stall_pairs:
            layer, before, after = self._stall_pairs.popleft()
            after.synchronize()
            self._add_stall(layer, before.elapsed_time(after) / 1e3)

    def synchronize(self) -> None:
        """Block the host until every issued copy has landed."""
        if self._worker is not None:
            self._worker.submit(lambda: None).result()  # FIFO: all earlier jobs are done or issued
        if self.cuda:
            self.stream.synchronize()
        self._inflight.clear()

    def close(self) -> None:
        self.synchronize()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def __enter__(self) -> "TransferEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- CPU ----------------------------------------------------------------------------------------

    def _fetch_cpu(self, key: Key, src: torch.Tensor, dst: torch.Tensor) -> Ticket:
        if self._worker is None:
            started = time.perf_counter()
            dst.copy_(src)
            self._add_stall(key[0], time.perf_counter() - started)  # one thread: compute waited for it
            return Ticket(key, src.numel(), waited=True)
        return Ticket(key, src.numel(), future=self._worker.submit(dst.copy_, src), src=src)

    # -- CUDA ---------------------------------------------------------------------------------------

    def _fetch_cuda(self, key: Key, src: torch.Tensor, dst: torch.Tensor) -> Ticket:
        fence = self._fence if self._fence is not None else self._mark_compute()
        event = torch.cuda.Event()
        pinned = src.is_pinned()
        with self._lock:
            direct = pinned and self._queued == 0
            self._queued += not direct
        if direct:
            self._issue(src, dst, fence, event)
            return Ticket(key, src.numel(), event=event, src=src)
        future = self._worker.submit(self._background_copy, src, dst, fence, event, pinned)
        return Ticket(key, src.numel(), event=event, future=future, src=src)

    def _mark_compute(self):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device.index))
        return event

    def _issue(self, src: torch.Tensor, dst: torch.Tensor, fence, event) -> None:
        with torch.cuda.device(self.device.index), self._copy_stream():
            self.stream.wait_event(fence)
            dst.copy_(src, non_blocking=True)
            event.record(self.stream)

    @contextlib.contextmanager
    def _copy_stream(self):
        """The copy stream made current (torch.cuda.stream() looks the device up through the
        environment on every entry; the thread's previous stream comes back afterwards)."""
        previous = torch.cuda.current_stream(self.device.index)
        torch.cuda.set_stream(self.stream)
        try:
            yield
        finally:
            torch.cuda.set_stream(previous)

    def _background_copy(self, src, dst, fence, event, pinned: bool) -> None:
        try:
            if pinned:
                self._issue(src, dst, fence, event)
            else:
                self._staged_copy(src, dst, fence, event)
        finally:
            with self._lock:
                self._queued -= 1

    def _staged_copy(self, src: torch.Tensor, dst: torch.Tensor, fence, event) -> None:
        """mmap -> pinned staging (host memcpy; page faults from disk land here) -> device, by chunks."""
        chunk = self._staging[0].numel()
        with torch.cuda.device(self.device.index), self._copy_stream():
            self.stream.wait_event(fence)
            for start in range(0, src.numel(), chunk):
                stop = min(start + chunk, src.numel())
                i = self._next_staging
                self._next_staging = (i + 1) % len(self._staging)
                self._staging_free[i].synchronize()  # its previous H2D has finished reading it
                buffer = self._staging[i][: stop - start]
                buffer.copy_(src[start:stop])
                dst[start:stop].copy_(buffer, non_blocking=True)
                self._staging_free[i].record(self.stream)
            event.record(self.stream)

    def _wait_event(self, ticket: Ticket) -> None:
        compute = torch.cuda.current_stream(self.device.index)
        if not self.measure_stalls:
            compute.wait_event(ticket.event)
            return
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(compute)
        compute.wait_event(ticket.event)
        after.record(compute)
        self._stall_pairs.append((ticket.key[0], before, after))
        while self._stall_pairs and self._stall_pairs[0][2].query():
            layer, b, a = self._stall_pairs.popleft()
            self._add_stall(layer, b.elapsed_time(a) / 1e3)

    def _add_stall(self, layer: int, seconds: float) -> None:
        self._stall_seconds += seconds
        self.metrics.stall(layer, seconds)


class IndexUpload:
    """Short index lists (slot ids, rows) to the device without a host synchronisation.

    ``torch.tensor(values, device="cuda")`` copies from pageable memory and waits for the stream.
    Here the values go into a pinned row and are copied asynchronously on the current stream. A row
    is reused only after the caller's next device-to-host read (the routing sync of the next
    layer), which waits for the copy; so a step may use each of its ``rows`` rows once.
    """

    def __init__(self, width: int, device: torch.device, rows: int = 2):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.host = torch.empty(rows, width, dtype=torch.int64, pin_memory=self.cuda)
        self.dev = torch.empty(rows, width, dtype=torch.int64, device=self.device)
        self._host_values = self.host.numpy()  # the same (pinned) memory, written without torch's dispatch
        self._views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (row, n) -> host, device

    def row(self, row: int, n: int) -> torch.Tensor:
        """The device view the last ``n`` values uploaded to ``row`` live in (a fixed address)."""
        return self._view(row, n)[1]

    def _view(self, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        views = self._views.get((row, n))
        if views is None:
            views = self._views[(row, n)] = (self.host[row, :n], self.dev[row, :n])
        return views

    def __call__(self, values: list[int], row: int = 0) -> torch.Tensor:
        """``values`` as an int64 tensor on the device (a view valid until ``row`` is reused)."""
        n = len(values)
        self._host_values[row, :n] = values
        host, target = self._view(row, n)
        target.copy_(host, non_blocking=self.cuda)
        return target
