"""Request bodies of the OpenAI API subset dymoe serves, as pydantic models.

Fields the API defines but dymoe does not implement are accepted at their neutral value and refused
otherwise (``n`` > 1, ``logprobs``, ``tools``...), so a client never gets a silently different answer.
Unknown fields are ignored, as OpenAI-compatible servers do. ``top_k`` and ``repetition_penalty`` are
the usual extensions (vLLM, llama.cpp). Unions are validated by hand so an error names the field, not
a pydantic type tag.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4


class UnsupportedField(ValueError):
    """A field set to a value dymoe does not implement; carries the field's name."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _refuse(condition: bool, field: str, message: str) -> None:
    if condition:
        raise UnsupportedField(field, message)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat share: the model name, sampling, stop strings, streaming."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: Any = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: Any = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        return tuple(stops)

    @model_validator(mode="after")
    def _unsupported(self):
        _refuse(self.n != 1, "n", "only n=1 is supported (one completion per request)")
        _refuse(bool(self.logprobs), "logprobs", "log probabilities are not implemented")
        _refuse(self.frequency_penalty != 0, "frequency_penalty", "not implemented; use repetition_penalty")
        _refuse(self.presence_penalty != 0, "presence_penalty", "not implemented; use repetition_penalty")
        _refuse(bool(self.logit_bias), "logit_bias", "not implemented")
        return self


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a string or a list of token ids (one prompt per request)."""

    prompt: Any
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]  # a batch of one
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        if isinstance(value, list) and all(isinstance(p, (str, list)) for p in value):
            raise ValueError("one prompt per request: batching is not implemented, send the prompts one by one")
        raise ValueError("must be a string or a list of token ids")

    @model_validator(mode="after")
    def _unsupported_completion(self):
        _refuse(self.echo, "echo", "echo is not implemented")
        _refuse(self.best_of not in (None, 1), "best_of", "only best_of=1 is supported")
        _refuse(bool(self.suffix), "suffix", "suffix (insertion) is not implemented")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> str:
        """A string, or a list of text parts joined (images and audio are not supported)."""
        if value is None or isinstance(value, str):
            return value or ""
        if isinstance(value, list) and all(isinstance(p, dict) for p in value):
            if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
                return "".join(p["text"] for p in value)
            raise ValueError("only text parts ({'type': 'text', 'text': ...}) are supported")
        raise ValueError("must be a string or a list of text parts")


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``: the conversation goes through the checkpoint's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _unsupported_chat(self):
        _refuse(bool(self.tools), "tools", "tool calling is not implemented")
        _refuse(self.response_format is not None and self.response_format.get("type") not in (None, "text"),
                "response_format", "only the text response format is implemented")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
