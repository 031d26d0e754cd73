"""The SQLite writer makes each commit durable itself, before answering, after the turn."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from relay.errors import StoreError
from relay.store.sqlite import SqliteStore
from tests.conftest import eventually, submission


class Syncs:
    """The store's `sync`: records the WAL's size at each sync, then syncs for real."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.inodes: set[int] = set()
        self.failures: list[OSError] = []

    def __call__(self, fd: int) -> None:
        if self.failures:
            raise self.failures.pop()
        found = os.fstat(fd)
        self.sizes.append(found.st_size)
        self.inodes.add(found.st_ino)
        os.fdatasync(fd)


@pytest.mark.parametrize("inline_commit", [1.0, 0.0], ids=["loop-commits", "thread-commits"])
async def test_every_commit_is_synced_to_disk_before_its_caller_is_answered(
    tmp_path: Path, inline_commit: float
) -> None:
    path = tmp_path / "relay.db"
    syncs = Syncs()
    store = SqliteStore(str(path), inline_commit=inline_commit, sync=syncs)
    await store.open()
    try:
        for n in range(3):
            before = len(syncs.sizes)
            verdict = await store.accept(submission(f"S{n}"))
            assert verdict.forward == ("alice@example.org",)
            # One sync for the accept, covering every byte the WAL held when it was answered.
            assert len(syncs.sizes) == before + 1
            assert syncs.sizes[-1] == os.stat(f"{path}-wal").st_size > 0
        assert syncs.inodes == {os.stat(f"{path}-wal").st_ino}
    finally:
        await store.close()


async def test_a_batch_that_wrote_nothing_is_not_synced(tmp_path: Path) -> None:
    syncs = Syncs()
    store = SqliteStore(str(tmp_path / "relay.db"), sync=syncs)
    await store.open()
    try:
        assert (await store.lease("w", 10, 1_800_000_100.0, 600.0)).leases == ()
        assert syncs.sizes == []
    finally:
        await store.close()


async def test_a_failed_sync_stops_the_store_until_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    syncs = Syncs()
    store = SqliteStore(str(path), sync=syncs)
    await store.open()
    try:
        syncs.failures.append(OSError(errno.EIO, "Input/output error"))
        with pytest.raises(StoreError, match="syncing the store's WAL to disk failed"):
            await store.accept(submission("UNSURE"))
        assert store.lost is not None and "Input/output error" in store.lost
        # A later sync that succeeded would prove nothing: nothing more is taken.
        with pytest.raises(StoreError, match="syncing the store's WAL to disk failed"):
            await store.accept(submission("LATER"))
    finally:
        await store.close()
    restarted = SqliteStore(str(path), sync=syncs)
    await restarted.open()
    try:
        assert (await restarted.accept(submission("AFTER"))).forward == ("alice@example.org",)
        with sqlite3.connect(path) as db:
            ids = [row[0] for row in db.execute("SELECT queue_id FROM messages ORDER BY 1")]
        assert ids == ["AFTER", "UNSURE"]  # what SQLite found on disk, and the new one
    finally:
        await restarted.close()


async def test_another_writer_commits_while_one_waits_for_its_disk(tmp_path: Path) -> None:
    path = str(tmp_path / "relay.db")
    syncing, other_done = threading.Event(), threading.Event()

    def slow_disk(fd: int) -> None:
        syncing.set()
        other_done.wait(timeout=30)
        os.fdatasync(fd)

    # The first waits for its disk on its writer thread, so this loop stays free.
    first = SqliteStore(path, inline_commit=0.0, sync=slow_disk)
    second = SqliteStore(path)
    await first.open()
    await second.open()
    try:
        waiting = asyncio.ensure_future(first.accept(submission("FIRST")))
        await eventually(syncing.is_set, what="the first writer to wait for its disk")
        assert (await second.accept(submission("SECOND"))).forward == ("alice@example.org",)
        assert not waiting.done()  # still not answered: its sync has not returned
        other_done.set()
        assert (await waiting).forward == ("alice@example.org",)
    finally:
        other_done.set()
        await second.close()
        await first.close()
