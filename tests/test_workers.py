"""`serve --workers N`: one parent, N relay processes on one port and one store, as one relay."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

from tests.conftest import (
    RelayProcess,
    Upstream,
    eventually,
    free_port,
    http_get,
    make_message,
    process_config,
    relay_cli,
    send,
)
from tests.test_metrics import scrape
from tests.test_restart import message_ids


def worker_pids(relay: RelayProcess) -> dict[int, int]:
    """Slot -> pid of every worker that has said it is ready (the latest one per slot)."""
    pids: dict[int, int] = {}
    for line in relay.stderr_lines:
        found = re.search(r"worker (\d+) \(pid (\d+)\) ready", line)
        if found:
            pids[int(found.group(1))] = int(found.group(2))
    return pids


def leases(tmp_path: Path) -> set[str]:
    with sqlite3.connect(tmp_path / "relay.db") as db:
        rows = db.execute("SELECT DISTINCT lease_owner FROM messages WHERE state = 'sending'")
        return {owner for (owner,) in rows}


async def test_default_is_one_worker_per_cpu_each_leasing_under_its_own_name(
    tmp_path: Path, upstream: Upstream, relay_process: Any
) -> None:
    upstream.script.data_delay = 0.5
    relay = relay_process(process_config(tmp_path, upstream))
    relay.instance = "edge"
    await asyncio.to_thread(relay.start)
    relay.drain_stderr()
    cpus = len(os.sched_getaffinity(0))
    # On one CPU the default is one process of its own, under the name as given.
    names = {f"edge.w{slot}" for slot in range(cpus)} if cpus > 1 else {"edge"}
    if cpus > 1:
        await eventually(lambda: len(worker_pids(relay)) == cpus, what=f"{cpus} workers ready")
        assert len(set(worker_pids(relay).values())) == cpus
    seen: set[str] = set()
    # Connections spread over the workers (SO_REUSEPORT); each leases what it accepted.
    for n in range(8 * cpus):
        assert (await send(relay.port, make_message(f"n {n}", message_id=f"<w{n}@x>"))).code == 250
        seen |= leases(tmp_path)

    def every_name_seen() -> bool:
        seen.update(leases(tmp_path))
        return len(seen) == cpus

    await eventually(every_name_seen, what=f"leases under {cpus} names")
    assert seen == names
    await upstream.wait_for(8 * cpus)
    assert await asyncio.to_thread(relay.terminate) == 0


async def test_kill_9_of_a_worker_starts_a_new_one_that_delivers_what_the_dead_one_took(
    tmp_path: Path, upstream: Upstream, relay_process: Any
) -> None:
    upstream.script.data_delay = 0.3
    relay = relay_process(process_config(tmp_path, upstream))
    relay.args = ["--workers", "2"]  # whatever the CPUs: this is about the parent
    await asyncio.to_thread(relay.start)
    relay.drain_stderr()
    promised = set()
    for n in range(20):
        message_id = f"<k{n}@x>"
        assert (await send(relay.port, make_message(f"k {n}", message_id=message_id))).code == 250
        promised.add(message_id)
    await eventually(lambda: bool(leases(tmp_path)), what="a delivery under way")
    owner = sorted(leases(tmp_path))[0]
    slot = int(owner.rsplit(".w", 1)[1])
    dead = worker_pids(relay)[slot]
    os.kill(dead, signal.SIGKILL)
    await eventually(
        lambda: worker_pids(relay).get(slot, dead) != dead, what=f"worker {slot} restarted"
    )
    assert relay.proc is not None and relay.proc.poll() is None
    # The relay still takes mail, and everything promised before the kill goes out.
    assert (await send(relay.port, make_message("after", message_id="<after@x>"))).code == 250
    promised.add("<after@x>")
    await eventually(
        lambda: promised <= set(message_ids(upstream)), what="every promised message upstream"
    )
    assert await asyncio.to_thread(relay.terminate) == 0
    with sqlite3.connect(tmp_path / "relay.db") as db:
        ambiguous = {
            f"<{mid}>"
            for (mid,) in db.execute("SELECT message_id FROM events WHERE event = 'ambiguous'")
        }
    # Cut mid-transaction, a message may reach the upstream twice only as a logged ambiguity.
    assert {mid for mid, count in message_ids(upstream).items() if count > 1} <= ambiguous
    assert set(message_ids(upstream)) == promised


async def test_side_port_speaks_for_every_worker(
    tmp_path: Path, upstream: Upstream, relay_process: Any
) -> None:
    http_port = free_port()
    config = process_config(tmp_path, upstream, http={"listen": f"127.0.0.1:{http_port}"})
    relay = relay_process(config)
    relay.instance = "edge"
    relay.args = ["--workers", "2"]
    await asyncio.to_thread(relay.start)
    relay.drain_stderr()
    assert (await http_get(http_port, "/readyz")).json()["checks"]["workers"] == "ok"
    for n in range(10):
        assert (await send(relay.port, make_message(f"m {n}", message_id=f"<m{n}@x>"))).code == 250
    assert "duplicate" in (await send(relay.port, make_message("m 0", message_id="<m0@x>"))).text
    await upstream.wait_for(10)

    async def counted() -> bool:
        return (await scrape(http_port)).sum("dedup_relay_events_total", event="delivered") == 10

    await eventually(counted, what="10 deliveries counted over the workers")
    samples = await scrape(http_port)
    assert samples.sum("dedup_relay_events_total", event="received") == 10
    assert samples.sum("dedup_relay_events_total", event="duplicate") == 1
    assert [labels["instance"] for labels, _ in samples.values["dedup_relay_build_info"]] == [
        "edge"
    ]
    # A dead worker makes the relay not ready until its slot serves again.
    dead = worker_pids(relay)[0]
    os.kill(dead, signal.SIGKILL)

    async def ready_again() -> bool:
        return worker_pids(relay).get(0, dead) != dead and (
            (await http_get(http_port, "/readyz")).status == 200
        )

    await eventually(ready_again, what="worker 0 back and the relay ready")
    assert await asyncio.to_thread(relay.terminate) == 0
    assert message_ids(upstream) == Counter({f"<m{n}@x>": 1 for n in range(10)})


def test_workers_flag_must_be_a_whole_number_of_at_least_one(tmp_path: Path) -> None:
    for bad in ("0", "-1", "two"):
        result = relay_cli("serve", "--workers", bad, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "--workers" in result.stderr
