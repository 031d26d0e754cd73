"""When the store stops taking writes: outcomes are kept, nothing is sent twice, the log stays calm.

An outcome the store refuses (a full disk, a read-only file) must be kept and
written once the store takes writes again; meanwhile the message is neither
given back nor sent again, and it never comes back as "the relay stopped". A
store that fails for minutes says so once, not once per attempt.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from relay.clock import ManualClock
from tests.conftest import (
    DEADLINE,
    HttpReply,
    RelayProcess,
    Upstream,
    eventually,
    free_port,
    http_get,
    make_message,
    process_config,
    send,
    settled,
)
from tests.faults import READ_ONLY, Faults, fill, small_disk

OUTCOME = "UPDATE recipients"  # the statement that records a recipient's outcome
PACING = "INSERT INTO pacing"  # a rate-limited upstream's booking, before each transaction


async def test_an_outcome_the_store_refuses_is_written_later_and_the_message_not_sent_again(
    make_relay, upstream: Upstream
) -> None:
    faults = Faults()
    relay = await make_relay(store_factory=faults.store_factory())
    faults.fail(OUTCOME, READ_ONLY, times=2)
    assert (await send(relay.port, make_message())).code == 250
    await eventually(lambda: relay.events("delivered"), what="the outcome recorded at last")
    await relay.idle()
    assert faults.fired == [OUTCOME, OUTCOME]
    assert len(upstream.messages) == 1
    assert [e["event"] for e in await relay.events()] == ["received", "delivered"]


async def test_a_kept_outcome_holds_its_lease_past_its_timeout_and_housekeeping(
    make_relay, upstream: Upstream
) -> None:
    clock = ManualClock()
    faults = Faults()
    relay = await make_relay(
        clock=clock, store_factory=faults.store_factory(), delivery={"lease_timeout": "30s"}
    )
    await settled(clock)
    faults.fail(OUTCOME, READ_ONLY, times=10**6)
    assert (await send(relay.port, make_message())).code == 250
    await upstream.wait_for(1)
    await eventually(lambda: OUTCOME in faults.fired, what="the outcome refused")
    for _ in range(16):  # four minutes: eight lease lifetimes, four rounds of housekeeping
        clock.advance(15.0)
        await settled(clock)
    assert len(upstream.messages) == 1
    assert await relay.rows("SELECT state, lease_until > ? FROM messages", clock.time()) == [
        ("sending", 1)
    ]
    assert [e["event"] for e in await relay.events()] == ["received"]
    faults.clear()
    clock.advance(1.0)  # the next poll writes it
    await eventually(lambda: relay.events("delivered"), what="the kept outcome recorded")
    await relay.idle()
    assert [e["event"] for e in await relay.events()] == ["received", "delivered"]
    assert len(upstream.messages) == 1


# --- a real full disk, under a real relay process ------------------------------


def disk_config(tmp_path: Path, disk: Path, upstream: Upstream) -> dict[str, Any]:
    return process_config(
        tmp_path,
        upstream,
        store={"path": str(disk / "relay.db")},
        http={"listen": f"127.0.0.1:{free_port()}"},
    )


async def readyz(config: dict[str, Any]) -> HttpReply:
    return await http_get(int(config["http"]["listen"].rsplit(":", 1)[1]), "/readyz")


async def until_full(config: dict[str, Any]) -> None:
    """Until the store refuses even the smallest write: a write that failed half-way leaves
    room in its log file that smaller ones may still use."""

    async def refused() -> bool:
        return (await readyz(config)).status == 503

    await eventually(refused, what="the store to refuse writes")


def lines(relay: RelayProcess, text: str) -> list[str]:
    return [line for line in relay.stderr_lines if text in line]


async def test_a_delivered_outcome_on_a_full_disk_is_recorded_once_space_returns(
    tmp_path: Path, upstream: Upstream, relay_process
) -> None:
    upstream.script.stall = "data"  # the upstream has the payload and holds its reply
    with small_disk(tmp_path / "disk", "8m") as disk:
        config = disk_config(tmp_path, disk, upstream)
        relay = relay_process(config)
        await asyncio.to_thread(relay.start)
        relay.drain_stderr()
        assert (await send(relay.port, make_message(message_id="<full@x>"))).code == 250
        await asyncio.wait_for(upstream.script.stalled.wait(), DEADLINE)
        fill(disk / "ballast")
        await until_full(config)
        upstream.script.go_on()
        await eventually(lambda: lines(relay, "outcome not recorded"), what="the outcome kept")
        assert len(upstream.messages) == 1
        (disk / "ballast").unlink()
        await eventually(lambda: lines(relay, "recorded 1 outcome(s)"), what="it to be written")
        assert await asyncio.to_thread(relay.terminate) == 0
        with sqlite3.connect(disk / "relay.db") as db:
            events = [row[0] for row in db.execute("SELECT event FROM events ORDER BY id")]
    assert events == ["received", "delivered"]
    assert len(upstream.messages) == 1
    assert not lines(relay, "Traceback")


async def test_a_full_store_logs_one_line_when_it_fails_and_one_when_it_recovers(
    tmp_path: Path, upstream: Upstream, relay_process
) -> None:
    with small_disk(tmp_path / "disk", "8m") as disk:
        config = disk_config(tmp_path, disk, upstream)
        relay = relay_process(config)
        await asyncio.to_thread(relay.start)
        relay.drain_stderr()
        fill(disk / "ballast")
        await until_full(config)
        # stderr is read by a thread: the line may trail the 503 that followed it
        await eventually(lambda: lines(relay, "store: cannot commit"), what="the failure said")
        said = len(relay.stderr_lines)
        for _ in range(5):  # five more refused writes, and the relay's own polls meanwhile
            assert (await readyz(config)).status == 503
        assert relay.stderr_lines[said:] == []
        (disk / "ballast").unlink()

        async def ready() -> bool:  # the probe's write is the first to commit again
            return (await readyz(config)).status == 200

        await eventually(ready, what="the store to take writes again")
        await eventually(lambda: lines(relay, "commits again"), what="the recovery to be said")
        assert await asyncio.to_thread(relay.terminate) == 0
    failing = lines(relay, "store: cannot commit")
    assert failing and "database or disk is full" in failing[0]
    assert len(failing) == len(lines(relay, "commits again"))
    assert not lines(relay, "Traceback")


async def test_a_rate_limit_booking_the_store_refuses_puts_the_message_back_without_a_traceback(
    make_relay, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    faults = Faults()
    relay = await make_relay(
        store_factory=faults.store_factory(),
        upstreams=[
            {"name": "provider", "url": f"smtp://127.0.0.1:{upstream.port}", "rate": "50/s"}
        ],
    )
    faults.fail(PACING, READ_ONLY)  # the booking before MAIL FROM: nothing was sent yet
    assert (await send(relay.port, make_message())).code == 250
    await upstream.wait_for(1)
    await relay.idle()
    assert faults.fired == [PACING]
    assert len(upstream.messages) == 1
    assert [e["event"] for e in await relay.events()] == ["received", "delivered"]
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
