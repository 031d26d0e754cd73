"""Durations and sizes as people write them in YAML and on the command line.

One parser serves the config file and the CLI filters, so `--since 2h` and
`window: 2h` can never mean different things.
"""

from __future__ import annotations

import re

from relay.errors import UnitError

__all__ = ["UnitError", "format_duration", "format_size", "parse_duration", "parse_size"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from `30s`, `5m`, `24h`, `5d`, `250ms` or a plain number of seconds."""
    if isinstance(value, bool):
        raise UnitError(f"{value!r} is not a duration (use 30s, 5m, 24h, 5d)")
    if isinstance(value, int | float):
        if value < 0:
            raise UnitError(f"{value!r} is negative; a duration must be 0 or more")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    raise UnitError(f"{value!r} is not a duration (use 30s, 5m, 24h, 5d)")


def parse_size(value: object) -> int:
    """Bytes from `25MB`, `512k`, `10MiB` or a plain number of bytes."""
    if isinstance(value, bool):
        raise UnitError(f"{value!r} is not a size (use 25MB, 512KB or bytes)")
    if isinstance(value, int):
        if value < 0:
            raise UnitError(f"{value!r} is negative; a size must be 0 or more")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            unit = (match.group(2) or "b").lower()
            return int(float(match.group(1)) * _SIZE_UNITS[unit])
    raise UnitError(f"{value!r} is not a size (use 25MB, 512KB or bytes)")


def format_duration(seconds: float) -> str:
    """The shortest exact spelling that parse_duration reads back."""
    if seconds == 0:
        return "0s"
    for unit in ("w", "d", "h", "m", "s"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    for unit, factor in (("MB", 1000**2), ("KB", 1000)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)
