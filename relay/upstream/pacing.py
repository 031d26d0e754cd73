"""Keeping below an upstream's send rate, and backing off when it says "too fast".

The rate is a schedule kept in the store, so it holds across workers, processes and
replicas sharing the store: each transaction books the next slot (`Store.reserve_send`)
and waits for it. Slots are `interval` apart and never earlier than now, so no window
of any length ever holds more transactions than the rate allows, and an idle upstream
earns no burst. Throttling replies are handled per process: the upstream gets no new
transaction for a cool-down that doubles while the replies go on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from relay.clock import Clock
from relay.config import Rate

__all__ = ["COOL_DOWN_MAX", "COOL_DOWN_START", "Pacer", "Reserve"]

log = logging.getLogger(__name__)

# (upstream, interval, now) -> the time booked for this transaction
Reserve = Callable[[str, float, float], Awaitable[float]]

COOL_DOWN_START = 1.0
COOL_DOWN_MAX = 60.0


class Pacer:
    """The gate one upstream's transactions pass just before MAIL FROM."""

    def __init__(self, name: str, rate: Rate | None, reserve: Reserve, clock: Clock) -> None:
        self.name = name
        self.rate = rate
        self._reserve = reserve
        self._clock = clock
        self._cool_until = 0.0
        self._cool_down = 0.0
        # Transactions waiting on the clock here: tests that move a manual clock use it to
        # see when every worker waits for time to pass.
        self.sleeping = 0

    async def wait(self) -> None:
        """Until this upstream may take the next transaction."""
        while (remaining := self._cool_until - self._clock.time()) > 0:
            await self._sleep(remaining)
        if self.rate is None:
            return
        now = self._clock.time()
        slot = await self._reserve(self.name, self.rate.interval, now)
        if slot > now:
            await self._sleep(slot - now)

    async def _sleep(self, seconds: float) -> None:
        self.sleeping += 1
        try:
            await self._clock.sleep(seconds)
        finally:
            self.sleeping -= 1

    def throttled(self) -> float:
        """The upstream asked the relay to slow down: pause it, longer each time in a row."""
        self._cool_down = min(max(self._cool_down * 2, COOL_DOWN_START), COOL_DOWN_MAX)
        self._cool_until = max(self._cool_until, self._clock.time() + self._cool_down)
        log.warning(
            "upstream %s is throttling: no new mail to it for %gs", self.name, self._cool_down
        )
        return self._cool_down

    def relieved(self) -> None:
        """It took a message: the next throttling reply starts the cool-down afresh."""
        self._cool_down = 0.0
