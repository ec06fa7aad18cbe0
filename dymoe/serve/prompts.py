"""From a validated request to what the engine takes: prompt token ids and :class:`SamplingParams`.

Everything here runs before the request joins the queue, so a prompt that cannot fit, a ``max_tokens``
that overflows the context or a token id outside the vocabulary is refused without any model work.
"""

from __future__ import annotations

from dymoe.engine.sampling import SamplingParams
from dymoe.engine.tokenizer import Tokenizer
from dymoe.errors import InputError
from dymoe.serve.api_errors import APIError
from dymoe.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields

# OpenAI's defaults where neither the request nor the checkpoint's generation_config.json says.
API_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default; chat defaults to the rest of the context


def check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(404, f"the model {requested!r} does not exist: this server serves {served!r} "
                       "(see GET /v1/models)", param="model", code="model_not_found")


def completion_prompt_ids(request: CompletionRequest, tokenizer: Tokenizer) -> list[int]:
    if isinstance(request.prompt, str):
        return tokenizer.encode(request.prompt)
    bad = [t for t in request.prompt if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})",
                       param="prompt", code="invalid_parameter")
    return list(request.prompt)


def chat_prompt_ids(request: ChatCompletionRequest, tokenizer: Tokenizer) -> list[int]:
    """Render the conversation with the checkpoint's template; "developer" is OpenAI's new name for "system"."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                for m in request.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def sampling_params(request: SamplingFields, max_tokens: int | None, prompt_tokens: int, context_len: int,
                    defaults: dict, prompt_field: str) -> SamplingParams:
    """Sampling for one request: its values, else the checkpoint's defaults, else OpenAI's.

    ``max_tokens`` None means the rest of the context for chat and 16 for completions (OpenAI's).
    """
    room = context_len - prompt_tokens
    if prompt_tokens == 0:
        raise APIError(400, f"{prompt_field}: the prompt is empty", param=prompt_field, code="invalid_parameter")
    if room < 1:
        raise APIError(400, f"this model's context holds {context_len} tokens, but the prompt alone has "
                       f"{prompt_tokens}; shorten the {prompt_field}", param=prompt_field,
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(COMPLETION_DEFAULT_MAX_TOKENS, room) if isinstance(request, CompletionRequest) else room
    if prompt_tokens + max_tokens > context_len:
        raise APIError(400, f"this model's context holds {context_len} tokens, but the request asks for "
                       f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt + {max_tokens} max_tokens); "
                       f"lower max_tokens to at most {room} or shorten the {prompt_field}", param="max_tokens",
                       code="context_length_exceeded")
    chosen = {k: getattr(request, k) for k in API_DEFAULTS}
    values = {k: v if v is not None else defaults.get(k, API_DEFAULTS[k]) for k, v in chosen.items()}
    try:
        return SamplingParams(max_new_tokens=max_tokens, seed=request.seed, stop=request.stop, **values)
    except InputError as exc:
        raise APIError(400, str(exc), code="invalid_parameter") from None
