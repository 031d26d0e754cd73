"""Delivery workers: lease due messages, send them, record each recipient's outcome.

Policy lives here (backoff, expiry, what an ambiguous outcome means); the store
only applies what it is told, and the transports only report what happened.
The leases this process holds, their renewal and the outcomes the store could
not take yet are `relay.leases`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import Callable

from relay import headers, logs, routes
from relay.audit import Event
from relay.clock import SYSTEM, Clock
from relay.config import Config, UpstreamConfig
from relay.errors import StoreError
from relay.leases import GiveBack, Leases
from relay.store import Lease, LeaseBatch, RecipientState, RecipientUpdate, Store, Update
from relay.upstream import Attempt, Outgoing, RecipientResult, Transport
from relay.upstream.failover import Failover, Trip, Upstreams
from relay.upstream.replies import Kind

__all__ = [
    "HOUSEKEEPING_INTERVAL",
    "POLL_INTERVAL",
    "Delivery",
    "backoff",
    "idempotency_value",
    "next_attempt",
    "recipient_outcome",
]

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
HOUSEKEEPING_INTERVAL = 60.0


Jitter = Callable[[float, float], float]


def backoff(config: Config, attempts: int, jitter: Jitter = random.uniform) -> float:
    """Exponential from retry_initial, capped at retry_max, with jitter so retries spread out."""
    d = config.delivery
    delay: float = min(d.retry_max, d.retry_initial * 2.0 ** max(attempts - 1, 0))
    return min(d.retry_max, delay * jitter(0.8, 1.2))


def next_attempt(
    config: Config, lease: Lease, now: float, jitter: Jitter = random.uniform
) -> float:
    """After the backoff, but never past the message's max_age, when it gets one last try."""
    due = min(
        now + backoff(config, lease.attempts, jitter), lease.received_at + config.delivery.max_age
    )
    return max(due, now)


def recipient_outcome(
    config: Config, lease: Lease, result: RecipientResult, upstream_id: str | None, now: float
) -> RecipientUpdate:
    """What one recipient's result means: delivered, failed, held, queued again, or expired.

    A permanent failure or an expiry frees the dedupe key (`release_on_failure`), so a
    legitimate resend is not taken for a repeat of mail that never arrived.
    """
    release = config.dedupe.release_on_failure
    too_old = now >= lease.received_at + config.delivery.max_age

    def update(state: RecipientState, event: str, *, released: bool = False) -> RecipientUpdate:
        delivered_as = (result.upstream_id or upstream_id) if state == "delivered" else None
        return RecipientUpdate(
            result.rcpt, state, event, result.code, result.reply, delivered_as, released
        )

    if result.kind is Kind.DELIVERED:
        return update("delivered", "delivered")
    if result.kind is Kind.PERMANENT:
        return update("failed", "failed", released=release)
    if result.kind is Kind.AMBIGUOUS:
        if config.delivery.on_ambiguous == "hold":
            return update("held", "ambiguous")
        if not too_old:
            return update("queued", "ambiguous")
    if too_old:
        return update("expired", "expired", released=release)
    return update("queued", "deferred")


def idempotency_value(lease: Lease) -> str:
    """Same claim and same recipient set give the same value, so an RFC 1047 retry is a no-op."""
    material = "\x1f".join(
        [
            lease.scope or "",
            lease.strategy or "",
            lease.key or "",
            lease.queue_id,
            *sorted(r.lower() for r in lease.recipients),
        ]
    )
    return "dedup-relay-" + hashlib.sha256(material.encode()).hexdigest()[:40]


class Delivery:
    def __init__(
        self,
        config: Config,
        store: Store,
        transport_factory: Callable[[UpstreamConfig], Transport],
        *,
        clock: Clock = SYSTEM,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.upstreams = Upstreams(
            config, transport_factory, reserve=store.reserve_send, clock=clock
        )
        self.instance = config.runtime.instance
        self.lease_for = config.delivery.lease_timeout
        self.leases = Leases(store, self.instance, self.lease_for)
        self._queue: asyncio.Queue[Lease | None] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._in_flight = 0
        self._slot_wanted = False
        self._stopping = False
        self._dispatcher: asyncio.Task[None] | None = None
        self._housekeeper: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._workers: list[asyncio.Task[None]] = []

    @property
    def in_flight(self) -> int:
        """Messages leased and not yet finished by this process."""
        return self._in_flight

    def wake(self) -> None:
        """New mail was spooled: look for work now rather than at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        """Take back what this instance's previous run left mid-attempt, then start sending.

        Call it only while holding the instance name (`relay.instance`): recovery takes
        every lease under the name, which must not be a live process's.
        """
        now = self.clock.time()
        stuck = await self.store.recover(
            self.instance, now, hold=self.config.delivery.on_ambiguous == "hold"
        )
        if stuck:
            log.warning(
                "%d message(s) were left mid-delivery by an earlier run: ambiguous", len(stuck)
            )
        for n in range(self.config.delivery.concurrency):
            self._workers.append(asyncio.create_task(self._work(), name=f"worker-{n}"))
        self._dispatcher = asyncio.create_task(self._dispatch(), name="dispatcher")
        self._housekeeper = asyncio.create_task(self._housekeeping(), name="housekeeping")
        self._renewer = asyncio.create_task(self._renewing(), name="lease-renewal")

    async def stop(self, grace: float) -> None:
        """Finish the transactions under way (up to `grace`), hand back what was not started."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self._stopping = True
        self._wake.set()
        for task in (self._housekeeper, self._renewer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._dispatcher is not None:
            await self._dispatcher
        now = self.clock.time()
        while not self._queue.empty():
            lease = self._queue.get_nowait()
            if lease is not None:
                await self.leases.settle(GiveBack(lease.queue_id, now))
        for _ in self._workers:
            self._queue.put_nowait(None)
        if self._workers:
            _, pending = await asyncio.wait(self._workers, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
        await self.upstreams.close()
        # Outcomes the store refused get what is left of the grace period to be written.
        while not await self.leases.flush():
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.sleep(min(POLL_INTERVAL, left))
        self.leases.abandon()

    async def _dispatch(self) -> None:
        concurrency = self.config.delivery.concurrency
        while not self._stopping:
            # Cleared before looking, so a wake-up that arrives while leasing is not lost.
            self._wake.clear()
            now = self.clock.time()
            if not await self.leases.flush():
                # Nothing new is sent while outcomes wait: they could not be recorded either.
                await self.clock.wait(self._wake, POLL_INTERVAL)
                continue
            free = concurrency - self._in_flight
            if free <= 0:
                self._slot_wanted = True
                await self._wake.wait()
                continue
            try:
                batch = await self.store.lease(self.instance, free, now, self.lease_for)
            except StoreError:
                batch = LeaseBatch((), None)  # the store logs its state once, not per poll
            except Exception:
                log.exception("could not lease messages for delivery")
                batch = LeaseBatch((), None)
            self.leases.took((lease.queue_id for lease in batch.leases), now + self.lease_for)
            for lease in batch.leases:
                self._in_flight += 1
                self._queue.put_nowait(lease)
            # Only a full batch can have left due mail behind: a short one took all that was
            # due, and looking again at once would cost a transaction that finds nothing.
            if len(batch.leases) >= free:
                continue
            # Measured from the time the lease looked, so a due time that passed while it
            # looked (or a clock moved meanwhile) is leased at once, not one poll later.
            until = now + POLL_INTERVAL
            if batch.next_due is not None:
                until = min(until, batch.next_due)
            remaining = until - self.clock.time()
            if remaining > 0:
                await self.clock.wait(self._wake, remaining)

    async def _work(self) -> None:
        idle = max(min(u.idle_timeout for u in self.config.delivery_upstreams), 0.1)
        while True:
            try:
                lease = await asyncio.wait_for(self._queue.get(), idle)
            except TimeoutError:
                await self.upstreams.close_idle()
                continue
            if lease is None:
                return
            trip = Trip()
            try:
                await self._attempt(lease, trip)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, StoreError):  # the store says its own state, once
                    log.warning("%s: attempt stopped, the store failed: %s", lease.queue_id, exc)
                else:
                    log.exception("%s: delivery failed unexpectedly", lease.queue_id)
                if trip.payload_sent:
                    reason = f"unexpected error after the message was sent: {exc!r}"
                    await self._all(lease, trip, Kind.AMBIGUOUS, reason)
                else:
                    later = self.clock.time() + backoff(self.config, 1)
                    await self.leases.settle(GiveBack(lease.queue_id, later))
                    self._wake.set()  # queued again, with a due time the dispatcher has not seen
            finally:
                logs.bind(queue_id=None)
                self._in_flight -= 1
                # A finished attempt frees a slot; the dispatcher needs to hear of it only when it
                # is waiting for one. New mail wakes it from the intake, retries from _record.
                if self._slot_wanted:
                    self._slot_wanted = False
                    self._wake.set()

    async def _attempt(self, lease: Lease, trip: Trip) -> None:
        logs.bind(queue_id=lease.queue_id)
        body = lease.data if lease.data is not None else await self.store.body(lease.queue_id)
        if body is None or not lease.recipients:
            await self._all(lease, trip, Kind.PERMANENT, "spooled body missing")
            return
        names = routes.select(
            self.config, sender=lease.sender, data=body, rule=lease.rule, user=lease.user
        )
        added: list[str] = []
        if lease.duplicate_of:
            added.append(f"X-Dedup-Duplicate-Of: {lease.duplicate_of}")

        def prepare(upstream: UpstreamConfig, recipients: tuple[str, ...]) -> Outgoing:
            extra = list(added)
            header = upstream.idempotency_header
            if header and lease.key:
                extra.append(f"{header}: {idempotency_value(lease)}")
            return Outgoing(
                queue_id=lease.queue_id,
                sender=lease.sender,
                recipients=recipients,
                data=headers.prepend(body, extra),
                smtputf8=lease.smtputf8,
                body8bit=lease.body8bit,
                fence=fence,
            )

        def fence() -> None:
            self.leases.check(lease.queue_id, self.clock.time())

        async def failover(moved: Failover) -> None:
            await self._failover(lease, moved)

        try:
            attempt = await self.upstreams.send(
                self.upstreams.route(names), prepare, lease.recipients, trip, failover
            )
        except asyncio.CancelledError:
            # Shutdown grace ran out mid-transaction: say truthfully how far it got.
            if trip.payload_sent:
                await self._all(lease, trip, Kind.AMBIGUOUS, "relay stopped awaiting the reply")
            else:
                await self.leases.settle(GiveBack(lease.queue_id, self.clock.time()))
            raise
        await self._record(lease, attempt, trip)

    async def _all(self, lease: Lease, trip: Trip, kind: Kind, reason: str) -> None:
        """The same outcome for every recipient, without a reply from the upstream."""
        results = tuple(RecipientResult(r, kind, None, reason) for r in lease.recipients)
        await self._record(lease, Attempt(results, None, 0.0), trip)

    async def _failover(self, lease: Lease, moved: Failover) -> None:
        """An audit event per failover, so the log says why mail went to another upstream."""
        log.warning(
            "%s: upstream %s unusable (%s); trying %s",
            lease.queue_id,
            moved.upstream,
            moved.reply,
            moved.next,
        )
        try:
            await self.store.record(
                Event(
                    ts=self.clock.time(),
                    event="failover",
                    queue_id=lease.queue_id,
                    key=lease.key,
                    strategy=lease.strategy,
                    message_id=lease.message_id,
                    sender=lease.sender,
                    rcpts=moved.rcpts,
                    size=lease.size,
                    user=lease.user,
                    upstream=moved.upstream,
                    code=moved.code,
                    reply=moved.reply,
                    detail=f"nothing was sent to {moved.upstream}; trying {moved.next}",
                )
            )
        except StoreError as exc:
            log.error("%s: could not record the failover: %s", lease.queue_id, exc)

    async def _record(self, lease: Lease, attempt: Attempt, trip: Trip) -> None:
        """The attempt's outcome, kept and written later if the store cannot take it now."""
        now = self.clock.time()
        updates = tuple(
            recipient_outcome(self.config, lease, r, attempt.upstream_id, now)
            for r in attempt.results
        )
        again = any(u.state == "queued" for u in updates)
        detail = "; ".join([f"attempt {lease.attempts}", *trip.notes])
        await self.leases.settle(
            Update(
                queue_id=lease.queue_id,
                recipients=updates,
                next_attempt=next_attempt(self.config, lease, now) if again else None,
                upstream=trip.upstream,
                duration=attempt.duration,
                ts=now,
                detail=detail,
                owner=self.instance,
            )
        )
        if again:
            self._wake.set()  # due again later: the dispatcher's last look did not see it

    async def _renewing(self) -> None:
        """Keep every lease this process holds alive, however long its attempt takes."""
        while True:
            await self.clock.sleep(self.lease_for / 3)
            await self.leases.renew(self.clock.time())

    async def _housekeeping(self) -> None:
        """Purge what has outlived its window, and rescue leases abandoned by dead replicas."""
        while True:
            try:
                now = self.clock.time()
                hold = self.config.delivery.on_ambiguous == "hold"
                if await self.store.reclaim(self.instance, now, hold=hold):
                    self.wake()
                counts = await self.store.purge(now, self.config.audit.retention)
                if any(counts.values()):
                    log.info("purged %s", ", ".join(f"{v} {k}" for k, v in counts.items() if v))
            except asyncio.CancelledError:
                raise
            except StoreError:
                pass  # the store logs its state once, not at every round
            except Exception:
                log.exception("housekeeping failed")
            # A dead replica's leases are looked for at least twice per lease_timeout.
            await self.clock.sleep(min(HOUSEKEEPING_INTERVAL, self.lease_for / 2))
