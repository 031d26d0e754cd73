"""The claims on disk: reached by their key (scope, key, rcpt), never by queue_id.

SQLite keeps them in one B-tree clustered on that key: a store from before (schema version 4,
a rowid table with three indexes) is rebuilt in place when it is migrated. PostgreSQL keeps its
table and drops the queue_id index (schema version 4). Either way, live claims keep catching
repeats across the migration, and every claim statement finds its rows by an index.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from relay.config import StoreConfig, from_mapping
from relay.decision import Claim
from relay.store import Store, migrate, migrations
from relay.store import pg_statements as pg_sql
from relay.store import statements as sql
from relay.store.postgres import PostgresStore, connect_options
from relay.store.sqlite import SqliteStore
from tests.conftest import PG_PASSWORD_ENV, cli, submission
from tests.test_store_contract import HOUR, T0, outcome

CLAIM_STATEMENTS = {
    "others": sql.CLAIMS_OF_OTHERS,
    "unclaim": sql.DELETE_CLAIMS_OF_MESSAGE,
    "settle": sql.SETTLE_CLAIM,
    "release": sql.DELETE_RECIPIENT_CLAIM,
    "purge": sql.DELETE_EXPIRED_CLAIMS,
}


def claim(key: str) -> Claim:
    return Claim("global", key, "message-id", "a" * 64, HOUR, "drop", "reject")


def claims_table(path: Path) -> tuple[str, list[str], list[tuple[str, str, int]]]:
    """The table's definition, its indexes, and its rows as (queue_id, rcpt, pending)."""
    with sqlite3.connect(path) as db:
        (definition,) = db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'claims'"
        ).fetchone()
        indexes = [
            name
            for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'claims'"
                " ORDER BY name"
            )
        ]
        rows = db.execute("SELECT queue_id, rcpt, pending FROM claims ORDER BY queue_id").fetchall()
    return definition, indexes, rows


def schema_version(path: Path) -> str:
    with sqlite3.connect(path) as db:
        (version,) = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
    return str(version)


async def deliver(store: Store, at: float, **states: str) -> None:
    """Lease what is due and report each recipient in `states` (default: delivered)."""
    batch = await store.lease("worker", 100, at, 600.0)
    for lease in batch.leases:
        rcpts = ((r, states.get(lease.queue_id, "delivered")) for r in lease.recipients)
        await store.update(outcome(lease.queue_id, at, *rcpts))


async def seed_earlier_release(store: Any) -> None:
    """What a store of an earlier release holds: a delivered, a failed and a queued message."""
    await store.open()
    await store.accept(submission("SENT", "Ann@x.test", "bo@x.test", key=claim("k1")))
    await store.accept(submission("FAILED", "cy@x.test", key=claim("k2")))
    await deliver(store, T0 + 1, FAILED="failed")
    await store.accept(submission("QUEUED", "dee@x.test", at=T0 + 2, key=claim("k3")))
    await store.close()


async def migrate_as_a_user(folder: Path, store: dict[str, Any]) -> str:
    """`python -m relay migrate` on a config naming `store`, as an upgrade runs it; its output."""
    config = folder / "relay.yaml"
    config.write_text(yaml.safe_dump({"store": store}))
    migrated = await cli(config, "migrate")
    assert migrated.code == 0, migrated.err
    return migrated.out


def pg_store(pg_url: str) -> dict[str, Any]:
    """The `store` section for the test cluster."""
    return {"url": pg_url, "password_env": PG_PASSWORD_ENV}


async def test_a_version_4_store_is_rebuilt_clustered_and_its_claims_still_catch_repeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "relay.db"
    with monkeypatch.context() as old_relay:
        old_relay.setattr(migrations, "SQLITE", migrations.SQLITE[:4])
        store = SqliteStore(str(path))
        await seed_earlier_release(store)
    definition, indexes, before = claims_table(path)
    assert schema_version(path) == "4" and "WITHOUT ROWID" not in definition
    assert indexes == ["claims_expiry", "claims_queue", "sqlite_autoindex_claims_1"]
    assert before == [
        ("QUEUED", "dee@x.test", 1),
        ("SENT", "ann@x.test", 0),
        ("SENT", "bo@x.test", 0),
    ]

    await migrate_as_a_user(tmp_path, {"path": str(path)})
    definition, indexes, after = claims_table(path)
    assert schema_version(path) == str(migrations.SQLITE[-1].version)
    assert "WITHOUT ROWID" in definition
    assert indexes == ["claims_expiry"]
    assert after == before

    store = SqliteStore(str(path))
    await store.open()
    try:
        repeat = await store.accept(submission("AGAIN", "ann@X.test", at=T0 + 3, key=claim("k1")))
        assert (repeat.kind, repeat.forward, repeat.originals) == ("drop", (), ("SENT",))
        queued_repeat = await store.accept(
            submission("AGAIN2", "dee@x.test", at=T0 + 3, key=claim("k3"))
        )
        assert (queued_repeat.kind, queued_repeat.originals) == ("drop", ("QUEUED",))
        retry = await store.accept(submission("RETRY", "cy@x.test", at=T0 + 3, key=claim("k2")))
        assert retry.forward == ("cy@x.test",)
        await deliver(store, T0 + 4, RETRY="failed")
        assert claims_table(path)[2] == [
            ("QUEUED", "dee@x.test", 0),
            ("SENT", "ann@x.test", 0),
            ("SENT", "bo@x.test", 0),
        ]
        purged = await store.purge(T0 + 2 + HOUR, audit_retention=10 * HOUR)
        assert purged["claims"] == 3 and claims_table(path)[2] == []
    finally:
        await store.close()


@pytest.mark.parametrize("name", sorted(CLAIM_STATEMENTS))
def test_every_claim_statement_finds_its_rows_by_an_index(tmp_path: Path, name: str) -> None:
    db = sqlite3.connect(tmp_path / "plan.db")
    for step in migrations.SQLITE:
        db.executescript(step.script)
    plan = " / ".join(
        row[3]
        for row in db.execute(
            f"EXPLAIN QUERY PLAN {CLAIM_STATEMENTS[name]}",
            {
                "scope": "global",
                "key": "k",
                "rcpt": "a@x.test",
                "queue_id": "Q",
                "now": T0,
                "cutoff": T0,
                "chunk": 10,
            },
        )
    )
    db.close()
    assert "claims USING PRIMARY KEY" in plan or "claims USING INDEX claims_expiry" in plan, plan
    assert "SCAN claims" not in plan, plan


# --- PostgreSQL ------------------------------------------------------------------

PG_CLAIM_STATEMENTS = {
    "claim": pg_sql.CLAIM,
    "others": pg_sql.CLAIMS_OF_OTHERS,
    "unclaim": pg_sql.DELETE_CLAIMS_OF_MESSAGE,
    "settle and free": pg_sql.UPDATE_RECIPIENTS,
    "purge": pg_sql.DELETE_EXPIRED_CLAIMS,
}
PG_PARAMS: dict[str, Any] = {
    "scope": "global",
    "key": "k",
    "queue_id": "Q",
    "fingerprint": "f",
    "now": T0,
    "expires_at": T0 + HOUR,
    "cutoff": T0,
    "chunk": 10,
    "ts": T0,
    "rcpts": ["a@x.test"],
    "states": ["delivered"],
    "codes": [250],
    "replies": ["ok"],
    "upstream_ids": [None],
    "settle": ["a@x.test"],
    "release": ["b@x.test"],
}


def pg_config(pg_url: str) -> StoreConfig:
    return from_mapping({"store": pg_store(pg_url)}, check_paths=False).store


async def pg_claims(config: StoreConfig) -> tuple[str, list[str], list[tuple[str, str, bool]]]:
    """The schema version, the claims' indexes, and their rows as (queue_id, rcpt, pending)."""
    db = await asyncpg.connect(**connect_options(config))
    try:
        version = await db.fetchval("SELECT value FROM meta WHERE name = 'schema'")
        indexes = await db.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'claims' ORDER BY indexname"
        )
        rows = await db.fetch("SELECT queue_id, rcpt, pending FROM claims ORDER BY queue_id, rcpt")
    finally:
        await db.close()
    return version, [r[0] for r in indexes], [tuple(r) for r in rows]


async def test_a_version_3_postgres_store_loses_claims_queue_and_its_claims_still_settle(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = pg_config(pg_url)
    with monkeypatch.context() as old_relay:
        old_relay.setattr(migrations, "POSTGRES", migrations.POSTGRES[:3])
        store = PostgresStore(config)
        await seed_earlier_release(store)
    version, indexes, before = await pg_claims(config)
    assert (version, indexes) == ("3", ["claims_expiry", "claims_pkey", "claims_queue"])
    assert before == [
        ("QUEUED", "dee@x.test", True),
        ("SENT", "ann@x.test", False),
        ("SENT", "bo@x.test", False),
    ]

    migrated = await migrate_as_a_user(tmp_path, pg_store(pg_url))
    latest = str(migrations.POSTGRES[-1].version)
    assert f"schema version 3 -> {latest}" in migrated
    assert await pg_claims(config) == (latest, ["claims_expiry", "claims_pkey"], before)

    store = PostgresStore(config)
    await store.open()
    try:
        repeat = await store.accept(submission("AGAIN", "ann@X.test", at=T0 + 3, key=claim("k1")))
        assert (repeat.kind, repeat.forward, repeat.originals) == ("drop", (), ("SENT",))
        retry = await store.accept(submission("RETRY", "cy@x.test", at=T0 + 3, key=claim("k2")))
        assert retry.forward == ("cy@x.test",)
        await deliver(store, T0 + 4, RETRY="failed")
        assert (await pg_claims(config))[2] == [
            ("QUEUED", "dee@x.test", False),
            ("SENT", "ann@x.test", False),
            ("SENT", "bo@x.test", False),
        ]
        purged = await store.purge(T0 + 2 + HOUR, audit_retention=10 * HOUR)
        assert purged["claims"] == 3 and (await pg_claims(config))[2] == []
    finally:
        await store.close()


@pytest.mark.parametrize("name", sorted(PG_CLAIM_STATEMENTS))
async def test_every_postgres_claim_statement_finds_its_rows_by_an_index(
    pg_url: str, name: str
) -> None:
    config = pg_config(pg_url)
    await migrate(config)
    query = PG_CLAIM_STATEMENTS[name]
    db = await asyncpg.connect(**connect_options(config))
    try:
        # Only an index can then spare a sequential scan: the plan shows whether one serves.
        await db.execute("SET enable_seqscan = off")
        rows = await db.fetch(f"EXPLAIN {query.text}", *query.args(PG_PARAMS))
    finally:
        await db.close()
    plan = "\n".join(row[0] for row in rows)
    assert "Seq Scan on claims" not in plan, plan
    assert "claims_queue" not in plan, plan
    assert "claims_pkey" in plan or "claims_expiry" in plan, plan
