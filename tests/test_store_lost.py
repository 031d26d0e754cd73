"""The store file deleted or replaced under a running relay: it stops, says so, and loses nothing.

SQLite keeps writing to the file it opened even after it is unlinked, so a relay
whose store was deleted would answer 250 into a file that is gone at the next
start. The writer checks the file's identity (st_dev, st_ino) before every
commit: once it changed, nothing more is committed or accepted, readiness fails,
and what the open file held is copied beside it for the operator to put back.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

import aiosmtplib
import pytest

from relay.clock import ManualClock
from tests.conftest import (
    DEADLINE,
    Reply,
    Upstream,
    eventually,
    http_get,
    make_message,
    send,
    settled,
)


def lose(store: Path, how: str) -> None:
    """What an operator or a cleanup job does to the store while the relay runs."""
    if how == "deleted":
        store.unlink()
        return
    other = store.with_name("restored.db")
    sqlite3.connect(other).close()
    os.replace(other, store)


def rescued_copy(folder: Path) -> Path:
    [copy] = folder.glob("relay.db.rescued-*")
    return copy


def put_back(copy: Path, store: Path) -> None:
    """The operator's way back, as the log says: the copy at store.path, nothing beside it."""
    for leftover in store.parent.glob(store.name + "*"):
        if leftover != copy:
            leftover.unlink()
    copy.rename(store)


async def attempt(port: int) -> Reply:
    """One transaction; a refusal at connect counts as its reply."""
    try:
        return await send(port, make_message())
    except aiosmtplib.SMTPConnectResponseError as exc:
        return Reply(exc.code, exc.message)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_the_first_message_after_the_store_file_is_lost_gets_451_never_250(
    make_relay, upstream: Upstream, tmp_path: Path, how: str
) -> None:
    clock = ManualClock()  # no poll of its own writes first: the message is the first write
    relay = await make_relay(clock=clock)
    assert (await send(relay.port, make_message())).code == 250
    await upstream.wait_for(1)
    await relay.idle()
    await settled(clock)
    lose(tmp_path / "relay.db", how)
    first = await send(relay.port, make_message())
    assert (first.code, first.text.split(" ", 1)[0]) == (451, "4.3.0")
    later = await attempt(relay.port)
    assert later.code == 421 and "Mail store unavailable" in later.text
    assert relay.app.store.lost == f"the store file {tmp_path / 'relay.db'} was {how}" + (
        " by another file" if how == "replaced" else ""
    )


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_lost_store_fails_readiness_and_its_queued_mail_is_copied_out(
    make_relay, upstream: Upstream, tmp_path: Path, how: str
) -> None:
    upstream.script.stall = "rcpt"  # one message still to deliver when the file goes
    relay = await make_relay(http={"listen": "127.0.0.1:0"}, runtime={"shutdown_grace": "0s"})
    assert (await send(relay.port, make_message(message_id="<kept@x>"))).code == 250
    await eventually(upstream.script.stalled.is_set, what="the attempt under way")
    lose(tmp_path / "relay.db", how)
    ready = await http_get(relay.app.http_port, "/readyz")
    assert ready.status == 503
    assert ready.json()["failing"] == ["store"]
    assert how in ready.json()["checks"]["store"]
    assert (await http_get(relay.app.http_port, "/healthz")).status == 200
    assert (await attempt(relay.port)).code == 421
    rescued = rescued_copy(tmp_path)
    await relay.stop()
    put_back(rescued, tmp_path / "relay.db")
    upstream.script.go_on()
    restarted = await make_relay()
    await upstream.wait_for(1)
    await restarted.idle()
    assert [e["event"] for e in await restarted.events()] == ["received", "ambiguous", "delivered"]
    assert len(upstream.messages) == 1
    with contextlib.suppress(Exception):
        await restarted.stop()


async def test_the_log_says_what_happened_and_where_the_copy_is(
    make_relay, upstream: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await make_relay()
    assert (await send(relay.port, make_message())).code == 250
    lose(tmp_path / "relay.db", "deleted")
    await eventually(lambda: relay.app.store.lost, DEADLINE, "the relay's own poll to notice")
    [said] = [r for r in caplog.records if r.levelname == "CRITICAL"]
    rescued = rescued_copy(tmp_path)
    assert f"the store file {tmp_path / 'relay.db'} was deleted" in said.getMessage()
    assert str(rescued) in said.getMessage()
