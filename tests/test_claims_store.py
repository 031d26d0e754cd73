"""The claims on disk (SQLite): one B-tree clustered on (scope, key, rcpt), reached by that key.

A store from before (schema version 4, a rowid table with three indexes) is rebuilt in place
when it is migrated, and its live claims keep catching repeats.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml

from relay.decision import Claim
from relay.store import migrations
from relay.store import statements as sql
from relay.store.sqlite import SqliteStore
from tests.conftest import cli, submission
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


async def deliver(store: SqliteStore, at: float, **states: str) -> None:
    """Lease what is due and report each recipient in `states` (default: delivered)."""
    batch = await store.lease("worker", 100, at, 600.0)
    for lease in batch.leases:
        rcpts = ((r, states.get(lease.queue_id, "delivered")) for r in lease.recipients)
        await store.update(outcome(lease.queue_id, at, *rcpts))


async def test_a_version_4_store_is_rebuilt_clustered_and_its_claims_still_catch_repeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "relay.db"
    with monkeypatch.context() as old_relay:
        old_relay.setattr(migrations, "SQLITE", migrations.SQLITE[:4])
        store = SqliteStore(str(path))
        await store.open()
        await store.accept(submission("SENT", "Ann@x.test", "bo@x.test", key=claim("k1")))
        await store.accept(submission("FAILED", "cy@x.test", key=claim("k2")))
        await deliver(store, T0 + 1, FAILED="failed")
        await store.accept(submission("QUEUED", "dee@x.test", at=T0 + 2, key=claim("k3")))
        await store.close()
    definition, indexes, before = claims_table(path)
    assert schema_version(path) == "4" and "WITHOUT ROWID" not in definition
    assert indexes == ["claims_expiry", "claims_queue", "sqlite_autoindex_claims_1"]
    assert before == [
        ("QUEUED", "dee@x.test", 1),
        ("SENT", "ann@x.test", 0),
        ("SENT", "bo@x.test", 0),
    ]

    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump({"store": {"path": str(path)}}))
    migrated = await cli(config, "migrate")
    assert migrated.code == 0, migrated.err
    definition, indexes, after = claims_table(path)
    assert schema_version(path) == "5" and "WITHOUT ROWID" in definition
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
