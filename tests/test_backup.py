"""`relay backup --to FILE`: a consistent copy of a live store, good enough to restore from."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import Relay, Upstream, make_message, relay_cli, send


def backup_cli(*args: str, store: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return relay_cli("backup", *args, env={"RELAY_STORE__PATH": str(store)}, cwd=cwd)


async def test_backup_while_mail_arrives_is_one_consistent_store_that_restores(
    make_relay: Any, upstream: Upstream, tmp_path: Path
) -> None:
    relay: Relay = await make_relay()
    await upstream.stop()  # keep everything queued, so the copy holds real spool
    acked = []
    for n in range(20):
        message_id = f"<before-{n}@example.com>"
        assert (await send(relay.port, make_message(f"b{n}", message_id=message_id))).code == 250
        acked.append(message_id.strip("<>"))

    target = tmp_path / "backups" / "relay-copy.db"
    target.parent.mkdir()
    store = tmp_path / "relay.db"
    backup = asyncio.create_task(
        asyncio.to_thread(backup_cli, "--to", str(target), store=store, cwd=tmp_path)
    )
    during = 0
    while not backup.done():  # mail keeps arriving for as long as the backup runs
        message = make_message(f"d{during}", message_id=f"<during-{during}@example.com>")
        assert (await send(relay.port, message)).code == 250
        during += 1
    result = await backup
    assert during > 0
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{store} -> {target}: ")
    assert not list(target.parent.glob(".*partial*"))

    with sqlite3.connect(target) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        ids = {row[0] for row in copy.execute("SELECT message_id FROM messages")}
        bodies = copy.execute(
            "SELECT count(*) FROM messages JOIN bodies USING (queue_id)"
        ).fetchone()[0]
        received = copy.execute("SELECT count(*) FROM events WHERE event = 'received'").fetchone()
        claims = copy.execute("SELECT count(DISTINCT queue_id) FROM claims").fetchone()[0]
    assert set(acked) <= ids
    # One snapshot: every spooled message has its body, its event and its claim.
    assert bodies == len(ids) == received[0] == claims

    # Restore: a relay started on the copy delivers what the copy holds.
    await relay.stop()
    await upstream.start()
    restored: Relay = await make_relay(store={"path": str(target)})
    await upstream.wait_for(len(ids))
    await restored.idle()
    assert len(upstream.messages) == len(ids)


def test_backup_refuses_bad_targets_with_one_line_and_exit_2(tmp_path: Path) -> None:
    store = tmp_path / "relay.db"
    missing = backup_cli("--to", str(tmp_path / "copy.db"), store=store, cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"dedup-relay: error: no store at {store}")
    sqlite3.connect(store).close()
    nowhere = backup_cli("--to", str(tmp_path / "no" / "copy.db"), store=store, cwd=tmp_path)
    assert nowhere.returncode == 2
    assert "--to: directory" in nowhere.stderr and "does not exist" in nowhere.stderr
    itself = backup_cli("--to", str(store), store=store, cwd=tmp_path)
    assert itself.returncode == 2 and "that is the store itself" in itself.stderr
    no_flag = backup_cli(store=store, cwd=tmp_path)
    assert no_flag.returncode == 2 and "--to" in no_flag.stderr
    for result in (missing, nowhere, itself):
        assert len(result.stderr.strip().splitlines()) == 1
