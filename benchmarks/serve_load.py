"""A short, bounded load run of ``dymoe serve`` on loopback: latency and throughput as clients are added.

One command: ``python benchmarks/serve_load.py`` (``--model DIR`` for a real checkpoint; by default a
random-weight Qwen3-MoE checkpoint of the demo's shape is written to a temporary folder).

What it does. Starts ``dymoe serve`` as a child process on a free 127.0.0.1 port (so the load
generator does not share the server's interpreter), then for each ``--clients`` level runs that many
client threads, each sending streamed ``/v1/completions`` requests (greedy, ``--max-tokens`` tokens,
varied prompts) back to back until the level has sent ``--requests`` requests. Per request it records,
on the client side, TTFT (request sent to first text chunk), TPOT ((last chunk - first chunk) /
(tokens - 1), tokens from the usage chunk) and end-to-end latency (the first *text* chunk can trail the
first token by a few tokens when a character spans several byte-level tokens); per level, requests per second and
generated tokens per second. A direct :class:`~dymoe.engine.engine.Engine` run of the same requests,
in this process with no HTTP, comes first as the baseline the server's overhead is read against.

Each level runs ``--repeat`` times and the run with the most requests per second is reported (other
work on a shared machine only slows a run down); the load average before and after is printed.
Bounds: at most ``--requests`` per level, at most ``--time-limit`` seconds in all (a level that runs
out of time reports what finished), loopback only. Generation is one request at a time (no batching),
so throughput should stay flat as clients are added while TTFT grows with the queue: that is what the
table shows. It prints a markdown table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from dymoe.engine.engine import Engine, EngineConfig
from dymoe.engine.sampling import SamplingParams
from dymoe.engine.tokenizer import Tokenizer

PROMPTS = ["The quick brown fox", "Experts live on the host", "A router picks two experts for", "Memory is",
           "The runtime fetches", "Once upon a time", "In the beginning the cache was", "Offloading means"]
DEMO_TEXTS = ["The quick brown fox jumps over the lazy dog. " * 20,
              "Experts live on the host; the runtime fetches them to the device when a token needs them. " * 20]


@dataclass
class Sample:
    ok: bool
    status: int = 200
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    latency_s: float = 0.0
    tokens: int = 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: a random demo-shape one)")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of each level; the one with the most requests per second is reported")
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds for the whole run")
    parser.add_argument("--context-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


def random_model(folder: Path) -> Path:
    from dymoe.bench.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(folder / "random-qwen3-moe", DEMO_TEXTS, vocab_size=1024, seed=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int, context_len: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "dymoe", "serve", "-m", str(model), "--port", str(port), "--device", "cpu",
               "--no-progress", "--context-len", str(context_len), "--log-level", "warning", "--max-queue", "256",
               "--queue-timeout", "120", "--served-model-name", "bench"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"dymoe serve exited: {process.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("dymoe serve did not come up within 120 s")


def one_request(http: httpx.Client, prompt: str, max_tokens: int) -> Sample:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return Sample(ok=False, status=response.status_code)
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    done = time.perf_counter()
    if first is None:
        first = last = done
    return Sample(True, 200, first - sent, (last - first) / max(tokens - 1, 1), done - sent, tokens)


def run_level(url: str, clients: int, requests: int, max_tokens: int, deadline: float) -> tuple[list[Sample], float]:
    counter = iter(range(requests))
    lock = threading.Lock()
    samples: list[Sample] = []

    def client():
        with httpx.Client(base_url=url, timeout=300) as http:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                sample = one_request(http, f"{PROMPTS[i % len(PROMPTS)]} ({i})", max_tokens)
                with lock:
                    samples.append(sample)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return samples, time.perf_counter() - started


def direct_baseline(model: Path, requests: int, max_tokens: int, context_len: int) -> dict:
    """The same requests on an Engine in this process: no HTTP, no queue."""
    tokenizer = Tokenizer.from_dir(model)
    engine = Engine.load(EngineConfig(model_dir=model, device="cpu", context_len=context_len, progress=False),
                         eos_token_ids=tokenizer.eos_token_ids)
    for _ in engine.generate(tokenizer.encode(PROMPTS[0]), SamplingParams(max_new_tokens=max_tokens)):
        pass  # warm-up, as the server gets one
    ttft, tpot, latency, tokens = [], [], [], 0
    started = time.perf_counter()
    for i in range(requests):
        sent = time.perf_counter()
        ids = tokenizer.encode(f"{PROMPTS[i % len(PROMPTS)]} ({i})")
        for _ in engine.generate(ids, SamplingParams(max_new_tokens=max_tokens)):
            pass
        latency.append(time.perf_counter() - sent)
        ttft.append(engine.stats.ttft_s)
        tpot.append(engine.stats.tpot_s)
        tokens += engine.stats.generated_tokens
    wall = time.perf_counter() - started
    return {"clients": "direct", "ok": requests, "rejected": 0, "req_s": requests / wall, "tok_s": tokens / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttft), "ttft_p95_ms": 1000 * percentile(ttft, 95),
            "tpot_p50_ms": 1000 * statistics.median(tpot), "latency_p50_ms": 1000 * statistics.median(latency),
            "latency_p95_ms": 1000 * percentile(latency, 95), "wall_s": wall}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(clients: int, samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if s.ok]
    row = {"clients": clients, "ok": len(ok), "rejected": len(samples) - len(ok), "wall_s": wall,
           "req_s": len(ok) / wall, "tok_s": sum(s.tokens for s in ok) / wall}
    if ok:
        row |= {"ttft_p50_ms": 1000 * statistics.median(s.ttft_s for s in ok),
                "ttft_p95_ms": 1000 * percentile([s.ttft_s for s in ok], 95),
                "tpot_p50_ms": 1000 * statistics.median(s.tpot_s for s in ok),
                "latency_p50_ms": 1000 * statistics.median(s.latency_s for s in ok),
                "latency_p95_ms": 1000 * percentile([s.latency_s for s in ok], 95)}
    return row


def best(rows) -> dict:
    """The run with the most requests per second: other work on a shared machine only ever slows a run down."""
    return max(rows, key=lambda row: row["req_s"])


def table(rows: list[dict]) -> str:
    columns = ("clients", "ok", "rejected", "req_s", "tok_s", "ttft_p50_ms", "ttft_p95_ms", "tpot_p50_ms",
               "latency_p50_ms", "latency_p95_ms")
    fmt = lambda v: "–" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows])


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {platform.system()} {platform.release()}; "
            f"load average before the run {load}")


def main(argv=None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.time_limit
    host = machine()  # before the run: the load average says whether others shared the machine
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_model(Path(tmp))
        rows = [best(direct_baseline(model, args.requests, args.max_tokens, args.context_len)
                     for _ in range(args.repeat))]
        port = free_port()
        server = start_server(model, port, args.context_len)
        try:
            url = f"http://127.0.0.1:{port}"
            run_level(url, 1, 2, args.max_tokens, deadline)  # warm-up, not reported
            for clients in (int(c) for c in args.clients.split(",")):
                rows.append(best(summarize(clients, *run_level(url, clients, args.requests, args.max_tokens, deadline))
                                 for _ in range(args.repeat)))
            metrics = httpx.get(f"{url}/metrics").text
        finally:
            server.terminate()
            server.wait(20)
    print(f"dymoe serve load run: {args.requests} streamed completions per level, greedy, max_tokens "
          f"{args.max_tokens}, loopback, one generation at a time (no batching); best of {args.repeat} runs per level")
    print(f"model: {args.model or 'random-weight Qwen3-MoE, demo shape (untrained)'}")
    print(f"machine: {host}; after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"command: {' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}\n")
    print(table(rows))
    rejected = [line for line in metrics.splitlines() if line.startswith("dymoe_queue_rejected_total")]
    print(f"\nserver-side 503s: {rejected or 'none'}")
    if args.out:
        args.out.write_text(json.dumps({"machine": host, "args": vars(args) | {"model": str(args.model)},
                                        "rows": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
