"""One live process per instance name, and a second `serve` that stops before it touches anything.

A relay takes back every lease under its instance name at start-up, as left by a
crash. A second `serve` on the same config used to do that before binding its
port, turning the running relay's deliveries into "ambiguous" ones and then
hanging. Now the port is bound first, the name is a lock in the store (taken over
only from a dead holder), and a start that cannot have either exits at once with
one line and status 1.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from pathlib import Path

from tests.conftest import (
    DEADLINE,
    RelayProcess,
    Upstream,
    eventually,
    make_message,
    process_config,
    relay_cli,
    send,
)


def events(tmp_path: Path) -> list[str]:
    with sqlite3.connect(tmp_path / "relay.db") as db:
        return [row[0] for row in db.execute("SELECT event FROM events ORDER BY id")]


async def one_in_flight(relay: RelayProcess, upstream: Upstream) -> None:
    """A message the running relay has sent and awaits the reply for."""
    upstream.script.stall = "data"
    await asyncio.to_thread(relay.start)
    relay.drain_stderr()
    assert (await send(relay.port, make_message(message_id="<in-flight@x>"))).code == 250
    await asyncio.wait_for(upstream.script.stalled.wait(), DEADLINE)


async def second_serve(relay: RelayProcess, tmp_path: Path) -> tuple[int, list[str]]:
    assert relay.config_path is not None
    done = await asyncio.to_thread(
        relay_cli, "serve", "--config", str(relay.config_path), cwd=tmp_path, timeout=DEADLINE
    )
    return done.returncode, done.stderr.strip().splitlines()


async def untouched(relay: RelayProcess, upstream: Upstream, tmp_path: Path) -> None:
    """The first relay's delivery finishes as if nothing had happened."""
    assert events(tmp_path) == ["received"]
    upstream.script.go_on()
    await eventually(lambda: events(tmp_path) == ["received", "delivered"], what="delivered")
    assert await asyncio.to_thread(relay.terminate) == 0
    assert len(upstream.messages) == 1


async def test_a_second_serve_on_a_busy_port_exits_at_once_and_leaves_the_first_alone(
    tmp_path: Path, upstream: Upstream, relay_process
) -> None:
    first = relay_process(process_config(tmp_path, upstream))
    await one_in_flight(first, upstream)
    status, said = await second_serve(first, tmp_path)
    assert status == 1
    assert said == [
        f"dedup-relay: error: cannot listen on 127.0.0.1:{first.port} (listen.port): Address"
        " already in use (another process has it: a relay already running on this config?)"
    ]
    await untouched(first, upstream, tmp_path)


async def test_two_reuse_port_processes_on_one_instance_name_refuse_the_second(
    tmp_path: Path, upstream: Upstream, relay_process
) -> None:
    shared = process_config(tmp_path, upstream, listen={"reuse_port": True})
    del shared["runtime"]["instance"]  # the default: host:port, the same for both
    first = relay_process(shared)
    await one_in_flight(first, upstream)
    status, said = await second_serve(first, tmp_path)
    name = f"{socket.gethostname()}:{first.port}"
    assert status == 1
    assert said == [
        f"dedup-relay: error: instance {name!r} is already running"
        f" (pid {first.proc.pid if first.proc else '?'} on {socket.gethostname()}) on this store;"
        " give each process sharing a store its own name (--instance NAME or runtime.instance)"
    ]
    await untouched(first, upstream, tmp_path)


async def test_a_relay_killed_outright_gives_its_name_to_the_next_start_at_once(
    tmp_path: Path, upstream: Upstream, relay_process
) -> None:
    settings = process_config(tmp_path, upstream)
    first = relay_process(settings)
    await one_in_flight(first, upstream)
    first.kill()
    upstream.script.go_on()
    restarted = relay_process(settings)
    await asyncio.to_thread(restarted.start)
    await eventually(lambda: "delivered" in events(tmp_path), what="the retry delivered")
    assert await asyncio.to_thread(restarted.terminate) == 0
    assert events(tmp_path) == ["received", "ambiguous", "delivered"]
