"""Counters that keep one client from using up what every client shares.

Each takes its clock as an argument, so tests move time instead of waiting for it.
All state is in memory and per process, like Postfix's anvil: replicas count apart.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable

__all__ = ["Budget", "Events", "Tally"]

Clock = Callable[[], float]


class Budget:
    """Bytes of message data held in memory across all sessions, up to a fixed total."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def fits(self, size: int) -> bool:
        return self.used + size <= self.total

    def take(self, size: int) -> bool:
        """Charge `size` bytes; False (and nothing charged) when they would not fit."""
        if not self.fits(size):
            return False
        self.used += size
        return True

    def give_back(self, size: int) -> None:
        self.used = max(self.used - size, 0)


class Tally:
    """How many of something each key holds right now (connections per client address)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def add(self, key: str) -> int:
        self._counts[key] += 1
        return self._counts[key]

    def remove(self, key: str) -> None:
        self._counts[key] -= 1
        if self._counts[key] <= 0:
            del self._counts[key]

    def __getitem__(self, key: str) -> int:
        return self._counts.get(key, 0)


class Events:
    """Timestamps of events per key within a sliding window (failed logins, messages sent)."""

    MAX_KEYS = 10_000

    def __init__(self, window: float, clock: Clock = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._seen: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        stamps = self._seen.get(key)
        if stamps is None:
            return deque()
        while stamps and stamps[0] <= now - self.window:
            stamps.popleft()
        if not stamps:
            del self._seen[key]
        return stamps

    def count(self, key: str) -> int:
        return len(self._recent(key, self.clock()))

    def add(self, key: str, keep: int) -> int:
        """Record one event; returns how many fall in the window now. Keeps at most `keep`."""
        now = self.clock()
        if len(self._seen) > self.MAX_KEYS:
            for other in list(self._seen):
                self._recent(other, now)
        stamps = self._recent(key, now)
        if not stamps:
            stamps = self._seen[key] = deque(maxlen=max(keep, 1))
        stamps.append(now)
        return len(stamps)
