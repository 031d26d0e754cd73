"""Prometheus metrics on /metrics: valid for promtool, moving with traffic, equal to stats."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiosmtplib
from prometheus_client.parser import text_string_to_metric_families

from relay.audit import EVENTS
from tests.conftest import (
    ROOT,
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
from tests.mta import require_program

HTTP = {"http": {"listen": "127.0.0.1:0"}}


class Samples:
    """One scrape, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.values: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[sample.name].append((dict(sample.labels), sample.value))

    def sum(self, name: str, **labels: str) -> float:
        return sum(
            value
            for found, value in self.values[name]
            if all(found.get(k) == v for k, v in labels.items())
        )

    def by(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for found, value in self.values[name]:
            out[found[label]] += value
        return {k: v for k, v in out.items() if v}


async def scrape(port: int) -> Samples:
    reply = await http_get(port, "/metrics")
    assert reply.status == 200, reply.text
    return Samples(reply.text)


def stats(store: Path) -> dict[str, Any]:
    result = relay_cli("stats", "--json", env={"RELAY_STORE__PATH": str(store)}, cwd=store.parent)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


async def mixed_traffic(relay: Relay, upstream: Upstream) -> None:
    """New mail, repeats, a key conflict, a refused key and a permanent failure."""
    upstream.script.rcpt["nobody@example.org"] = "550 5.1.1 no such user"
    for n in range(4):
        message = make_message(f"receipt {n}", message_id=f"<m-{n}@example.com>")
        assert (await send(relay.port, message)).code == 250
    for n in range(2):
        message = make_message(f"receipt {n}", message_id=f"<m-{n}@example.com>")
        assert "duplicate" in (await send(relay.port, message)).text
    pair = ("alice@example.org", "bob@example.org")
    assert (await send(relay.port, make_message("for two"), rcpts=pair)).code == 250
    keyed = {"Idempotency-Key": "order-1"}
    assert (await send(relay.port, make_message("order", extra=keyed))).code == 250
    assert (await send(relay.port, make_message("other", extra=keyed))).code == 554
    assert (await send(relay.port, make_message("bad", extra={"Idempotency-Key": ""}))).code == 550
    lost = make_message("lost", to="nobody@example.org")
    assert (await send(relay.port, lost, rcpts=("nobody@example.org",))).code == 250
    await relay.idle()


async def test_metrics_output_passes_promtool_check_metrics(
    make_relay: Any, upstream: Upstream
) -> None:
    promtool = require_program("promtool", "prometheus")
    relay: Relay = await make_relay(**HTTP)
    await mixed_traffic(relay, upstream)
    samples = await scrape(relay.app.http_port)
    assert samples.sum("dedup_relay_events_total", event="conflict") == 1  # traffic was counted
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=samples.text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


async def test_values_move_as_mail_queues_and_then_flows(
    make_relay: Any, upstream: Upstream
) -> None:
    relay: Relay = await make_relay(**HTTP)
    relay.app.metrics.queue_cache = 0.0
    port = relay.app.http_port
    before = await scrape(port)
    assert before.sum("dedup_relay_messages_received_total") == 0
    assert before.sum("dedup_relay_queue_messages") == 0
    await upstream.stop()  # refused connections: every attempt is deferred
    for n in range(3):
        message = make_message(f"queued {n}", message_id=f"<q-{n}@example.com>")
        assert (await send(relay.port, message)).code == 250
    repeat = make_message("queued 0", message_id="<q-0@example.com>")
    assert "duplicate" in (await send(relay.port, repeat)).text

    async def deferred() -> bool:
        s = await scrape(port)
        return s.sum("dedup_relay_recipients_total", outcome="deferred") >= 3

    await eventually(deferred, what="deferrals to be counted")
    during = await scrape(port)
    assert during.sum("dedup_relay_queue_messages") == 3
    assert during.sum("dedup_relay_queue_oldest_age_seconds") > 0
    assert during.sum("dedup_relay_upstream_replies_total", **{"class": "none"}) >= 3
    assert during.sum("dedup_relay_messages_received_total", strategy="message-id") == 3
    assert during.sum("dedup_relay_duplicates_total", strategy="message-id", action="drop") == 1
    assert during.sum("dedup_relay_recipients_total", outcome="delivered") == 0
    assert during.sum("dedup_relay_store_batch_jobs_count") > 0

    await upstream.start()
    await upstream.wait_for(3)

    async def drained() -> bool:
        s = await scrape(port)
        return s.sum("dedup_relay_queue_messages") == 0

    await eventually(drained, what="the queue gauges to fall back to 0")
    after = await scrape(port)
    assert after.sum("dedup_relay_recipients_total", outcome="delivered") == 3
    assert after.sum("dedup_relay_upstream_replies_total", **{"class": "2xx"}) == 3
    assert after.sum("dedup_relay_accept_to_delivered_seconds_count") == 3
    assert after.sum("dedup_relay_accept_to_delivered_seconds_sum") > 0
    assert after.sum("dedup_relay_delivery_attempt_seconds_count") >= 6  # 3 failed, 3 good
    assert after.sum("dedup_relay_queue_oldest_age_seconds") == 0


async def test_counters_agree_with_relay_stats_on_the_same_store(
    make_relay: Any, upstream: Upstream, tmp_path: Path
) -> None:
    relay: Relay = await make_relay(**HTTP)
    relay.app.metrics.queue_cache = 0.0
    await mixed_traffic(relay, upstream)
    samples = await scrape(relay.app.http_port)
    report = stats(tmp_path / "relay.db")
    assert samples.by("dedup_relay_events_total", "event") == report["events"]
    assert set(report["events"]) >= {"received", "duplicate", "conflict", "rejected", "failed"}
    assert samples.by("dedup_relay_duplicates_total", "action") == report["duplicates_by_action"]
    assert (
        samples.by("dedup_relay_duplicates_total", "strategy") == report["duplicates_by_strategy"]
    )
    assert (
        samples.sum("dedup_relay_accept_to_delivered_seconds_count") == (report["latency"]["count"])
    )
    queue = {k: v for k, v in report["queue"].items() if v}
    assert samples.by("dedup_relay_queue_messages", "state") == queue
    outcomes = await relay.rows("SELECT state, count(*) FROM recipients GROUP BY state")
    assert samples.by("dedup_relay_recipients_total", "outcome") == dict(outcomes)
    assert set(samples.by("dedup_relay_events_total", "event")) <= set(EVENTS)


async def test_open_smtp_sessions_are_counted(make_relay: Any) -> None:
    relay: Relay = await make_relay(**HTTP)
    port = relay.app.http_port
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False)
    await client.connect()
    await client.ehlo()
    assert (await scrape(port)).sum("dedup_relay_smtp_sessions_open") == 1
    await client.quit()

    async def closed() -> bool:
        return (await scrape(port)).sum("dedup_relay_smtp_sessions_open") == 0

    await eventually(closed, what="the session gauge to drop")


async def test_alert_rules_name_only_metrics_the_relay_exports(make_relay: Any) -> None:
    relay: Relay = await make_relay(**HTTP)
    exported: set[str] = set()
    for name, kind in re.findall(
        r"^# TYPE (\S+) (\S+)$", (await scrape(relay.app.http_port)).text, re.M
    ):
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        exported.update(name + suffix for suffix in suffixes)
    rules = (ROOT / "examples" / "prometheus" / "alerts.yml").read_text()
    named = set(re.findall(r"\bdedup_relay_\w+", rules))
    assert named, "the example rules use the relay's metrics"
    assert named <= exported, named - exported


async def test_processes_sharing_a_store_export_per_process_counts_that_sum_to_the_store(
    tmp_path: Path, upstream: Upstream, relay_process: Any
) -> None:
    smtp_port = free_port()
    config = deep_merge(
        base_config(tmp_path, upstream.port), {"listen": {"port": smtp_port, "reuse_port": True}}
    )
    http_ports = [free_port(), free_port()]
    relays = [
        relay_process(config, env={"RELAY_HTTP__LISTEN": f"127.0.0.1:{http_port}"})
        for http_port in http_ports
    ]
    for n, relay in enumerate(relays):
        relay.instance = f"relay-{n + 1}"
        await asyncio.to_thread(relay.start)
    for n in range(12):
        message = make_message(f"shared {n}", message_id=f"<s-{n}@example.com>")
        assert (await send(smtp_port, message)).code == 250
    for n in range(6):
        message = make_message(f"shared {n}", message_id=f"<s-{n}@example.com>")
        assert "duplicate" in (await send(smtp_port, message)).text
    await upstream.wait_for(12)

    async def all_delivered() -> bool:
        scraped = [await scrape(p) for p in http_ports]
        return sum(s.sum("dedup_relay_events_total", event="delivered") for s in scraped) == 12

    await eventually(all_delivered, what="both processes to count 12 deliveries between them")
    scraped = [await scrape(p) for p in http_ports]
    report = stats(tmp_path / "relay.db")
    for event in ("received", "duplicate", "delivered"):
        total = sum(s.sum("dedup_relay_events_total", event=event) for s in scraped)
        assert total == report["events"][event], event
    instances = {s.values["dedup_relay_build_info"][0][0]["instance"] for s in scraped}
    assert instances == {"relay-1", "relay-2"}
    # Queue gauges are store-wide: each process reports the same figure (aggregate with max).
    assert [s.sum("dedup_relay_queue_messages") for s in scraped] == [0, 0]
    for relay in relays:
        assert await asyncio.to_thread(relay.terminate) == 0
