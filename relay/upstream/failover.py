"""One delivery attempt along a route: the first upstream that can be used gets the message.

An upstream that cannot be used (connect, TLS, greeting, AUTH, 421, a connection lost
before the payload) is marked down and the recipients it never took go to the next
upstream of the route, in the same attempt. Nothing else moves a message to another
upstream: a 4xx or 5xx reply about the message is its outcome, and once the payload
was sent a lost reply is ambiguous, never a reason to send a second copy elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from relay.clock import Clock
from relay.config import Config, UpstreamConfig
from relay.upstream import Attempt, Outgoing, RecipientResult, Transport
from relay.upstream.pacing import Reserve
from relay.upstream.pool import UpstreamPool
from relay.upstream.replies import Kind, throttled

__all__ = ["Failover", "Prepare", "Trip", "Upstreams"]


@dataclass(frozen=True)
class Failover:
    """The relay gave up on `upstream` for these recipients and tries `next` now."""

    upstream: str
    next: str
    rcpts: tuple[str, ...]
    code: int | None
    reply: str


# The message as one upstream gets it (its idempotency header, the recipients left).
Prepare = Callable[[UpstreamConfig, tuple[str, ...]], Outgoing]
OnFailover = Callable[[Failover], Awaitable[None]]


@dataclass
class Trip:
    """How far one attempt got, readable when its worker is cancelled mid-way."""

    upstream: str | None = None
    transport: Transport | None = None
    notes: list[str] = field(default_factory=list)
    sent_before: bool = False

    @property
    def payload_sent(self) -> bool:
        return self.sent_before or (self.transport is not None and self.transport.payload_sent)


class Upstreams:
    """Every configured upstream, each with its own connections, pace and down mark."""

    def __init__(
        self,
        config: Config,
        factory: Callable[[UpstreamConfig], Transport],
        *,
        reserve: Reserve,
        clock: Clock,
    ) -> None:
        self._clock = clock
        self.pools = {
            up.label: UpstreamPool(
                up,
                factory,
                reserve=reserve,
                clock=clock,
                down_for=config.delivery.retry_initial,
            )
            for up in config.delivery_upstreams
        }

    def route(self, names: tuple[str, ...]) -> tuple[UpstreamPool, ...]:
        return tuple(self.pools[name] for name in names)

    async def send(
        self,
        route: tuple[UpstreamPool, ...],
        prepare: Prepare,
        recipients: tuple[str, ...],
        trip: Trip,
        on_failover: OnFailover,
    ) -> Attempt:
        started = time.monotonic()
        pending = recipients
        final: dict[str, RecipientResult] = {}
        upstream_id: str | None = None
        for i, pool in enumerate(route):
            now = self._clock.time()
            if pool.is_down(now):
                trip.notes.append(f"{pool.name} down: {pool.down_reason}")
                continue
            trip.upstream = pool.name
            async with pool.connection() as transport:
                trip.transport = transport
                attempt = await transport.send(prepare(pool.config, pending), pool.pacer.wait)
                trip.sent_before = trip.sent_before or transport.payload_sent
                trip.transport = None
            self._learn(pool, attempt)
            upstream_id = attempt.upstream_id or upstream_id
            moving = [r for r in attempt.results if r.failover]
            final.update((r.rcpt, r) for r in attempt.results if not r.failover)
            if not moving:
                break
            later = [p for p in route[i + 1 :] if not p.is_down(self._clock.time())]
            if not later:
                final.update((r.rcpt, r) for r in moving)
                break
            pending = tuple(r.rcpt for r in moving)
            await on_failover(
                Failover(pool.name, later[0].name, pending, moving[0].code, moving[0].reply)
            )
        for rcpt in recipients:
            if rcpt not in final:
                final[rcpt] = RecipientResult(rcpt, Kind.TEMPORARY, None, _all_down(route))
        if trip.upstream is None and route:
            trip.upstream = route[0].name
        results = tuple(final[r] for r in recipients)
        return Attempt(results, upstream_id, time.monotonic() - started)

    def _learn(self, pool: UpstreamPool, attempt: Attempt) -> None:
        """Down or up, throttling or not: what this attempt says about the upstream."""
        if attempt.down is not None:
            pool.mark_down(self._clock.time(), attempt.down)
            return
        if any(throttled(r.code, r.reply) for r in attempt.results):
            pool.pacer.throttled()
        elif any(r.kind is Kind.DELIVERED for r in attempt.results):
            pool.pacer.relieved()
        pool.mark_up()

    async def close_idle(self) -> None:
        for pool in self.pools.values():
            await pool.close_idle()

    async def close(self) -> None:
        for pool in self.pools.values():
            with contextlib.suppress(Exception):
                await asyncio.shield(pool.close())


def _all_down(route: tuple[UpstreamPool, ...]) -> str:
    reasons = "; ".join(f"{p.name}: {p.down_reason}" for p in route if p.down_reason)
    return f"no upstream of the route can be used now ({reasons or 'all marked down'})"
