"""The OpenAI API through the official client and raw HTTP: answers equal a direct Engine run."""

from __future__ import annotations

import json

import httpx

from dymoe.engine.engine import Engine, EngineConfig
from dymoe.runtime.presets import RuntimeConfig
from dymoe.serve.app import create_app
from dymoe.serve.config import ServeConfig
from dymoe.serve.server import BackgroundServer
from tests.serve.conftest import CONTEXT, MODEL, chat_ids

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "the fox"}]


def test_models_lists_the_served_model(client, http):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert http.get(f"/v1/models/{MODEL}").json()["max_model_len"] == CONTEXT


def test_completion_equals_engine_with_usage(client, tokenizer, reference):
    ids = tokenizer.encode("the fox")
    out = client.completions.create(model=MODEL, prompt="the fox", max_tokens=12, temperature=0)
    ref = reference(ids, 12)
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason == "length"
    usage = out.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_completion_accepts_token_ids(client, tokenizer, reference):
    ids = tokenizer.encode("Experts live")
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert out.choices[0].text == reference(ids, 8).text


def test_sampled_completion_stops_at_eos_and_counts_it(client, tokenizer, reference):
    ids = tokenizer.encode("the fox")
    ref = reference(ids, 200, temperature=0.8, seed=1)
    assert ref.finish_reason == "stop" and ref.completion_tokens < 200, "seed 1 is expected to meet EOS"
    out = client.completions.create(model=MODEL, prompt="the fox", max_tokens=200, temperature=0.8, seed=1)
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == ref.completion_tokens  # the EOS token counts, as in vLLM


def test_chat_uses_the_template(client, tokenizer, reference):
    ids = chat_ids(tokenizer, MESSAGES)
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0.7, seed=5)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reference(ids, 10, 0.7, 5).text
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 10


def test_chat_accepts_text_parts_and_developer_role(client, tokenizer, reference):
    messages = [{"role": "developer", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "the "}, {"type": "text", "text": "fox"}]}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6, temperature=0)
    assert out.choices[0].message.content == reference(chat_ids(tokenizer, MESSAGES), 6).text


def test_streamed_chat_reassembles_to_the_whole_answer(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0.9, seed=11)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_streamed_completion_reassembles(client):
    kwargs = dict(model=MODEL, prompt="the lazy dog", max_tokens=30, temperature=1.0, seed=3)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # usage only when stream_options asks for it


def test_raw_sse_format(http):
    body = {"model": MODEL, "prompt": "the fox", "max_tokens": 5, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {e["object"] for e in events} == {"text_completion"}


def test_stop_sequence_cuts_the_text(client, tokenizer, reference):
    full = reference(tokenizer.encode("the fox"), 40).text
    printable = [i for i in range(len(full) // 3, len(full) - 2)
                 if full[i:i + 2].isprintable() and full[i:i + 2].strip()]
    assert printable, f"no printable stop string in {full!r}"
    stop = full[printable[0]:printable[0] + 2]
    expected = full[: full.index(stop)]
    out = client.completions.create(model=MODEL, prompt="the fox", max_tokens=40, temperature=0, stop=[stop, "never"])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt="the fox", max_tokens=40, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_raw_http_chat(http, tokenizer, reference):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 7, "temperature": 0, "unknown_field": 1}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "chat.completion" and data["model"] == MODEL
    assert data["choices"][0]["message"]["content"] == reference(chat_ids(tokenizer, MESSAGES), 7).text


def test_chat_without_max_tokens_may_use_the_rest_of_the_context(http):
    body = {"model": MODEL, "messages": MESSAGES, "temperature": 0.8, "seed": 1}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    usage = response.json()["usage"]
    assert usage["total_tokens"] <= CONTEXT


def test_health_and_metrics(http, client):
    client.completions.create(model=MODEL, prompt="the fox", max_tokens=3, temperature=0)
    assert http.get("/health").json() == {"status": "ok", "model": MODEL, "busy": False, "queued": 0}
    text = http.get("/metrics").text
    for name in ("dymoe_http_requests_total", "dymoe_time_to_first_token_seconds_bucket",
                 "dymoe_time_per_output_token_seconds_count", "dymoe_expert_hit_rate", "dymoe_queue_length",
                 "dymoe_expert_bytes_moved_total", 'dymoe_generations_total{finish_reason="length"}'):
        assert name in text
    assert 'dymoe_http_requests_total{route="/v1/completions",status="200"}' in text


def test_offloaded_runtime_is_served_and_its_metrics_exported(model_dir, tokenizer, reference):
    """The server serves whatever engine it is given: here experts offloaded with LRU at a small budget."""
    config = EngineConfig(model_dir=model_dir, device="cpu", context_len=CONTEXT, progress=False,
                          runtime=RuntimeConfig(policy="lru", device_memory=6 * 3 * 64 * 64 * 4, progress=False))
    engine = Engine.load(config, eos_token_ids=tokenizer.eos_token_ids)
    with BackgroundServer(create_app(engine, tokenizer, ServeConfig(model_name=MODEL))) as running, \
            httpx.Client(base_url=running.url, timeout=30) as http:
        body = {"model": MODEL, "prompt": "the fox", "max_tokens": 12, "temperature": 0}
        text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        metrics = dict(line.rsplit(" ", 1) for line in http.get("/metrics").text.splitlines()
                       if line.startswith("dymoe_expert"))
    assert text == reference(tokenizer.encode("the fox"), 12).text  # offloading is invisible at full precision
    assert 0 < float(metrics["dymoe_expert_hit_rate"]) < 1
    assert float(metrics["dymoe_expert_bytes_moved_total"]) > 0 and float(metrics["dymoe_expert_misses_total"]) > 0
