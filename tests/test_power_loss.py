"""A power cut loses no message the relay answered 250: each was on disk before the answer.

`kill -9` keeps the page cache, so tests/test_restart.py cannot tell a synced commit from
one still in memory. Here the store lives on the power-cut file system (tests/powercut.py),
which throws away every write no fsync made durable, as a power failure does.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DEADLINE, Upstream, eventually, make_message, process_config, relay_cli
from tests.mta import unavailable
from tests.powercut import PowerCut, why_unavailable
from tests.test_restart import message_ids, send_quietly

CLIENTS = 4
PER_CLIENT = 10
CUT_AFTER = 16  # 250s before the power fails; the other sessions are mid-transaction
UNFINISHED = "SELECT count(*) FROM messages WHERE state IN ('queued', 'sending')"


@pytest.fixture
def power_cut(tmp_path: Path) -> Iterator[PowerCut]:
    reason = why_unavailable()
    if reason is not None:
        unavailable(f"{reason} (.ci/system-deps installs fuse3; pip install -e '.[test]')")
    with PowerCut(tmp_path / "disk", tmp_path / "mnt", tmp_path / "powercut") as mount:
        yield mount


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_power_cut_keeps_what_was_synced_and_loses_the_rest(power_cut: PowerCut) -> None:
    """The tool itself: unsynced data and a new name whose directory was not synced are gone."""
    mnt, disk = power_cut.mountpoint, power_cut.backing
    kept = os.open(mnt / "kept", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(kept, b"synced")
    os.fsync(kept)
    folder = os.open(mnt, os.O_RDONLY)
    os.fsync(folder)  # the name "kept" lasts
    os.write(kept, b" and not")
    os.ftruncate(kept, 3)  # the truncate was never synced either
    nameless = os.open(mnt / "nameless", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(nameless, b"data synced, name not")
    os.fsync(nameless)
    assert (mnt / "kept").read_bytes() == b"syn"  # readers see what is pending
    for fd in (kept, nameless, folder):
        os.close(fd)
    power_cut.cut()
    assert sorted(os.listdir(disk)) == ["kept"]
    assert (disk / "kept").read_bytes() == b"synced"


async def test_a_power_cut_mid_traffic_loses_no_message_that_got_250(
    tmp_path: Path, upstream: Upstream, relay_process: Any, power_cut: PowerCut
) -> None:
    upstream.script.stall = "data"  # deliveries stay in flight: the payload sent, no reply
    config = process_config(
        tmp_path, upstream, store={"path": str(power_cut.mountpoint / "relay.db")}
    )
    relay = relay_process(config)
    # The store made earlier, as by a run before this one: this start reopens it with a new
    # WAL, as every start after a clean stop does.
    migrated = await asyncio.to_thread(
        relay_cli, "migrate", "--config", str(relay.config_path), cwd=tmp_path
    )
    assert migrated.returncode == 0, migrated.stderr
    assert not (power_cut.mountpoint / "relay.db-wal").exists()
    relay.args = ["--workers", "2"]  # two writers taking turns on one WAL
    await asyncio.to_thread(relay.start)
    relay.drain_stderr()

    def workers() -> set[int]:
        found = (re.search(r"worker \d+ \(pid (\d+)\) ready", line) for line in relay.stderr_lines)
        return {int(m.group(1)) for m in found if m}

    await eventually(lambda: len(workers()) == 2, what="two workers ready")
    sent: set[str] = set()
    promised: set[str] = set()
    enough = asyncio.Event()

    async def client(c: int) -> None:
        for n in range(PER_CLIENT):
            message_id = f"<power-{c}-{n}@example.com>"
            sent.add(message_id)
            data = make_message(f"order {c}-{n}", message_id=message_id)
            if await send_quietly(relay.port, data):
                promised.add(message_id)
            if len(promised) >= CUT_AFTER:
                enough.set()

    clients = asyncio.gather(*(client(c) for c in range(CLIENTS)))
    await asyncio.wait_for(enough.wait(), timeout=60)
    # and at least one delivery is in flight
    await asyncio.wait_for(upstream.script.stalled.wait(), timeout=DEADLINE)
    # The power fails: every relay process dies, then the disk loses what was not synced.
    pids = workers()
    relay.kill()
    await eventually(lambda: not any(alive(pid) for pid in pids), what="the workers to die")
    await asyncio.to_thread(power_cut.cut)
    await clients  # the sessions left end in errors: those messages were promised nothing
    assert CUT_AFTER <= len(promised) < len(sent)

    store = power_cut.backing / "relay.db"
    upstream.script.go_on()
    restarted = relay_process(process_config(tmp_path, upstream, store={"path": str(store)}))
    restarted.args = ["--workers", "2"]
    await asyncio.to_thread(restarted.start)
    restarted.drain_stderr()
    await eventually(
        lambda: rows(store, UNFINISHED) == [(0,)],
        timeout=60,
        what="the restarted relay to finish every message its store holds",
    )
    assert await asyncio.to_thread(restarted.terminate) == 0

    assert rows(store, "PRAGMA integrity_check") == [("ok",)]
    delivered = message_ids(upstream)
    lost = sorted(promised - set(delivered))
    assert not lost, f"{len(lost)} of {len(promised)} messages that got 250 were lost: {lost}"
    assert set(delivered) <= sent
    twice = {mid for mid, count in delivered.items() if count > 1}
    ambiguous = {
        f"<{mid}>"
        for (mid,) in rows(store, "SELECT message_id FROM events WHERE event = 'ambiguous'")
    }
    assert twice <= ambiguous
    received = Counter(
        f"<{mid}>"
        for (mid,) in rows(store, "SELECT message_id FROM events WHERE event = 'received'")
    )
    assert promised <= set(received)
    assert max(received.values()) == 1  # the store took each message once
