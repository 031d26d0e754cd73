"""The SQLite store: the spool, the dedupe claims and the audit trail in one file.

`GroupCommit` feeds the write connection batches of jobs, and `run_batch` runs
each batch in one transaction and one commit (a savepoint per job only once a
job has failed). The SQL is in `statements`; what the SQL decides is in
`relay.decision` and `relay.store.changes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from relay import instance
from relay.audit import Event
from relay.decision import (
    ClaimResult,
    Holder,
    Verdict,
    decide,
    namespaced_key,
    needs_holders,
    normalise_rcpt,
)
from relay.store import (
    PENDING_STATES,
    Claim,
    Instance,
    LeaseBatch,
    MessageState,
    OnBatch,
    OnCommit,
    QueueDepth,
    StoreError,
    StoreLost,
    Submission,
    Update,
    changes,
    migrations,
    schema,
)
from relay.store import statements as sql
from relay.store.changes import INLINE_BODY_LIMIT, PURGE_CHUNK
from relay.store.writer import BatchResult, GroupCommit, Outcome
from relay.store.writer_thread import WriterThread

__all__ = [
    "INLINE_BODY_LIMIT",
    "PURGE_CHUNK",
    "Backup",
    "SqliteStore",
    "Tx",
    "backup",
    "connect",
    "is_outage",
    "migrate",
    "migrate_file",
    "run_batch",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Leases renewed per statement, well inside SQLite's limit on parameters.
RENEW_CHUNK = 500
# What `purge` deletes by a single statement (finished messages take several).
_PURGES = {
    "claims": sql.DELETE_EXPIRED_CLAIMS,
    "bodies": sql.DELETE_KEPT_BODIES,
    "events": sql.DELETE_OLD_EVENTS,
}


class Tx:
    """One job's view of the batch's transaction: the connection and the events to record."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.events: list[Event] = []

    def execute(self, statement: str, params: dict[str, Any] | None = None) -> sqlite3.Cursor:
        return self.db.execute(statement, params or {})

    def executemany(self, statement: str, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            self.db.executemany(statement, rows)

    def record(self, events: Sequence[Event]) -> None:
        """Audit events, in the same transaction as the change they describe."""
        if events:
            self.db.executemany(sql.INSERT_EVENT, [changes.event_row(e) for e in events])
            self.events.extend(events)


Job = Callable[[Tx], Any]

# Commits quicker than this lately (seconds): the loop waits for the next one itself.
INLINE_COMMIT = 0.001


def is_outage(error: BaseException) -> bool:
    """Whether a job's error is the store's state (full, read-only, locked, corrupt), not the job's.

    Those fail any write alike and pass when the store recovers; an integrity or
    programming error belongs to the one job.
    """
    return isinstance(error, sqlite3.OperationalError | StoreLost) or (
        type(error) is sqlite3.DatabaseError
    )


def run_batch(
    db: sqlite3.Connection,
    jobs: Sequence[Job],
    before_commit: Callable[[], None] | None = None,
    *,
    begun: bool = False,
    commit: bool = True,
) -> BatchResult:
    """Every job in one transaction and one commit; a job that raises keeps nothing.

    The jobs run straight through, without savepoints: a savepoint makes SQLite copy every
    page a job first changes into a sub-journal, which spills to a temporary file past
    64 KiB, and under load that was half the writes per message. When a job raises, the
    transaction is rolled back and the batch runs once more with a savepoint per job
    (`_one_by_one`): the failing job is rolled back to its savepoint and the others still
    commit. Jobs may therefore run twice; they only read and write the transaction.

    An error outside the jobs (begin, savepoint, `before_commit`, commit) rolls back the
    whole batch and propagates: then nothing of it is stored. `begun`: the caller has run
    BEGIN; `commit=False`: the caller commits (the transaction is left open unless a lone
    job's failure rolled it back).
    """
    changes_before = db.total_changes
    if not begun:
        db.execute("BEGIN IMMEDIATE")
    try:
        tx = Tx(db)
        outcomes = _straight(tx, jobs)
        failed = any(error is not None for _, error in outcomes)
        if failed:
            db.execute("ROLLBACK")
            if len(jobs) > 1:
                db.execute("BEGIN IMMEDIATE")
                tx = Tx(db)
                outcomes, failed = _one_by_one(tx, jobs), False
        if before_commit is not None:
            before_commit()
        if not failed and commit:
            db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return BatchResult(outcomes, tx.events, db.total_changes != changes_before)


def _straight(tx: Tx, jobs: Sequence[Job]) -> list[Outcome]:
    """The jobs in turn, up to the first that raises; that one's error ends the list."""
    outcomes: list[Outcome] = []
    for job in jobs:
        try:
            outcomes.append((job(tx), None))
        except Exception as exc:
            tx.events.clear()
            return [(None, exc)]
    return outcomes


def _one_by_one(tx: Tx, jobs: Sequence[Job]) -> list[Outcome]:
    """Each job inside its own savepoint: one failing job must not spoil the batch."""
    db = tx.db
    outcomes: list[Outcome] = []
    for job in jobs:
        mark = len(tx.events)
        db.execute("SAVEPOINT job")
        try:
            result = job(tx)
        except Exception as exc:
            del tx.events[mark:]
            db.execute("ROLLBACK TO job")
            db.execute("RELEASE job")
            outcomes.append((None, exc))
        else:
            db.execute("RELEASE job")
            outcomes.append((result, None))
    return outcomes


async def connect(path: str, *, readonly: bool = False) -> aiosqlite.Connection:
    """A reading connection; WAL lets it read while the writer writes, without blocking it."""
    readonly_uri = Path(os.path.abspath(path)).as_uri() + "?mode=ro"  # noqa: ASYNC240
    target = readonly_uri if readonly else path
    db = await aiosqlite.connect(target, uri=readonly, isolation_level=None)
    await db.execute("PRAGMA busy_timeout=10000")
    return db


class SqliteStore:
    """The `Store` on one SQLite file; replicas on one host may share the file.

    `connection_factory` is the `sqlite3.Connection` class for the write connection:
    tests pass a subclass that fails chosen statements, to prove what a failed
    commit or a failed job does.

    Before each commit the writer checks that the file at `path` is still the one it
    opened (st_dev and st_ino): a store deleted or replaced under a running relay
    would otherwise take commits into an unlinked file, lost at the next start. Once
    that happens the store is `lost` for good, what the open file still holds is
    copied beside it, and every call fails.

    Each commit is made durable by the writer itself, after it has given back the turn
    (`_sync`): see `_open_writer`. `sync` is the call that does it (tests record it).
    """

    def __init__(
        self,
        path: str,
        *,
        keep_bodies: float = 0.0,
        on_commit: OnCommit | None = None,
        on_batch: OnBatch | None = None,
        connection_factory: type[sqlite3.Connection] = sqlite3.Connection,
        inline_commit: float = INLINE_COMMIT,
        sync: Callable[[int], None] = os.fdatasync,
    ) -> None:
        """`inline_commit`: the loop waits for a COMMIT itself while commits have lately taken
        less than this many seconds (0: always on the writer thread)."""
        self.path = path
        self.keep_bodies = keep_bodies
        self._inline_commit = inline_commit
        self._commit_time = 0.0
        self._factory = connection_factory
        self._db: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._lost: str | None = None
        self._turn: int | None = None
        self._wal: int | None = None
        self._sync_file = sync
        self._held = False
        self._patient = True  # the writer's busy_timeout is the PRAGMAS' (not 0)
        self._thread = WriterThread("store-writer")
        self.writer: GroupCommit[Job] = GroupCommit(
            self._run_batch,
            on_commit=on_commit,
            on_batch=on_batch,
            outage=is_outage,
            turn=self._take_turn,
        )

    # --- lifecycle ---------------------------------------------------------

    def _open_writer(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self.path,
            timeout=10.0,
            isolation_level=None,
            check_same_thread=False,
            factory=self._factory,
        )
        db.row_factory = sqlite3.Row
        try:
            for pragma in schema.PRAGMAS:
                db.execute(pragma)
            migrate(db, self.path)
            self._wal = _durable_wal(db, self.path)
        except BaseException:
            db.close()
            raise
        found = os.stat(self.path)
        self._identity = (found.st_dev, found.st_ino)
        self._turn = os.open(self.path + "-writer", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._db = db

    async def open(self) -> None:
        try:
            await self._thread.call(self._open_writer)
        except (sqlite3.Error, OSError, ValueError) as exc:
            raise StoreError(f"cannot open the store {self.path} (store.path): {exc}") from None
        self._reader = await connect(self.path)
        self.writer.start()

    async def close(self) -> None:
        await self.writer.stop()
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        db, self._db = self._db, None
        if db is not None:
            await self._thread.call(db.close)
        turn, self._turn = self._turn, None
        if turn is not None:
            os.close(turn)
        wal, self._wal = self._wal, None
        if wal is not None:
            os.close(wal)
        self._thread.shutdown()

    @property
    def running(self) -> bool:
        """The writer is taking jobs; when it is not, nothing can be accepted or delivered."""
        return self.writer.running

    def subscribe(self, wake: Callable[[], None]) -> None:
        """Processes sharing a file have no channel to each other: delivery's poll finds their
        work (within a second)."""

    @property
    def lost(self) -> str | None:
        return self._lost

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreError("store is not open")
        return self._reader

    async def _run_batch(self, jobs: list[Job]) -> BatchResult:
        try:
            db = self._db
            if db is None:
                raise StoreError("store is not open")
            if self._held and self._lost is None and self._begin_at_once(db):
                return await self._run_on_loop(db, jobs)
            return await self._thread.call(self._batch, db, jobs)
        finally:
            if self._held:  # the batch never reached the thread's own release
                self._give_back()

    def _begin_at_once(self, db: sqlite3.Connection) -> bool:
        """BEGIN on the loop, only if SQLite's own lock is free as well as the turn.

        Every relay process takes the turn first, so SQLite's lock is free then, unless a
        program that does not take turns writes the file: waiting for that in SQLite's busy
        handler would stop the loop, so the batch goes to the writer thread, which may wait.
        """
        if self._patient:
            db.execute("PRAGMA busy_timeout=0")
            self._patient = False
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise  # not a wait: the batch fails as it would on the thread
            return False
        return True

    async def _run_on_loop(self, db: sqlite3.Connection, jobs: list[Job]) -> BatchResult:
        """The jobs' statements on the loop, and the COMMIT there too while commits are quick.

        On the writer thread every statement gave up the GIL and then waited for the loop to
        give it back, while the turn that the other workers wait for was held. The loop runs
        them without waiting. The COMMIT and the WAL's sync after it (`_commit`) wait for the
        disk: the loop waits itself while they are quick (a hand-over to the thread and back
        cost about 0.3 ms here, close to the commit's own 0.4), and hands them to the writer
        thread once they are slow (a busy or networked disk), so that the loop keeps serving.
        """
        try:
            result = run_batch(db, jobs, self._check_file, begun=True, commit=False)
        except StoreLost as exc:
            await self._thread.call(self._lose, db, str(exc))
            raise
        if self._commit_time < self._inline_commit:
            self._commit(db, result.wrote)
        else:
            await self._thread.call(self._commit, db, result.wrote)
        return result

    def _commit(self, db: sqlite3.Connection, wrote: bool) -> None:
        """The batch committed (if a failed lone job left one open), the turn given back,
        the commit made durable, and how long all that takes kept up to date (a moving
        average of the last few), on the loop or the writer thread alike."""
        started = time.perf_counter()
        try:
            try:
                if db.in_transaction:
                    db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            finally:
                self._give_back()
            if wrote:
                self._sync()
        finally:
            self._commit_time += (time.perf_counter() - started - self._commit_time) / 8

    def _batch(self, db: sqlite3.Connection, jobs: list[Job]) -> BatchResult:
        """In the writer thread: the batch, refused once the file is no longer the store."""
        if self._lost is not None:
            raise StoreLost(self._lost)
        if not self._patient:
            db.execute("PRAGMA busy_timeout=10000")
            self._patient = True
        try:
            result = run_batch(db, jobs, self._check_file, commit=False)
        except BaseException as exc:
            self._give_back()  # before a rescue copy, as soon as the batch has ended
            if isinstance(exc, StoreLost):
                self._lose(db, str(exc))
            raise
        self._commit(db, result.wrote)
        return result

    def _sync(self) -> None:
        """The WAL on disk up to the commit just made, before any job of it is answered.

        A failed sync stops the store, as PostgreSQL stops on a failed fsync: the kernel may
        have dropped the pages it could not write, so a later sync that succeeds would prove
        nothing. The batch's callers get an outage (451), and so does every later call until
        a restart, when SQLite recovers what is on disk.
        """
        if self._wal is None:
            return  # not in WAL mode: COMMIT synced, as `_durable_wal` left FULL on
        try:
            self._sync_file(self._wal)
        except OSError as exc:
            self._lost = f"syncing the store's WAL to disk failed ({exc})"
            log.critical(
                "store: %s while the relay was running: what the last commits hold may not be"
                " on disk. It now refuses mail (421/451) and delivers nothing until restarted",
                self._lost,
            )
            raise StoreLost(self._lost) from exc

    def _lose(self, db: sqlite3.Connection, reason: str) -> None:
        self._rescue(db, reason)
        self._lost = reason  # after the copy, so whoever sees it can find the copy

    async def _take_turn(self) -> None:
        """Processes sharing the file take turns through a kernel lock, not SQLite's busy wait.

        SQLite's busy handler polls with sleeps of 1, 2, 5 ... 100 ms, so two workers'
        writers that collide wait far longer than the other's commit lasts; `flock`
        wakes the waiter as soon as the holder is done. SQLite's own lock still guards
        the file (against a process that does not take this turn); this only orders.
        The turn is taken before the batch (`GroupCommit`'s `turn`): a free lock at once
        on the loop, a busy one on the writer thread, while jobs keep queueing.
        """
        turn = self._turn
        if turn is None:
            return
        try:
            fcntl.flock(turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting = asyncio.ensure_future(self._thread.call(fcntl.flock, turn, fcntl.LOCK_EX))
            try:
                await asyncio.shield(waiting)
            except asyncio.CancelledError:
                # The thread takes the lock all the same: give it back once it has.
                waiting.add_done_callback(lambda _: self._give_back(turn))
                raise
        self._held = True

    def _give_back(self, turn: int | None = None) -> None:
        self._held = False
        fd = self._turn if turn is None else turn
        if fd is not None:
            with contextlib.suppress(OSError):  # closed with the store: nothing left to hold
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _check_file(self) -> None:
        try:
            found = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            raise StoreLost(f"the store file {self.path} was deleted") from None
        if (found.st_dev, found.st_ino) != self._identity:
            raise StoreLost(f"the store file {self.path} was replaced by another file")

    def _rescue(self, db: sqlite3.Connection, reason: str) -> None:
        """Copy what the open, now unreachable file holds beside its old path, and say so."""
        stopped = (
            f"store: {reason} while the relay was running. It now refuses mail (421/451) and"
            " delivers nothing until restarted"
        )
        try:
            target = _rescue_path(self.path)
            copy = sqlite3.connect(target, isolation_level=None)
            try:
                db.backup(copy)
                copy.execute("PRAGMA journal_mode=DELETE")
            finally:
                copy.close()
        except (sqlite3.Error, OSError) as exc:
            hint = _open_as(self.path)
            log.critical(
                "%s. What the file held, queued mail included, could not be copied (%s); this"
                " process still has it open%s: copy it out before stopping the relay",
                stopped,
                exc,
                f" as {hint}" if hint else "",
            )
            return
        log.critical(
            "%s. Everything the file held, queued mail included, was copied to %s: stop the"
            " relay, put that copy at %s (remove any -wal and -shm beside it) and start it",
            stopped,
            target,
            self.path,
        )

    async def _run(self, job: Callable[[Tx], T]) -> T:
        return cast(T, await self.writer.run(job))

    # --- the front half ----------------------------------------------------

    async def accept(self, sub: Submission) -> Verdict:
        return await self._run(lambda tx: self._accept(tx, sub))

    def _accept(self, tx: Tx, sub: Submission) -> Verdict:
        result = None if sub.claim is None else _take_claims(tx, sub, sub.claim)
        verdict = decide(sub.queue_id, sub.recipients, sub.claim, result)
        if verdict.unclaim and sub.claim is not None:
            tx.execute(
                sql.DELETE_CLAIMS_OF_MESSAGE,
                {"scope": sub.claim.scope, "key": sub.claim.namespaced, "queue_id": sub.queue_id},
            )
        if verdict.forward:
            _spool(tx, sub, verdict)
        tx.record(changes.accept_events(sub, verdict))
        return verdict

    async def record(self, event: Event) -> None:
        await self._run(lambda tx: tx.record([event]))

    # --- the back half -----------------------------------------------------

    async def lease(self, owner: str, limit: int, now: float, lease_for: float) -> LeaseBatch:
        return await self._run(lambda tx: _lease(tx, owner, limit, now, lease_for))

    async def body(self, queue_id: str) -> bytes | None:
        async with self.reader.execute(sql.SELECT_BODY, {"queue_id": queue_id}) as cursor:
            row = await cursor.fetchone()
        return None if row is None else bytes(row[0])

    async def update(self, update: Update) -> MessageState:
        return await self._run(lambda tx: self._update(tx, update))

    def _update(self, tx: Tx, u: Update) -> MessageState:
        row = tx.execute(sql.MESSAGE_FOR_EVENTS, {"queue_id": u.queue_id}).fetchone()
        if row is None:
            raise StoreError(f"no message {u.queue_id}")
        fields = dict(zip(row.keys(), row, strict=True))
        changes.check_lease(u, fields.pop("state"), fields.pop("lease_owner"))
        message = changes.MessageFields(**fields)
        tx.executemany(
            sql.UPDATE_RECIPIENT,
            [
                {
                    "state": r.state,
                    "code": r.code,
                    "reply": r.reply,
                    "upstream_id": r.upstream_id,
                    "ts": u.ts,
                    "queue_id": u.queue_id,
                    "rcpt": r.rcpt,
                }
                for r in u.recipients
            ],
        )
        released = _settle_claims(tx, u, message)
        state = self._end_lease(tx, u)
        tx.record(changes.update_events(u, message, released))
        return state

    def _end_lease(self, tx: Tx, u: Update) -> MessageState:
        states = [
            row["state"] for row in tx.execute(sql.RECIPIENT_STATES, {"queue_id": u.queue_id})
        ]
        state = changes.message_state(states)
        tx.execute(sql.END_LEASE, changes.lease_end(u, state))
        if state == "done" and self.keep_bodies <= 0:
            tx.execute(sql.DELETE_BODY, {"queue_id": u.queue_id})
        return state

    async def unlease(self, queue_id: str, next_attempt: float, owner: str) -> None:
        params = {"queue_id": queue_id, "next_attempt": next_attempt, "owner": owner}
        await self._run(lambda tx: tx.execute(sql.UNLEASE, params).rowcount)

    async def renew(self, owner: str, queue_ids: Sequence[str], until: float) -> frozenset[str]:
        ids = list(queue_ids)

        def job(tx: Tx) -> frozenset[str]:
            renewed: set[str] = set()
            for start in range(0, len(ids), RENEW_CHUNK):
                chunk = ids[start : start + RENEW_CHUNK]
                params = {"owner": owner, "until": until, **sql.in_params(chunk)}
                renewed.update(row[0] for row in tx.execute(sql.renew_leases(len(chunk)), params))
            return frozenset(renewed)

        return await self._run(job) if ids else frozenset()

    async def recover(self, owner: str, now: float, *, hold: bool) -> list[str]:
        return await self._run(lambda tx: self._take_back(tx, sql.STUCK_LEASES, owner, now, hold))

    async def reclaim(self, owner: str, now: float, *, hold: bool) -> list[str]:
        return await self._run(lambda tx: self._take_back(tx, sql.EXPIRED_LEASES, owner, now, hold))

    def _take_back(self, tx: Tx, query: str, owner: str, now: float, hold: bool) -> list[str]:
        stuck = [
            (row["queue_id"], row["lease_owner"])
            for row in tx.execute(query, {"owner": owner, "now": now})
        ]
        for queue_id, holder in stuck:
            rcpts = _recipients_in(tx, queue_id, "queued")
            update = changes.recovery_update(
                queue_id, rcpts, now, hold=hold, holder=holder, owner=owner
            )
            self._update(tx, update)
        return [queue_id for queue_id, _ in stuck]

    async def requeue(self, queue_id: str, now: float) -> int:
        def job(tx: Tx) -> int:
            rcpts = _recipients_in(tx, queue_id, "held")
            if rcpts:
                self._update(tx, changes.requeue_update(queue_id, rcpts, now))
            return len(rcpts)

        return await self._run(job)

    async def probe(self, now: float) -> None:
        await self._run(lambda tx: tx.execute(sql.READY_PROBE, {"now": repr(now)}).rowcount)

    async def acquire_instance(self, me: Instance, stale_after: float) -> Instance:
        def job(tx: Tx) -> Instance:
            row = tx.execute(sql.SELECT_INSTANCE, {"name": me.name}).fetchone()
            holder = None if row is None else Instance(**dict(zip(row.keys(), row, strict=True)))
            if not instance.may_take(holder, me, stale_after):
                assert holder is not None
                return holder
            tx.execute(sql.TAKE_INSTANCE, asdict(me))
            return me

        return await self._run(job)

    async def heartbeat_instance(self, me: Instance, now: float) -> bool:
        params = {"name": me.name, "token": me.token, "now": now}
        return await self._run(lambda tx: tx.execute(sql.HEARTBEAT_INSTANCE, params).rowcount > 0)

    async def release_instance(self, me: Instance) -> None:
        params = {"name": me.name, "token": me.token}
        await self._run(lambda tx: tx.execute(sql.RELEASE_INSTANCE, params).rowcount)

    async def reserve_send(self, upstream: str, interval: float, now: float) -> float:
        params = {"upstream": upstream, "interval": interval, "now": now}
        return await self._run(
            lambda tx: float(tx.execute(sql.RESERVE_SEND, params).fetchone()["last_at"])
        )

    async def queue_depth(self) -> tuple[QueueDepth, ...]:
        from relay.store.reader import Reader, SqliteSource  # the reader imports this module

        return await Reader(SqliteSource(self.reader)).queue_depth()

    async def purge(self, now: float, audit_retention: float) -> dict[str, int]:
        return await changes.purge(self._purge_chunk, now, self.keep_bodies, audit_retention)

    async def _purge_chunk(self, kind: str, cutoff: float) -> int:
        if kind == "messages":
            return await self._run(lambda tx: _purge_messages(tx, cutoff))
        return await self._run(_deleter(_PURGES[kind], cutoff))


def _durable_wal(db: sqlite3.Connection, path: str) -> int | None:
    """The writer's commits leave the WAL's sync to the writer, which does it after the turn.

    `synchronous=FULL` syncs the WAL inside COMMIT, while this process holds SQLite's write
    lock and the `-writer` turn, so every other worker waited for the disk too. With
    `synchronous=NORMAL` SQLite still syncs the WAL before each checkpoint and its header
    when the file is reused, and the writer syncs it after each COMMIT (`_sync`) before
    it answers any job: the same durability as FULL. Another process that reads the
    commit before that sync only acts on it through a commit and a sync of its own,
    which cover the earlier frames of the same file. The WAL stays while this connection
    is open, and its directory entry is made durable once here. A file SQLite would not put
    in WAL mode keeps FULL, and None is returned: then COMMIT syncs, as before.
    """
    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        return None
    wal = os.open(path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
    db.execute("PRAGMA synchronous=NORMAL")
    try:
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except BaseException:
        os.close(wal)
        raise
    return wal


def migrate(db: sqlite3.Connection, where: str) -> migrations.Migrated:
    """The steps this store lacks, in one transaction; BEGIN IMMEDIATE keeps out other processes
    migrating the same file at once (the second finds the work done)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        current = _schema_version(db)
        steps = migrations.pending(migrations.SQLITE, current, where)
        done = migrations.Migrated(current, steps)
        for step in steps:
            for statement in _statements(step.script):
                db.execute(statement)
        if steps:
            db.execute(sql.SET_SCHEMA_VERSION, {"version": str(done.after)})
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return done


def _schema_version(db: sqlite3.Connection) -> int:
    if db.execute(sql.HAS_META).fetchone() is None:
        return 0
    row = db.execute(sql.SCHEMA_VERSION).fetchone()
    return 0 if row is None else int(row[0])


def _statements(script: str) -> list[str]:
    """A script as single statements (a trigger's body holds semicolons of its own)."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise ValueError(f"incomplete statement at the end of a migration: {buffer.strip()!r}")
    return statements


async def migrate_file(path: str) -> migrations.Migrated:
    """`relay migrate` on a SQLite store: creates it when there is none yet."""

    def run() -> migrations.Migrated:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        try:
            for pragma in schema.PRAGMAS:
                db.execute(pragma)
            return migrate(db, path)
        finally:
            db.close()

    try:
        return await asyncio.to_thread(run)
    except (sqlite3.Error, OSError, ValueError) as exc:
        raise StoreError(f"cannot migrate the store {path} (store.path): {exc}") from None


def _take_claims(tx: Tx, sub: Submission, claim: Claim) -> ClaimResult:
    """Claim the key for every recipient; the unique index decides, not a prior read."""
    params = changes.claim_params(sub, claim)
    rcpts = params.pop("rcpts")
    params.update(sql.in_params(rcpts, "rcpt"))
    claimed = frozenset(row["rcpt"] for row in tx.execute(sql.claim(len(rcpts)), params))
    if not needs_holders(claim, claimed, len(rcpts)):
        return ClaimResult(claimed)
    holders = tx.execute(sql.CLAIMS_OF_OTHERS, params)  # the names it needs, among others
    return ClaimResult(
        claimed,
        tuple(Holder(row["rcpt"], row["queue_id"], row["fingerprint"]) for row in holders),
    )


def _spool(tx: Tx, sub: Submission, verdict: Verdict) -> None:
    row = changes.message_row(sub, verdict)
    tx.execute(sql.INSERT_MESSAGE, row)
    tx.execute(sql.INSERT_BODY, row)
    tx.executemany(
        sql.INSERT_RECIPIENT,
        [
            {"queue_id": sub.queue_id, "rcpt": r, "updated_at": sub.received_at}
            for r in verdict.forward
        ],
    )


def _lease(tx: Tx, owner: str, limit: int, now: float, lease_for: float) -> LeaseBatch:
    rows = tx.execute(
        sql.LEASE_DUE, {"owner": owner, "until": now + lease_for, "now": now, "limit": limit}
    ).fetchall()
    # A full batch may have left due mail: the caller looks again at once, not at next_due.
    next_due = None if len(rows) >= limit else tx.execute(sql.NEXT_DUE).fetchone()["next_due"]
    if not rows:
        return LeaseBatch((), next_due)
    ids = [row["queue_id"] for row in rows]
    rcpts: dict[str, list[str]] = {queue_id: [] for queue_id in ids}
    for row in tx.execute(sql.queued_recipients_of(len(ids)), sql.in_params(ids)):
        rcpts[row["queue_id"]].append(row["rcpt"])
    small = [row["queue_id"] for row in rows if row["size"] <= INLINE_BODY_LIMIT]
    bodies: dict[str, bytes] = {}
    if small:
        bodies = {
            row["queue_id"]: bytes(row["data"])
            for row in tx.execute(sql.bodies_of(len(small)), sql.in_params(small))
        }
    leases = tuple(
        changes.lease_of(row, tuple(rcpts[row["queue_id"]]), bodies.get(row["queue_id"]))
        for row in rows
    )
    return LeaseBatch(leases, next_due)


def _settle_claims(tx: Tx, u: Update, message: changes.MessageFields) -> tuple[str, ...]:
    """A final outcome lets a claim expire with its window, or frees it (returned).

    The claim is found by its key, read from the message: a message spooled without a
    claim has none to settle."""
    settled, released = changes.settlement(u)
    if message.scope is None or message.key is None or message.strategy is None:
        return released
    own = {
        "scope": message.scope,
        "key": namespaced_key(message.strategy, message.key),
        "queue_id": u.queue_id,
    }
    tx.executemany(sql.SETTLE_CLAIM, [{**own, "rcpt": normalise_rcpt(r)} for r in settled])
    tx.executemany(
        sql.DELETE_RECIPIENT_CLAIM, [{**own, "rcpt": normalise_rcpt(r)} for r in released]
    )
    return released


def _rescue_path(path: str) -> str:
    """Beside the store, never over an earlier rescue."""
    base = f"{path}.rescued-{os.getpid()}"
    candidate, n = base, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _open_as(path: str) -> str | None:
    """/proc/self/fd/N for a file this process still has open after it was unlinked."""
    gone = f"{os.path.abspath(path)} (deleted)"
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") == gone:
                    return f"/proc/{os.getpid()}/fd/{fd}"
    return None


def _recipients_in(tx: Tx, queue_id: str, state: str) -> list[str]:
    rows = tx.execute(sql.RECIPIENTS_IN_STATE, {"queue_id": queue_id, "state": state})
    return [row["rcpt"] for row in rows]


def _deleter(statement: str, cutoff: float) -> Callable[[Tx], int]:
    def job(tx: Tx) -> int:
        return tx.execute(statement, {"cutoff": cutoff, "chunk": PURGE_CHUNK}).rowcount

    return job


def _purge_messages(tx: Tx, cutoff: float) -> int:
    ids = [
        {"queue_id": row["queue_id"]}
        for row in tx.execute(sql.FINISHED_MESSAGES, {"cutoff": cutoff, "chunk": PURGE_CHUNK})
    ]
    for statement in sql.DELETE_MESSAGE_ROWS:
        tx.executemany(statement, ids)
    return len(ids)


@dataclass(frozen=True)
class Backup:
    size: int
    pending: int


def backup(path: str, target: str) -> Backup:
    """A consistent copy of a live store, by SQLite's online backup API, written atomically.

    One backup step copies every page inside one read transaction, so the copy is a single
    snapshot even while the relay commits; in WAL mode that read never blocks the writer.
    The copy is written beside the target and renamed over it only once it checks out.
    """
    source = sqlite3.connect(
        Path(os.path.abspath(path)).as_uri() + "?mode=ro", uri=True, timeout=10.0
    )
    final = Path(target)
    partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        source.execute("PRAGMA busy_timeout=10000")
        copy = sqlite3.connect(partial, isolation_level=None)
        try:
            source.backup(copy)
            # One self-contained file: the relay turns WAL back on when it opens a restored copy.
            copy.execute("PRAGMA journal_mode=DELETE")
            (verdict,) = copy.execute("PRAGMA quick_check").fetchone()
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"the copy failed its check: {verdict}")
            marks = ",".join("?" * len(PENDING_STATES))
            (pending,) = copy.execute(
                f"SELECT count(*) FROM messages WHERE state IN ({marks})", PENDING_STATES
            ).fetchone()
        finally:
            copy.close()
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, final)
        directory = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        source.close()
        partial.unlink(missing_ok=True)
    return Backup(final.stat().st_size, int(pending))
