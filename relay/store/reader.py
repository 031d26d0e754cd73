"""Read-only queries over the store for the review commands (log, show, stats) and the web page.

One `Reader` and one set of queries for both backends: the SQL is portable, and
the little that is not (placeholders, case-insensitive equality, ASCII-only
`lower()`, how a snapshot begins) is each backend's `Source`. On SQLite it
opens its own read-only connection (in WAL mode readers never block the writer);
on PostgreSQL a connection of its own too (MVCC: readers never block writers).
Every query runs inside one read transaction, so a report is one snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiosqlite

from relay.audit import FIELDS, Event
from relay.errors import ReadError
from relay.keys import normalise_message_id
from relay.store import PENDING_STATES, QueueDepth
from relay.store.sqlite import connect

if TYPE_CHECKING:
    from relay.config import StoreConfig
    from relay.store.postgres import Db

__all__ = [
    "PENDING_STATES",
    "Bucket",
    "Count",
    "Cursor",
    "EventFilter",
    "EventPage",
    "Latency",
    "MessageState",
    "QueueDepth",
    "ReadError",
    "Reader",
    "RecipientState",
    "RepeatSource",
    "SearchPage",
    "Source",
    "Stats",
    "Timeline",
    "open_reader",
    "percentile",
]

# Quoted: `user` is a reserved word in PostgreSQL (it means current_user there).
_COLUMNS = ", ".join(f'"{name}"' for name in FIELDS)
_QUALIFIED = ", ".join(f'e."{name}"' for name in FIELDS)
_RCPTS = FIELDS.index("rcpts")
_TABLES = ("events", "messages", "recipients")


class Source(Protocol):
    """One backend's read connection and the few words of SQL it says its own way."""

    async def rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]: ...

    async def begin(self) -> None:
        """Start one read-only snapshot."""

    async def end(self) -> None: ...

    def nocase(self, column: str) -> str:
        """`column = ?`, ignoring ASCII case."""
        ...

    def lower(self, value: str) -> str:
        """An expression folding ASCII case only, the way the recipient index was written."""
        ...


class SqliteSource:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            async with self.db.execute(sql, params) as cursor:
                return [tuple(row) for row in await cursor.fetchall()]
        except sqlite3.Error as exc:
            raise ReadError(f"cannot read the store: {exc}") from None

    async def begin(self) -> None:
        await self.rows("BEGIN", ())

    async def end(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            await self.db.execute("COMMIT")

    def nocase(self, column: str) -> str:
        return f"{column} = ? COLLATE NOCASE"

    def lower(self, value: str) -> str:
        return f"lower({value})"


@functools.lru_cache(maxsize=512)
def numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1, $2, ...` (no query here has a `?` in a literal)."""
    count = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _: f"${next(count)}", sql)


class PostgresSource:
    def __init__(self, db: Db) -> None:
        self.db = db

    async def rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        from relay.store.postgres import FAILURES

        try:
            return [tuple(row) for row in await self.db.fetch(numbered(sql), *params)]
        except FAILURES as exc:
            raise ReadError(f"cannot read the store: {exc}") from None

    async def begin(self) -> None:
        await self.rows("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", ())

    async def end(self) -> None:
        with contextlib.suppress(Exception):
            await self.db.execute("COMMIT")

    def nocase(self, column: str) -> str:
        return f"lower({column}) = {self.lower('?')}"

    def lower(self, value: str) -> str:
        return f'lower({value} COLLATE "C")'


@dataclass(frozen=True)
class EventFilter:
    """Every field narrows the selection; None (or empty) means "any"."""

    since: float | None = None
    until: float | None = None
    events: tuple[str, ...] = ()
    message_id: str | None = None
    key: str | None = None
    rcpt: str | None = None
    sender: str | None = None
    client: str | None = None
    user: str | None = None
    limit: int = 1000
    queue_id: str | None = None
    strategy: str | None = None
    rule: str | None = None


@dataclass(frozen=True)
class EventPage:
    """The newest events that match, oldest first; `more` says older matches were left out."""

    events: tuple[Event, ...]
    more: bool


@dataclass(frozen=True, order=True)
class Cursor:
    """Where a page of a search ends: the (ts, id) of an event, for keyset paging."""

    ts: float
    id: int


@dataclass(frozen=True)
class SearchPage:
    """One page of matches, newest first, and the cursors to the pages either side (None: none)."""

    events: tuple[Event, ...]
    older: Cursor | None
    newer: Cursor | None


@dataclass(frozen=True)
class Bucket:
    """How many `event`s fell in the bucket of `width` seconds from `start`."""

    start: float
    event: str
    count: int


@dataclass(frozen=True)
class RepeatSource:
    """Duplicates with one combination of where they came from and what was done about them."""

    client: str | None
    user: str | None
    rule: str | None
    strategy: str | None
    action: str | None
    count: int


@dataclass(frozen=True)
class MessageState:
    queue_id: str
    state: str
    received_at: float
    sender: str
    size: int
    message_id: str | None
    key: str | None
    strategy: str | None
    client: str | None
    attempts: int
    next_attempt: float | None
    finished_at: float | None
    duplicate_of: str | None


@dataclass(frozen=True)
class RecipientState:
    queue_id: str
    rcpt: str
    state: str
    code: int | None
    reply: str | None
    upstream_id: str | None
    updated_at: float


@dataclass(frozen=True)
class Timeline:
    """One message and every repeat suppressed against it, as the store remembers them."""

    queue_id: str
    message: MessageState | None
    recipients: tuple[RecipientState, ...]
    repeats: tuple[str, ...]
    events: tuple[Event, ...]


@dataclass(frozen=True)
class Count:
    name: str
    count: int


@dataclass(frozen=True)
class Latency:
    """Seconds from `received` to `delivered` for the same queue id (nearest-rank percentiles)."""

    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None


@dataclass(frozen=True)
class Stats:
    since: float
    until: float
    events: tuple[Count, ...]
    duplicates_by_action: tuple[Count, ...]
    duplicates_by_strategy: tuple[Count, ...]
    duplicates_by_client: tuple[Count, ...]
    queue: tuple[QueueDepth, ...]
    latency: Latency

    @property
    def pending(self) -> int:
        return sum(q.messages for q in self.queue)

    @property
    def oldest_pending(self) -> float | None:
        return min((q.oldest for q in self.queue if q.oldest is not None), default=None)


# Typed, so that PostgreSQL compares the bounds with `ts` as numbers.
_BUCKET = "(CAST(? AS BIGINT), CAST(? AS DOUBLE PRECISION), CAST(? AS DOUBLE PRECISION))"


def percentile(ordered: Sequence[float], fraction: float) -> float | None:
    """Nearest rank: always a latency that really happened, never an interpolation."""
    if not ordered:
        return None
    rank = max(math.ceil(fraction * len(ordered)), 1)
    return ordered[rank - 1]


def _event(row: Iterable[Any]) -> Event:
    values = list(row)
    values[_RCPTS] = tuple(r for r in (values[_RCPTS] or "").split(",") if r)
    return Event(*values)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _where(f: EventFilter, source: Source) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if f.since is not None:
        clauses.append("ts >= ?")
        params.append(f.since)
    if f.until is not None:
        clauses.append("ts <= ?")
        params.append(f.until)
    if f.events:
        clauses.append(f"event IN ({','.join('?' * len(f.events))})")
        params += f.events
    if f.message_id is not None:
        clauses.append("message_id = ?")
        params.append(normalise_message_id(f.message_id) or f.message_id)
    if f.key is not None:
        clauses.append("key = ?")
        params.append(f.key)
    if f.rcpt is not None:
        # One whole address of the comma-joined list, ignoring ASCII case.
        wrapped = source.lower("',' || rcpts || ','")
        clauses.append(f"{wrapped} LIKE {source.lower('?')} ESCAPE '\\'")
        params.append(f"%,{_like_escape(f.rcpt.strip())},%")
    if f.sender is not None:
        clauses.append(source.nocase("sender"))
        params.append(f.sender.strip())
    if f.client is not None:
        clauses.append("client = ?")
        params.append(f.client.strip())
    if f.user is not None:
        clauses.append('"user" = ?')
        params.append(f.user.strip())
    if f.queue_id is not None:
        clauses.append("queue_id IN (?, ?)")
        params += [f.queue_id.strip(), f.queue_id.strip().upper()]
    if f.strategy is not None:
        clauses.append("strategy = ?")
        params.append(f.strategy.strip())
    if f.rule is not None:
        clauses.append("detail = ?")
        params.append(f"rule={f.rule.strip()}")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


class Reader:
    def __init__(self, source: Source) -> None:
        self._source = source

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await self._source.rows(sql, params)

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Reader]:
        """One read transaction, so counts and timelines agree with each other."""
        await self._source.begin()
        try:
            yield self
        finally:
            await self._source.end()

    # --- log ---------------------------------------------------------------

    async def events(self, f: EventFilter) -> EventPage:
        where, params = _where(f, self._source)
        rows = await self._rows(
            f"SELECT {_COLUMNS} FROM events{where} ORDER BY ts DESC, id DESC LIMIT ?",
            [*params, f.limit + 1],
        )
        more = len(rows) > f.limit
        return EventPage(tuple(_event(r) for r in reversed(rows[: f.limit])), more)

    async def search(
        self, f: EventFilter, *, before: Cursor | None = None, after: Cursor | None = None
    ) -> SearchPage:
        """`f.limit` matches older than `before` (or the oldest newer than `after`), newest first.

        Keyset paging: a page is one index range starting where the last one ended, so the
        thousandth page costs what the first does, and new events never shift a page. A recipient
        search walks `event_rcpts`, every other field an index on (field, ts) where there is one.
        """
        where, params = _where(replace(f, rcpt=None), self._source)
        clauses = [where.removeprefix(" WHERE ")] if where else []
        source, ts, ident = "events e", "e.ts", "e.id"
        if f.rcpt is not None:
            source, ts, ident = "event_rcpts r CROSS JOIN events e", "r.event_ts", "r.event_id"
            clauses.append(f"e.id = r.event_id AND r.rcpt = {self._source.lower('?')}")
            params.append(f.rcpt.strip())
            for bound, op in ((f.since, ">="), (f.until, "<=")):
                if bound is not None:  # also on r, so the walk stops at the window's edge
                    clauses.append(f"r.event_ts {op} ?")
                    params.append(bound)
        for cursor, op in ((before, "<"), (after, ">")):
            if cursor is not None:
                clauses.append(f"({ts}, {ident}) {op} (?, ?)")
                params += [cursor.ts, cursor.id]
        order = "ASC" if after is not None else "DESC"
        rows = await self._rows(
            f"SELECT {ident}, {_QUALIFIED} FROM {source}"
            + (" WHERE " + " AND ".join(clauses) if clauses else "")
            + f" ORDER BY {ts} {order}, {ident} {order} LIMIT ?",
            [*params, f.limit + 1],
        )
        more = len(rows) > f.limit
        rows = rows[: f.limit]
        if after is not None:
            rows.reverse()
        cursors = [Cursor(float(r[1]), int(r[0])) for r in rows]
        events = tuple(_event(r[1:]) for r in rows)
        if after is None:
            newer = cursors[0] if before is not None and cursors else None
            return SearchPage(events, cursors[-1] if more else None, newer)
        return SearchPage(events, cursors[-1] if cursors else None, cursors[0] if more else None)

    # --- dashboard ---------------------------------------------------------

    async def activity(
        self, since: float, until: float, width: float, events: Sequence[str]
    ) -> tuple[Bucket, ...]:
        """Events per bucket of `width` seconds, aligned on the epoch (UTC hours, days); the
        first and last bucket are cut to the window, which includes `until`.

        One count per bucket and event, each a range of the (event, ts) index: counting ranges
        is several times faster than grouping every row of the window by a computed bucket.
        """
        first, last = math.floor(since / width), math.floor(until / width)
        end = math.nextafter(until, math.inf)
        ranges = [
            (n, max(n * width, since), min((n + 1) * width, end)) for n in range(first, last + 1)
        ]
        rows = await self._rows(
            f"WITH b (n, lo, hi) AS (VALUES {','.join(_BUCKET for _ in ranges)}),"
            f" k (event) AS (VALUES {','.join('(CAST(? AS TEXT))' for _ in events)})"
            " SELECT b.n, k.event, (SELECT count(*) FROM events"
            "  WHERE event = k.event AND ts >= b.lo AND ts < b.hi) FROM b, k",
            [*(v for r in ranges for v in r), *events],
        )
        return tuple(Bucket(int(n) * width, str(event), int(c)) for n, event, c in rows if c)

    async def repeat_sources(self, since: float, until: float) -> tuple[RepeatSource, ...]:
        """Duplicates in the window, counted by client, user, rule, strategy and action at once."""
        rows = await self._rows(
            'SELECT client, "user", detail, strategy, action, count(*) FROM events'
            " WHERE event = 'duplicate' AND ts >= ? AND ts <= ?"
            ' GROUP BY client, "user", detail, strategy, action',
            (since, until),
        )
        return tuple(
            RepeatSource(
                client=client,
                user=user,
                rule=detail[5:] if detail and detail.startswith("rule=") else None,
                strategy=strategy,
                action=action,
                count=int(count),
            )
            for client, user, detail, strategy, action, count in rows
        )

    async def message_head(self, queue_id: str, limit: int = 65536) -> bytes | None:
        """The first `limit` bytes of a stored message (None when its body is gone)."""
        rows = await self._rows(
            "SELECT substr(data, 1, ?) FROM bodies WHERE queue_id = ?", (limit, queue_id)
        )
        return bytes(rows[0][0]) if rows and rows[0][0] is not None else None

    # --- show --------------------------------------------------------------

    async def find(self, ident: str) -> list[str]:
        """Queue ids an operator's ID names, oldest first, with repeats folded into originals."""
        ident = ident.strip()
        message_id = normalise_message_id(ident) or ident
        rows = await self._rows(
            "SELECT queue_id, min(ts) FROM ("
            " SELECT queue_id, ts FROM events WHERE queue_id IN (?, ?)"
            " UNION ALL SELECT queue_id, ts FROM events WHERE message_id = ?"
            " UNION ALL SELECT queue_id, ts FROM events WHERE key = ?"
            " UNION ALL SELECT queue_id, received_at FROM messages WHERE queue_id IN (?, ?)"
            ") AS found WHERE queue_id IS NOT NULL GROUP BY queue_id ORDER BY min(ts), queue_id",
            (ident, ident.upper(), message_id, ident, ident, ident.upper()),
        )
        found = [str(r[0]) for r in rows]
        if len(found) < 2:
            return found
        marks = ",".join("?" * len(found))
        folded = {
            str(r[0])
            for r in await self._rows(
                f"SELECT DISTINCT queue_id FROM events WHERE queue_id IN ({marks})"
                f" AND event IN ('duplicate', 'conflict') AND original IN ({marks})",
                [*found, *found],
            )
        }
        return [q for q in found if q not in folded]

    async def timeline(self, queue_id: str) -> Timeline:
        repeats = [
            str(r[0])
            for r in await self._rows(
                "SELECT queue_id FROM events WHERE original = ?"
                " AND event IN ('duplicate', 'conflict') AND queue_id <> ?"
                " GROUP BY queue_id ORDER BY min(ts)",
                (queue_id, queue_id),
            )
        ]
        ids = [queue_id, *repeats]
        marks = ",".join("?" * len(ids))
        events = await self._rows(
            f"SELECT {_COLUMNS} FROM events WHERE queue_id IN ({marks}) ORDER BY ts, id", ids
        )
        messages = await self._rows(
            "SELECT queue_id, state, received_at, sender, size, message_id, key, strategy, client,"
            " attempts, next_attempt, finished_at, duplicate_of FROM messages WHERE queue_id = ?",
            (queue_id,),
        )
        recipients = await self._rows(
            "SELECT queue_id, rcpt, state, code, reply, upstream_id, updated_at FROM recipients"
            f" WHERE queue_id IN ({marks})",
            ids,
        )
        order = {q: i for i, q in enumerate(ids)}
        return Timeline(
            queue_id=queue_id,
            message=MessageState(*messages[0]) if messages else None,
            recipients=tuple(
                RecipientState(*r) for r in sorted(recipients, key=lambda r: (order[r[0]], r[6]))
            ),
            repeats=tuple(repeats),
            events=tuple(_event(r) for r in events),
        )

    # --- stats -------------------------------------------------------------

    async def _counts(self, sql: str, params: Sequence[Any]) -> tuple[Count, ...]:
        return tuple(Count(str(name), int(n)) for name, n in await self._rows(sql, params))

    async def queue_depth(self) -> tuple[QueueDepth, ...]:
        """Messages not yet finished, per state, and when the oldest of each was received."""
        queue = await self._rows(
            "SELECT state, count(*), min(received_at) FROM messages"
            f" WHERE state IN ({','.join('?' * len(PENDING_STATES))}) GROUP BY state",
            PENDING_STATES,
        )
        depth = {str(r[0]): QueueDepth(str(r[0]), int(r[1]), r[2]) for r in queue}
        return tuple(depth.get(s, QueueDepth(s, 0, None)) for s in PENDING_STATES)

    async def stats(self, since: float, until: float) -> Stats:
        window = (since, until)
        by = " FROM events WHERE ts >= ? AND ts <= ? AND event = 'duplicate'"
        latencies = sorted(
            float(r[0])
            for r in await self._rows(
                "SELECT d.ts - (SELECT min(r.ts) FROM events r"
                "  WHERE r.queue_id = d.queue_id AND r.event = 'received')"
                " FROM events d WHERE d.ts >= ? AND d.ts <= ? AND d.event = 'delivered'",
                window,
            )
            if r[0] is not None
        )
        return Stats(
            since=since,
            until=until,
            events=await self._counts(
                "SELECT event, count(*) FROM events WHERE ts >= ? AND ts <= ?"
                " GROUP BY event ORDER BY count(*) DESC, event",
                window,
            ),
            duplicates_by_action=await self._counts(
                f"SELECT coalesce(action, '-'), count(*){by} GROUP BY 1 ORDER BY 2 DESC, 1",
                window,
            ),
            duplicates_by_strategy=await self._counts(
                f"SELECT coalesce(strategy, '-'), count(*){by} GROUP BY 1 ORDER BY 2 DESC, 1",
                window,
            ),
            duplicates_by_client=await self._counts(
                f"SELECT coalesce(client, '-'), count(*){by} GROUP BY 1 ORDER BY 2 DESC, 1",
                window,
            ),
            queue=await self.queue_depth(),
            latency=Latency(
                count=len(latencies),
                p50=percentile(latencies, 0.50),
                p90=percentile(latencies, 0.90),
                p99=percentile(latencies, 0.99),
                max=latencies[-1] if latencies else None,
            ),
        )


@contextlib.asynccontextmanager
async def open_reader(store: StoreConfig | str) -> AsyncIterator[Reader]:
    """A reader for an existing store (a StoreConfig, or a SQLite file's path); it never creates
    one, so a typo cannot make an empty database."""
    if not isinstance(store, str) and store.url is not None:
        from relay.store.postgres import open_source

        async with open_source(store) as source:
            yield await _checked(Reader(source), store.url, _PG_TABLES)
        return
    path = store if isinstance(store, str) else store.path
    if not await asyncio.to_thread(Path(path).is_file):
        raise ReadError(f"no store at {path} (is store.path right, and has the relay run yet?)")
    try:
        db = await connect(path, readonly=True)
    except sqlite3.Error as exc:
        raise ReadError(f"cannot open the store {path} (store.path): {exc}") from None
    try:
        yield await _checked(Reader(SqliteSource(db)), path, _SQLITE_TABLES)
    finally:
        await db.close()


_SQLITE_TABLES = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN (?, ?, ?)"
_PG_TABLES = (
    "SELECT count(*) FROM information_schema.tables"
    " WHERE table_schema = current_schema() AND table_name IN (?, ?, ?)"
)


async def _checked(reader: Reader, where: str, tables_sql: str) -> Reader:
    tables = await reader._rows(tables_sql, _TABLES)
    if tables[0][0] != len(_TABLES):
        raise ReadError(f"{where} is not a dedup-relay store")
    return reader
