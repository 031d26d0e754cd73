"""Health and readiness: /healthz, /readyz and `relay health`, as an orchestrator uses them."""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from relay.health import WRITE_DEADLINE
from tests.conftest import (
    DEADLINE,
    Relay,
    Upstream,
    base_config,
    deep_merge,
    eventually,
    free_port,
    http_get,
    make_message,
    relay_cli,
    send,
)

HTTP = {"http": {"listen": "127.0.0.1:0"}}


def health_cli(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return relay_cli("health", env=env, cwd=cwd)


class StoreLock:
    """Another process's write transaction holding the store, as a stuck disk or peer would."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)

    def __enter__(self) -> StoreLock:
        self._db.execute("BEGIN EXCLUSIVE")
        return self

    def __exit__(self, *exc: object) -> None:
        self._db.execute("COMMIT")
        self._db.close()


async def test_alive_and_ready_when_running(make_relay: Any) -> None:
    relay: Relay = await make_relay(**HTTP)
    live = await http_get(relay.app.http_port, "/healthz")
    assert (live.status, live.json()["status"]) == (200, "alive")
    ready = await http_get(relay.app.http_port, "/readyz")
    assert ready.status == 200
    assert ready.json() == {
        "status": "ready",
        "failing": [],
        "checks": {"shutdown": "ok", "smtp": "ok", "store": "ok"},
    }


async def test_readiness_fails_naming_the_store_while_it_cannot_commit(
    make_relay: Any, tmp_path: Path
) -> None:
    relay: Relay = await make_relay(**HTTP)
    relay.app.health.write_deadline = 0.3
    port = relay.app.http_port
    env = {"RELAY_HTTP__LISTEN": f"127.0.0.1:{port}"}
    with StoreLock(tmp_path / "relay.db"):
        ready = await http_get(port, "/readyz")
        assert ready.status == 503
        assert ready.json()["failing"] == ["store"]
        assert ready.json()["checks"]["store"] == "no write committed within 0.3s"
        # Alive all the same: a locked store is no reason to restart the relay.
        assert (await http_get(port, "/healthz")).status == 200
        result = await asyncio.to_thread(health_cli, env, tmp_path)
        assert result.returncode == 1
        assert result.stdout.splitlines() == [
            f"unhealthy: not ready: store: no write committed within 0.3s"
            f" (http://127.0.0.1:{port}/readyz)"
        ]

    relay.app.health.write_deadline = WRITE_DEADLINE

    async def ready_again() -> bool:
        return (await http_get(port, "/readyz")).status == 200

    await eventually(ready_again, what="readiness once the lock is gone")
    result = await asyncio.to_thread(health_cli, env, tmp_path)
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("healthy: ready: shutdown, smtp, store ok")


async def test_health_command_without_a_relay_says_so_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    result = await asyncio.to_thread(
        health_cli, {"RELAY_HTTP__LISTEN": f"0.0.0.0:{port}"}, tmp_path
    )
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"unhealthy: not running: no answer from http://127.0.0.1:{port}/readyz"
        " (Connection refused)"
    ]


async def test_health_command_without_a_side_port_checks_the_smtp_greeting(
    make_relay: Any, tmp_path: Path
) -> None:
    relay: Relay = await make_relay()
    env = {"RELAY_LISTEN__PORT": str(relay.port)}
    result = await asyncio.to_thread(health_cli, env, tmp_path)
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith(f"healthy: ready: smtp 127.0.0.1:{relay.port} greets with 220")
    await relay.stop()
    result = await asyncio.to_thread(health_cli, env, tmp_path)
    assert result.returncode == 1
    assert result.stdout.startswith("unhealthy: not running")


async def test_sigterm_turns_readiness_off_before_the_smtp_port_closes(
    tmp_path: Path, upstream: Upstream, relay_process: Any
) -> None:
    config = deep_merge(
        base_config(tmp_path, upstream.port),
        {
            "listen": {"port": free_port()},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "runtime": {"shutdown_grace": "50s", "drain_delay": "40s"},
        },
    )
    http_port = int(config["http"]["listen"].rsplit(":", 1)[1])
    relay = relay_process(config)
    await asyncio.to_thread(relay.start)
    assert (await http_get(http_port, "/readyz")).status == 200
    relay.proc.send_signal(signal.SIGTERM)

    async def draining() -> bool:
        return (await http_get(http_port, "/readyz")).status == 503

    await eventually(draining, what="readiness to fail after SIGTERM")
    ready = await http_get(http_port, "/readyz")
    assert ready.json()["failing"] == ["shutdown"]
    assert (await http_get(http_port, "/healthz")).status == 503
    # Readiness is off but the port is still open: mail that arrives now is still taken.
    reply = await send(relay.port, make_message("during the drain"))
    assert reply.code == 250, reply.text
    await upstream.wait_for(1)
    # A second signal cuts the drain delay short: the relay is gone long before its 40s.
    relay.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(relay.proc.wait, DEADLINE) == 0


async def test_probes_answer_503_until_open_work_has_finished(make_relay: Any) -> None:
    relay: Relay = await make_relay(**HTTP)
    port = relay.app.http_port
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    for command in (b"EHLO client.test", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.org>"):
        writer.write(command + b"\r\n")
    writer.write(b"DATA\r\n")
    while not (await reader.readline()).startswith(b"354"):
        pass
    writer.write(make_message("half sent").split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    await writer.drain()
    stopping = asyncio.create_task(relay.app.stop(grace=DEADLINE))

    async def draining() -> bool:
        return (await http_get(port, "/readyz")).status == 503

    # A session is still in DATA, so the relay is stopping but not stopped: probes say so.
    await eventually(draining, what="readiness to fail once stopping began")
    assert (await http_get(port, "/healthz")).json()["status"] == "not alive"
    assert not stopping.done()
    writer.write(b"the rest of the body\r\n.\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"250")
    await stopping
    writer.close()
    await writer.wait_closed()


def test_side_port_already_taken_exits_1_naming_http_listen(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"RELAY_LISTEN__PORT": str(free_port()), "RELAY_HTTP__LISTEN": f"127.0.0.1:{port}"}
        result = relay_cli("serve", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"dedup-relay: error: cannot listen on 127.0.0.1:{port} (http.listen):"
        " Address already in use"
    ]
