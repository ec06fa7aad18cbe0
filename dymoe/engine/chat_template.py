"""Hugging Face chat templates, rendered with jinja2 the way transformers renders them.

A chat template is untrusted code that ships with a checkpoint, so it runs in jinja2's immutable
sandbox. The environment matches the one transformers builds (trim_blocks, lstrip_blocks, the
loopcontrols extension, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text
and takes ``indent``), because the same template must give the same prompt string here and there:
a template written against transformers' environment is what every checkpoint ships.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dymoe.errors import CheckpointError, InputError

# Older names under which callers pass a message's reasoning; templates read the first one
# (Qwen3) or ``thinking`` (GPT-OSS), so every message carries both, as transformers does.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def raise_exception(message: str) -> None:
    """Templates call this to reject a conversation (e.g. roles that do not alternate)."""
    raise jinja2.exceptions.TemplateError(message)


def strftime_now(format: str) -> str:
    """Today's date for templates that print it into the system prompt (Llama 3 style)."""
    return datetime.now().strftime(format)


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
           sort_keys: bool = False) -> str:
    """JSON without jinja's HTML escaping: templates embed tool schemas verbatim in the prompt."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed names, closing a path to Python internals."""

    def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_public(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_public(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_public(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates may not set the attribute {name!r} on a namespace")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain_messages(messages: list[dict]) -> list[dict]:
    """Copies of the messages without None values (templates print them as "None") and with reasoning aliased."""
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"chat message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        plain.append(message)
    return plain


class ChatTemplate:
    """One compiled chat template; ``source`` names where it came from, for error messages."""

    def __init__(self, template: str, source: str = "chat template"):
        self.template = template
        self.source = source
        try:
            self._compiled = _environment().from_string(template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise CheckpointError(
                f"{source}: the chat template is not valid jinja ({e.message}, line {e.lineno}); "
                "fix or replace the template"
            ) from None

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        special_tokens: dict[str, str] | None = None,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt string for ``messages``.

        ``special_tokens`` maps ``bos_token``, ``eos_token``, ... to their text; names whose token is
        None are left undefined (so they render empty), as transformers does. Extra keyword arguments
        (e.g. ``enable_thinking``) become template variables. A conversation the template rejects
        through ``raise_exception`` ends in :class:`InputError` quoting the template's message.
        """
        variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        variables.update(kwargs)
        try:
            return self._compiled.render(
                messages=_plain_messages(messages), tools=tools, documents=None,
                add_generation_prompt=add_generation_prompt, **variables,
            )
        except jinja2.exceptions.SecurityError as e:
            raise CheckpointError(f"{self.source}: the chat template tried an unsafe operation ({e})") from None
        except jinja2.exceptions.TemplateError as e:
            raise InputError(f"the chat template ({self.source}) rejected the conversation: {e}") from None
