"""Several upstreams: failover, routes, connection caps, provider rate limits, throttling.

Upstreams are aiosmtpd servers in this process and smtp-sink processes, each on its own
loopback port. Back-off periods and rates run on a clock the test moves (`ManualClock`), so
a minute's back-off or 25 seconds of paced sending take no real time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.clock import ManualClock
from tests import mta
from tests.conftest import (
    DEADLINE,
    Certificates,
    Relay,
    RelayFactory,
    Upstream,
    eventually,
    make_message,
    primary_and_backup,
    running,
    secure_config,
    send,
    send_authenticated,
    transact,
)
from tests.mta import SmtpSink

sink_factory = mta.sink_factory

RCPT = ("alice@example.org",)
SinkFactory = Callable[..., SmtpSink]


def url(port: int) -> str:
    return f"smtp://127.0.0.1:{port}"


async def start_sink(factory: SinkFactory, **options: Any) -> SmtpSink:
    return await asyncio.to_thread(factory, **options)


async def events_of(relay: Relay, queue_id: str) -> list[dict[str, Any]]:
    return [e for e in await relay.events() if e["queue_id"] == queue_id]


def queue_id(reply: Any) -> str:
    assert reply.code == 250, reply
    return str(reply.text.split("queued as ")[1].split()[0])


# --- failover ------------------------------------------------------------------------------


async def test_failover_to_the_backup_while_the_primary_is_down_and_back_when_it_returns(
    make_relay: RelayFactory, sink_factory: SinkFactory
) -> None:
    primary = Upstream()
    await primary.start()
    await primary.stop()  # its port now refuses connections
    backup = await start_sink(sink_factory)
    clock = ManualClock()
    relay = await make_relay(
        clock=clock,
        delivery={"retry_initial": "60s", "retry_max": "10m"},
        upstreams=[
            {"name": "primary", "url": url(primary.port)},
            {"name": "backup", "url": url(backup.port)},
        ],
        routes=[{"upstreams": ["primary", "backup"]}],
    )
    first = queue_id(await send(relay.port, make_message("first")))
    await asyncio.to_thread(backup.wait_for, 1)
    await relay.idle()
    events = await events_of(relay, first)
    assert [e["event"] for e in events] == ["received", "failover", "delivered"]
    _, failover, delivered = events
    assert (failover["upstream"], failover["detail"]) == (
        "primary",
        "nothing was sent to primary; trying backup",
    )
    assert "refused" in failover["reply"].lower() or "connect" in failover["reply"].lower()
    assert delivered["upstream"] == "backup"
    # Failing over is part of the same attempt: it does not count against the message.
    assert await relay.rows("SELECT attempts FROM messages WHERE queue_id = ?", first) == [(1,)]

    # Marked down: the next message goes straight to the backup, without a connection attempt.
    second = queue_id(await send(relay.port, make_message("second")))
    await asyncio.to_thread(backup.wait_for, 2)
    await relay.idle()
    events = await events_of(relay, second)
    assert [e["event"] for e in events] == ["received", "delivered"]
    assert events[1]["upstream"] == "backup"
    assert "primary down" in events[1]["detail"]

    # Back, but still inside its back-off (delivery.retry_initial): not tried yet.
    await primary.start(primary.port)
    await send(relay.port, make_message("third"))
    await asyncio.to_thread(backup.wait_for, 3)
    assert primary.connections == 0

    # Once the back-off has passed, the primary gets mail again.
    clock.advance(61)
    fourth = queue_id(await send(relay.port, make_message("fourth")))
    [received] = await primary.wait_for(1)
    assert "fourth" in received.data.decode()
    await relay.idle()
    assert (await events_of(relay, fourth))[-1]["upstream"] == "primary"
    assert backup.count() == 3
    await primary.stop()


async def test_a_421_before_the_payload_fails_over_and_the_message_is_sent_once(
    make_relay: RelayFactory, upstream: Upstream, sink_factory: SinkFactory
) -> None:
    closing = await start_sink(sink_factory, close_421=["MAIL"])
    relay = await primary_and_backup(make_relay, closing.port, upstream.port)
    await send(relay.port, make_message())
    await upstream.wait_for(1)
    await relay.idle()
    [failover] = await relay.events("failover")
    assert (failover["upstream"], failover["code"]) == ("primary", 421)
    assert closing.count() == 0
    assert len(upstream.messages) == 1


@pytest.mark.parametrize("fault", ["greeting", "ehlo", "tls"])
async def test_a_primary_failing_before_mail_fails_over_without_counting_an_attempt(
    make_relay: RelayFactory,
    upstream: Upstream,
    sink_factory: SinkFactory,
    certificates: Certificates,
    fault: str,
) -> None:
    if fault == "tls":
        # A certificate from a CA the relay was not given: the handshake fails.
        refusing = Upstream(tls_context=certificates.server_context(), implicit_tls=True)
        await refusing.start()
        primary = f"smtps://127.0.0.1:{refusing.port}"
    else:
        commands = ["CONNECT"] if fault == "greeting" else mta.FAULT_STAGES["helo"]
        primary = url((await start_sink(sink_factory, hardfail=commands)).port)
    try:
        relay = await make_relay(
            upstreams=[
                {"name": "primary", "url": primary},
                {"name": "backup", "url": url(upstream.port)},
            ],
            routes=[{"upstreams": ["primary", "backup"]}],
        )
        first = queue_id(await send(relay.port, make_message()))
        await upstream.wait_for(1)
        await relay.idle()
        events = await events_of(relay, first)
        assert [e["event"] for e in events] == ["received", "failover", "delivered"]
        assert (events[1]["upstream"], events[2]["upstream"]) == ("primary", "backup")
        assert await relay.rows("SELECT attempts FROM messages WHERE queue_id = ?", first) == [(1,)]
    finally:
        if fault == "tls":
            await refusing.stop()


async def two_upstreams(make_relay: RelayFactory, primary: Upstream, **overrides: Any) -> Relay:
    backup = overrides.pop("backup_port")
    return await primary_and_backup(make_relay, primary.port, backup, **overrides)


async def test_a_5xx_from_the_primary_is_final_and_never_tried_on_the_backup(
    make_relay: RelayFactory, upstream: Upstream
) -> None:
    upstream.script.rcpt = {"alice@example.org": "550 5.1.1 no such user"}
    async with running(Upstream()) as backup:
        relay = await two_upstreams(make_relay, upstream, backup_port=backup.port)
        await send(relay.port, make_message())
        await relay.idle()
        [failed] = await relay.events("failed")
        assert (failed["upstream"], failed["code"]) == ("primary", 550)
        assert await relay.events("failover") == []
        assert backup.connections == 0


async def test_a_4xx_about_the_message_is_retried_on_the_same_upstream(
    make_relay: RelayFactory, upstream: Upstream
) -> None:
    upstream.script.data = ["452 4.3.1 insufficient system storage"]
    async with running(Upstream()) as backup:
        relay = await two_upstreams(make_relay, upstream, backup_port=backup.port)
        await send(relay.port, make_message())
        await upstream.wait_for(1)
        await relay.idle()
        assert [e["event"] for e in await relay.events()] == ["received", "deferred", "delivered"]
        assert backup.connections == 0


async def test_a_reply_lost_after_the_payload_stays_ambiguous_and_never_goes_to_the_backup(
    make_relay: RelayFactory, upstream: Upstream
) -> None:
    upstream.script.drop_after_data = 1
    async with running(Upstream()) as backup:
        relay = await two_upstreams(
            make_relay, upstream, backup_port=backup.port, delivery={"on_ambiguous": "hold"}
        )
        await send(relay.port, make_message())
        await eventually(lambda: relay.events("ambiguous"), what="an ambiguous outcome")
        await relay.idle()
        assert await relay.rows("SELECT state FROM recipients") == [("held",)]
        assert await relay.events("failover") == []
        assert backup.connections == 0
        assert len(upstream.dropped) == 1


# --- routes ----------------------------------------------------------------------------------


async def test_routes_choose_the_upstream_by_sender_domain_header_and_rule(
    make_relay: RelayFactory, upstream: Upstream, sink_factory: SinkFactory
) -> None:
    brand_b = await start_sink(sink_factory)
    async with running(Upstream()) as transactional:
        relay = await make_relay(
            rules=[{"name": "invoices", "match": {"header": {"Subject": "*invoice*"}}}],
            upstreams=[
                {"name": "primary", "url": url(upstream.port)},
                {"name": "brand-b", "url": url(brand_b.port)},
                {"name": "transactional", "url": url(transactional.port)},
            ],
            routes=[
                {"match": {"sender": "*@brand-b.example"}, "upstreams": ["brand-b"]},
                {"match": {"header": {"X-Mail-Kind": "otp"}}, "upstreams": ["transactional"]},
                {"match": {"rule": "invoices"}, "upstreams": ["transactional"]},
                {"upstreams": ["primary"]},
            ],
        )
        sent = {
            "brand-b": await send(
                relay.port, make_message("hello from b"), sender="news@brand-b.example"
            ),
            "otp": await send(relay.port, make_message("code", extra={"X-Mail-Kind": "otp"})),
            "invoice": await send(relay.port, make_message("Your invoice 42")),
            "other": await send(relay.port, make_message("a newsletter")),
        }
        await relay.idle()
        chosen = {
            name: (await events_of(relay, queue_id(reply)))[-1]["upstream"]
            for name, reply in sent.items()
        }
        assert chosen == {
            "brand-b": "brand-b",
            "otp": "transactional",
            "invoice": "transactional",
            "other": "primary",
        }
        assert [m.mail_from for m in brand_b.messages()] == ["news@brand-b.example"]
        assert len(transactional.messages) == 2
        assert len(upstream.messages) == 1


async def test_routes_choose_the_upstream_by_authenticated_user(
    make_relay: RelayFactory, upstream: Upstream, certificates: Certificates, tmp_path: Path
) -> None:
    async with running(Upstream()) as billing:
        relay = await make_relay(
            **secure_config(tmp_path, certificates),
            upstreams=[
                {"name": "primary", "url": url(upstream.port)},
                {"name": "billing", "url": url(billing.port)},
            ],
            routes=[{"match": {"user": "bob"}, "upstreams": ["billing"]}],
        )
        await send_authenticated(relay.port, make_message("from bob"), certificates, user="bob")
        await send_authenticated(relay.port, make_message("from alice"), certificates)
        [bobs] = await billing.wait_for(1)
        assert "from bob" in bobs.data.decode()
        [alices] = await upstream.wait_for(1)
        assert "from alice" in alices.data.decode()


async def test_mail_matching_no_route_goes_to_the_first_upstream_alone(
    make_relay: RelayFactory, upstream: Upstream
) -> None:
    down = Upstream()
    await down.start()
    await down.stop()
    relay = await make_relay(
        upstreams=[
            {"name": "first", "url": url(down.port)},
            {"name": "second", "url": url(upstream.port)},
        ],
        routes=[{"match": {"sender": "*@elsewhere.example"}, "upstreams": ["second"]}],
    )
    await send(relay.port, make_message())
    deferred = (await relay.wait_for_events("deferred"))[0]
    assert deferred["upstream"] == "first"
    assert await relay.events("failover") == []
    assert upstream.connections == 0


# --- connections, throttling, rate ------------------------------------------------------------


async def test_max_connections_caps_the_connections_to_one_upstream(
    make_relay: RelayFactory, upstream: Upstream
) -> None:
    upstream.script.data_delay = 0.05  # transactions overlap, so every worker wants one
    relay = await make_relay(
        delivery={"concurrency": 8},
        upstreams=[{"name": "slow", "url": url(upstream.port), "max_connections": 2}],
    )
    await asyncio.gather(*(send(relay.port, make_message(f"n{n}")) for n in range(16)))
    await upstream.wait_for(16)
    await relay.idle()
    assert upstream.connections == 2


async def test_a_throttling_reply_pauses_that_upstream_instead_of_retrying_hard(
    make_relay: RelayFactory, upstream: Upstream
) -> None:
    upstream.script.data = ["451 4.7.1 Rate limit exceeded, slow down"]
    clock = ManualClock()
    relay = await make_relay(
        clock=clock,
        delivery={"concurrency": 1, "retry_initial": "60s", "retry_max": "10m"},
        upstreams=[{"name": "provider", "url": url(upstream.port)}],
    )
    await send(relay.port, make_message("throttled"))
    deferred = (await relay.wait_for_events("deferred"))[0]
    assert "Rate limit" in deferred["reply"]
    pacer = relay.app.delivery.upstreams.pools["provider"].pacer
    await send(relay.port, make_message("next"))
    # The next message waits out the cool-down on the relay's clock; nothing is sent meanwhile.
    await eventually(lambda: pacer.sleeping == 1, what="the next message to wait")
    assert upstream.messages == []
    clock.advance(1.0)
    [delivered] = await upstream.wait_for(1)
    assert "next" in delivered.data.decode()


class Timed(Upstream):
    """Notes the relay's clock at each MAIL FROM: when each transaction started."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self.clock = clock
        self.started: list[float] = []

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.started.append(self.clock.time())
        return await super().handle_MAIL(server, session, envelope, address, options)


async def run_clock(clock: ManualClock, relays: list[Relay], done: Callable[[], bool]) -> None:
    """Move the clock to the next wake-up whenever every busy worker waits for time to pass.

    The relay then sends exactly as fast as its pacing allows and no faster: time never jumps
    while a worker is still connecting, sending or recording.
    """
    workers = sum(r.app.config.delivery.concurrency for r in relays)
    deadline = time.monotonic() + 120
    while not done():
        assert time.monotonic() < deadline, "the paced delivery did not finish"
        busy = sum(r.app.delivery.in_flight for r in relays)
        waiting = sum(
            pool.pacer.sleeping for r in relays for pool in r.app.delivery.upstreams.pools.values()
        )
        rows = await relays[0].rows("SELECT count(*) FROM messages WHERE state = 'queued'")
        wake = clock.next_wakeup
        if busy and waiting == busy and (busy == workers or rows[0][0] == 0) and wake:
            clock.advance(max(wake - clock.time(), 0.0))
        await asyncio.sleep(0.001)


@pytest.mark.parametrize(
    ("processes", "workers", "messages"),
    [(1, 8, 500), (2, 4, 200)],
    ids=["one-relay-8-workers", "two-relays-one-store"],
)
async def test_a_rate_of_20_per_second_is_never_exceeded_and_holds_within_10_percent(
    make_relay: RelayFactory, tmp_path: Path, processes: int, workers: int, messages: int
) -> None:
    clock = ManualClock()
    provider = Timed(clock)
    async with running(provider):
        # Two relays on one store share its schedule, as replicas or processes would.
        relays = [
            await make_relay(
                clock=clock,
                store={"path": str(tmp_path / "shared.db")},
                runtime={"instance": f"replica-{n}"},
                delivery={"concurrency": workers},
                upstreams=[{"name": "provider", "url": url(provider.port), "rate": "20/s"}],
            )
            for n in range(processes)
        ]

        async def submit(session: int) -> None:
            """One app connection sending its share of the messages, one after the other."""
            client = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=relays[session % processes].port, timeout=DEADLINE
            )
            async with client:
                for n in range(session, messages, 20):
                    reply = await transact(client, make_message(f"n{n}"), "shop@example.com", RCPT)
                    assert reply.code == 250, reply

        await asyncio.gather(*(submit(session) for session in range(20)))
        await run_clock(clock, relays, lambda: len(provider.messages) >= messages)
        for relay in relays:
            await relay.idle()
    started = sorted(provider.started)
    assert len(started) == messages
    # Never more than 20 transactions in any one second...
    # (the tolerance is float rounding of epoch seconds, far below a millisecond)
    crowded = [(a, b) for a, b in zip(started, started[20:], strict=False) if b - a < 1.0 - 1e-4]
    assert crowded == []
    # ...and the relay keeps up the rate it is allowed: 20/s within 10%.
    rate = (messages - 1) / (started[-1] - started[0])
    assert 18.0 <= rate <= 22.0, rate
