"""The group-commit writer on its own: batching, a failing job kept out, one commit per batch."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from relay.audit import Event
from relay.errors import StoreError
from relay.store.sqlite import SqliteStore, Tx, run_batch
from relay.store.writer import BatchResult, GroupCommit
from relay.store.writer_thread import WriterThread
from tests.conftest import eventually, submission
from tests.faults import Faults
from tests.test_store_contract import outcome


class Harness:
    """A GroupCommit over SQLite's own batch runner, on a one-table database."""

    def __init__(self, path: Path, faults: Faults, limit: int) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, factory=faults.connection())
        self.db.row_factory = sqlite3.Row
        self.db.execute("CREATE TABLE notes (text TEXT NOT NULL)")
        self.db.execute(
            "CREATE TABLE events (ts REAL, event TEXT, queue_id TEXT, key TEXT, strategy TEXT,"
            " message_id TEXT, sender TEXT, rcpts TEXT, size INTEGER, client TEXT, user TEXT,"
            " upstream TEXT, code INTEGER, reply TEXT, upstream_id TEXT, duration REAL,"
            " original TEXT, action TEXT, detail TEXT)"
        )
        self.committed: list[list[Event]] = []
        self.batch_sizes: list[int] = []
        self.writer: GroupCommit[Callable[[Tx], Any]] = GroupCommit(
            self._run, limit=limit, on_commit=self.committed.append
        )

    async def _run(self, jobs: list[Callable[[Tx], Any]]) -> BatchResult:
        self.batch_sizes.append(len(jobs))
        return run_batch(self.db, jobs)

    def notes(self) -> list[str]:
        return [row["text"] for row in self.db.execute("SELECT text FROM notes ORDER BY rowid")]


def note(text: str, *, fail: bool = False, runs: list[str] | None = None) -> Callable[[Tx], str]:
    """A job that writes a row and an event, then (if `fail`) raises after writing.

    `runs` gets `text` each time the job runs."""

    def job(tx: Tx) -> str:
        if runs is not None:
            runs.append(text)
        tx.execute("INSERT INTO notes (text) VALUES (:text)", {"text": text})
        tx.record([Event(ts=0.0, event="received", queue_id=text)])
        if fail:
            raise ValueError(f"{text} broke after writing")
        return text

    return job


@pytest.fixture
def faults() -> Faults:
    return Faults()


@pytest.fixture
async def harness(tmp_path: Path, faults: Faults) -> AsyncIterator[Harness]:
    h = Harness(tmp_path / "writer.db", faults, limit=4)
    h.writer.start()
    yield h
    await h.writer.stop()
    h.db.close()


async def test_jobs_waiting_together_share_one_commit(harness: Harness) -> None:
    futures = [harness.writer.submit(note(f"n{i}")) for i in range(3)]
    assert await asyncio.gather(*futures) == ["n0", "n1", "n2"]
    assert harness.batch_sizes == [3]
    assert harness.notes() == ["n0", "n1", "n2"]
    assert [[e.queue_id for e in batch] for batch in harness.committed] == [["n0", "n1", "n2"]]


async def test_a_batch_never_exceeds_its_limit(harness: Harness) -> None:
    futures = [harness.writer.submit(note(f"n{i}")) for i in range(10)]
    await asyncio.gather(*futures)
    assert harness.batch_sizes == [4, 4, 2]
    assert harness.writer.batches == 3 and harness.writer.jobs_run == 10


async def test_a_failing_job_keeps_nothing_and_the_others_run_again_and_commit_once(
    harness: Harness,
) -> None:
    runs: list[str] = []
    futures = [
        harness.writer.submit(note("first", runs=runs)),
        harness.writer.submit(note("broken", fail=True, runs=runs)),
        harness.writer.submit(note("third", runs=runs)),
    ]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0] == "first" and results[2] == "third"
    assert isinstance(results[1], StoreError)
    assert "broken broke after writing" in str(results[1])
    assert harness.batch_sizes == [3]
    # Straight through until "broken" raised, then all again, a savepoint each.
    assert runs == ["first", "broken", "first", "broken", "third"]
    assert harness.notes() == ["first", "third"]
    assert [e.queue_id for e in harness.committed[0]] == ["first", "third"]


async def test_a_lone_failing_job_keeps_nothing_and_the_next_batch_commits(
    harness: Harness,
) -> None:
    with pytest.raises(StoreError, match="alone broke after writing"):
        await harness.writer.run(note("alone", fail=True))
    assert harness.batch_sizes == [1]
    assert harness.notes() == []
    assert harness.committed == []
    assert await harness.writer.run(note("next")) == "next"
    assert harness.notes() == ["next"]
    assert [e.queue_id for e in harness.committed[0]] == ["next"]


async def test_a_batch_takes_savepoints_only_once_a_job_has_failed(
    harness: Harness, faults: Faults
) -> None:
    faults.fail("SAVEPOINT", "disk I/O error")
    assert await harness.writer.run(note("alone")) == "alone"
    futures = [harness.writer.submit(note(f"n{i}")) for i in range(3)]
    assert await asyncio.gather(*futures) == ["n0", "n1", "n2"]
    assert harness.batch_sizes == [1, 3]
    assert harness.notes() == ["alone", "n0", "n1", "n2"]
    # A failing job sends the batch to the savepoint pass, where the planned failure waits.
    futures = [harness.writer.submit(note("a")), harness.writer.submit(note("b", fail=True))]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results)
    assert harness.notes() == ["alone", "n0", "n1", "n2"]


async def test_a_failed_commit_fails_every_job_of_the_batch_and_keeps_nothing(
    harness: Harness, faults: Faults
) -> None:
    faults.fail("COMMIT", "disk I/O error")
    futures = [harness.writer.submit(note(f"lost{i}")) for i in range(3)]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results)
    assert "disk I/O error" in str(results[0])
    assert harness.notes() == []
    assert harness.committed == []
    assert harness.writer.failed_batches == 1
    assert await harness.writer.run(note("after")) == "after"
    assert harness.notes() == ["after"]


async def test_a_batch_that_cannot_begin_fails_and_the_writer_goes_on(
    harness: Harness, faults: Faults
) -> None:
    faults.fail("BEGIN", "database is locked")
    with pytest.raises(StoreError, match="database is locked"):
        await harness.writer.run(note("refused"))
    assert await harness.writer.run(note("next")) == "next"
    assert harness.notes() == ["next"]


async def test_an_error_in_the_savepoint_machinery_fails_the_whole_batch(
    harness: Harness, faults: Faults
) -> None:
    faults.fail("RELEASE", "disk I/O error")
    futures = [
        harness.writer.submit(note("a")),
        harness.writer.submit(note("b", fail=True)),
        harness.writer.submit(note("c")),
    ]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results)
    assert harness.notes() == []


async def test_a_batch_whose_turn_is_refused_fails_and_the_writer_goes_on(
    harness: Harness,
) -> None:
    refusals = [OSError("turn refused")]

    async def turn() -> None:
        if refusals:
            raise refusals.pop()

    await harness.writer.stop()
    writer: GroupCommit[Callable[[Tx], Any]] = GroupCommit(harness._run, turn=turn)
    writer.start()
    try:
        with pytest.raises(StoreError, match="turn refused"):
            await writer.run(note("refused"))
        assert await writer.run(note("next")) == "next"
    finally:
        await writer.stop()
    assert harness.notes() == ["next"]
    harness.writer.start()  # for the fixture's stop


async def test_stop_runs_what_is_queued_then_refuses_new_jobs(harness: Harness) -> None:
    queued = harness.writer.submit(note("last"))
    await harness.writer.stop()
    assert queued.result() == "last"
    with pytest.raises(StoreError, match="not open"):
        harness.writer.submit(note("late"))
    harness.writer.start()  # for the fixture's stop


async def test_processes_sharing_a_file_take_turns_to_write_through_the_kernel_lock(
    tmp_path: Path,
) -> None:
    """A writer waits on the `-writer` lock (woken when it is free), not in SQLite's sleeps."""
    path = tmp_path / "relay.db"
    first, second = SqliteStore(str(path)), SqliteStore(str(path))
    await first.open()
    await second.open()
    try:
        holder = os.open(f"{path}-writer", os.O_RDWR)
        fcntl.flock(holder, fcntl.LOCK_EX)
        try:
            waiting = asyncio.ensure_future(first.accept(submission("TURN1")))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiting), 0.3)
        finally:
            fcntl.flock(holder, fcntl.LOCK_UN)
            os.close(holder)
        assert (await waiting).forward == ("alice@example.org",)
        both = await asyncio.gather(
            *(
                store.accept(submission(f"TURN{side}{n}"))
                for n in range(50)
                for side, store in (("A", first), ("B", second))
            )
        )
        assert all(v.forward for v in both)
    finally:
        await first.close()
        await second.close()


def blocked_on(path: Path) -> Callable[[], bool]:
    """Whether the kernel lists a process blocked on `path`'s lock (`->` in /proc/locks)."""
    inode = f":{os.stat(path).st_ino} "
    locks = Path("/proc/locks")
    return lambda: any("->" in line and inode in line for line in locks.read_text().splitlines())


async def test_jobs_queued_while_the_writer_waits_for_its_turn_join_that_batch(
    tmp_path: Path,
) -> None:
    """While another process commits, the jobs that arrive are one batch, not one and the rest."""
    path = tmp_path / "relay.db"
    sizes: list[int] = []
    store = SqliteStore(str(path), on_batch=lambda jobs, _: sizes.append(jobs))
    await store.open()
    try:
        holder = os.open(f"{path}-writer", os.O_RDWR)
        fcntl.flock(holder, fcntl.LOCK_EX)
        try:
            first = asyncio.ensure_future(store.accept(submission("WAIT1")))
            await eventually(blocked_on(Path(f"{path}-writer")), what="the writer's wait")
            rest = [asyncio.ensure_future(store.accept(submission(f"WAIT{n}"))) for n in (2, 3, 4)]
            await eventually(lambda: store.writer.queued == 3, what="three jobs queued")
        finally:
            fcntl.flock(holder, fcntl.LOCK_UN)
            os.close(holder)
        verdicts = await asyncio.gather(first, *rest)
        assert all(v.forward == ("alice@example.org",) for v in verdicts)
        assert sizes == [4]
    finally:
        await store.close()


async def test_a_writer_that_takes_no_turn_makes_the_batch_wait_off_the_loop(
    tmp_path: Path,
) -> None:
    """The loop runs a batch only when SQLite's lock is free at once; else the thread waits."""
    path = tmp_path / "relay.db"
    store = SqliteStore(str(path))
    await store.open()
    outsider = sqlite3.connect(path, isolation_level=None)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    try:
        outsider.execute("BEGIN IMMEDIATE")
        outsider.execute("CREATE TABLE outsider (x)")
        waiting = asyncio.ensure_future(store.accept(submission("OUTSIDE")))
        counted = ticks
        # With the loop stuck in SQLite's busy handler (10 s), nothing would tick meanwhile.
        await eventually(
            lambda: ticks >= counted + 10, timeout=5.0, what="the loop to keep running"
        )
        assert not waiting.done()
        outsider.execute("COMMIT")
        assert (await waiting).forward == ("alice@example.org",)
        assert (await store.accept(submission("AFTER"))).forward == ("alice@example.org",)
    finally:
        ticker.cancel()
        outsider.close()
        await store.close()


@pytest.mark.parametrize("inline_commit", [1.0, 0.0], ids=["loop-commits", "thread-commits"])
async def test_batches_commit_and_give_the_turn_back_whoever_waits_for_the_disk(
    tmp_path: Path, inline_commit: float
) -> None:
    path = tmp_path / "relay.db"
    store = SqliteStore(str(path), inline_commit=inline_commit)
    await store.open()
    try:
        accepted = await asyncio.gather(*(store.accept(submission(f"D{n}")) for n in range(5)))
        assert all(v.forward for v in accepted)
        batch = await store.lease("w", 10, 1_800_000_100.0, 600.0)
        await asyncio.gather(
            *(
                store.update(outcome(lease.queue_id, 1_800_000_101.0, (rcpt, "delivered")))
                for lease in batch.leases
                for rcpt in lease.recipients
            )
        )
        with sqlite3.connect(path) as other:
            states = other.execute("SELECT state FROM messages ORDER BY queue_id").fetchall()
        assert states == [("done",)] * 5
        turn = os.open(f"{path}-writer", os.O_RDWR)
        try:
            fcntl.flock(turn, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: nothing kept it
        finally:
            os.close(turn)
    finally:
        await store.close()


async def test_the_writer_thread_runs_calls_in_order_on_one_thread_and_answers_each() -> None:
    thread = WriterThread("test-writer")
    ran: list[tuple[int, str]] = []

    def note(n: int) -> int:
        ran.append((n, threading.current_thread().name))
        return n * 10

    def fail() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    try:
        results = await asyncio.gather(
            *(thread.call(note, n) for n in range(50)),
            thread.call(fail),
            thread.call(note, 50),
            return_exceptions=True,
        )
    finally:
        thread.shutdown()
    assert results[:50] == [n * 10 for n in range(50)]
    assert isinstance(results[50], sqlite3.OperationalError)
    assert results[51] == 500
    assert [n for n, _ in ran] == list(range(51))
    assert {name for _, name in ran} == {"test-writer"}
    assert threading.current_thread().name != "test-writer"


async def test_a_cancelled_caller_leaves_the_writer_thread_serving_the_next() -> None:
    thread = WriterThread("test-writer")
    release = threading.Event()
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow() -> str:
        loop.call_soon_threadsafe(started.set)
        release.wait(30)
        return "late"

    try:
        waiting = asyncio.ensure_future(thread.call(slow))
        await started.wait()
        waiting.cancel()
        release.set()
        assert await thread.call(str.upper, "next") == "NEXT"
        assert waiting.cancelled()
    finally:
        thread.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        await thread.call(str.upper, "after")
