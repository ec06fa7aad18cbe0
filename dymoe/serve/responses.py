"""Response bodies in OpenAI's shapes: whole completions, stream chunks (server-sent events), usage.

:class:`CompletionShape` and :class:`ChatShape` differ only in object names and where the text sits
(``text`` vs ``message``/``delta``), so the routes drive both through the same four methods.
"""

from __future__ import annotations

import json
import time
import uuid

from dymoe.serve.scheduler import Finished


def usage(finished: Finished) -> dict:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


def sse(payload: dict | str) -> str:
    """One server-sent event; ``payload`` "[DONE]" is OpenAI's end-of-stream marker."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class _Shape:
    object = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(self, model: str):
        self.model = model
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list, extra: dict | None = None) -> dict:
        body = {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}
        return body | (extra or {})

    def whole(self, text: str, finished: Finished) -> dict:
        return self._envelope(self.object, [self._choice(text, finished.finish_reason)], {"usage": usage(finished)})

    def opening_chunks(self) -> list[dict]:
        return []

    def chunk(self, text: str, finish_reason: str | None = None) -> dict:
        return self._envelope(self.chunk_object, [self._delta(text, finish_reason)])

    def usage_chunk(self, finished: Finished) -> dict:
        return self._envelope(self.chunk_object, [], {"usage": usage(finished)})


class CompletionShape(_Shape):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def _choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    _delta = _choice


class ChatShape(_Shape):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def _choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def _delta(self, text: str, finish_reason: str | None) -> dict:
        delta = {"content": text} if finish_reason is None else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def opening_chunks(self) -> list[dict]:
        opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [self._envelope(self.chunk_object, [opening])]
