"""When the store fails: the client hears 451 and keeps its message; nothing half-done is kept.

A 250 is a promise that the message is on disk. These tests make SQLite fail at
chosen statements (tests/faults.py) and, as root, fill a real disk.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay.clock import ManualClock
from tests.conftest import (
    Relay,
    Upstream,
    base_config,
    deep_merge,
    eventually,
    free_port,
    make_message,
    send,
    settled,
)
from tests.faults import DISK_FULL, Faults, small_disk


async def quiet_relay(make_relay, faults: Faults) -> Relay:
    """A relay whose dispatcher and housekeeping wait on a clock that does not move, so the
    next store batch is the test's own submission."""
    clock = ManualClock()
    relay = await make_relay(clock=clock, store_factory=faults.store_factory())
    await settled(clock, "delivery to settle")
    return relay


def carrying(marker: bytes) -> object:
    """Only the body insert of the message whose bytes contain `marker`."""
    return lambda params: isinstance(params, dict) and marker in bytes(params.get("data", b""))


async def test_a_failed_commit_answers_451_and_the_retry_is_forwarded_once(
    make_relay, upstream: Upstream
) -> None:
    faults = Faults()
    relay = await quiet_relay(make_relay, faults)
    message = make_message(extra={"Idempotency-Key": "commit-fails"})
    faults.fail("COMMIT", "disk I/O error")
    reply = await send(relay.port, message)
    assert (reply.code, reply.text.split(" ", 1)[0]) == (451, "4.3.0")
    assert faults.fired == ["COMMIT"]
    assert await relay.rows("SELECT count(*) FROM messages") == [(0,)]
    assert await relay.rows("SELECT count(*) FROM claims") == [(0,)]
    assert await relay.events() == []
    retry = await send(relay.port, message)
    assert retry.code == 250 and "queued as" in retry.text
    await upstream.wait_for(1)
    await relay.idle()
    assert len(upstream.messages) == 1


async def test_a_batch_that_cannot_start_answers_451(make_relay, upstream: Upstream) -> None:
    faults = Faults()
    relay = await quiet_relay(make_relay, faults)
    faults.fail("BEGIN", "database is locked")
    assert (await send(relay.port, make_message())).code == 451
    assert (await send(relay.port, make_message())).code == 250
    await upstream.wait_for(1)


async def test_a_job_failing_midway_leaves_no_claim_so_the_retry_is_not_called_a_repeat(
    make_relay, upstream: Upstream
) -> None:
    faults = Faults()
    relay = await make_relay(store_factory=faults.store_factory())
    poisoned = make_message("poison", extra={"Idempotency-Key": "half-done"})
    faults.fail("INSERT INTO bodies", DISK_FULL, when=carrying(b"Subject: poison"))
    reply = await send(relay.port, poisoned)
    assert reply.code == 451
    assert faults.fired == ["INSERT INTO bodies"]
    # The claim and the message row were written before the body failed; both rolled back.
    assert await relay.rows("SELECT count(*) FROM claims") == [(0,)]
    assert await relay.rows("SELECT count(*) FROM messages") == [(0,)]
    assert await relay.events() == []
    retry = await send(relay.port, poisoned)
    assert "queued as" in retry.text
    await upstream.wait_for(1)
    await relay.idle()
    assert len(upstream.messages) == 1


async def test_a_failed_job_does_not_spoil_the_messages_committed_with_it(
    make_relay, upstream: Upstream
) -> None:
    faults = Faults()
    relay = await make_relay(store_factory=faults.store_factory())
    # Twice: a batch that holds it runs again, a savepoint per job, after the first failure.
    faults.fail("INSERT INTO bodies", DISK_FULL, times=2, when=carrying(b"Subject: poison"))
    messages = [make_message(f"good {n}") for n in range(8)] + [make_message("poison")]
    replies = await asyncio.gather(*(send(relay.port, m) for m in messages))
    assert [r.code for r in replies] == [250] * 8 + [451]
    await upstream.wait_for(8)
    await relay.idle()
    subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in upstream.messages)
    assert subjects == [f"good {n}".encode() for n in range(8)]


async def test_a_refused_key_is_still_refused_when_its_audit_event_cannot_be_written(
    make_relay, upstream: Upstream
) -> None:
    faults = Faults()
    relay = await quiet_relay(make_relay, faults)
    faults.fail("COMMIT")
    raw = b"Idempotency-Key: \r\n" + make_message()
    reply = await send(relay.port, raw)
    assert reply.code == 550 and "is empty" in reply.text
    assert upstream.messages == []


async def test_a_failed_lease_is_tried_again_at_the_next_poll(
    make_relay, upstream: Upstream
) -> None:
    faults = Faults()
    clock = ManualClock()
    relay = await make_relay(clock=clock, store_factory=faults.store_factory())
    await settled(clock, "delivery to settle")
    faults.fail("UPDATE messages SET state = 'sending'", "database is locked")
    assert (await send(relay.port, make_message())).code == 250
    await eventually(lambda: faults.fired, what="the lease to fail")
    await settled(clock, "the dispatcher to wait for the next poll")
    assert upstream.messages == []
    clock.advance(1.0)
    await upstream.wait_for(1)
    await relay.idle()


# --- a real full disk ----------------------------------------------------------


async def test_a_full_disk_answers_451_never_250_and_mail_flows_again_when_space_returns(
    tmp_path: Path, upstream: Upstream, relay_process
) -> None:
    # Workers wait at RCPT meanwhile, so no delivery outcome has to be written to the full
    # disk (what happens then is a separate problem: issue 14).
    upstream.script.stall = "rcpt"
    with small_disk(tmp_path / "disk", "8m") as disk:
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * 6 * 1024 * 1024)
        config = deep_merge(
            base_config(tmp_path, upstream.port),
            {
                "listen": {"port": free_port()},
                "store": {"path": str(disk / "relay.db")},
                "upstream": {"timeout": "60s"},
            },
        )
        relay = relay_process(config)
        await asyncio.to_thread(relay.start)
        accepted: list[str] = []
        refused = None
        for n in range(200):
            message_id = f"<full-{n}@example.com>"
            body = f"order {n}\n" + "x" * 60_000 + "\n"
            reply = await send(relay.port, make_message(f"n{n}", body, message_id=message_id))
            if reply.code != 250:
                refused = reply
                break
            accepted.append(message_id)
        assert refused is not None, "the disk never filled"
        assert (refused.code, refused.text.split(" ", 1)[0]) == (451, "4.3.0")
        assert accepted, "the disk was full before the first message"
        assert relay.proc is not None and relay.proc.poll() is None
        ballast.unlink()
        last = await send(relay.port, make_message("after", message_id="<after@example.com>"))
        assert last.code == 250, last
        accepted.append("<after@example.com>")
        upstream.script.go_on()
        await upstream.wait_for(len(accepted))
        assert await asyncio.to_thread(relay.terminate) == 0
    delivered = [
        line.split(b":", 1)[1].strip().decode()
        for m in upstream.messages
        for line in m.data.split(b"\r\n\r\n")[0].split(b"\r\n")
        if line.lower().startswith(b"message-id:")
    ]
    assert sorted(delivered) == sorted(accepted)
