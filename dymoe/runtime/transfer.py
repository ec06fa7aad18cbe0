"""TransferEngine: host-to-device copies of expert blobs into pool slots.

On CUDA every copy runs on the engine's own stream and records an event; :meth:`wait` makes the
*compute* stream wait on that one event, so the host never blocks and compute runs on until the
expert it needs next. Sources must be pinned for the copy to be asynchronous: a blob that is not
(an mmap view of the store beyond ``--host-memory``) is first copied by the host into one of a
ring of pinned staging buffers. Before a copy overwrites a slot, the copy stream waits for the
compute work already queued (which may still read the slot's previous expert).

On CPU, the "device" is RAM under the budget: copies are synchronous and their time is the stall.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dymoe.runtime.metrics import RuntimeMetrics


@dataclass
class Ticket:
    key: tuple[int, int]
    event: object | None = None  # torch.cuda.Event, None when already complete


class TransferEngine:
    def __init__(self, device, metrics: RuntimeMetrics, staging_bytes: int = 0, staging_buffers: int = 2,
                 measure_stalls: bool = True):
        self.device = torch.device(device)
        self.metrics = metrics
        self.measure_stalls = measure_stalls
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            self._staging = [torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=True)
                             for _ in range(staging_buffers if staging_bytes else 0)]
            self._staging_done: list[object | None] = [None] * len(self._staging)
            self._next_staging = 0

    def fetch(self, key, src: torch.Tensor, dst: torch.Tensor) -> Ticket:
        """Start copying ``src`` (host uint8 blob) into ``dst`` (a slot view)."""
        if not self.cuda:
            started = time.perf_counter()
            dst.copy_(src)
            self.metrics.add_stall(time.perf_counter() - started)
            return Ticket(key)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        staging = None
        if not src.is_pinned():
            staging, src = self._stage(src)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event(enable_timing=False)
            event.record(self.stream)
        if staging is not None:
            self._staging_done[staging] = event
        return Ticket(key, event)

    def _stage(self, src: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Copy a pageable blob into the next pinned staging buffer, once its last copy is done."""
        if not self._staging or src.numel() > self._staging[0].numel():
            raise ValueError("a blob that is not pinned needs staging buffers of at least its size")
        i = self._next_staging
        self._next_staging = (i + 1) % len(self._staging)
        if self._staging_done[i] is not None:
            self._staging_done[i].synchronize()
        buffer = self._staging[i][: src.numel()]
        buffer.copy_(src)
        return i, buffer

    def wait(self, ticket: Ticket) -> None:
        """Make the current (compute) stream wait for ``ticket``'s copy; never blocks the host."""
        if ticket.event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        if self.measure_stalls:
            before = torch.cuda.Event(enable_timing=True)
            after = torch.cuda.Event(enable_timing=True)
            before.record(compute)
            compute.wait_event(ticket.event)
            after.record(compute)
            self.metrics.add_stall_events(before, after)
        else:
            compute.wait_event(ticket.event)
        ticket.event = None
