"""Leases: an attempt keeps its lease however long it runs, and nobody takes a live one back.

A message being sent is leased to its process (`runtime.instance`) for
`delivery.lease_timeout`. The lease is renewed while the attempt lives, so a slow
upstream or a long recipient list never hands the message to a second worker;
and a process never takes back a lease it holds itself, even one it could not
renew in time. Only another process's lease, left unrenewed past its timeout,
is taken back (tests/test_clock.py), as ambiguous.
"""

from __future__ import annotations

import asyncio

import pytest

from relay.clock import ManualClock
from relay.config import ConfigError, from_mapping
from relay.store.sqlite import SqliteStore
from tests.conftest import (
    DEADLINE,
    Relay,
    Upstream,
    eventually,
    make_message,
    running,
    send,
    settled,
)
from tests.faults import DISK_FULL, Faults

RENEWAL = "UPDATE messages SET lease_until"


async def stalled_attempt(
    make_relay, upstream: Upstream, clock: ManualClock, **kw: object
) -> Relay:
    """A relay with one attempt under way, its upstream silent after RCPT."""
    relay: Relay = await make_relay(clock=clock, delivery={"lease_timeout": "30s"}, **kw)
    await settled(clock)
    upstream.script.stall = "rcpt"
    assert (await send(relay.port, make_message())).code == 250
    await asyncio.wait_for(upstream.script.stalled.wait(), DEADLINE)
    return relay


async def pass_time(clock: ManualClock, seconds: float, step: float = 5.0) -> None:
    """Move the clock in steps, letting every task of the relay look at each one."""
    for _ in range(int(seconds / step)):
        clock.advance(step)
        await settled(clock)


async def finish(relay: Relay, upstream: Upstream) -> None:
    upstream.script.go_on()
    await upstream.wait_for(1)
    await relay.idle()
    assert [e["event"] for e in await relay.events()] == ["received", "delivered"]
    assert len(upstream.messages) == 1


async def test_a_delivery_slower_than_its_lease_keeps_renewing_it_and_is_sent_once(
    make_relay, upstream: Upstream
) -> None:
    clock = ManualClock()
    relay = await stalled_attempt(make_relay, upstream, clock)
    await pass_time(clock, 240.0)  # eight lease lifetimes, four rounds of housekeeping
    [(state, left)] = await relay.rows("SELECT state, lease_until - ? FROM messages", clock.time())
    assert state == "sending" and 0 < left <= 30.0
    await finish(relay, upstream)


async def test_a_lease_it_could_not_renew_is_never_taken_back_by_its_own_process(
    make_relay, upstream: Upstream
) -> None:
    clock = ManualClock()
    faults = Faults()
    relay = await stalled_attempt(make_relay, upstream, clock, store_factory=faults.store_factory())
    faults.fail(RENEWAL, DISK_FULL, times=10**6)
    await pass_time(clock, 240.0)
    assert RENEWAL in faults.fired
    [(state, left)] = await relay.rows("SELECT state, lease_until - ? FROM messages", clock.time())
    assert state == "sending" and left < 0  # expired, and still this process's
    faults.clear()
    # Renewed again before the payload goes: until then it might be another replica's.
    await pass_time(clock, 10.0)
    await finish(relay, upstream)


async def test_an_attempt_whose_lease_ran_out_unrenewed_never_sends_its_payload(
    make_relay, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Renewals failed for longer than the lease, and another replica took the message over
    and will send it. This process's attempt, held up before its payload, must not send it
    too: it stops before the payload and gives back nothing (the lease is no longer its own)."""
    clock = ManualClock()
    faults = Faults()
    relay = await stalled_attempt(make_relay, upstream, clock, store_factory=faults.store_factory())
    faults.fail(RENEWAL, DISK_FULL, times=10**6)
    await pass_time(clock, 60.0)
    other = SqliteStore(str(relay.app.config.store.path))
    await other.open()
    try:
        [queue_id] = await other.reclaim("other", clock.time(), hold=False)
        assert len((await other.lease("other", 1, clock.time(), 30.0)).leases) == 1
        faults.clear()
        upstream.script.go_on()
        await eventually(
            lambda: "not sent" in caplog.text or upstream.messages,
            what="the attempt to stop or send",
        )
        assert await relay.rows("SELECT state, lease_owner FROM messages") == [("sending", "other")]
    finally:
        await other.close()
    assert upstream.messages == []
    assert queue_id in caplog.text


@pytest.mark.parametrize(("value", "seconds"), [("90s", 90.0), ("10m", 600.0), (None, 300.0)])
def test_lease_timeout_is_a_duration_with_a_five_minute_default(
    value: str | None, seconds: float
) -> None:
    delivery = {} if value is None else {"lease_timeout": value}
    assert from_mapping({"delivery": delivery}).delivery.lease_timeout == seconds


def test_a_lease_timeout_too_short_to_renew_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"delivery.lease_timeout: must be at least 3s"):
        from_mapping({"delivery": {"lease_timeout": "2s"}})


async def test_an_outcome_written_after_another_replica_took_the_lease_back_changes_nothing(
    make_relay, upstream: Upstream
) -> None:
    # Replica A's attempt outlives its lease (its renewals are refused), B takes the lease
    # back (ambiguous) and delivers. A's attempt then ends with a 550 and A writes it: that
    # used to turn B's delivery into "failed" and free the key, so the app's resend of the
    # same email was forwarded and delivered a second time.
    clock = ManualClock()
    faults = Faults()
    a: Relay = await make_relay(
        clock=clock,
        store_factory=faults.store_factory(),
        runtime={"instance": "a"},
        delivery={"lease_timeout": "30s", "concurrency": 1},  # A leases nothing more
    )
    await settled(clock)
    upstream.script.stall = "rcpt"
    message = make_message()
    assert (await send(a.port, message)).code == 250
    await asyncio.wait_for(upstream.script.stalled.wait(), DEADLINE)
    faults.fail(RENEWAL, DISK_FULL, times=10**6)
    async with running(Upstream()) as other:
        b = await make_relay(
            clock=clock,
            runtime={"instance": "b"},
            upstream={"url": f"smtp://127.0.0.1:{other.port}"},
            delivery={"lease_timeout": "30s"},
        )
        for _ in range(40):  # until B's housekeeping finds A's lease expired and B delivers
            if other.messages:
                break
            clock.advance(5.0)
            await eventually(lambda: clock.sleepers >= 7, what="both relays to wait on the clock")
        await other.wait_for(1)
        await b.idle()
        assert [e["event"] for e in await b.events()] == ["received", "ambiguous", "delivered"]
        upstream.script.rcpt["alice@example.org"] = "550 5.7.1 Refused"
        upstream.script.go_on()
        await eventually(lambda: a.app.delivery.in_flight == 0, what="A's attempt to end")
        assert await b.rows("SELECT state FROM recipients") == [("delivered",)]
        assert [e["event"] for e in await b.events()] == ["received", "ambiguous", "delivered"]
        # The app sends the same email again: still a repeat of what B delivered.
        again = await send(b.port, message)
        assert again.code == 250 and "not forwarded" in again.text, again.text
        await b.idle()
        assert len(other.messages) == 1
