"""Server metrics in the Prometheus text format (version 0.0.4), written by hand: no extra dependency.

Counters and histograms are updated from two threads (the event loop and the engine thread), so each
metric holds a lock. Gauges that mirror live state (queue length, busy) and the expert runtime's
counters are read at scrape time rather than copied on every change.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = labels + extra
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help, self.kind = name, help, "counter"
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            return [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self._values.items())]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.kind = name, help, "histogram"
        self.buckets = buckets + (math.inf,)
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1

    @property
    def count(self) -> int:
        return self._counts[-1]

    def lines(self) -> list[str]:
        with self._lock:
            out = [f"{self.name}_bucket{_labels((), (('le', _number(b)),))} {c}"
                   for b, c in zip(self.buckets, self._counts)]
            return out + [f"{self.name}_sum {_number(self._sum)}", f"{self.name}_count {self._counts[-1]}"]


class Gauge:
    """A value read at scrape time from ``read`` (None: left out); ``kind="counter"`` for totals kept elsewhere."""

    def __init__(self, name: str, help: str, read: Callable[[], float | None], kind: str = "gauge"):
        self.name, self.help, self.kind = name, help, kind
        self.read = read

    def lines(self) -> list[str]:
        value = self.read()
        return [] if value is None else [f"{self.name} {_number(value)}"]


def runtime_totals(experts) -> dict[str, float] | None:
    """The expert runtime's totals (hits, misses, bytes_moved, stall_s), or None if it keeps none.

    Reads ``experts.metrics.to_dict()["total"]`` (:class:`dymoe.runtime.metrics.RuntimeMetrics`);
    resident experts have no ``metrics``: everything is a hit and nothing moves.
    """
    metrics = getattr(experts, "metrics", None)
    if metrics is None or not hasattr(metrics, "to_dict"):
        return None
    try:
        total = metrics.to_dict().get("total", {})
    except RuntimeError:  # the engine thread added a layer's counters mid-read; the next scrape will see them
        return {}
    names = {"hits": "hits", "misses": "misses", "bytes_moved": "h2d_bytes", "stall_s": "stall_seconds"}
    return {key: float(total[name]) for key, name in names.items() if isinstance(total.get(name), (int, float))}


class ServerMetrics:
    """Everything ``/metrics`` shows; the scheduler and the routes call the small methods below."""

    def __init__(self, queue_length: Callable[[], float], busy: Callable[[], float], experts=None):
        self.requests = Counter("dymoe_http_requests_total", "HTTP requests answered, by route and status")
        self.generations = Counter("dymoe_generations_total", "generations ended, by finish reason")
        self.rejected = Counter("dymoe_queue_rejected_total", "requests answered 503, by reason (full, timeout)")
        self.prompt_tokens = Counter("dymoe_prompt_tokens_total", "prompt tokens prefilled")
        self.generated_tokens = Counter("dymoe_generation_tokens_total", "tokens generated")
        self.queue_wait = Histogram("dymoe_queue_wait_seconds", "time a request waited for the model", WAIT_BUCKETS)
        self.ttft = Histogram("dymoe_time_to_first_token_seconds",
                              "request queued to first token (queue wait + prefill)", TTFT_BUCKETS)
        self.tpot = Histogram("dymoe_time_per_output_token_seconds", "decode time per token after the first",
                              TPOT_BUCKETS)
        self.experts = experts
        self._metrics = [
            self.requests, self.generations, self.rejected, self.prompt_tokens, self.generated_tokens,
            self.queue_wait, self.ttft, self.tpot,
            Gauge("dymoe_queue_length", "requests waiting for the model", queue_length),
            Gauge("dymoe_running", "1 while a generation runs (one at a time: no batching)", busy),
            *self._runtime_gauges(),
        ]

    def _runtime_gauges(self) -> list[Gauge]:
        def total(key: str, resident_value: float):
            def read():
                totals = runtime_totals(self.experts)
                return resident_value if totals is None else totals.get(key)
            return read

        def hit_rate():
            totals = runtime_totals(self.experts)
            if totals is None:
                return 1.0  # every expert resident: every access hits
            hits, misses = totals.get("hits"), totals.get("misses")
            return None if hits is None or misses is None or hits + misses == 0 else hits / (hits + misses)

        return [
            Gauge("dymoe_expert_hit_rate", "share of expert uses found in device memory", hit_rate),
            Gauge("dymoe_expert_hits_total", "expert uses found in device memory", total("hits", None), "counter"),
            Gauge("dymoe_expert_misses_total", "expert uses that had to be fetched", total("misses", 0.0), "counter"),
            Gauge("dymoe_expert_bytes_moved_total", "bytes of expert weights copied to the device",
                  total("bytes_moved", 0.0), "counter"),
            Gauge("dymoe_expert_stall_seconds_total", "time compute waited for expert copies",
                  total("stall_s", 0.0), "counter"),
        ]

    # ---- updates ------------------------------------------------------------------------------

    def request_answered(self, route: str, status: int) -> None:
        self.requests.inc(route=route, status=str(status))

    def queue_rejected(self, reason: str) -> None:
        self.rejected.inc(reason=reason)

    def generation_failed(self) -> None:
        self.generations.inc(finish_reason="error")

    def generation_finished(self, finished) -> None:
        self.generations.inc(finish_reason=finished.finish_reason)
        self.prompt_tokens.inc(finished.prompt_tokens)
        self.generated_tokens.inc(finished.completion_tokens)
        self.queue_wait.observe(finished.queue_s)
        if finished.completion_tokens >= 1:
            self.ttft.observe(finished.queue_s + finished.ttft_s)
        if finished.completion_tokens >= 2:
            self.tpot.observe(finished.tpot_s)

    # ---- the text format ----------------------------------------------------------------------

    def render(self) -> str:
        out = []
        for metric in self._metrics:
            out += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}", *metric.lines()]
        return "\n".join(out) + "\n"
