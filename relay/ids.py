"""Queue ids: short, sortable by time, unique across replicas sharing a store.

The random tail comes from a generator of this process, seeded from the OS once
(and again in any child forked from it), not from an OS call per id: an OS draw
per message was a measurable share of accepting one. A queue id names a message;
it is not a secret, and nothing grants access by knowing one. Uniqueness rests on
the millisecond and 40 random bits, and the store's primary key still refuses a
collision (a temporary failure the client retries), so no message is ever
mistaken for another.
"""

from __future__ import annotations

import os
import random
import time

__all__ = ["new_queue_id", "queue_id_time", "reseed"]

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"
_BASE = len(_ALPHABET)
_TAIL = 8
_TAILS = _BASE**_TAIL
_SEED_BYTES = 32
# Two digits per step: half the divisions of one digit at a time.
_PAIRS = tuple(a + b for a in _ALPHABET for b in _ALPHABET)
_PAIR = _BASE * _BASE

_random = random.Random()


def reseed() -> None:
    """A fresh seed from the OS: at import, and in every child forked from this process."""
    _random.seed(os.urandom(_SEED_BYTES))


reseed()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=reseed)


def new_queue_id(now: float | None = None) -> str:
    """Milliseconds in base 31 (no vowels, so no words) then 40 random bits."""
    ms = int((time.time() if now is None else now) * 1000)
    return _digits(ms) + _digits(_random.randrange(_TAILS), _TAIL)


def _digits(number: int, width: int = 0) -> str:
    """`number` in base 31, padded with leading "0" to `width` digits."""
    parts: list[str] = []
    while number >= _PAIR:
        number, pair = divmod(number, _PAIR)
        parts.append(_PAIRS[pair])
    if number >= _BASE:
        parts.append(_PAIRS[number])
    elif number:
        parts.append(_ALPHABET[number])
    return "".join(reversed(parts)).rjust(width, "0")


def queue_id_time(queue_id: str) -> float | None:
    """When the message was received (to the millisecond), read back from its queue id."""
    head = queue_id[:-_TAIL]
    if not head or any(c not in _ALPHABET for c in head):
        return None
    ms = 0
    for c in head:
        ms = ms * len(_ALPHABET) + _ALPHABET.index(c)
    return ms / 1000
