"""The scheduler alone, over a scripted engine: arrival order, withdrawal while waiting, cancellation while running."""

from __future__ import annotations

import asyncio
import threading

from dymoe.engine.engine import GenerationStats
from dymoe.engine.sampling import SamplingParams
from dymoe.serve.metrics import ServerMetrics
from dymoe.serve.scheduler import Finished, JobState, Scheduler, job_events


class ScriptedEngine:
    """Yields ``max_new_tokens`` copies of one token; the first job holds until ``gate`` opens."""

    def __init__(self, token: int):
        self.token = token
        self.order: list[int] = []
        self.gate = threading.Event()
        self.stats = GenerationStats()

    def generate(self, prompt_ids, params):
        self.order.append(prompt_ids[0])
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids), stop_reason="length")
        for step in range(params.max_new_tokens):
            self.gate.wait()
            self.stats.generated_tokens = step + 1
            yield self.token


async def drain(job):
    pieces = []
    async for event in job_events(job):
        if isinstance(event, Finished):
            return "".join(pieces), event
        pieces.append(event)


def test_fifo_order_and_withdrawal(tokenizer):
    engine = ScriptedEngine(tokenizer.encode("fox")[0])
    scheduler = Scheduler(engine, tokenizer, ServerMetrics(lambda: 0, lambda: 0))

    async def scenario():
        scheduler.start()
        jobs = [scheduler.submit([i], SamplingParams(max_new_tokens=2)) for i in range(1, 6)]
        await scheduler.wait_for_turn(jobs[0], 5)
        assert scheduler.queued == 4
        scheduler.cancel(jobs[2])  # withdrawn while it waits: never runs
        assert jobs[2].state is JobState.CANCELLED and scheduler.queued == 3
        engine.gate.set()
        results = [await drain(job) for job in (jobs[0], jobs[1], jobs[3], jobs[4])]
        scheduler.stop()
        return results

    results = asyncio.run(scenario())
    assert engine.order == [1, 2, 4, 5]
    assert all(text == tokenizer.decode([engine.token] * 2) and f.finish_reason == "length" for text, f in results)
    assert scheduler.queued == 0


def test_cancel_while_running_stops_at_the_next_token(tokenizer):
    engine = ScriptedEngine(tokenizer.encode("fox")[0])
    scheduler = Scheduler(engine, tokenizer, ServerMetrics(lambda: 0, lambda: 0))

    async def scenario():
        scheduler.start()
        job = scheduler.submit([1], SamplingParams(max_new_tokens=10_000))
        await scheduler.wait_for_turn(job, 5)
        scheduler.cancel(job)
        engine.gate.set()
        _, finished = await drain(job)
        scheduler.stop()
        return finished

    finished = asyncio.run(scenario())
    assert finished.finish_reason == "cancelled" and finished.completion_tokens <= 2
