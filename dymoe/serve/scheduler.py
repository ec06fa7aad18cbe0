"""One generation at a time on the engine thread; requests wait in a fair FIFO queue.

The engine (model, expert runtime, one KV cache) is not re-entrant and batching is not implemented,
so one thread owns it and the event loop hands it :class:`Job` objects in arrival order. The engine
thread posts each job's text pieces back onto the loop; a job cancelled while it waits is skipped, and
one cancelled while it runs stops at the next token, so a client that hangs up frees the model at once.
Nothing here imports FastAPI: the queue and the cancellation rules are testable on their own.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from dymoe.engine.sampling import SamplingParams
from dymoe.engine.streaming import StopState, stream_text

log = logging.getLogger("dymoe.serve")


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Finished:
    """The last event of a job: why it ended and what it cost.

    ``finish_reason`` is OpenAI's: "stop" (EOS or a stop string), "length" (``max_tokens`` or the
    context), or "cancelled" (the client left). ``completion_tokens`` counts every token the model
    produced, the EOS or the tokens of a stop string included, as vLLM counts them.
    """

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    ttft_s: float  # from the start of prefill; queue_s + ttft_s is what the client waited
    tpot_s: float


class QueueRejected(Exception):
    """The request cannot be served now (queue full, or it waited too long); retry after ``retry_after_s``."""

    def __init__(self, reason: str, message: str, retry_after_s: int):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Job:
    """One request's generation: its inputs, its state, and the queue of events the loop reads.

    Events are text pieces (``str``), then one :class:`Finished`, or an ``Exception`` if the engine
    failed. State changes are guarded by a lock because the loop (cancel) and the engine thread
    (begin, finish) race on them.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.prompt_ids = prompt_ids
        self.params = params
        self.events: asyncio.Queue = asyncio.Queue()
        self.started = asyncio.Event()
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None
        self._loop = loop
        self._state = JobState.QUEUED
        self._lock = threading.Lock()

    @property
    def state(self) -> JobState:
        return self._state

    @property
    def cancelled(self) -> bool:
        return self._state is JobState.CANCELLED

    def _move(self, allowed: tuple[JobState, ...], to: JobState) -> JobState:
        """Go to ``to`` if the state is one of ``allowed``; return the state before, either way."""
        with self._lock:
            before = self._state
            if before in allowed:
                self._state = to
            return before

    def post(self, event) -> None:
        """Hand an event to the loop (from the engine thread); dropped if the loop has closed."""
        self._call_in_loop(self.events.put_nowait, event)

    def announce_start(self) -> None:
        self._call_in_loop(self.started.set)

    def _call_in_loop(self, function, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:
            pass  # the loop has closed: nobody listens any more

    async def next_event(self):
        return await self.events.get()


class Scheduler:
    """A FIFO queue in front of one engine thread: :meth:`run` on a thread of yours, or :meth:`start` one."""

    def __init__(self, engine, tokenizer, metrics, max_queue: int = 64):
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_queue = max_queue
        self.running: Job | None = None
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._queued = 0
        self._lock = threading.Lock()
        self._service_s = 1.0  # moving average of one generation's duration, for Retry-After
        self._thread: threading.Thread | None = None

    # ---- life cycle (any thread) ------------------------------------------------------------

    def start(self) -> None:
        """Run the engine loop on a new thread (tests, embedding in another program)."""
        self._thread = threading.Thread(target=self.run, name="dymoe-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run jobs on the calling thread until :meth:`stop`.

        ``dymoe serve`` calls this on the main thread, the one that loaded the model: on CPU, torch's
        OpenMP parallel regions entered from another thread made a small model's decode 2.6x slower
        (1.0 -> 2.6 ms per token on 2 cores, measured), while matmuls (MKL) were unaffected.
        """
        while (job := self._queue.get()) is not None:
            if job._move((JobState.QUEUED,), JobState.RUNNING) is not JobState.QUEUED:
                continue  # withdrawn while it waited
            self._leave_queue()
            self._run(job)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the running job and end :meth:`run` (joining the thread :meth:`start` made)."""
        if self.running is not None:
            self.running._move((JobState.RUNNING,), JobState.CANCELLED)
        self._queue.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def busy(self) -> bool:
        return self.running is not None

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely moved on: the average generation times the jobs ahead."""
        return max(1, math.ceil(self._service_s * (self._queued + 1)))

    # ---- the event loop's side --------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Job:
        """Queue a generation; raise :class:`QueueRejected` when ``max_queue`` requests already wait."""
        with self._lock:
            if self._queued >= self.max_queue:
                self.metrics.queue_rejected("full")
                raise QueueRejected("full", f"the server is busy: {self._queued} requests are already waiting; "
                                    "retry later", self.retry_after_s())
            self._queued += 1
        job = Job(prompt_ids, params, asyncio.get_running_loop())
        self._queue.put(job)
        return job

    async def wait_for_turn(self, job: Job, timeout_s: float) -> None:
        """Return once ``job`` runs; withdraw it and raise :class:`QueueRejected` after ``timeout_s``."""
        try:
            await asyncio.wait_for(job.started.wait(), timeout_s)
        except asyncio.TimeoutError:
            if self._withdraw(job):
                self.metrics.queue_rejected("timeout")
                raise QueueRejected("timeout", f"the request waited {timeout_s:g} s for the model without its "
                                    "turn coming; retry later", self.retry_after_s()) from None

    def cancel(self, job: Job) -> None:
        """The client left: drop the job if it waits, stop it at the next token if it runs."""
        if not self._withdraw(job):
            job._move((JobState.RUNNING,), JobState.CANCELLED)

    def _withdraw(self, job: Job) -> bool:
        """Cancel ``job`` if it has not started; True when it was still waiting.

        A withdrawn job never runs, so it is settled here: ``started`` is set and a "cancelled"
        :class:`Finished` posted, and whoever waits on it (a handler whose client left) ends.
        """
        if job._move((JobState.QUEUED,), JobState.CANCELLED) is not JobState.QUEUED:
            return False
        self._leave_queue()
        job.post(Finished("cancelled", len(job.prompt_ids), 0, time.perf_counter() - job.submitted_at, 0.0, 0.0))
        job.announce_start()
        return True

    def _leave_queue(self) -> None:
        with self._lock:
            self._queued -= 1

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self, job: Job) -> None:
        job.started_at = time.perf_counter()
        self.running = job
        job.announce_start()
        try:
            finished = self._generate(job)
            self.metrics.generation_finished(finished)
            job.post(finished)
        except Exception as exc:  # a bug or a runtime failure must not take the engine thread down
            log.exception("generation failed")
            self.metrics.generation_failed()
            job.post(exc)
        finally:
            job._move((JobState.RUNNING,), JobState.FINISHED)
            self.running = None
            self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - job.started_at)

    def _generate(self, job: Job) -> Finished:
        stop_state = StopState()
        tokens = self.engine.generate(job.prompt_ids, job.params)
        pieces = stream_text(self.tokenizer, _until_cancelled(tokens, job), job.params.stop, stop_state)
        try:
            for piece in pieces:
                job.post(piece)
        finally:
            pieces.close()
            tokens.close()
        stats = self.engine.stats
        if job.cancelled:
            reason = "cancelled"
        elif stop_state.stopped_by is not None or stats.stop_reason == "eos":
            reason = "stop"
        else:
            reason = "length"
        return Finished(reason, len(job.prompt_ids), stats.generated_tokens, job.started_at - job.submitted_at,
                        stats.ttft_s, stats.tpot_s)


def _until_cancelled(tokens: Iterator[int], job: Job) -> Iterator[int]:
    for token in tokens:
        if job.cancelled:
            return
        yield token


async def job_events(job: Job):
    """The job's text pieces, then its :class:`Finished`; an engine failure is raised here."""
    while True:
        event = await job.next_event()
        if isinstance(event, Exception):
            raise event
        yield event
        if isinstance(event, Finished):
            return
