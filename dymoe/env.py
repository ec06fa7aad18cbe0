"""Environment switches: ``DYMOE_*`` variables that pick between measured code paths (the README's
table). Each is read once at import, and a value outside its choices is a user error naming them."""

import os

from dymoe.errors import InputError


def env_choice(name: str, choices: dict[str, str], default: str | None = None) -> str | None:
    """The value of environment variable ``name``: one of ``choices`` (value -> what it does), or
    ``default`` when unset or empty; any other value raises :class:`InputError` listing them."""
    value = os.environ.get(name, "")
    if not value:
        return default
    if value not in choices:
        listed = " or ".join(f"{v} ({what})" for v, what in choices.items())
        raise InputError(f"{name}={value!r}: use {listed}")
    return value


def env_override(name: str, on: str, off: str) -> bool | None:
    """An on/off switch over a measured default: True for ``1`` (``on`` says what it does), False
    for ``0`` (``off``), None when unset (the default decides); any other value raises
    :class:`InputError` (:func:`env_choice`)."""
    value = env_choice(name, {"1": on, "0": off})
    return None if value is None else value == "1"
