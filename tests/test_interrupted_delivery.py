"""A delivery attempt cut short, by a shutdown or a crash: the log says truthfully how far it got.

Before the payload reached the upstream, a stopped attempt is simply given
back (no attempt counted, nothing to explain). After it, the upstream may have
the message: the recipients are `ambiguous` and follow `delivery.on_ambiguous`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from relay.store import RecipientUpdate, Update
from relay.store.sqlite import SqliteStore
from tests.conftest import Relay, Upstream, left_mid_attempt, make_message, send, submission

INSTANCE = "test"  # runtime.instance in tests/conftest.py's base config


async def stop_mid_attempt(relay: Relay, upstream: Upstream, stage: str) -> None:
    """Send one message, let the upstream stall at `stage`, and stop the relay with no grace."""
    upstream.script.stall = stage
    assert (await send(relay.port, make_message())).code == 250
    await asyncio.wait_for(upstream.script.stalled.wait(), 20)
    await relay.stop()


async def test_stopped_before_the_payload_the_message_is_given_back_uncounted(
    make_relay, upstream: Upstream
) -> None:
    relay = await make_relay(runtime={"shutdown_grace": "0s"})
    await stop_mid_attempt(relay, upstream, "rcpt")
    assert await stored_rows(relay, "SELECT state, attempts FROM messages") == [("queued", 0)]
    assert await stored_rows(relay, "SELECT event FROM events") == [("received",)]
    upstream.script.go_on()
    after = await make_relay()
    await upstream.wait_for(1)
    await after.idle()
    assert [e["event"] for e in await after.events()] == ["received", "delivered"]
    assert await after.rows("SELECT attempts FROM messages") == [(1,)]


async def test_stopped_awaiting_the_final_reply_is_ambiguous_and_retried(
    make_relay, upstream: Upstream
) -> None:
    relay = await make_relay(runtime={"shutdown_grace": "0s"})
    await stop_mid_attempt(relay, upstream, "data")
    [ambiguous] = await stored_events(relay, "ambiguous")
    assert ambiguous == ("ambiguous", "relay stopped awaiting the reply")
    assert await stored_rows(relay, "SELECT state FROM recipients") == [("queued",)]
    upstream.script.go_on()
    after = await make_relay()
    await upstream.wait_for(1)
    await after.idle()
    assert [e["event"] for e in await after.events()] == ["received", "ambiguous", "delivered"]


async def test_stopped_awaiting_the_final_reply_is_held_under_hold(
    make_relay, upstream: Upstream
) -> None:
    relay = await make_relay(runtime={"shutdown_grace": "0s"}, delivery={"on_ambiguous": "hold"})
    await stop_mid_attempt(relay, upstream, "data")
    assert await stored_rows(relay, "SELECT state FROM messages") == [("held",)]
    assert await stored_events(relay, "ambiguous") == [
        ("ambiguous", "relay stopped awaiting the reply")
    ]


async def stored_rows(relay: Relay, sql: str) -> list[tuple[object, ...]]:
    """Rows of a stopped relay's store, read through a store opened for the purpose."""
    store = SqliteStore(relay.app.config.store.path)
    await store.open()
    try:
        async with store.reader.execute(sql) as cursor:
            return [tuple(r) for r in await cursor.fetchall()]
    finally:
        await store.close()


async def stored_events(relay: Relay, name: str) -> list[tuple[object, ...]]:
    return await stored_rows(relay, f"SELECT event, reply FROM events WHERE event = '{name}'")


# --- a crash mid-attempt -------------------------------------------------------


async def test_after_a_crash_mid_attempt_hold_keeps_the_message_for_an_operator(
    make_relay, upstream: Upstream, tmp_path: Path
) -> None:
    await left_mid_attempt(tmp_path / "relay.db", INSTANCE, time.time())
    relay = await make_relay(delivery={"on_ambiguous": "hold"})
    assert await relay.rows("SELECT state FROM messages") == [("held",)]
    assert await relay.rows("SELECT state FROM recipients") == [("held",)]
    [ambiguous] = await relay.events("ambiguous")
    assert "held for an operator" in ambiguous["detail"]
    assert await relay.events("deferred") == []
    assert upstream.messages == []


async def test_after_a_crash_mid_attempt_the_message_is_retried_as_ambiguous(
    make_relay, upstream: Upstream, tmp_path: Path
) -> None:
    await left_mid_attempt(tmp_path / "relay.db", INSTANCE, time.time())
    relay = await make_relay()
    await upstream.wait_for(1)
    await relay.idle()
    assert [e["event"] for e in await relay.events()] == ["received", "ambiguous", "delivered"]
    [ambiguous] = await relay.events("ambiguous")
    assert "will be retried" in ambiguous["detail"]
    assert len(upstream.messages) == 1


async def test_after_a_crash_in_a_retry_only_the_recipients_it_was_for_are_ambiguous(
    make_relay, upstream: Upstream, tmp_path: Path
) -> None:
    # The first attempt delivered to alice and deferred bob; the relay died during bob's
    # retry. Recovery concerns bob alone: alice must not be marked ambiguous, nor sent again.
    now = time.time()
    store = SqliteStore(str(tmp_path / "relay.db"))
    await store.open()
    try:
        sub = submission("CRASH1", "alice@example.org", "bob@example.org", at=now)
        assert (await store.accept(sub)).forward == sub.recipients
        [lease] = (await store.lease(INSTANCE, 10, now, 600.0)).leases
        delivered = RecipientUpdate("alice@example.org", "delivered", "delivered", 250, "ok")
        deferred = RecipientUpdate("bob@example.org", "queued", "deferred", 452, "full")
        await store.update(Update(lease.queue_id, (delivered, deferred), now, None, None, now))
        [retry] = (await store.lease(INSTANCE, 10, now, 600.0)).leases
        assert retry.recipients == ("bob@example.org",)
    finally:
        await store.close()  # the relay died here, its retry's outcome never recorded
    relay = await make_relay()
    [message] = await upstream.wait_for(1)
    await relay.idle()
    assert message.rcpts == ["bob@example.org"]
    [ambiguous] = await relay.events("ambiguous")
    assert ambiguous["rcpts"] == "bob@example.org"
    assert dict(await relay.rows("SELECT rcpt, state FROM recipients")) == {
        "alice@example.org": "delivered",
        "bob@example.org": "delivered",
    }
    assert len(upstream.messages) == 1
