"""Queue ids: short, sortable by time, unique across replicas sharing a store."""

from __future__ import annotations

import secrets
import time

__all__ = ["new_queue_id"]

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"


def new_queue_id(now: float | None = None) -> str:
    """Milliseconds in base 31 (no vowels, so no words) then 40 random bits."""
    ms = int((time.time() if now is None else now) * 1000)
    head = ""
    while ms:
        ms, digit = divmod(ms, len(_ALPHABET))
        head = _ALPHABET[digit] + head
    tail = "".join(secrets.choice(_ALPHABET) for _ in range(8))
    return head + tail
