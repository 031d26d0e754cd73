"""PostgreSQL's batch runner: no savepoints until a job fails, then the batch once more, one by one.

The real `PostgresStore` on a private cluster (tests/pg.py) runs the tests' own jobs through
its group-commit writer. What the writer sends is read from the server's own statement log:
the test database is set to `log_statement = 'all'`, so nothing in the client is wrapped.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from relay.audit import Event
from relay.config import StoreConfig, from_mapping
from relay.errors import StoreError
from relay.store.postgres import PgTx, PostgresStore
from tests.conftest import PG_PASSWORD_ENV, eventually
from tests.pg import Cluster

# The statements that open, end or divide a transaction, as the writer sends them.
CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "NOTIFY")


class StatementLog:
    """What the server logged since `mark()`: each statement's text, in order."""

    def __init__(self, cluster: Cluster, store: PostgresStore) -> None:
        self._cluster = cluster
        self._store = store
        self._offset = 0

    def mark(self) -> None:
        self._offset = self._cluster.log.stat().st_size

    async def since_mark(self) -> list[str]:
        # A statement is logged before it runs; one sent after the batch and found in the log
        # means the batch's statements are all there.
        token = f"end of batch {secrets.token_hex(4)}"
        async with self._store.connection() as db:
            await db.execute(f"SELECT '{token}'")
        await eventually(lambda: token in self._text(), what="the marker in the server's log")
        found = []
        for line in self._text().splitlines():
            _, logged, rest = line.partition(" LOG:  ")
            if logged and rest.startswith(("statement: ", "execute ")):
                found.append(rest.split(": ", 1)[1])
        return found

    async def control(self) -> list[str]:
        """The transaction control the batches since `mark()` sent."""
        return [s for s in await self.since_mark() if s.upper().startswith(CONTROL)]

    def _text(self) -> str:
        with self._cluster.log.open("rb") as log:
            log.seek(self._offset)
            return log.read().decode(errors="replace")


class Harness:
    """The store's writer, what it committed, the statements it sent, and the notes table the
    tests' jobs write."""

    def __init__(self, config: StoreConfig, cluster: Cluster) -> None:
        self.committed: list[list[Event]] = []
        self.batch_sizes: list[int] = []
        self.runs: list[str] = []
        self.store = PostgresStore(config, on_commit=self.committed.append, on_batch=self._batch)
        self.log = StatementLog(cluster, self.store)

    def _batch(self, size: int, seconds: float) -> None:
        self.batch_sizes.append(size)

    def submit(self, *jobs: Callable[[PgTx], Awaitable[str]]) -> list[asyncio.Future[Any]]:
        """All at once, before the writer wakes: one batch."""
        return [self.store.writer.submit(job) for job in jobs]

    def note(self, text: str, *, fail: str | None = None) -> Callable[[PgTx], Awaitable[str]]:
        """A job that writes a row and records an event; then, if `fail` says so, breaks on an
        SQL error ("sql", which aborts PostgreSQL's transaction) or its own ("python")."""

        async def job(tx: PgTx) -> str:
            self.runs.append(text)
            await tx.db.execute("INSERT INTO notes (text) VALUES ($1)", text)
            tx.record([Event(ts=0.0, event="received", queue_id=text)])
            if fail == "sql":
                await tx.db.execute("INSERT INTO notes (text) VALUES ('')")  # the CHECK refuses it
            elif fail == "python":
                raise ValueError(f"{text} broke after writing")
            return text

        return job

    async def notes(self) -> list[str]:
        async with self.store.connection() as db:
            return [row["text"] for row in await db.fetch("SELECT text FROM notes ORDER BY n")]

    async def stored_events(self) -> list[str]:
        async with self.store.connection() as db:
            rows = await db.fetch("SELECT queue_id FROM events ORDER BY id")
        return [row["queue_id"] for row in rows]


@pytest.fixture
async def harness(pg_cluster: Cluster, pg_url: str) -> AsyncIterator[Harness]:
    database = urlsplit(pg_url).path.lstrip("/")
    # Every session on this database logs what it is sent; the other tests' databases do not.
    await asyncio.to_thread(pg_cluster.sql, f"ALTER DATABASE {database} SET log_statement = 'all'")
    config = from_mapping(
        {"store": {"url": pg_url, "password_env": PG_PASSWORD_ENV}}, check_paths=False
    ).store
    h = Harness(config, pg_cluster)
    await h.store.open()
    try:
        async with h.store.connection() as db:
            await db.execute(
                "CREATE TABLE notes"
                " (n bigserial PRIMARY KEY, text text NOT NULL CHECK (text <> ''))"
            )
        yield h
    finally:
        await h.store.close()


async def test_a_batch_takes_savepoints_only_once_a_job_has_failed(
    harness: Harness,
) -> None:
    harness.log.mark()
    futures = harness.submit(*(harness.note(f"n{i}") for i in range(3)))
    assert await asyncio.gather(*futures) == ["n0", "n1", "n2"]
    assert harness.batch_sizes == [3]
    assert await harness.log.control() == ["BEGIN", "COMMIT"]
    assert await harness.notes() == ["n0", "n1", "n2"]

    # Savepoints do show in the log: a failing job sends its batch to the savepoint pass.
    harness.log.mark()
    futures = harness.submit(harness.note("a"), harness.note("b", fail="sql"))
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0] == "a" and isinstance(results[1], StoreError)
    control = await harness.log.control()
    assert control[:2] == ["BEGIN", "ROLLBACK"]
    assert any("SAVEPOINT" in s for s in control[2:])
    assert control[-1] == "COMMIT"
    assert await harness.notes() == ["n0", "n1", "n2", "a"]


@pytest.mark.parametrize("fail", ["sql", "python"])
async def test_a_failing_job_keeps_nothing_and_the_others_run_again_and_commit_once(
    harness: Harness, fail: str
) -> None:
    futures = harness.submit(
        harness.note("first"), harness.note("broken", fail=fail), harness.note("third")
    )
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0] == "first" and results[2] == "third"
    assert isinstance(results[1], StoreError)
    assert harness.batch_sizes == [3]
    # Straight through until "broken" raised, then all again, a savepoint each.
    assert harness.runs == ["first", "broken", "first", "broken", "third"]
    assert await harness.notes() == ["first", "third"]
    assert await harness.stored_events() == ["first", "third"]
    assert [[e.queue_id for e in batch] for batch in harness.committed] == [["first", "third"]]
    # The writer goes on.
    assert await harness.store.writer.run(harness.note("next")) == "next"
    assert await harness.notes() == ["first", "third", "next"]


@pytest.mark.parametrize("fail", ["sql", "python"])
async def test_a_lone_failing_job_keeps_nothing_and_takes_no_savepoint(
    harness: Harness, fail: str
) -> None:
    harness.log.mark()
    with pytest.raises(StoreError):
        await harness.store.writer.run(harness.note("alone", fail=fail))
    assert harness.runs == ["alone"]
    assert await harness.log.control() == ["BEGIN", "ROLLBACK"]
    assert await harness.notes() == []
    assert await harness.stored_events() == []
    assert harness.committed == []
    assert await harness.store.writer.run(harness.note("next")) == "next"
    assert await harness.notes() == ["next"]
    assert await harness.stored_events() == ["next"]
