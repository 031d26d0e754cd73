"""The SQLite store: the spool, the dedupe claims and the audit trail in one file.

One writer task owns the write connection. Callers queue jobs to it; it runs
everything waiting in one transaction (a savepoint per job, so one bad job
cannot spoil the others) and commits once. That single fsync per batch is
what lets durability keep up with many concurrent SMTP sessions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from relay.audit import FIELDS, Event
from relay.store import (
    PENDING_STATES,
    Acceptance,
    Claim,
    Lease,
    LeaseBatch,
    QueueDepth,
    RecipientUpdate,
    StoreError,
    Submission,
    Update,
    schema,
)

__all__ = [
    "BATCH_LIMIT",
    "INLINE_BODY_LIMIT",
    "PURGE_CHUNK",
    "Backup",
    "SqliteStore",
    "backup",
    "connect",
    "normalise_rcpt",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]

BATCH_LIMIT = 512
# Bodies up to this size are read in the lease itself, sparing a round-trip per message.
INLINE_BODY_LIMIT = 256 * 1024
PURGE_CHUNK = 5000

_EVENT_COLUMNS = ", ".join(FIELDS)
_EVENT_INSERT = f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES ({','.join('?' * len(FIELDS))})"


def normalise_rcpt(rcpt: str) -> str:
    """Claims compare recipients case-insensitively: Bob@X and bob@x are one mailbox in practice."""
    return rcpt.strip().lower()


def _submission_fields(sub: Submission) -> dict[str, Any]:
    """The audit fields every event about a submission shares."""
    return {
        "queue_id": sub.queue_id,
        "key": sub.claim.key if sub.claim else None,
        "strategy": sub.claim.strategy if sub.claim else None,
        "message_id": sub.message_id,
        "sender": sub.sender,
        "size": len(sub.data),
        "client": sub.client,
        "user": sub.user,
    }


def _event_row(e: Event) -> tuple[Any, ...]:
    return tuple(",".join(e.rcpts) if name == "rcpts" else getattr(e, name) for name in FIELDS)


async def connect(path: str, *, readonly: bool = False) -> aiosqlite.Connection:
    """A reading connection; WAL lets it read while the writer writes, without blocking it."""
    readonly_uri = Path(os.path.abspath(path)).as_uri() + "?mode=ro"  # noqa: ASYNC240
    target = readonly_uri if readonly else path
    db = await aiosqlite.connect(target, uri=readonly, isolation_level=None)
    await db.execute("PRAGMA busy_timeout=10000")
    return db


class SqliteStore:
    def __init__(
        self,
        path: str,
        *,
        keep_bodies: float = 0.0,
        on_commit: Callable[[list[Event]], None] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.path = path
        self.keep_bodies = keep_bodies
        self._on_commit = on_commit
        self._on_batch = on_batch
        self._db: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._jobs: asyncio.Queue[tuple[Job, asyncio.Future[Any]] | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._events: list[Event] = []
        self.batches = 0
        self.jobs_run = 0

    # --- lifecycle ---------------------------------------------------------

    def _open_writer(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        for pragma in schema.PRAGMAS:
            db.execute(pragma)
        db.executescript(schema.TABLES)
        db.execute(
            "INSERT OR IGNORE INTO meta (name, value) VALUES ('schema', ?)", (str(schema.VERSION),)
        )
        self._db = db

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._open_writer)
        self._reader = await connect(self.path)
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")

    async def close(self) -> None:
        if self._writer is not None:
            await self._jobs.put(None)
            await self._writer
            self._writer = None
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, db.close)
        self._thread.shutdown(wait=True)

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreError("store is not open")
        return self._reader

    @property
    def running(self) -> bool:
        """The writer is taking jobs; when it is not, nothing can be accepted or delivered."""
        return self._writer is not None and not self._writer.done()

    # --- the writer --------------------------------------------------------

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None or self._writer.done():
            raise StoreError("store is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait((job, future))
        return await future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            item = await self._jobs.get()
            batch: list[tuple[Job, asyncio.Future[Any]]] = []
            while True:
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                if stopping or len(batch) >= BATCH_LIMIT or self._jobs.empty():
                    break
                item = self._jobs.get_nowait()
            if not batch:
                continue
            jobs = [job for job, _ in batch]
            started = time.perf_counter()
            try:
                outcomes, events = await loop.run_in_executor(self._thread, self._run_batch, jobs)
            except sqlite3.Error as exc:
                log.error("store: batch of %d not committed: %s", len(batch), exc)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(StoreError(f"store unavailable: {exc}"))
                continue
            self.batches += 1
            self.jobs_run += len(batch)
            if self._on_batch is not None:
                self._on_batch(len(batch), time.perf_counter() - started)
            for (_, future), (result, error) in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if error is not None:
                    log.error("store job failed: %r", error)
                    future.set_exception(
                        error if isinstance(error, StoreError) else StoreError(str(error))
                    )
                else:
                    future.set_result(result)
            if self._on_commit is not None and events:
                self._on_commit(events)

    def _run_batch(self, jobs: list[Job]) -> tuple[list[tuple[Any, Exception | None]], list[Event]]:
        """On the writer thread: every job in one transaction, a savepoint each, one commit."""
        db = self._db
        assert db is not None
        self._events = []
        outcomes: list[tuple[Any, Exception | None]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for job in jobs:
                mark = len(self._events)
                db.execute("SAVEPOINT job")
                try:
                    result = job(db)
                except Exception as exc:  # one failing job must not spoil the batch
                    del self._events[mark:]
                    db.execute("ROLLBACK TO job")
                    db.execute("RELEASE job")
                    outcomes.append((None, exc))
                else:
                    db.execute("RELEASE job")
                    outcomes.append((result, None))
            db.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        events, self._events = self._events, []
        return outcomes, events

    def _insert_events(self, db: sqlite3.Connection, events: Sequence[Event]) -> None:
        if events:
            db.executemany(_EVENT_INSERT, [_event_row(e) for e in events])
            self._events.extend(events)

    # --- the front half ----------------------------------------------------

    async def accept(self, sub: Submission) -> Acceptance:
        """Claim, spool and record in one transaction; only then may the client get 250."""
        return await self._run(lambda db: self._accept(db, sub))

    def _accept(self, db: sqlite3.Connection, sub: Submission) -> Acceptance:
        claim = sub.claim
        common = _submission_fields(sub)
        events: list[Event] = []
        forwarded = sub.recipients
        duplicates: list[tuple[str, str]] = []
        duplicate_of: str | None = None
        if claim is not None:
            claimed, others = self._take_claims(db, sub, claim)
            conflicting = [o for o in others if o[2] != claim.fingerprint]
            if conflicting:
                original = str(conflicting[0][1])
                if claimed:
                    db.execute("DELETE FROM claims WHERE queue_id = ?", (sub.queue_id,))
                events.append(
                    Event(
                        ts=sub.received_at,
                        event="conflict",
                        rcpts=sub.recipients,
                        original=original,
                        action=claim.on_conflict,
                        detail="same key, different content",
                        **common,
                    )
                )
                if claim.on_conflict != "forward":
                    self._insert_events(db, events)
                    return Acceptance(sub.queue_id, (), conflict_with=original)
            else:
                by_norm = {normalise_rcpt(r): r for r in sub.recipients}
                duplicates = [
                    (by_norm[rcpt], str(original))
                    for rcpt, original, _ in others
                    if rcpt in by_norm and rcpt not in claimed
                ]
            if duplicates:
                events.append(
                    Event(
                        ts=sub.received_at,
                        event="duplicate",
                        rcpts=tuple(r for r, _ in duplicates),
                        original=duplicates[0][1],
                        action="shadow" if claim.shadow else claim.on_duplicate,
                        detail=f"rule={sub.rule}" if sub.rule else None,
                        **common,
                    )
                )
                if not claim.shadow:  # shadow mode forwards to everyone and only records
                    if claim.on_duplicate == "tag":
                        duplicate_of = duplicates[0][1]
                    else:
                        forwarded = tuple(r for r in sub.recipients if normalise_rcpt(r) in claimed)
        if forwarded:
            self._spool(db, sub, forwarded, duplicate_of)
            received = Event(
                ts=sub.received_at,
                event="received",
                rcpts=forwarded,
                detail=f"rule={sub.rule}" if sub.rule else None,
                **common,
            )
            events.insert(0, received)
        self._insert_events(db, events)
        return Acceptance(sub.queue_id, forwarded, tuple(duplicates))

    def _take_claims(
        self, db: sqlite3.Connection, sub: Submission, claim: Claim
    ) -> tuple[set[str], list[tuple[str, str, str]]]:
        """Claim the key for every recipient; the unique index decides, not a prior read.

        Returns the recipients claimed now, and the live claims of other messages on this key
        (their recipient, queue id and content fingerprint).
        """
        now = sub.received_at
        rcpts = sorted({normalise_rcpt(r) for r in sub.recipients})
        params: list[Any] = []
        for rcpt in rcpts:
            params += [
                claim.scope,
                claim.namespaced,
                rcpt,
                sub.queue_id,
                claim.fingerprint,
                now,
                now + claim.window,
            ]
        inserted = db.execute(
            "INSERT INTO claims (scope, key, rcpt, queue_id, fingerprint, claimed_at,"
            " expires_at, pending) VALUES "
            + ",".join("(?,?,?,?,?,?,?,1)" for _ in rcpts)
            + " ON CONFLICT (scope, key, rcpt) DO UPDATE SET queue_id = excluded.queue_id,"
            " fingerprint = excluded.fingerprint, claimed_at = excluded.claimed_at,"
            " expires_at = excluded.expires_at, pending = 1"
            " WHERE claims.expires_at <= ? AND claims.pending = 0"
            " RETURNING rcpt",
            [*params, now],
        ).fetchall()
        claimed = {row[0] for row in inserted}
        if len(claimed) == len(rcpts) and claim.strategy == "fingerprint":
            return claimed, []  # a fingerprint key cannot conflict with its own content
        others = db.execute(
            "SELECT rcpt, queue_id, fingerprint FROM claims"
            " WHERE scope = ? AND key = ? AND queue_id <> ?"
            " AND (expires_at > ? OR pending = 1) ORDER BY claimed_at",
            (claim.scope, claim.namespaced, sub.queue_id, now),
        ).fetchall()
        return claimed, [(str(r), str(q), str(f)) for r, q, f in others]

    def _spool(
        self,
        db: sqlite3.Connection,
        sub: Submission,
        recipients: tuple[str, ...],
        duplicate_of: str | None,
    ) -> None:
        claim = sub.claim
        db.execute(
            "INSERT INTO messages (queue_id, received_at, state, sender, size, message_id, scope,"
            " key, strategy, fingerprint, rule, client, user, helo, smtputf8, body8bit,"
            " duplicate_of, next_attempt) VALUES (?,?,'queued',?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                sub.queue_id,
                sub.received_at,
                sub.sender,
                len(sub.data),
                sub.message_id,
                claim.scope if claim else None,
                claim.key if claim else None,
                claim.strategy if claim else None,
                claim.fingerprint if claim else None,
                sub.rule,
                sub.client,
                sub.user,
                sub.helo,
                int(sub.smtputf8),
                int(sub.body8bit),
                duplicate_of,
                sub.received_at,
            ),
        )
        db.execute("INSERT INTO bodies (queue_id, data) VALUES (?, ?)", (sub.queue_id, sub.data))
        db.executemany(
            "INSERT INTO recipients (queue_id, rcpt, state, updated_at) VALUES (?, ?, 'queued', ?)",
            [(sub.queue_id, r, sub.received_at) for r in recipients],
        )

    async def record(self, event: Event) -> None:
        """An event with no state change, such as a submission refused for a bad key."""
        await self._run(lambda db: self._insert_events(db, [event]))

    # --- the back half -----------------------------------------------------

    async def lease(self, owner: str, limit: int, now: float, lease_for: float) -> LeaseBatch:
        return await self._run(lambda db: self._lease(db, owner, limit, now, lease_for))

    def _lease(
        self, db: sqlite3.Connection, owner: str, limit: int, now: float, lease_for: float
    ) -> LeaseBatch:
        rows = db.execute(
            "UPDATE messages SET state = 'sending', lease_owner = ?, lease_until = ?,"
            " attempts = attempts + 1 WHERE queue_id IN (SELECT queue_id FROM messages"
            " WHERE state = 'queued' AND next_attempt <= ? ORDER BY next_attempt LIMIT ?)"
            " RETURNING queue_id, sender, received_at, attempts, message_id, key, strategy,"
            " scope, size, smtputf8, body8bit, duplicate_of",
            (owner, now + lease_for, now, limit),
        ).fetchall()
        (next_due,) = db.execute(
            "SELECT min(next_attempt) FROM messages WHERE state = 'queued'"
        ).fetchone()
        if not rows:
            return LeaseBatch((), next_due)
        ids = [row[0] for row in rows]
        marks = ",".join("?" * len(ids))
        rcpts: dict[str, list[str]] = {qid: [] for qid in ids}
        for qid, rcpt in db.execute(
            "SELECT queue_id, rcpt FROM recipients"
            f" WHERE state = 'queued' AND queue_id IN ({marks})",
            ids,
        ).fetchall():
            rcpts[qid].append(rcpt)
        small = [row[0] for row in rows if row[8] <= INLINE_BODY_LIMIT]
        bodies: dict[str, bytes] = {}
        if small:
            bodies = {
                qid: bytes(data)
                for qid, data in db.execute(
                    f"SELECT queue_id, data FROM bodies WHERE queue_id IN"
                    f" ({','.join('?' * len(small))})",
                    small,
                ).fetchall()
            }
        leases = tuple(
            Lease(
                queue_id=r[0],
                sender=r[1],
                recipients=tuple(rcpts[r[0]]),
                received_at=r[2],
                attempts=r[3],
                message_id=r[4],
                key=r[5],
                strategy=r[6],
                scope=r[7],
                size=r[8],
                smtputf8=bool(r[9]),
                body8bit=bool(r[10]),
                duplicate_of=r[11],
                data=bodies.get(r[0]),
            )
            for r in rows
        )
        return LeaseBatch(leases, next_due)

    async def body(self, queue_id: str) -> bytes | None:
        async with self.reader.execute(
            "SELECT data FROM bodies WHERE queue_id = ?", (queue_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else bytes(row[0])

    async def update(self, update: Update) -> str:
        """Apply an attempt's outcome; returns the message's new state."""
        return await self._run(lambda db: self._update(db, update))

    def _update(self, db: sqlite3.Connection, u: Update) -> str:
        row = db.execute(
            "SELECT key, strategy, message_id, sender, size, client, user, scope"
            " FROM messages WHERE queue_id = ?",
            (u.queue_id,),
        ).fetchone()
        if row is None:
            raise StoreError(f"no message {u.queue_id}")
        db.executemany(
            "UPDATE recipients SET state = ?, code = ?, reply = ?, upstream_id = ?, updated_at = ?"
            " WHERE queue_id = ? AND rcpt = ?",
            [
                (r.state, r.code, r.reply, r.upstream_id, u.ts, u.queue_id, r.rcpt)
                for r in u.recipients
            ],
        )
        released = self._settle_claims(db, u)
        state = self._message_state(db, u)
        names = ("key", "strategy", "message_id", "sender", "size", "client", "user")
        common: dict[str, Any] = dict(zip(names, row[:7], strict=True))
        events = [
            Event(
                ts=u.ts,
                event=group[0].event,
                queue_id=u.queue_id,
                rcpts=tuple(r.rcpt for r in group),
                upstream=u.upstream,
                code=group[0].code,
                reply=group[0].reply,
                upstream_id=group[0].upstream_id,
                duration=u.duration,
                detail=u.detail,
                **common,
            )
            for group in _group(u.recipients)
        ]
        if released:
            events.append(
                Event(
                    ts=u.ts,
                    event="released",
                    queue_id=u.queue_id,
                    rcpts=released,
                    detail=f"key released in scope {row[7]} after final failure",
                    **common,
                )
            )
        self._insert_events(db, events)
        return state

    def _settle_claims(self, db: sqlite3.Connection, u: Update) -> tuple[str, ...]:
        """A final outcome lets a claim expire with its window, or frees it (returned)."""
        settled = [r for r in u.recipients if r.state in ("delivered", "failed", "expired")]
        db.executemany(
            "UPDATE claims SET pending = 0 WHERE queue_id = ? AND rcpt = ?",
            [(u.queue_id, normalise_rcpt(r.rcpt)) for r in settled if not r.release],
        )
        released = [r.rcpt for r in settled if r.release]
        db.executemany(
            "DELETE FROM claims WHERE queue_id = ? AND rcpt = ?",
            [(u.queue_id, normalise_rcpt(rcpt)) for rcpt in released],
        )
        return tuple(released)

    def _message_state(self, db: sqlite3.Connection, u: Update) -> str:
        """A message is queued while any recipient is, held while any is held, else done."""
        states = {
            state
            for (state,) in db.execute(
                "SELECT DISTINCT state FROM recipients WHERE queue_id = ?", (u.queue_id,)
            )
        }
        state = "queued" if "queued" in states else "held" if "held" in states else "done"
        db.execute(
            "UPDATE messages SET state = ?, next_attempt = ?, lease_owner = NULL,"
            " lease_until = NULL, finished_at = ? WHERE queue_id = ?",
            (
                state,
                u.next_attempt if state == "queued" else None,
                u.ts if state == "done" else None,
                u.queue_id,
            ),
        )
        if state == "done" and self.keep_bodies <= 0:
            db.execute("DELETE FROM bodies WHERE queue_id = ?", (u.queue_id,))
        return state

    async def unlease(self, queue_id: str, next_attempt: float) -> None:
        """Give back a message whose attempt was stopped before anything reached the upstream."""

        def job(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE messages SET state = 'queued', next_attempt = ?, lease_owner = NULL,"
                " lease_until = NULL, attempts = max(attempts - 1, 0)"
                " WHERE queue_id = ? AND state = 'sending'",
                (next_attempt, queue_id),
            )

        await self._run(job)

    async def recover(self, owner: str, now: float, *, hold: bool) -> list[str]:
        """Messages left mid-attempt by a crash: their fate upstream is unknown (ambiguous)."""
        return await self._run(lambda db: self._recover(db, owner, now, hold))

    def _recover(self, db: sqlite3.Connection, owner: str, now: float, hold: bool) -> list[str]:
        stuck = [
            row[0]
            for row in db.execute(
                "SELECT queue_id FROM messages WHERE state = 'sending'"
                " AND (lease_owner = ? OR lease_until < ?)",
                (owner, now),
            ).fetchall()
        ]
        for qid in stuck:
            rcpts = [
                row[0]
                for row in db.execute(
                    "SELECT rcpt FROM recipients WHERE queue_id = ? AND state = 'queued'", (qid,)
                ).fetchall()
            ]
            self._update(
                db,
                Update(
                    queue_id=qid,
                    recipients=tuple(
                        RecipientUpdate(r, "held" if hold else "queued", "ambiguous") for r in rcpts
                    ),
                    next_attempt=now,
                    upstream=None,
                    duration=None,
                    ts=now,
                    detail=(
                        "the relay stopped during a delivery attempt; "
                        + ("held for an operator" if hold else "will be retried")
                    ),
                ),
            )
        return stuck

    async def requeue(self, queue_id: str, now: float) -> int:
        """An operator's decision to send held recipients again."""

        def job(db: sqlite3.Connection) -> int:
            rcpts = [
                row[0]
                for row in db.execute(
                    "SELECT rcpt FROM recipients WHERE queue_id = ? AND state = 'held'",
                    (queue_id,),
                ).fetchall()
            ]
            if rcpts:
                self._update(
                    db,
                    Update(
                        queue_id=queue_id,
                        recipients=tuple(RecipientUpdate(r, "queued", "requeued") for r in rcpts),
                        next_attempt=now,
                        upstream=None,
                        duration=None,
                        ts=now,
                        detail="requeued by an operator",
                    ),
                )
            return len(rcpts)

        return await self._run(job)

    async def probe(self, now: float) -> None:
        """Commit one tiny write: ready means the store takes writes, not only that it opened."""

        def job(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO meta (name, value) VALUES ('ready-probe', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (repr(now),),
            )

        await self._run(job)

    async def queue_depth(self) -> tuple[QueueDepth, ...]:
        """What is still to be delivered, per state, with the oldest receipt time of each."""
        from relay.store.reader import Reader  # the reader module imports this one

        return await Reader(self.reader).queue_depth()

    async def purge(self, now: float, audit_retention: float) -> dict[str, int]:
        """Drop expired claims, kept bodies and old audit rows, a chunk per transaction."""
        totals = {"claims": 0, "bodies": 0, "events": 0, "messages": 0}
        statements = {
            "claims": (
                "DELETE FROM claims WHERE rowid IN (SELECT rowid FROM claims"
                " WHERE expires_at <= ? AND pending = 0 LIMIT ?)",
                now,
            ),
            "bodies": (
                "DELETE FROM bodies WHERE queue_id IN (SELECT queue_id FROM messages"
                " WHERE state = 'done' AND finished_at <= ? LIMIT ?)",
                now - self.keep_bodies,
            ),
            "events": (
                "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE ts < ? LIMIT ?)",
                now - audit_retention,
            ),
        }
        for name, (sql, cutoff) in statements.items():
            while True:
                deleted = max(await self._run(_deleter(sql, cutoff)), 0)
                totals[name] += deleted
                if deleted < PURGE_CHUNK:
                    break
        while True:
            deleted = await self._run(lambda db: self._purge_messages(db, now - audit_retention))
            totals["messages"] += deleted
            if deleted < PURGE_CHUNK:
                break
        return totals

    def _purge_messages(self, db: sqlite3.Connection, cutoff: float) -> int:
        ids = [
            (row[0],)
            for row in db.execute(
                "SELECT queue_id FROM messages WHERE state = 'done' AND finished_at < ? LIMIT ?",
                (cutoff, PURGE_CHUNK),
            ).fetchall()
        ]
        for table in ("recipients", "bodies", "messages"):
            db.executemany(f"DELETE FROM {table} WHERE queue_id = ?", ids)
        return len(ids)


def _deleter(sql: str, cutoff: float) -> Callable[[sqlite3.Connection], int]:
    def job(db: sqlite3.Connection) -> int:
        cursor = db.execute(sql, (cutoff, PURGE_CHUNK))
        return cursor.rowcount

    return job


def _group(updates: Sequence[RecipientUpdate]) -> list[list[RecipientUpdate]]:
    """One audit event per distinct outcome, listing every recipient it applies to."""
    groups: dict[tuple[Any, ...], list[RecipientUpdate]] = {}
    for r in updates:
        groups.setdefault((r.event, r.code, r.reply, r.upstream_id), []).append(r)
    return list(groups.values())


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
