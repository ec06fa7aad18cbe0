"""A real server on a loopback port over a small random checkpoint with a real tokenizer.

``server`` serves the plain engine (EOS on). ``slow_server`` serves an engine that sleeps in every
decode step and never meets EOS, standing in for a big model: its generations take seconds, so
queueing, timeouts and cancellation can be watched. ``reference`` runs the same generation on a
separate Engine in this process, the answer every server response is checked against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from dymoe.bench.random_checkpoint import write_random_checkpoint
from dymoe.engine.engine import Engine, EngineConfig
from dymoe.engine.sampling import SamplingParams
from dymoe.engine.streaming import StopState, stream_text
from dymoe.engine.tokenizer import Tokenizer
from dymoe.serve.app import create_app
from dymoe.serve.config import ServeConfig
from dymoe.serve.server import BackgroundServer

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 20,
         "Experts live on the host; the runtime fetches them. " * 20]
MODEL = "tiny-moe"
CONTEXT = 256
SLOW_CONTEXT = 512
SLOW_DECODE_S = 0.01


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("serve") / MODEL, TEXTS, vocab_size=300, seed=3,
                                   hidden_size=64, num_hidden_layers=2, num_experts=8, moe_intermediate_size=64,
                                   head_dim=16)


@pytest.fixture(scope="session")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def load(model_dir: Path, context: int, eos: tuple[int, ...], engine_class=Engine) -> Engine:
    return engine_class.load(EngineConfig(model_dir=model_dir, device="cpu", context_len=context, progress=False),
                             eos_token_ids=eos)


@dataclass
class Reference:
    text: str
    completion_tokens: int
    finish_reason: str


@pytest.fixture(scope="session")
def reference(model_dir, tokenizer):
    """(prompt ids, max_tokens, temperature, seed, stop) -> what a direct Engine run gives."""
    engine = load(model_dir, CONTEXT, tokenizer.eos_token_ids)

    def run(prompt_ids: list[int], max_tokens: int, temperature: float = 0.0, seed: int | None = None,
            stop: tuple[str, ...] = ()) -> Reference:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop)
        state = StopState()
        text = "".join(stream_text(tokenizer, engine.generate(prompt_ids, params), stop, state))
        stopped = state.stopped_by is not None or engine.stats.stop_reason == "eos"
        return Reference(text, engine.stats.generated_tokens, "stop" if stopped else "length")

    return run


@pytest.fixture(scope="session")
def server(model_dir, tokenizer):
    engine = load(model_dir, CONTEXT, tokenizer.eos_token_ids)
    app = create_app(engine, tokenizer, ServeConfig(model_name=MODEL, max_body_bytes=64 * 1024))
    with BackgroundServer(app) as running:
        running.app = app
        yield running


class SlowEngine(Engine):
    """The tiny model at the pace of a big one: every decode step sleeps."""

    def decode_one(self, token, position):
        time.sleep(SLOW_DECODE_S)
        return super().decode_one(token, position)


@pytest.fixture(scope="session")
def slow_server(model_dir, tokenizer):
    engine = load(model_dir, SLOW_CONTEXT, (-1,), SlowEngine)  # EOS id -1: never met, runs to max_tokens
    config = ServeConfig(model_name=MODEL, queue_timeout_s=0.5, max_queue=1)
    app = create_app(engine, tokenizer, config)
    with BackgroundServer(app) as running:
        running.app = app
        yield running


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def chat_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                            add_special_tokens=False)
