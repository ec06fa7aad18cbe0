"""Byte sizes as users write them (``8GiB``, ``24GB``, ``512MiB``, ``1.5G``) and as we print them."""

from __future__ import annotations

import re

from dymoe.errors import InputError

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_bytes(text: str, flag: str = "size") -> int:
    """``8GiB`` -> 8589934592; a bare ``G`` means GiB. Bad input names the flag."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise InputError(f"{flag} {text!r} is not a size; write e.g. 8GiB, 24GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_share(text: str, flag: str) -> float | None:
    """``25%`` -> 0.25; None when ``text`` is no percentage (a size, for :func:`parse_bytes`). Bad
    input names the flag."""
    text = str(text).strip()
    if not text.endswith("%"):
        return None
    try:
        share = float(text[:-1]) / 100
    except ValueError:
        raise InputError(f"{flag} {text!r} is not a size or a percentage; write e.g. 8GiB or 25%") from None
    if not share > 0:  # (NaN too)
        raise InputError(f"{flag} {text!r}: a percentage must be above 0%")
    return share


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
