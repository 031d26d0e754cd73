"""Windows, backoff, expiry and leases on a clock the test moves: hours pass in milliseconds.

The relay runs for real (SMTP in, SMTP out, SQLite) on a `ManualClock`; only
the policy's sense of time is the test's. The real-time versions of some of
these stay in test_dedupe.py and test_delivery.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.clock import ManualClock
from relay.delivery import HOUSEKEEPING_INTERVAL as HOUSEKEEPING
from tests.conftest import (
    Relay,
    Upstream,
    eventually,
    left_mid_attempt,
    make_message,
    send,
    settled,
)

HOUR = 3600.0


async def started(make_relay, clock: ManualClock, **overrides: object) -> Relay:
    relay = await make_relay(clock=clock, **overrides)
    await settled(clock, "delivery to settle on the clock")
    return relay


async def test_manual_clock_wakes_sleepers_in_order_only_when_moved() -> None:
    clock = ManualClock(1000.0)
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("late", 20.0), ("soon", 10.0))]
    await eventually(lambda: clock.sleepers == 2, what="both asleep")
    clock.advance(9.0)
    await asyncio.sleep(0)
    assert woke == [] and clock.time() == 1009.0
    clock.advance(1.0)
    await eventually(lambda: woke == ["soon"], what="the first sleeper")
    clock.advance(10.0)
    await asyncio.gather(*tasks)
    assert woke == ["soon", "late"]
    event = asyncio.Event()
    waiting = asyncio.create_task(clock.wait(event, 5.0))
    await eventually(lambda: clock.sleepers == 1, what="the waiter")
    clock.advance(5.0)
    assert await waiting is False
    event.set()
    assert await clock.wait(event, 5.0) is True


async def test_a_repeat_is_dropped_within_the_window_and_forwarded_after_it(
    make_relay, upstream: Upstream
) -> None:
    clock = ManualClock()
    relay = await started(make_relay, clock, dedupe={"window": "24h"})
    message = make_message()
    assert "queued as" in (await send(relay.port, message)).text
    await upstream.wait_for(1)
    await relay.idle()
    clock.advance(24 * HOUR - 1)
    assert "not forwarded" in (await send(relay.port, message)).text
    clock.advance(2)
    assert "queued as" in (await send(relay.port, message)).text
    await upstream.wait_for(2)
    await relay.idle()
    assert len(upstream.messages) == 2


async def test_the_window_does_not_end_while_the_original_is_still_being_retried(
    make_relay, upstream: Upstream
) -> None:
    upstream.script.data = ["451 4.3.0 try later"]
    clock = ManualClock()
    relay = await started(
        make_relay,
        clock,
        dedupe={"window": "1h"},
        delivery={"retry_initial": "2h", "retry_max": "4h"},
    )
    message = make_message()
    await send(relay.port, message)
    await eventually(lambda: relay.events("deferred"), what="the original deferred")
    clock.advance(HOUR + 1)  # the window is over, the retry (after ~2h) is not due yet
    assert "not forwarded" in (await send(relay.port, message)).text
    clock.advance(2 * HOUR)
    await upstream.wait_for(1)
    await relay.idle()
    assert len(upstream.messages) == 1


async def test_a_deferred_message_is_retried_after_its_backoff_not_before(
    make_relay, upstream: Upstream
) -> None:
    upstream.script.data = ["451 4.3.0 try later"]
    clock = ManualClock()
    relay = await started(make_relay, clock, delivery={"retry_initial": "1h", "retry_max": "4h"})
    received = clock.time()
    await send(relay.port, make_message())
    await eventually(lambda: relay.events("deferred"), what="the first attempt deferred")
    [(next_attempt,)] = await relay.rows("SELECT next_attempt FROM messages")
    assert 0.8 * HOUR <= next_attempt - received <= 1.2 * HOUR
    clock.advance(next_attempt - received - 1)  # one second early: nothing is due
    await settled(clock, "the dispatcher to look and wait again")
    assert upstream.messages == []
    assert await relay.rows("SELECT attempts FROM messages") == [(1,)]
    clock.advance(1)
    await upstream.wait_for(1)
    await relay.idle()
    assert [e["event"] for e in await relay.events()] == ["received", "deferred", "delivered"]


async def test_a_message_deferred_until_max_age_expires_and_frees_its_key(
    make_relay, upstream: Upstream
) -> None:
    upstream.script.data = ["451 4.3.0 try later"] * 2
    clock = ManualClock()
    relay = await started(
        make_relay, clock, delivery={"retry_initial": "2d", "retry_max": "2d", "max_age": "1d"}
    )
    message = make_message()
    await send(relay.port, message)
    await eventually(lambda: relay.events("deferred"), what="the first attempt deferred")
    [(next_attempt,)] = await relay.rows("SELECT next_attempt - received_at FROM messages")
    assert next_attempt == pytest.approx(86400.0)  # ~2d backoff cut to a last try at max_age
    clock.advance(86400.0)
    await eventually(lambda: relay.events("expired"), what="the message to expire")
    await relay.idle()
    assert [e["event"] for e in await relay.events()][-2:] == ["expired", "released"]
    assert "queued as" in (await send(relay.port, message)).text
    await upstream.wait_for(1)


async def test_a_lease_abandoned_by_a_dead_replica_is_taken_back_once_it_expires(
    make_relay, upstream: Upstream, tmp_path: Path
) -> None:
    clock = ManualClock()
    lease_for = 600.0
    await left_mid_attempt(tmp_path / "relay.db", "dead", clock.time(), lease_for)
    relay = await started(make_relay, clock)
    assert await relay.rows("SELECT state, lease_owner FROM messages") == [("sending", "dead")]
    clock.advance(lease_for - 1)  # housekeeping looks (every minute) while the lease still runs
    await settled(clock, "housekeeping to look and sleep again")
    assert await relay.rows("SELECT state FROM messages") == [("sending",)]
    clock.advance(HOUSEKEEPING + 1)
    await upstream.wait_for(1)
    await relay.idle()
    assert [e["event"] for e in await relay.events()] == ["received", "ambiguous", "delivered"]
