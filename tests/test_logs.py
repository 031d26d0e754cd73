"""Operational logs: JSON lines for a collector, with the context of the session or delivery."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay import logs
from tests.conftest import Upstream, base_config, deep_merge, free_port, make_message, send


async def test_json_logs_are_one_object_per_line_with_the_client(
    tmp_path: Path, upstream: Upstream, relay_process: Any
) -> None:
    config = deep_merge(
        base_config(tmp_path, upstream.port),
        {
            "listen": {"port": free_port(), "networks": ["127.0.0.1/32"]},
            "runtime": {"log_format": "json"},
            "audit": {"output": "stdout"},
        },
    )
    relay = relay_process(config)
    await asyncio.to_thread(relay.start)
    assert (await send(relay.port, make_message("audited"))).code == 250
    await upstream.wait_for(1)
    with pytest.raises(aiosmtplib.SMTPException):
        await send(relay.port, make_message("refused"), source="127.0.0.2")
    assert await asyncio.to_thread(relay.terminate) == 0
    assert relay.proc is not None and relay.proc.stderr is not None
    lines = relay.stderr_lines + [line.decode() for line in relay.proc.stderr.readlines()]
    records = [json.loads(line) for line in lines if line.strip()]
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    refused = [r for r in records if "refused connection" in r["message"]]
    assert len(refused) == 1
    assert refused[0]["client"] == "127.0.0.2"
    assert refused[0]["level"] == "warning" and refused[0]["logger"] == "relay.server"
    # The audit trail keeps its own stream: no event leaks into the log.
    assert not any(r.get("event") == "received" for r in records)


def test_context_bound_in_a_task_is_on_its_lines_and_only_there() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("relay.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)

    async def delivering(queue_id: str) -> None:
        logs.bind(queue_id=queue_id, client="127.0.0.9")
        logger.info("attempt for %s", queue_id)
        logs.bind(queue_id=None)
        logger.info("idle")

    async def main() -> None:
        await asyncio.gather(delivering("Q1"), delivering("Q2"))
        logger.info("outside")

    try:
        asyncio.run(main())
    finally:
        logger.removeHandler(handler)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    attempts = {r["message"]: r for r in records if r["message"].startswith("attempt")}
    assert attempts["attempt for Q1"]["queue_id"] == "Q1"
    assert attempts["attempt for Q2"]["queue_id"] == "Q2"
    idle = [r for r in records if r["message"] == "idle"]
    assert len(idle) == 2 and all("queue_id" not in r and r["client"] == "127.0.0.9" for r in idle)
    outside = next(r for r in records if r["message"] == "outside")
    assert "queue_id" not in outside and "client" not in outside
