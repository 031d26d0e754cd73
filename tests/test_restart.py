"""The relay as a real process: kill -9 at any moment loses nothing, SIGTERM stops cleanly."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import aiosmtplib

from tests.conftest import (
    Upstream,
    eventually,
    make_message,
    process_config,
    send,
)


def store_rows(tmp_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp_path / "relay.db") as db:
        return db.execute(sql).fetchall()


def message_ids(upstream: Upstream) -> Counter[str]:
    ids: Counter[str] = Counter()
    for message in upstream.messages:
        header = message.data.split(b"\r\n\r\n")[0]
        for line in header.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                ids[line.split(b":", 1)[1].strip().decode()] += 1
    return ids


async def send_quietly(port: int, data: bytes) -> bool:
    """True only for a 250: anything else, including a dead relay, promised nothing."""
    try:
        return (await send(port, data)).code == 250
    except (aiosmtplib.SMTPException, OSError):
        return False


async def test_kill_9_mid_traffic_then_restart_delivers_every_accepted_message(
    tmp_path: Path, upstream: Upstream, relay_process
) -> None:
    upstream.script.data_delay = 0.02
    config = process_config(tmp_path, upstream)
    relay = relay_process(config)
    await asyncio.to_thread(relay.start)
    promised: set[str] = set()
    for n in range(60):
        message_id = f"<crash-{n}@example.com>"
        if await send_quietly(relay.port, make_message(f"crash {n}", message_id=message_id)):
            promised.add(message_id)
        if n == 30:
            await upstream.wait_for(3)
            relay.kill()
    assert 30 < len(promised) < 60
    restarted = relay_process(config)
    await asyncio.to_thread(restarted.start)
    await eventually(
        lambda: promised <= set(message_ids(upstream)), what="every promised message upstream"
    )
    await asyncio.to_thread(restarted.terminate)
    twice = {mid for mid, count in message_ids(upstream).items() if count > 1}
    ambiguous = {
        f"<{row[0]}>"
        for row in store_rows(tmp_path, "SELECT message_id FROM events WHERE event = 'ambiguous'")
    }
    assert twice <= ambiguous
    assert set(message_ids(upstream)) == promised


async def test_kill_9_with_upstream_down_then_both_back_delivers_each_exactly_once(
    tmp_path: Path, upstream: Upstream, relay_process
) -> None:
    await upstream.stop()
    config = process_config(tmp_path, upstream)
    relay = relay_process(config)
    await asyncio.to_thread(relay.start)
    for n in range(10):
        assert await send_quietly(relay.port, make_message(f"queued {n}", message_id=f"<q{n}@x>"))
    relay.kill()
    await upstream.start()
    restarted = relay_process(config)
    await asyncio.to_thread(restarted.start)
    await upstream.wait_for(10)
    await asyncio.to_thread(restarted.terminate)
    assert message_ids(upstream) == Counter({f"<q{n}@x>": 1 for n in range(10)})


async def test_sigterm_lets_the_upstream_transaction_finish_and_exits(
    tmp_path: Path, upstream: Upstream, relay_process
) -> None:
    upstream.script.data_delay = 1.0
    relay = relay_process(process_config(tmp_path, upstream))
    await asyncio.to_thread(relay.start)
    assert await send_quietly(relay.port, make_message())

    def in_flight() -> bool:
        return bool(store_rows(tmp_path, "SELECT 1 FROM messages WHERE state = 'sending'"))

    await eventually(in_flight, what="a delivery under way")
    status = await asyncio.to_thread(relay.terminate)
    assert status == 0
    assert len(upstream.messages) == 1
    assert store_rows(tmp_path, "SELECT state FROM messages") == [("done",)]


async def test_sigterm_hangs_up_idle_sessions_with_421(
    tmp_path: Path, upstream: Upstream, relay_process
) -> None:
    relay = relay_process(process_config(tmp_path, upstream))
    await asyncio.to_thread(relay.start)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    await reader.readline()
    writer.write(b"HELO client\r\nMAIL FROM:<a@example.com>\r\n")
    await reader.readline()
    await reader.readline()
    status = await asyncio.to_thread(relay.terminate)
    assert (await reader.readline()).startswith(b"421 4.3.2")
    assert status == 0
    writer.close()


async def test_two_processes_sharing_a_port_and_a_store_forward_each_email_once(
    tmp_path: Path, upstream: Upstream, relay_process
) -> None:
    config = process_config(tmp_path, upstream, listen={"reuse_port": True})
    first, second = relay_process(config), relay_process(config)
    for process, name in ((first, "one"), (second, "two")):
        process.instance = name
        await asyncio.to_thread(process.start)
    assert first.port == second.port
    messages = [make_message(f"order {n}", message_id=f"<shared-{n}@x>") for n in range(30)]
    replies = await asyncio.gather(*(send(first.port, m) for m in messages * 2))
    assert all(r.code == 250 for r in replies)
    await eventually(lambda: len(upstream.messages) >= 30, what="30 messages upstream")
    statuses = await asyncio.gather(
        asyncio.to_thread(first.terminate), asyncio.to_thread(second.terminate)
    )
    assert statuses == [0, 0]
    assert message_ids(upstream) == Counter({f"<shared-{n}@x>": 1 for n in range(30)})
    assert store_rows(tmp_path, "SELECT count(*) FROM events WHERE event = 'duplicate'") == [(30,)]
