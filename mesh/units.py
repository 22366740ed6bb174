"""Parsing of the human units used in flags and the ServiceMesh YAML: `10s`, `250ms`, `50%`."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|us)?\s*$")
_SCALE = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | int | float) -> float:
    """'10s' -> 10.0, '250ms' -> 0.25, '1.5m' -> 90.0; a bare number is seconds."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration; write it like 10s or 250ms")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"{text!r} is negative; a duration must be 0 or more")
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration; write it like 10s, 250ms, 1m or 1h")
    return float(m.group(1)) * _SCALE[m.group(2) or "s"]


def parse_percent(text: str | int | float) -> float:
    """'50%' -> 0.5; a bare number from 0 to 1 is a fraction; anything else is an error."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a percentage; write it like 50%")
    if isinstance(text, str):
        s = text.strip()
        if not s.endswith("%"):
            raise ValueError(f"{text!r} is not a percentage; write it like 50%")
        try:
            value = float(s[:-1]) / 100.0
        except ValueError:
            raise ValueError(f"{text!r} is not a percentage; write it like 50%") from None
    else:
        value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{text!r} is not between 0% and 100%")
    return value


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:g}s"
