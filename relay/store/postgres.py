"""The PostgreSQL store: replicas on several hosts share one database, with SQLite's guarantees.

The same `Store` as `relay.store.sqlite`, built from PostgreSQL's own tools:
the unique index arbitrates claims (`INSERT ... ON CONFLICT ... DO UPDATE ...
WHERE ... RETURNING`, in the transaction that spools the message and records
its events), leases are taken `FOR UPDATE SKIP LOCKED`, and `NOTIFY` tells
idle replicas that work is due. `GroupCommit` still batches concurrent jobs
into one transaction (a savepoint per job only once a job has failed), so one
commit answers many SMTP sessions. The verdict comes from `relay.decision`, the
events and state rules from `relay.store.changes`; this module only speaks SQL
(asyncpg).

Losing the connection is expected (a restart, a failover): a batch whose
transaction never reached COMMIT committed nothing, so it is run once more on a
fresh connection; if that fails too, every caller gets `StoreError` (the SMTP
client hears 4xx). Delivery outcomes are written again until the database
answers (up to `OUTCOME_RETRY`), so mail delivered during an outage is not
taken for ambiguous.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any, TypeAlias, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from relay import instance
from relay.audit import Event
from relay.config import StoreConfig
from relay.decision import (
    ClaimResult,
    Holder,
    Verdict,
    decide,
    needs_holders,
    normalise_rcpt,
)
from relay.store import (
    Claim,
    Instance,
    LeaseBatch,
    MessageState,
    OnBatch,
    OnCommit,
    QueueDepth,
    StoreError,
    StoreUnavailable,
    Submission,
    Update,
    changes,
    migrations,
)
from relay.store import pg_statements as sql
from relay.store.changes import INLINE_BODY_LIMIT, PURGE_CHUNK
from relay.store.pg_statements import Query
from relay.store.writer import BatchResult, GroupCommit, Outcome

__all__ = [
    "FAILURES",
    "OUTCOME_RETRY",
    "TRANSIENT",
    "UNAVAILABLE",
    "CommitUnknown",
    "NotCommitted",
    "PgTx",
    "PostgresStore",
    "connect_options",
    "migrate_database",
    "open_source",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a delivery outcome (or a lease given back) is written again while the database is
# unreachable: a restart or a managed failover usually takes seconds to half a minute.
OUTCOME_RETRY = 60.0
# The LISTEN connection is checked this often, so a silently dead one is replaced.
LISTEN_KEEPALIVE = 15.0
# What `purge` deletes by a plain DELETE (finished messages return their count in a row).
_PURGES = {
    "claims": sql.DELETE_EXPIRED_CLAIMS,
    "bodies": sql.DELETE_KEPT_BODIES,
    "events": sql.DELETE_OLD_EVENTS,
}

# Errors that say the connection (or the server behind it) is gone, not that a statement was
# wrong: the connection is dropped, and nothing of an uncommitted transaction was stored.
UNAVAILABLE: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    # A failover left this connection on a standby: a new one finds the new primary.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    # The driver lost track of the protocol (a reply cut off mid-way): the connection is done.
    asyncpg.exceptions.InternalClientError,
)


# Errors where the server gave up on a statement that was right and may pass when run again:
# statement_timeout (or a cancel), a deadlock or serialization failure between replicas, a lock
# not granted. The job's writes are rolled back, so it is `NotCommitted`, not wrong: an outcome
# is written again, as after a lost connection, instead of being dropped.
TRANSIENT: tuple[type[Exception], ...] = (
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.LockNotAvailableError,
)

# Every error a statement or a connection can end in.
FAILURES: tuple[type[Exception], ...] = (asyncpg.PostgresError, *UNAVAILABLE)
# A connection of its own or one lent by a pool.
Db: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"


class NotCommitted(StoreUnavailable):
    """Nothing of the batch was stored: the connection was lost before COMMIT was sent, or the
    server answered COMMIT with an ordinary error (it rolled back)."""


class CommitUnknown(StoreUnavailable):
    """The connection was lost after COMMIT was sent and before its answer: the batch may or
    may not be stored. An SMTP client hears 4xx (its retry meets the claim if it was stored);
    a delivery outcome is looked up and written again only if it is not there."""


def connect_options(config: StoreConfig, *, readonly: bool = False) -> dict[str, Any]:
    """asyncpg.connect's arguments for `store.url`, with libpq's names and fallbacks.

    The URL's query keeps libpq's names (sslmode, sslrootcert, sslcert, sslkey, sslcrl,
    target_session_attrs, application_name, ...), and host, port, user, database and the
    password fall back to PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD and ~/.pgpass as
    libpq's do. `connect_timeout` (libpq's, in seconds) overrides `store.connect_timeout`.
    """
    assert config.url is not None
    parts = urlsplit(config.url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    timeout = config.connect_timeout
    kept: list[tuple[str, str]] = []
    for name, value in query:
        if name == "connect_timeout":
            with contextlib.suppress(ValueError):
                timeout = float(value) if float(value) > 0 else timeout
            continue
        kept.append((name, value))
    statement_ms = str(round(config.statement_timeout * 1000))
    settings = {
        "application_name": "dedup-relay",
        "statement_timeout": statement_ms,
        # A replica stalled mid-transaction (paused VM, partition) must not hold claims for ever.
        "idle_in_transaction_session_timeout": statement_ms,
    }
    settings.update({k: v for k, v in kept if k == "application_name"})
    if readonly:
        settings["default_transaction_read_only"] = "on"
    return {
        "dsn": urlunsplit(parts._replace(query=urlencode(kept))),
        "password": config.password.value if config.password is not None else None,
        "timeout": timeout,
        # The client's own limit, for a server that is gone without a word (no RST).
        "command_timeout": config.statement_timeout + timeout,
        "server_settings": settings,
    }


def _lost(exc: BaseException) -> bool:
    return isinstance(exc, UNAVAILABLE)


def _job_error(exc: Exception) -> Exception:
    """A job's error as its caller should see it: a transient one stored nothing."""
    if isinstance(exc, TRANSIENT):
        return NotCommitted(f"the database gave up on the job: {_describe(exc)}")
    return exc


def _count(status: str) -> int:
    """Rows a command touched, from its status ("DELETE 12", "UPDATE 1")."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class PgTx:
    """One job's view of the batch's transaction: the connection and the events to record.

    Events are inserted once per batch, just before COMMIT, in one statement; a job that fails
    takes its events back with it, as the rollback takes back its writes.
    """

    def __init__(self, db: Db) -> None:
        self.db = db
        self.events: list[Event] = []
        self.notify = False

    async def fetch(self, query: Query, **params: Any) -> list[asyncpg.Record]:
        return await self.db.fetch(query.text, *query.args(params))

    async def fetchrow(self, query: Query, **params: Any) -> asyncpg.Record | None:
        return await self.db.fetchrow(query.text, *query.args(params))

    async def execute(self, query: Query, **params: Any) -> int:
        return _count(await self.db.execute(query.text, *query.args(params)))

    def record(self, events: Sequence[Event]) -> None:
        self.events.extend(events)


Job = Callable[[PgTx], Awaitable[Any]]


async def run_jobs(db: Db, jobs: Sequence[Job]) -> BatchResult:
    """Every job in one transaction, then the events, then one COMMIT.

    The jobs run straight through, without savepoints: a savepoint around each job cost one
    more round trip to the server per job, on every batch, against a failure that is rare.
    A job that raises has aborted PostgreSQL's transaction (an SQL error) or left its writes
    in it, so the transaction is rolled back; a lone job then just reports its error, and a
    batch of several runs once more with a savepoint per job (`_one_by_one`), so the failing
    job keeps nothing and the others still commit. Jobs may therefore run twice; they only
    read and write the transaction, and only the second run's results and events count
    (another replica may have committed in between).

    A lost connection fails the batch: `NotCommitted` before COMMIT was sent (or when the
    server answered it with an error), `CommitUnknown` when the link died awaiting it.
    """
    tx = PgTx(db)
    try:
        await db.execute("BEGIN")
        outcomes = await _straight(tx, jobs)
        if any(error is not None for _, error in outcomes):
            await db.execute("ROLLBACK")
            if len(jobs) == 1:
                return BatchResult(outcomes, [])
            tx = PgTx(db)
            outcomes = await _one_by_one(tx, jobs)
        if tx.events:
            await tx.execute(sql.INSERT_EVENTS, **_event_arrays(tx.events))
    except Exception as exc:
        # COMMIT was not sent, so nothing is stored, whatever went wrong.
        raise NotCommitted(f"lost the database before commit: {_describe(exc)}") from exc
    try:
        await db.execute(f"NOTIFY {sql.CHANNEL}; COMMIT" if tx.notify else "COMMIT")
    except UNAVAILABLE as exc:
        # Even a server's "terminating connection" may come after the commit record.
        raise CommitUnknown(f"lost the database during commit: {_describe(exc)}") from exc
    except asyncpg.PostgresError as exc:
        raise NotCommitted(f"the database refused the commit: {_describe(exc)}") from exc
    return BatchResult(outcomes, tx.events)


async def _straight(tx: PgTx, jobs: Sequence[Job]) -> list[Outcome]:
    """The jobs in turn, up to the first that raises; that one's error ends the list.

    A lost connection is the batch's failure, not the job's: it propagates.
    """
    outcomes: list[Outcome] = []
    for job in jobs:
        try:
            outcomes.append((await job(tx), None))
        except Exception as exc:
            if _lost(exc):
                raise
            tx.events.clear()
            return [(None, _job_error(exc))]
    return outcomes


async def _one_by_one(tx: PgTx, jobs: Sequence[Job]) -> list[Outcome]:
    """A new transaction with each job inside its own savepoint: one failing job must not
    spoil the batch (PostgreSQL refuses every statement after an error until a rollback)."""
    db = tx.db
    outcomes: list[Outcome] = []
    await db.execute("BEGIN; SAVEPOINT job")
    for n, job in enumerate(jobs):
        if n:
            await db.execute("RELEASE SAVEPOINT job; SAVEPOINT job")
        mark = len(tx.events)
        try:
            result = await job(tx)
        except Exception as exc:
            if _lost(exc):
                raise
            del tx.events[mark:]
            await db.execute("ROLLBACK TO SAVEPOINT job")
            outcomes.append((None, _job_error(exc)))
        else:
            outcomes.append((result, None))
    return outcomes


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _event_arrays(events: Sequence[Event]) -> dict[str, list[Any]]:
    """One array per column, for `INSERT_EVENTS`' unnest."""
    rows = [changes.event_row(e) for e in events]
    return {name: [row[n] for row in rows] for n, (name, _) in enumerate(sql.event_columns())}


class PostgresStore:
    """The `Store` on a PostgreSQL database that any number of replicas share.

    Connections: one for the writer (group commit: one batch at a time, so the front door's
    load sets the batch size, not the number of connections), `readers` for large bodies, queue
    gauges and the review pages (sized from `delivery.concurrency`), and one that LISTENs.
    """

    def __init__(
        self,
        config: StoreConfig,
        *,
        on_commit: OnCommit | None = None,
        on_batch: OnBatch | None = None,
    ) -> None:
        if config.url is None:
            raise StoreError("store.url is not set")
        self.config = config
        self.url = config.url
        self.keep_bodies = config.keep_bodies
        # store.pool_size counts the writer's connection too.
        self.readers = max((config.pool_size or 6) - 1, 1)
        self._options = connect_options(config)
        self._writes: asyncpg.Pool | None = None
        self._reads: asyncpg.Pool | None = None
        self._listener: asyncio.Task[None] | None = None
        self._wakers: list[Callable[[], None]] = []
        # Per owner, the lease expiries this process wrote that may still be in force: each
        # lease and renewal writes one of its own (see `_until`).
        self._untils: dict[str, set[float]] = {}
        # (owner, until) of leases whose COMMIT's answer was lost: given back by the next lease.
        self._lost_leases: set[tuple[str, float]] = set()
        self.writer: GroupCommit[Job] = GroupCommit(
            self._run_batch, on_commit=on_commit, on_batch=on_batch, name="pg-store-writer"
        )

    # --- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        try:
            await migrate_database(self.config)
            self._writes = await asyncpg.create_pool(min_size=1, max_size=1, **self._options)
            self._reads = await asyncpg.create_pool(
                min_size=0, max_size=self.readers, **self._options
            )
        except StoreError:
            await self._close_pools()
            raise
        except FAILURES as exc:
            await self._close_pools()
            raise StoreError(
                f"cannot open the store {self.url} (store.url): {_describe(exc)}"
            ) from None
        self._listener = asyncio.create_task(self._listen(), name="pg-store-listen")
        self.writer.start()

    async def close(self) -> None:
        await self.writer.stop()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        await self._close_pools()

    async def _close_pools(self) -> None:
        for pool in (self._writes, self._reads):
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), 5.0)
                except Exception:
                    pool.terminate()
        self._writes = self._reads = None

    @property
    def running(self) -> bool:
        return self.writer.running

    @property
    def lost(self) -> str | None:
        """Never: a database is reached by address, and a new connection finds whatever
        serves it now (a restart, a failover), so no state of this process goes stale."""
        return None

    def subscribe(self, wake: Callable[[], None]) -> None:
        self._wakers.append(wake)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Db]:
        """A reading connection from the pool (bodies, gauges, tests)."""
        if self._reads is None:
            raise StoreError("store is not open")
        try:
            async with self._reads.acquire(timeout=self.config.connect_timeout) as db:
                yield db
        except FAILURES as exc:
            raise StoreError(f"cannot read the store: {_describe(exc)}") from None

    async def _run_batch(self, jobs: list[Job]) -> BatchResult:
        if self._writes is None:
            raise StoreError("store is not open")
        try:
            return await self._attempt(jobs)
        except NotCommitted as exc:
            # Often a connection the restart left dead in the pool: one more try on a new one.
            log.warning("store: %s; trying the batch again on a new connection", exc)
            return await self._attempt(jobs)

    async def _attempt(self, jobs: list[Job]) -> BatchResult:
        assert self._writes is not None
        try:
            db = await self._writes.acquire(timeout=self.config.connect_timeout)
        except FAILURES as exc:
            raise NotCommitted(f"cannot reach the database: {_describe(exc)}") from None
        try:
            return await run_jobs(db, jobs)
        except BaseException:
            # Whatever broke the batch may have left the connection mid-protocol: a new one.
            with contextlib.suppress(Exception):
                db.terminate()
            raise
        finally:
            # A connection that died under the pool may already be detached from it.
            with contextlib.suppress(asyncpg.InterfaceError):
                await self._writes.release(db)

    async def _run(self, job: Callable[[PgTx], Awaitable[T]]) -> T:
        return cast(T, await self.writer.run(job))

    async def _run_until_stored(
        self,
        job: Callable[[PgTx], Awaitable[T]],
        stored: Callable[[PgTx], Awaitable[T | None]] | None = None,
    ) -> T:
        """For outcomes of what already happened: written again while the database is away.

        After a commit whose answer was lost, `stored` looks whether it landed (its result,
        else None), so an outcome is never applied twice.
        """
        deadline = time.monotonic() + OUTCOME_RETRY
        pause = 0.2
        unsure = False
        while True:
            try:
                if unsure and stored is not None:
                    return await self._run(_first_of(stored, job))
                return await self._run(job)
            except (NotCommitted, CommitUnknown) as exc:
                unsure = unsure or isinstance(exc, CommitUnknown)
                if time.monotonic() + pause > deadline or not self.running:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    # --- LISTEN/NOTIFY -----------------------------------------------------

    def _wake(self, *_: object) -> None:
        for wake in self._wakers:
            wake()

    async def _listen(self) -> None:
        """Wake delivery when another replica makes work due; reconnect when the link drops."""
        pause = 0.5
        while True:
            db: asyncpg.Connection | None = None
            try:
                db = await asyncpg.connect(**self._options)
                lost = asyncio.Event()
                db.add_termination_listener(functools.partial(_flag, lost))
                await db.add_listener(sql.CHANNEL, self._wake)
                self._wake()  # whatever was notified while this link was down
                pause = 0.5
                while not db.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), LISTEN_KEEPALIVE)
                    if not db.is_closed():
                        await db.execute("SELECT 1", timeout=LISTEN_KEEPALIVE)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("store: LISTEN connection lost (%s); reconnecting", _describe(exc))
            finally:
                if db is not None and not db.is_closed():
                    db.terminate()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 10.0)

    # --- the front half ----------------------------------------------------

    async def accept(self, sub: Submission) -> Verdict:
        return await self._run(lambda tx: self._accept(tx, sub))

    async def _accept(self, tx: PgTx, sub: Submission) -> Verdict:
        result = None if sub.claim is None else await _take_claims(tx, sub, sub.claim)
        verdict = decide(sub.queue_id, sub.recipients, sub.claim, result)
        if verdict.unclaim and sub.claim is not None:
            await tx.execute(
                sql.DELETE_CLAIMS_OF_MESSAGE,
                scope=sub.claim.scope,
                key=sub.claim.namespaced,
                queue_id=sub.queue_id,
            )
        if verdict.forward:
            await tx.execute(
                sql.SPOOL, **changes.message_row(sub, verdict), rcpts=list(verdict.forward)
            )
            tx.notify = True
        tx.record(changes.accept_events(sub, verdict))
        return verdict

    async def record(self, event: Event) -> None:
        async def job(tx: PgTx) -> None:
            tx.record([event])

        await self._run(job)

    # --- the back half -----------------------------------------------------

    def _until(self, owner: str, until: float, now: float | None = None) -> float:
        """`until`, or the next float above it that this process has not written for `owner`:
        every lease and renewal writes an expiry of its own, so the messages of a lease whose
        commit was lost are told from every other by theirs. Expiries before `now` are
        forgotten: every expiry written from now on is later."""
        issued = self._untils.setdefault(owner, set())
        if now is not None:
            issued.difference_update([u for u in issued if u < now])
        while until in issued:
            until = math.nextafter(until, math.inf)
        issued.add(until)
        return until

    async def lease(self, owner: str, limit: int, now: float, lease_for: float) -> LeaseBatch:
        """Due messages, leased to `owner`.

        A lease whose COMMIT's answer was lost may have leased messages that no caller knows
        of: nothing would send or renew them, and `reclaim` skips the caller's own. They are
        found by that lease's expiry, which no other lease or renewal of this process wrote,
        and given back (uncounted) by the next lease, in its transaction, so they are leased
        again at once if due.
        """
        until = self._until(owner, now + lease_for, now)
        lost = sorted(self._lost_leases)

        async def job(tx: PgTx) -> LeaseBatch:
            for lost_owner, lost_until in lost:
                await tx.execute(sql.UNLEASE_LOST, owner=lost_owner, until=lost_until)
            rows = await tx.fetch(
                sql.LEASE,
                owner=owner,
                limit=limit,
                now=now,
                until=until,
                inline=INLINE_BODY_LIMIT,
            )
            next_due = rows[0]["next_due"] if rows else None
            leases = tuple(
                changes.lease_of(row, tuple(row["rcpts"]), row["data"])
                for row in rows
                if row["queue_id"] is not None
            )
            return LeaseBatch(leases, next_due)

        try:
            batch = await self._run(job)
        except CommitUnknown:
            self._lost_leases.add((owner, until))
            raise
        self._lost_leases.difference_update(lost)
        return batch

    async def body(self, queue_id: str) -> bytes | None:
        async with self.connection() as db:
            data = await db.fetchval(sql.SELECT_BODY.text, queue_id)
        return None if data is None else bytes(data)

    async def update(self, update: Update) -> MessageState:
        async def stored(tx: PgTx) -> MessageState | None:
            # Delivery reports only on a message it leased: one no longer sending was settled
            # by the commit whose answer was lost (or taken over, and recorded, by another).
            row = await tx.fetchrow(sql.MESSAGE_STATE, queue_id=update.queue_id)
            state = None if row is None else row["state"]
            return None if state == "sending" else cast(MessageState, state)

        return await self._run_until_stored(lambda tx: self._update(tx, update), stored)

    async def _update(self, tx: PgTx, u: Update) -> MessageState:
        if u.owner is not None:
            lease = await tx.fetchrow(sql.LEASE_OF, queue_id=u.queue_id)
            if lease is not None:  # no message: UPDATE_RECIPIENTS says so below
                changes.check_lease(u, lease["state"], lease["lease_owner"])
        settle, released = changes.settlement(u)
        row = await tx.fetchrow(
            sql.UPDATE_RECIPIENTS,
            queue_id=u.queue_id,
            ts=u.ts,
            rcpts=[r.rcpt for r in u.recipients],
            states=[r.state for r in u.recipients],
            codes=[r.code for r in u.recipients],
            replies=[r.reply for r in u.recipients],
            upstream_ids=[r.upstream_id for r in u.recipients],
            settle=[normalise_rcpt(r) for r in settle],
            release=[normalise_rcpt(r) for r in released],
        )
        if row is None:
            raise StoreError(f"no message {u.queue_id}")
        message = changes.MessageFields(
            **{name: row[name] for name in changes.MessageFields.__dataclass_fields__}
        )
        state = changes.message_state([*row["others"], *(r.state for r in u.recipients)])
        await tx.execute(
            sql.END_LEASE,
            **changes.lease_end(u, state),
            drop_body=state == "done" and self.keep_bodies <= 0,
        )
        tx.record(changes.update_events(u, message, released))
        return state

    async def unlease(self, queue_id: str, next_attempt: float, owner: str) -> None:
        async def job(tx: PgTx) -> None:
            unleased = await tx.execute(
                sql.UNLEASE, queue_id=queue_id, next_attempt=next_attempt, owner=owner
            )
            if unleased:
                tx.notify = True

        await self._run_until_stored(job)

    async def renew(self, owner: str, queue_ids: Sequence[str], until: float) -> frozenset[str]:
        ids = list(queue_ids)
        if ids:
            until = self._until(owner, until)

        async def job(tx: PgTx) -> frozenset[str]:
            rows = await tx.fetch(sql.RENEW_LEASES, owner=owner, until=until, ids=ids)
            return frozenset(row["queue_id"] for row in rows)

        return await self._run(job) if ids else frozenset()

    async def recover(self, owner: str, now: float, *, hold: bool) -> list[str]:
        return await self._run(lambda tx: self._take_back(tx, sql.STUCK_LEASES, owner, now, hold))

    async def reclaim(self, owner: str, now: float, *, hold: bool) -> list[str]:
        return await self._run(lambda tx: self._take_back(tx, sql.EXPIRED_LEASES, owner, now, hold))

    async def _take_back(
        self, tx: PgTx, query: Query, owner: str, now: float, hold: bool
    ) -> list[str]:
        stuck = [
            (row["queue_id"], row["lease_owner"])
            for row in await tx.fetch(query, owner=owner, now=now)
        ]
        for queue_id, holder in stuck:
            rcpts = await _recipients_in(tx, queue_id, "queued")
            update = changes.recovery_update(
                queue_id, rcpts, now, hold=hold, holder=holder, owner=owner
            )
            await self._update(tx, update)
        tx.notify = bool(stuck) and not hold
        return [queue_id for queue_id, _ in stuck]

    async def requeue(self, queue_id: str, now: float) -> int:
        async def job(tx: PgTx) -> int:
            rcpts = await _recipients_in(tx, queue_id, "held")
            if rcpts:
                await self._update(tx, changes.requeue_update(queue_id, rcpts, now))
                tx.notify = True
            return len(rcpts)

        return await self._run(job)

    async def probe(self, now: float) -> None:
        async def job(tx: PgTx) -> None:
            await tx.execute(sql.READY_PROBE, now=repr(now))

        await self._run(job)

    async def acquire_instance(self, me: Instance, stale_after: float) -> Instance:
        async def job(tx: PgTx) -> Instance:
            # Two starters that both find no row must not both insert one: the name is locked
            # for the transaction first.
            await tx.execute(sql.LOCK_INSTANCE, name=me.name)
            row = await tx.fetchrow(sql.SELECT_INSTANCE, name=me.name)
            holder = None if row is None else Instance(**dict(row))
            if not instance.may_take(holder, me, stale_after):
                assert holder is not None
                return holder
            await tx.execute(sql.TAKE_INSTANCE, **asdict(me))
            return me

        return await self._run(job)

    async def heartbeat_instance(self, me: Instance, now: float) -> bool:
        async def job(tx: PgTx) -> bool:
            return (
                await tx.execute(sql.HEARTBEAT_INSTANCE, name=me.name, token=me.token, now=now) > 0
            )

        return await self._run(job)

    async def release_instance(self, me: Instance) -> None:
        async def job(tx: PgTx) -> None:
            await tx.execute(sql.RELEASE_INSTANCE, name=me.name, token=me.token)

        await self._run(job)

    async def reserve_send(self, upstream: str, interval: float, now: float) -> float:
        """One row per upstream, moved in one statement under its row lock: replicas booking
        at once queue behind each other, each `interval` after the one before."""

        async def job(tx: PgTx) -> float:
            row = await tx.fetchrow(sql.RESERVE_SEND, upstream=upstream, interval=interval, now=now)
            assert row is not None
            return float(row["last_at"])

        return await self._run(job)

    async def queue_depth(self) -> tuple[QueueDepth, ...]:
        from relay.store.reader import PostgresSource, Reader  # the reader imports this module

        async with self.connection() as db:
            return await Reader(PostgresSource(db)).queue_depth()

    async def purge(self, now: float, audit_retention: float) -> dict[str, int]:
        return await changes.purge(self._purge_chunk, now, self.keep_bodies, audit_retention)

    async def _purge_chunk(self, kind: str, cutoff: float) -> int:
        if kind == "messages":
            return await self._run(lambda tx: _purge_messages(tx, cutoff))
        return await self._run(_deleter(_PURGES[kind], cutoff))


def _flag(event: asyncio.Event, *_: object) -> None:
    event.set()


def _first_of(
    stored: Callable[[PgTx], Awaitable[T | None]], job: Callable[[PgTx], Awaitable[T]]
) -> Callable[[PgTx], Awaitable[T]]:
    async def either(tx: PgTx) -> T:
        found = await stored(tx)
        return found if found is not None else await job(tx)

    return either


def _deleter(query: Query, cutoff: float) -> Callable[[PgTx], Awaitable[int]]:
    async def job(tx: PgTx) -> int:
        return await tx.execute(query, cutoff=cutoff, chunk=PURGE_CHUNK)

    return job


async def _purge_messages(tx: PgTx, cutoff: float) -> int:
    row = await tx.fetchrow(sql.PURGE_MESSAGES, cutoff=cutoff, chunk=PURGE_CHUNK)
    return 0 if row is None else int(row[0])


async def _take_claims(tx: PgTx, sub: Submission, claim: Claim) -> ClaimResult:
    """Claim the key for every recipient; the unique index decides, not a prior read."""
    params = changes.claim_params(sub, claim)
    rcpts = params.pop("rcpts")
    claimed = frozenset(row["rcpt"] for row in await tx.fetch(sql.CLAIM, rcpts=rcpts, **params))
    if not needs_holders(claim, claimed, len(rcpts)):
        return ClaimResult(claimed)
    del params["fingerprint"], params["expires_at"]
    holders = await tx.fetch(sql.CLAIMS_OF_OTHERS, **params)
    return ClaimResult(
        claimed,
        tuple(Holder(row["rcpt"], row["queue_id"], row["fingerprint"]) for row in holders),
    )


async def _recipients_in(tx: PgTx, queue_id: str, state: str) -> list[str]:
    return [
        row["rcpt"]
        for row in await tx.fetch(sql.RECIPIENTS_IN_STATE, queue_id=queue_id, state=state)
    ]


async def _schema_version(db: Db) -> int:
    if not await db.fetchval(sql.HAS_META.text):
        return 0
    value = await db.fetchval(sql.SCHEMA_VERSION.text)
    return 0 if value is None else int(value)


async def migrate_database(config: StoreConfig) -> migrations.Migrated:
    """The steps this database lacks, in one transaction, under an advisory lock: replicas that
    start together wait for each other, and the later ones find the work done."""
    assert config.url is not None
    try:
        db = await asyncpg.connect(**connect_options(config))
    except FAILURES as exc:
        raise StoreError(
            f"cannot open the store {config.url} (store.url): {_describe(exc)}"
        ) from None
    try:
        async with db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock($1)", sql.MIGRATION_LOCK)
            current = await _schema_version(db)
            steps = migrations.pending(migrations.POSTGRES, current, config.url)
            done = migrations.Migrated(current, steps)
            for step in steps:
                await db.execute(step.script)
            if steps:
                await db.execute(sql.SET_SCHEMA_VERSION.text, str(done.after))
        return done
    except asyncpg.PostgresError as exc:
        raise StoreError(
            f"cannot migrate the store {config.url} (store.url): {_describe(exc)}"
        ) from None
    finally:
        await db.close()


@contextlib.asynccontextmanager
async def open_source(config: StoreConfig) -> AsyncIterator[Any]:
    """A read-only connection for `log`, `show`, `stats` and the review pages."""
    from relay.errors import ReadError
    from relay.store.reader import PostgresSource

    try:
        db = await asyncpg.connect(**connect_options(config, readonly=True))
    except FAILURES as exc:
        raise ReadError(
            f"cannot open the store {config.url} (store.url): {_describe(exc)}"
        ) from None
    try:
        yield PostgresSource(db)
    finally:
        with contextlib.suppress(Exception):
            await db.close()
