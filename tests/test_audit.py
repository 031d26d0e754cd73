"""The audit trail: a JSON line per committed event, no bodies kept, bounded retention."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import (
    Upstream,
    eventually,
    free_port,
    make_message,
    process_config,
    send,
)


async def test_stream_has_one_json_line_per_stored_event(
    make_relay, upstream: Upstream, tmp_path: Path
) -> None:
    stream = tmp_path / "audit.jsonl"
    relay = await make_relay(audit={"output": str(stream)})
    upstream.script.data = ["451 4.3.0 later"]
    message = make_message(extra={"Idempotency-Key": "stream-1"})
    await send(relay.port, message)
    await send(relay.port, message)
    await upstream.wait_for(1)
    await relay.idle()
    stored = await relay.events()
    lines = [json.loads(line) for line in stream.read_text().splitlines()]
    events = [line["event"] for line in lines]
    assert events == [e["event"] for e in stored]
    # The repeat's drop and the first attempt's deferral race; only causal order is fixed.
    assert sorted(events) == sorted(["received", "duplicate", "deferred", "delivered"])
    assert events[0] == "received"
    assert events.index("deferred") < events.index("delivered")
    duplicate = lines[events.index("duplicate")]
    assert duplicate["original"] == lines[0]["queue_id"]
    assert duplicate["action"] == "drop"
    assert duplicate["key"] == "stream-1"
    assert duplicate["ts"].endswith("Z")
    assert lines[events.index("delivered")]["upstream_id"] == "UP0001"
    assert all("Thank you" not in json.dumps(line) for line in lines)


async def test_stdout_of_the_process_carries_the_stream(tmp_path: Path, upstream: Upstream) -> None:
    config = process_config(tmp_path, upstream, audit={"output": "stdout"})
    config["listen"]["port"] = free_port()
    path = tmp_path / "stdout.yaml"
    path.write_text(yaml.safe_dump(config))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "serve",
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:

        async def listening() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", config["listen"]["port"])
            except OSError:
                return False
            writer.close()
            return True

        await eventually(listening, what="the relay to listen")
        await send(config["listen"]["port"], make_message())
        assert process.stdout is not None
        first = json.loads(await asyncio.wait_for(process.stdout.readline(), 20))
        second = json.loads(await asyncio.wait_for(process.stdout.readline(), 20))
        assert (first["event"], second["event"]) == ("received", "delivered")
        assert first["queue_id"] == second["queue_id"]
    finally:
        process.terminate()
        await process.wait()


async def test_bodies_are_deleted_after_delivery(make_relay, upstream: Upstream) -> None:
    relay = await make_relay()
    await send(relay.port, make_message())
    await upstream.wait_for(1)
    await relay.idle()
    assert await relay.rows("SELECT count(*) FROM bodies") == [(0,)]
    assert await relay.rows("SELECT state FROM messages") == [("done",)]


async def test_kept_bodies_outlive_delivery_until_their_retention(
    make_relay, upstream: Upstream
) -> None:
    relay = await make_relay(store={"keep_bodies": "1s"})
    await send(relay.port, make_message())
    await upstream.wait_for(1)
    await relay.idle()
    assert await relay.rows("SELECT count(*) FROM bodies") == [(1,)]
    [(finished,)] = await relay.rows("SELECT finished_at FROM messages")
    await eventually(lambda: time.time() > finished + 1, what="the body retention to pass")
    purged = await relay.store.purge(time.time(), 86400)
    assert purged["bodies"] == 1
    assert await relay.rows("SELECT count(*) FROM bodies") == [(0,)]


async def test_audit_retention_purges_old_events_and_finished_messages(
    make_relay, upstream: Upstream
) -> None:
    relay = await make_relay()
    upstream.script.data = ["451 4.3.0 later"] * 1000
    await send(relay.port, make_message("finished"))
    await eventually(lambda: relay.events("deferred"), what="a deferral")
    upstream.script.data = []
    await relay.idle()
    upstream.script.rcpt = {"nobody@example.org": "451 4.2.0 later"}
    await send(relay.port, make_message("still pending"), rcpts=("nobody@example.org",))
    await eventually(
        lambda: relay.rows(
            "SELECT 1 FROM events WHERE event = 'deferred' AND rcpts = ?", "nobody@example.org"
        ),
        what="the second message deferred",
    )
    newest = max(e["ts"] for e in await relay.events())
    purged = await relay.store.purge(newest + 1, 0.5)
    assert purged["messages"] == 1
    assert purged["events"] >= 3
    states = await relay.rows("SELECT state FROM messages")
    assert states and all(state != "done" for (state,) in states)
