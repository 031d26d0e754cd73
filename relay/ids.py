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
    head = ""
    while ms:
        ms, digit = divmod(ms, len(_ALPHABET))
        head = _ALPHABET[digit] + head
    # One draw from the OS for the whole tail (not one per character), uniform as before.
    rest = secrets.randbelow(_TAILS)
    tail = ""
    for _ in range(_TAIL):
        rest, digit = divmod(rest, len(_ALPHABET))
        tail = _ALPHABET[digit] + tail
    return head + tail


def queue_id_time(queue_id: str) -> float | None:
    """When the message was received (to the millisecond), read back from its queue id."""
    head = queue_id[:-_TAIL]
    if not head or any(c not in _ALPHABET for c in head):
        return None
    ms = 0
    for c in head:
        ms = ms * len(_ALPHABET) + _ALPHABET.index(c)
    return ms / 1000
