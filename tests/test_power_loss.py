"""A power cut loses no message the relay answered 250: each was on disk before the answer.

`kill -9` keeps the page cache, so tests/test_restart.py cannot tell a synced commit from
one still in memory. Here the store lives on the power-cut file system (tests/powercut.py),
which throws away every write no fsync made durable, as a power failure does.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
RECEIVED = "SELECT message_id FROM events WHERE event = 'received'"
# About 50 pages of the store per message: SQLite's automatic checkpoint (at 1,000 pages of
# WAL) runs every 20 messages or so. Well inside the default 25 MB limit on a message, and
# under the 256 KiB up to which a lease carries the body, as the small messages' leases do.
LARGE_BODY = 200_000
AFTER_RESET = CLIENTS + 2  # 250s after the reset: at least two were sent wholly after it


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


@dataclass
class Sent:
    """What the clients sent and which of those got 250, as the traffic goes on."""

    ids: set[str] = field(default_factory=set)
    promised: set[str] = field(default_factory=set)


@dataclass
class Cut:
    """What one power cut mid-traffic left: the messages, and the backing directory's store."""

    sent: set[str]
    promised: set[str]
    store: Path
    migrated_size: int  # the database file's size before any traffic


async def cut_mid_traffic(
    tmp_path: Path,
    upstream: Upstream,
    relay_process: Any,
    power_cut: PowerCut,
    *,
    per_client: int,
    body: Callable[[int, int], str],
    enough: Callable[[Sent], bool],
) -> Cut:
    """Two workers take mail from four sessions until `enough`, with deliveries in flight;
    then every relay process dies and the power fails. The backing store is left as found."""
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
    migrated_size = (power_cut.backing / "relay.db").stat().st_size
    relay.args = ["--workers", "2"]  # two writers taking turns on one WAL
    await asyncio.to_thread(relay.start)
    relay.drain_stderr()

    def workers() -> set[int]:
        found = (re.search(r"worker \d+ \(pid (\d+)\) ready", line) for line in relay.stderr_lines)
        return {int(m.group(1)) for m in found if m}

    await eventually(lambda: len(workers()) == 2, what="two workers ready")
    sent = Sent()
    ready = asyncio.Event()

    async def client(c: int) -> None:
        for n in range(per_client):
            message_id = f"<power-{c}-{n}@example.com>"
            sent.ids.add(message_id)
            data = make_message(f"order {c}-{n}", body(c, n), message_id=message_id)
            if await send_quietly(relay.port, data):
                sent.promised.add(message_id)
            if enough(sent):
                ready.set()

    clients = asyncio.gather(*(client(c) for c in range(CLIENTS)))
    waiting = asyncio.ensure_future(ready.wait())
    either: list[asyncio.Future[Any]] = [waiting, clients]
    await asyncio.wait(either, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    assert ready.is_set(), f"the cut's moment never came in {len(sent.ids)} messages"
    # and at least one delivery is in flight
    await asyncio.wait_for(upstream.script.stalled.wait(), timeout=DEADLINE)
    # The power fails: every relay process dies, then the disk loses what was not synced.
    pids = workers()
    relay.kill()
    await eventually(lambda: not any(alive(pid) for pid in pids), what="the workers to die")
    await asyncio.to_thread(power_cut.cut)
    await clients  # the sessions left end in errors: those messages were promised nothing
    return Cut(sent.ids, sent.promised, power_cut.backing / "relay.db", migrated_size)


async def deliver_after_the_cut(
    tmp_path: Path, upstream: Upstream, relay_process: Any, cut: Cut
) -> None:
    """The store as the cut left it is whole and holds every message that got 250; a relay
    on the backing directory delivers each, once unless the store marks it ambiguous."""
    store = cut.store
    wal = store.with_name(store.name + "-wal")
    kept = received_in_a_copy([store, wal], tmp_path / "as-the-cut-left-it")
    lost = sorted(cut.promised - kept)
    assert not lost, f"{len(lost)} of {len(cut.promised)} messages that got 250 are gone: {lost}"
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
    promised = cut.promised
    lost = sorted(promised - set(delivered))
    assert not lost, f"{len(lost)} of {len(promised)} messages that got 250 were lost: {lost}"
    assert set(delivered) <= cut.sent
    twice = {mid for mid, count in delivered.items() if count > 1}
    ambiguous = {
        f"<{mid}>"
        for (mid,) in rows(store, "SELECT message_id FROM events WHERE event = 'ambiguous'")
    }
    assert twice <= ambiguous
    received = Counter(f"<{mid}>" for (mid,) in rows(store, RECEIVED))
    assert promised <= set(received)
    assert max(received.values()) == 1  # the store took each message once


def wal_generation(wal: Path) -> int | None:
    """The checkpoint sequence number in a WAL's header, None when there is no header.

    SQLite writes 0 into a WAL as first made. A writer that finds the WAL wholly
    checkpointed starts it over at its beginning (a reset) with a new salt and its own count
    of resets, so from the first reset on the number is at least 1.
    """
    try:
        with wal.open("rb") as f:
            header = f.read(32)
    except FileNotFoundError:
        return None
    if len(header) < 32:
        return None
    return int.from_bytes(header[12:16], "big")


def received_in_a_copy(files: list[Path], where: Path) -> set[str]:
    """The messages a copy of the store's files holds, once SQLite finds the copy whole.

    A copy, so that the files stay as the power cut left them: SQLite recovers a WAL when it
    opens one and checkpoints it away when it closes the last connection.
    """
    where.mkdir()
    for found in files:
        shutil.copyfile(found, where / found.name)
    copy = where / files[0].name
    verdict = [line for (line,) in rows(copy, "PRAGMA integrity_check")]
    assert verdict == ["ok"], f"the copy in {where.name} is not whole: {verdict}"
    return {f"<{mid}>" for (mid,) in rows(copy, RECEIVED)}


async def test_a_power_cut_mid_traffic_loses_no_message_that_got_250(
    tmp_path: Path, upstream: Upstream, relay_process: Any, power_cut: PowerCut
) -> None:
    """Small messages: no checkpoint runs, every answered commit is only in the first WAL."""
    cut = await cut_mid_traffic(
        tmp_path,
        upstream,
        relay_process,
        power_cut,
        per_client=PER_CLIENT,
        body=lambda c, n: "Thank you for your order.\n",
        enough=lambda sent: len(sent.promised) >= CUT_AFTER,
    )
    assert CUT_AFTER <= len(cut.promised) < len(cut.sent)
    assert wal_generation(cut.store.with_name("relay.db-wal")) == 0  # the case covered here
    await deliver_after_the_cut(tmp_path, upstream, relay_process, cut)


async def test_a_power_cut_after_checkpoints_and_a_wal_reset_loses_no_message_that_got_250(
    tmp_path: Path, upstream: Upstream, relay_process: Any, power_cut: PowerCut
) -> None:
    """Large messages: checkpoints copy the WAL into the database file and a writer starts the
    WAL over; the power fails with later commits in the reused WAL.

    SQLite with `synchronous=NORMAL` must sync the WAL before a checkpoint, the database
    file after it and the header of the reused WAL; the writer's own sync covers the rest.
    The cut comes once the backing WAL shows a reset and a few more messages got 250.
    """
    wal = power_cut.backing / "relay.db-wal"  # what is on disk, not what the mount shows
    reset_at: list[int] = []  # how many had got 250 when the reset was first seen on disk

    def enough(sent: Sent) -> bool:
        if not reset_at and (wal_generation(wal) or 0) >= 1:
            reset_at.append(len(sent.promised))
        return bool(reset_at) and len(sent.promised) >= reset_at[0] + AFTER_RESET

    def body(c: int, n: int) -> str:
        line = f"order {c}-{n}: one line of a long invoice, to fill the store's pages.\n"
        return line * (LARGE_BODY // len(line))

    cut = await cut_mid_traffic(
        tmp_path,
        upstream,
        relay_process,
        power_cut,
        per_client=3 * PER_CLIENT,
        body=body,
        enough=enough,
    )
    assert len(cut.promised) < len(cut.sent)
    # What the backing disk holds after the cut, read before a relay opens it again: the
    # evidence that this test covers the case it claims (asserted after the deliveries, so
    # that a store that loses mail fails there first).
    generation = wal_generation(cut.store.with_name("relay.db-wal"))
    grown = cut.store.stat().st_size - cut.migrated_size
    checkpointed = received_in_a_copy([cut.store], tmp_path / "database-file-alone")
    await deliver_after_the_cut(tmp_path, upstream, relay_process, cut)
    # The WAL was started over after a complete checkpoint; the checkpoints' pages reached
    # the database file; and messages that got 250 were in the reused WAL and nowhere else.
    assert generation is not None and generation >= 1, f"no WAL reset on disk: {generation}"
    assert grown > LARGE_BODY, f"the database file grew by {grown} bytes only"
    assert checkpointed, "no checkpoint put an answered message into the database file"
    assert cut.promised - checkpointed, "every answered message was checkpointed: none in the WAL"
