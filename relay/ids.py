"""Queue ids: short, sortable by time, unique across replicas sharing a store."""

from __future__ import annotations

import secrets
import time

__all__ = ["new_queue_id", "queue_id_time"]

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"
_TAIL = 8
_TAILS = len(_ALPHABET) ** _TAIL


def new_queue_id(now: float | None = None) -> str:
    """Milliseconds in base 31 (no vowels, so no words) then 40 random bits."""
    ms = int((time.time() if now is None else now) * 1000)
    # One draw from the OS for the whole tail (not one per character), uniform as before.
    return _digits(ms) + _digits(secrets.randbelow(_TAILS), _TAIL)


def _digits(number: int, width: int = 0) -> str:
    """`number` in base 31, padded with leading "0" to `width` digits."""
    out = ""
    while number or len(out) < width:
        number, digit = divmod(number, len(_ALPHABET))
        out = _ALPHABET[digit] + out
    return out


def queue_id_time(queue_id: str) -> float | None:
    """When the message was received (to the millisecond), read back from its queue id."""
    head = queue_id[:-_TAIL]
    if not head or any(c not in _ALPHABET for c in head):
        return None
    ms = 0
    for c in head:
        ms = ms * len(_ALPHABET) + _ALPHABET.index(c)
    return ms / 1000
