"""One upstream as delivery sees it: its connections, its pace, and whether it is down.

Connections are reused across workers and capped at `max_connections`. An upstream
that could not be used (connect, TLS, greeting, AUTH, 421) is marked down for
`delivery.retry_initial`, as Postfix throttles a dead destination for
`minimal_backoff_time`; meanwhile messages go to the next upstream of their route, or
are deferred without a connection attempt. The first message after the period probes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from relay.clock import Clock
from relay.config import UpstreamConfig
from relay.upstream import Transport
from relay.upstream.pacing import Pacer, Reserve

__all__ = ["UpstreamPool"]

log = logging.getLogger(__name__)


class UpstreamPool:
    def __init__(
        self,
        config: UpstreamConfig,
        factory: Callable[[UpstreamConfig], Transport],
        *,
        reserve: Reserve,
        clock: Clock,
        down_for: float,
    ) -> None:
        self.config = config
        self.name = config.label
        self.pacer = Pacer(config.name or config.url, config.rate, reserve, clock)
        self._factory = factory
        self._clock = clock
        self._down_for = down_for
        self._slots = asyncio.Semaphore(config.max_connections or 1_000_000)
        self._idle: list[Transport] = []
        self._all: list[Transport] = []
        self.down_until = 0.0
        self.down_reason = ""

    def is_down(self, now: float) -> bool:
        return now < self.down_until

    def mark_down(self, now: float, reason: str) -> None:
        if not self.is_down(now):
            log.warning("upstream %s is down for %gs: %s", self.name, self._down_for, reason)
        self.down_until = now + self._down_for
        self.down_reason = reason

    def mark_up(self) -> None:
        if self.down_until:
            log.info("upstream %s answers again", self.name)
            self.down_until = 0.0
            self.down_reason = ""

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Transport]:
        """A connection of this upstream's own, waiting while `max_connections` are busy."""
        async with self._slots:
            if self._idle:
                transport = self._idle.pop()
            else:
                transport = self._factory(self.config)
                self._all.append(transport)
            try:
                yield transport
            except asyncio.CancelledError:
                raise  # stopped mid-transaction: never reused; `close` ends it with the rest
            except BaseException:
                self._idle.append(transport)  # it closed its own connection on the way out
                raise
            self._idle.append(transport)

    async def close_idle(self) -> None:
        for transport in list(self._idle):
            await transport.close_idle()

    async def close(self) -> None:
        for transport in self._all:
            with contextlib.suppress(Exception):
                await transport.close()
        self._idle.clear()
        self._all.clear()
