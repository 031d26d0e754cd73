"""Indexes hold only the rows their searches can find (SQLite step 6, PostgreSQL step 5).

Only duplicates and conflicts name an original, and purge looks for finished messages only
once they are done. A store from before keeps the other rows out of those two indexes once
migrated, and the searches that use them still find what they found.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import pytest

from relay.store import migrations
from relay.store.postgres import PostgresStore, connect_options
from relay.store.reader import EventFilter, open_reader
from relay.store.sqlite import SqliteStore
from tests.conftest import submission
from tests.test_claims_store import (
    claim,
    deliver,
    migrate_as_a_user,
    pg_config,
    pg_store,
    seed_earlier_release,
)
from tests.test_store_contract import T0

PARTIAL = ("events_original", "messages_finished")


def entries(path: Path) -> dict[str, int]:
    """Rows held by each of the two indexes, counted from their own leaf pages."""
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT name, sum(ncell) FROM dbstat WHERE pagetype = 'leaf'"
            f" AND name IN ({','.join('?' * len(PARTIAL))}) GROUP BY name",
            PARTIAL,
        ).fetchall()
    return dict(rows)


def wanted(path: Path) -> dict[str, int]:
    """The rows those searches can find."""
    with sqlite3.connect(path) as db:
        return {
            "events_original": db.execute(
                "SELECT count(*) FROM events WHERE original IS NOT NULL"
            ).fetchone()[0],
            "messages_finished": db.execute(
                "SELECT count(*) FROM messages WHERE state = 'done'"
            ).fetchone()[0],
        }


async def test_a_version_5_store_drops_rows_no_search_finds_and_its_searches_still_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "relay.db"
    with monkeypatch.context() as old_relay:
        old_relay.setattr(migrations, "SQLITE", migrations.SQLITE[:5])
        store = SqliteStore(str(path))
        await seed_earlier_release(store)
        store = SqliteStore(str(path))
        await store.open()
        await store.accept(submission("AGAIN", "ann@x.test", at=T0 + 3, key=claim("k1")))
        await store.close()
    with sqlite3.connect(path) as db:
        (events,) = db.execute("SELECT count(*) FROM events").fetchone()
        (messages,) = db.execute("SELECT count(*) FROM messages").fetchone()
    assert entries(path) == {
        "events_original": events,
        "messages_finished": messages,
    }
    assert all(wanted(path)[name] < entries(path)[name] for name in PARTIAL)

    await migrate_as_a_user(tmp_path, {"path": str(path)})
    assert entries(path) == wanted(path)

    store = SqliteStore(str(path))
    await store.open()
    try:
        await store.accept(submission("LATER", "eve@x.test", at=T0 + 4, key=claim("k4")))
        await store.accept(submission("LATER2", "eve@x.test", at=T0 + 4, key=claim("k4")))
        await deliver(store, T0 + 5)
    finally:
        await store.close()
    assert entries(path) == wanted(path)
    async with open_reader(str(path)) as reader:
        assert (await reader.timeline("SENT")).repeats == ("AGAIN",)
        assert (await reader.timeline("LATER")).repeats == ("LATER2",)
        found = (await reader.events(EventFilter(client="127.0.0.1"))).events
    assert {"LATER", "LATER2", "AGAIN"} <= {e.queue_id for e in found}


async def test_a_version_4_postgres_store_keeps_events_without_an_original_out_of_its_index(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = pg_config(pg_url)
    with monkeypatch.context() as old_relay:
        old_relay.setattr(migrations, "POSTGRES", migrations.POSTGRES[:4])
        await seed_earlier_release(PostgresStore(config))

    assert "schema version 4 -> 5" in await migrate_as_a_user(tmp_path, pg_store(pg_url))
    db = await asyncpg.connect(**connect_options(config))
    try:
        found = dict(
            await db.fetch(
                "SELECT indexname, indexdef FROM pg_indexes WHERE indexname IN"
                " ('events_original', 'messages_finished')"
            )
        )
    finally:
        await db.close()
    assert found["events_original"].endswith("WHERE (original IS NOT NULL)")
    assert found["messages_finished"].endswith("WHERE (state = 'done'::text)")

    store = PostgresStore(config)
    await store.open()
    try:
        await store.accept(submission("AGAIN", "ann@x.test", at=T0 + 3, key=claim("k1")))
    finally:
        await store.close()
    async with open_reader(config) as reader:
        assert (await reader.timeline("SENT")).repeats == ("AGAIN",)
