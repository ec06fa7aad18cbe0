"""Every bad request gets OpenAI's error JSON with the right status and a message naming the cause."""

from __future__ import annotations

import httpx
import openai
import pytest

from dymoe.engine.engine import Engine
from dymoe.serve.app import create_app
from dymoe.serve.config import ServeConfig
from dymoe.serve.server import BackgroundServer
from tests.serve.conftest import CONTEXT, MODEL, load

GOOD = {"model": MODEL, "prompt": "the fox", "max_tokens": 2, "temperature": 0}


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("body", [b"{", b'{"model": "x",}', b"\xff\xfe", b"", b"not json"])
def test_malformed_json_is_400(http, body):
    error = error_of(http.post("/v1/completions", content=body, headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in error["message"] and error["code"] == "invalid_json"


def test_json_that_is_not_an_object_is_400(http):
    assert "JSON object" in error_of(http.post("/v1/chat/completions", json=[1, 2]), 400)["message"]


def test_unknown_model_is_404(http, client):
    error = error_of(http.post("/v1/completions", json=GOOD | {"model": "gpt-9"}), 404)
    assert error["param"] == "model" and "'gpt-9' does not exist" in error["message"] and MODEL in error["message"]
    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert error_of(http.get("/v1/models/gpt-9"), 404)["code"] == "model_not_found"


@pytest.mark.parametrize("field, value, words", [
    ("temperature", -0.5, "greater than or equal to 0"),
    ("temperature", "hot", "valid number"),
    ("top_p", 0, "greater than 0"),
    ("top_p", 1.5, "less than or equal to 1"),
    ("max_tokens", 0, "greater than or equal to 1"),
    ("seed", -1, "greater than or equal to 0"),
    ("top_k", -2, "greater than or equal to 0"),
    ("stop", ["", "x"], "non-empty"),
    ("stop", ["a", "b", "c", "d", "e"], "at most 4"),
    ("prompt", {"text": "hi"}, "string or a list of token ids"),
    ("prompt", ["one", "two"], "one prompt per request"),
    ("stream", "perhaps", "valid boolean"),
])
def test_invalid_parameter_is_400_and_named(http, field, value, words):
    error = error_of(http.post("/v1/completions", json=GOOD | {field: value}), 400)
    assert error["param"] == field and field in error["message"] and words in error["message"]


@pytest.mark.parametrize("field, value", [("n", 2), ("logprobs", 3), ("echo", True), ("best_of", 3),
                                          ("frequency_penalty", 0.5), ("logit_bias", {"1": 5})])
def test_unimplemented_options_are_refused_by_name(http, field, value):
    error = error_of(http.post("/v1/completions", json=GOOD | {field: value}), 400)
    assert error["param"] == field and error["code"] == "unsupported_parameter"


def test_chat_message_errors_name_the_path(http):
    base = {"model": MODEL, "max_tokens": 2}
    robot = [{"role": "robot", "content": "x"}]
    error = error_of(http.post("/v1/chat/completions", json=base | {"messages": robot}), 400)
    assert error["param"] == "messages[0].role"
    error = error_of(http.post("/v1/chat/completions", json=base | {"messages": []}), 400)
    assert error["param"] == "messages"
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    error = error_of(http.post("/v1/chat/completions", json=base | {"messages": [{"role": "user", "content": image}]}),
                     400)
    assert error["param"] == "messages[0].content" and "text parts" in error["message"]
    error = error_of(http.post("/v1/chat/completions", json=base | {"messages": [{"role": "user", "content": "x"}],
                                                                    "tools": [{"type": "function"}]}), 400)
    assert error["param"] == "tools"


def test_missing_field_is_named(http):
    error = error_of(http.post("/v1/completions", json={"model": MODEL}), 400)
    assert error["param"] == "prompt" and "required" in error["message"]


def test_token_id_outside_vocabulary(http, tokenizer):
    error = error_of(http.post("/v1/completions", json=GOOD | {"prompt": [1, tokenizer.vocab_size]}), 400)
    assert error["param"] == "prompt" and "outside the vocabulary" in error["message"]


def test_oversize_body_is_413(http):
    response = http.post("/v1/completions", json=GOOD | {"prompt": "x" * 100_000})
    error = error_of(response, 413)
    assert "at most 65536" in error["message"] and "--max-body-bytes" in error["message"]


def test_oversize_chunked_body_is_413(http):
    def chunks():
        for _ in range(100):
            yield b" " * 1024

    error = error_of(http.post("/v1/completions", content=chunks()), 413)
    assert error["code"] == "body_too_large"


def test_prompt_plus_max_tokens_over_the_context_is_400(http, client, tokenizer):
    n = len(tokenizer.encode("the fox"))
    error = error_of(http.post("/v1/completions", json=GOOD | {"max_tokens": CONTEXT}), 400)
    assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
    assert f"context holds {CONTEXT} tokens" in error["message"] and f"at most {CONTEXT - n}" in error["message"]
    with pytest.raises(openai.BadRequestError, match="context holds"):
        client.completions.create(model=MODEL, prompt="the fox " * 200, max_tokens=1)


def test_empty_prompt_is_400(http):
    assert error_of(http.post("/v1/completions", json=GOOD | {"prompt": ""}), 400)["param"] == "prompt"


def test_unknown_route_and_method(http):
    assert "no route GET /v1/nothing" in error_of(http.get("/v1/nothing"), 404)["message"]
    assert error_of(http.get("/v1/completions"), 405)["type"] == "invalid_request_error"


def test_the_server_survives_every_bad_request(http):
    for body in (b"{", b"[]", b'{"model": 1}', b'{"model": "' + MODEL.encode() + b'", "prompt": null}'):
        assert http.post("/v1/completions", content=body).status_code == 400
    assert http.post("/v1/completions", json=GOOD).status_code == 200
    assert http.get("/health").json()["status"] == "ok"


class FailingEngine(Engine):
    """Raises inside prefill while ``fail`` is set: a runtime fault in the middle of serving."""

    fail = False

    def prefill(self, prompt):
        if self.fail:
            raise RuntimeError("secret internal detail")
        return super().prefill(prompt)


def test_engine_failure_is_500_and_the_server_goes_on(model_dir, tokenizer):
    engine = load(model_dir, CONTEXT, tokenizer.eos_token_ids, FailingEngine)
    with BackgroundServer(create_app(engine, tokenizer, ServeConfig(model_name=MODEL))) as running, \
            httpx.Client(base_url=running.url, timeout=30) as http:
        engine.fail = True
        error = error_of(http.post("/v1/completions", json=GOOD), 500)
        assert error["type"] == "server_error" and "secret" not in error["message"]
        streamed = http.post("/v1/completions", json=GOOD | {"stream": True})
        assert streamed.status_code == 200
        events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert '"server_error"' in events[-2] and events[-1] == "data: [DONE]"
        engine.fail = False
        assert http.post("/v1/completions", json=GOOD).status_code == 200
        assert 'dymoe_generations_total{finish_reason="error"} 2' in http.get("/metrics").text
