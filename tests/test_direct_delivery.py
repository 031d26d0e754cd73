"""`mx:` upstreams: direct delivery to each recipient domain's own mail servers.

A real DNS server (dnsmasq, tests/nameserver.py) serves the test zone on loopback, and
receiving aiosmtpd servers listen on 127.0.0.x addresses, all on one port that the relay is
told with `mx://:PORT` (MX delivery is to port 25 in service).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from tests import mta
from tests.conftest import Certificates, Relay, RelayFactory, Upstream, make_message, send
from tests.faults import Faults
from tests.mta import SmtpSink, free_port
from tests.nameserver import Dnsmasq, Zone

sink_factory = mta.sink_factory


ZONE = Zone(
    mx=(
        # Two at the same preference, one behind them.
        ("example.test", "mx1.example.test", 10),
        ("example.test", "mx2.example.test", 10),
        ("example.test", "mx3.example.test", 20),
        # The preferred server does not answer; the next one does.
        ("dead.test", "down.dead.test", 10),
        ("dead.test", "up.dead.test", 20),
        # No server answers at all.
        ("gone.test", "down.dead.test", 10),
        ("tls.test", "mx.tls.test", 10),
    ),
    addresses=(
        ("mx1.example.test", "127.0.0.2"),
        ("mx2.example.test", "127.0.0.3"),
        ("mx3.example.test", "127.0.0.4"),
        ("amx.test", "127.0.0.5"),  # no MX: the domain is its own mail server
        ("down.dead.test", "127.0.0.6"),  # nothing listens there
        ("up.dead.test", "127.0.0.7"),
        ("mx.tls.test", "127.0.0.8"),
    ),
    null_mx=("nullmx.test",),
    servfail=("servfail.test",),
)
RECEIVERS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.7")


@pytest.fixture
def dnsmasq() -> Iterator[Dnsmasq]:
    with Dnsmasq(ZONE) as server:
        yield server


@contextlib.asynccontextmanager
async def receivers(
    addresses: tuple[str, ...], **options: Any
) -> AsyncIterator[tuple[int, dict[str, Upstream]]]:
    """A server at each address, all on one port (MX hosts share the SMTP port).

    The port is free on 127.0.0.1; a client of an earlier test may still hold it as its own
    port at another 127.0.0.x, and then another port is tried.
    """
    for attempt in range(1, 6):
        port = free_port()
        servers = {address: Upstream(host=address, **options) for address in addresses}
        try:
            for server in servers.values():
                await server.start(port)
        except OSError as exc:
            for server in servers.values():
                await server.stop()
            if exc.errno != errno.EADDRINUSE or attempt == 5:
                raise
            continue
        try:
            yield port, servers
        finally:
            for server in servers.values():
                await server.stop()
        return


@pytest.fixture
async def mail_servers() -> AsyncIterator[tuple[int, dict[str, Upstream]]]:
    async with receivers(RECEIVERS) as found:
        yield found


async def direct_relay(
    make_relay: RelayFactory, dnsmasq: Dnsmasq, port: int, **overrides: Any
) -> Relay:
    upstream = {"url": f"mx://:{port}", "dns_servers": [dnsmasq.address], "timeout": "5s"}
    return await make_relay(upstream=upstream, **overrides)


async def test_recipients_are_grouped_by_domain_and_each_domain_reaches_its_own_servers(
    make_relay: RelayFactory, dnsmasq: Dnsmasq, mail_servers: tuple[int, dict[str, Upstream]]
) -> None:
    port, servers = mail_servers
    relay = await direct_relay(make_relay, dnsmasq, port)
    rcpts = ("ann@example.test", "bob@example.test", "cy@amx.test")
    assert (await send(relay.port, make_message("direct"), rcpts=rcpts)).code == 250
    await relay.idle()
    at_example = [m for a in ("127.0.0.2", "127.0.0.3") for m in servers[a].messages]
    assert [m.rcpts for m in at_example] == [["ann@example.test", "bob@example.test"]]
    # No MX for amx.test: its own address record is its mail server (RFC 5321 5.1).
    assert [m.rcpts for m in servers["127.0.0.5"].messages] == [["cy@amx.test"]]
    assert servers["127.0.0.4"].messages == []  # the preference-20 server is only a fallback
    delivered = await relay.events("delivered")
    assert sorted(e["rcpts"] for e in delivered) == [
        "ann@example.test,bob@example.test",
        "cy@amx.test",
    ]
    assert all(e["upstream"] == f"mx://:{port}" for e in delivered)
    assert any("relay=amx.test[127.0.0.5]" in e["reply"] for e in delivered)


async def test_equal_preferences_share_the_mail_in_random_order(
    make_relay: RelayFactory, dnsmasq: Dnsmasq, mail_servers: tuple[int, dict[str, Upstream]]
) -> None:
    port, servers = mail_servers
    relay = await direct_relay(make_relay, dnsmasq, port)
    for n in range(20):
        await send(relay.port, make_message(f"n{n}"), rcpts=("ann@example.test",))
    await relay.idle()
    first, second = len(servers["127.0.0.2"].messages), len(servers["127.0.0.3"].messages)
    assert first + second == 20
    # Each order is a coin toss per message: one server taking all 20 has odds of 1 in 500,000.
    assert first > 0 and second > 0, (first, second)
    assert servers["127.0.0.4"].messages == []


async def test_mx_lookups_are_cached_for_their_ttl(
    make_relay: RelayFactory, dnsmasq: Dnsmasq, mail_servers: tuple[int, dict[str, Upstream]]
) -> None:
    port, _ = mail_servers
    relay = await direct_relay(make_relay, dnsmasq, port)
    for n in range(3):
        await send(relay.port, make_message(f"n{n}"), rcpts=("ann@example.test",))
        await relay.idle()
    assert len(await relay.events("delivered")) == 3
    # The zone's TTL is 300s: one lookup serves all three messages.
    assert dnsmasq.queries("example.test", "MX") == 1


async def test_an_unreachable_mx_hands_the_message_to_the_next_one(
    make_relay: RelayFactory, dnsmasq: Dnsmasq, mail_servers: tuple[int, dict[str, Upstream]]
) -> None:
    port, servers = mail_servers
    relay = await direct_relay(make_relay, dnsmasq, port)
    await send(relay.port, make_message(), rcpts=("dee@dead.test",))
    event = (await relay.wait_for_events("delivered"))[0]
    assert "relay=up.dead.test[127.0.0.7]" in event["reply"]
    assert [m.rcpts for m in servers["127.0.0.7"].messages] == [["dee@dead.test"]]


async def test_a_null_mx_fails_the_recipient_for_good(
    make_relay: RelayFactory, dnsmasq: Dnsmasq, mail_servers: tuple[int, dict[str, Upstream]]
) -> None:
    port, _ = mail_servers
    relay = await direct_relay(make_relay, dnsmasq, port)
    await send(relay.port, make_message(), rcpts=("nobody@nullmx.test", "ann@example.test"))
    await relay.idle()
    [failed] = await relay.events("failed")
    assert failed["rcpts"] == "nobody@nullmx.test"
    assert "null MX" in failed["reply"] and "5.1.10" in failed["reply"]
    [delivered] = await relay.events("delivered")
    assert delivered["rcpts"] == "ann@example.test"
    assert await relay.events("deferred") == []


async def test_a_domain_that_does_not_exist_fails_for_good(
    make_relay: RelayFactory, dnsmasq: Dnsmasq, mail_servers: tuple[int, dict[str, Upstream]]
) -> None:
    port, _ = mail_servers
    relay = await direct_relay(make_relay, dnsmasq, port)
    await send(relay.port, make_message(), rcpts=("who@nope.test",))
    event = (await relay.wait_for_events("failed"))[0]
    assert "no such domain" in event["reply"]


async def test_a_dns_failure_defers_and_keeps_the_message(
    make_relay: RelayFactory, dnsmasq: Dnsmasq, mail_servers: tuple[int, dict[str, Upstream]]
) -> None:
    port, _ = mail_servers
    relay = await direct_relay(make_relay, dnsmasq, port)
    await send(relay.port, make_message(), rcpts=("ann@servfail.test",))
    event = (await relay.wait_for_events("deferred"))[0]
    assert "SERVFAIL" in event["reply"] and event["reply"].startswith("4.4.3")
    assert await relay.events("failed") == []
    assert await relay.rows("SELECT state FROM recipients") == [("queued",)]
    assert dnsmasq.queries("servfail.test", "MX") >= 1


async def test_starttls_is_used_when_offered_without_checking_the_certificate(
    make_relay: RelayFactory, dnsmasq: Dnsmasq, certificates: Certificates
) -> None:
    # The certificate names 127.0.0.1, not mx.tls.test, and the relay has no CA for it: as
    # with Postfix's "may" level, it encrypts anyway rather than sending in clear.
    tls = certificates.server_context()
    async with receivers(("127.0.0.8",), tls_context=tls) as (port, servers):
        relay = await direct_relay(make_relay, dnsmasq, port)
        await send(relay.port, make_message(), rcpts=("tia@tls.test",))
        [received] = await servers["127.0.0.8"].wait_for(1)
        assert received.tls


async def test_a_domain_no_server_of_which_answers_fails_over_to_the_next_upstream(
    make_relay: RelayFactory, dnsmasq: Dnsmasq, sink_factory: Callable[..., SmtpSink]
) -> None:
    # Postfix's smtp_fallback_relay, as a route: direct first, a smarthost when that fails.
    smarthost = await asyncio.to_thread(sink_factory)
    relay = await make_relay(
        upstreams=[
            {"name": "direct", "url": f"mx://:{free_port()}", "dns_servers": [dnsmasq.address]},
            {"name": "smarthost", "url": f"smtp://127.0.0.1:{smarthost.port}"},
        ],
        routes=[{"upstreams": ["direct", "smarthost"]}],
    )
    await send(relay.port, make_message(), rcpts=("gus@gone.test",))
    [message] = await asyncio.to_thread(smarthost.wait_for, 1)
    assert message.rcpt_to == ["gus@gone.test"]
    await relay.idle()
    [failover] = await relay.events("failover")
    assert (failover["upstream"], failover["rcpts"]) == ("direct", "gus@gone.test")
    assert "no mail server for gone.test could be reached" in failover["reply"]
    [delivered] = await relay.events("delivered")
    assert delivered["upstream"] == "smarthost"


async def test_stopped_awaiting_an_mx_servers_final_reply_is_ambiguous_never_given_back(
    make_relay: RelayFactory, dnsmasq: Dnsmasq, mail_servers: tuple[int, dict[str, Upstream]]
) -> None:
    # The worker is cancelled while the MX server holds the payload: the server may deliver
    # it, so the next start must say `ambiguous` before it sends the message again. The
    # direct transport used to learn that its server had the payload only once that server's
    # transaction returned, so this attempt was given back as never sent, and the second
    # copy had no event to explain it.
    port, servers = mail_servers
    server = servers["127.0.0.5"]
    server.script.stall = "data"
    relay = await direct_relay(make_relay, dnsmasq, port, runtime={"shutdown_grace": "0s"})
    assert (await send(relay.port, make_message(), rcpts=("cy@amx.test",))).code == 250
    await asyncio.wait_for(server.script.stalled.wait(), 20)
    await relay.stop()
    server.script.go_on()
    after = await direct_relay(make_relay, dnsmasq, port)
    await server.wait_for(1)
    await after.idle()
    assert [e["event"] for e in await after.events()] == ["received", "ambiguous", "delivered"]


async def test_a_store_failure_before_a_later_domain_keeps_what_the_earlier_domain_settled(
    make_relay: RelayFactory, dnsmasq: Dnsmasq, mail_servers: tuple[int, dict[str, Upstream]]
) -> None:
    # ann's domain is done and delivered; then the pacing slot for cy's domain cannot be
    # booked, so nothing goes to it. The attempt used to end "ambiguous" for both, and ann
    # got the message a second time.
    port, servers = mail_servers
    faults = Faults()
    bookings = itertools.count()
    faults.fail("INSERT INTO pacing", when=lambda _: next(bookings) == 1)
    upstream = {
        "url": f"mx://:{port}",
        "dns_servers": [dnsmasq.address],
        "timeout": "5s",
        "rate": "1000/s",
    }
    relay = await make_relay(upstream=upstream, store_factory=faults.store_factory())
    rcpts = ("ann@example.test", "cy@amx.test")
    assert (await send(relay.port, make_message("direct"), rcpts=rcpts)).code == 250
    await servers["127.0.0.5"].wait_for(1)
    await relay.idle()
    assert faults.fired == ["INSERT INTO pacing"]
    at_example = [m for a in ("127.0.0.2", "127.0.0.3") for m in servers[a].messages]
    assert [m.rcpts for m in at_example] == [["ann@example.test"]]
    assert [m.rcpts for m in servers["127.0.0.5"].messages] == [["cy@amx.test"]]
    assert [(e["event"], e["rcpts"]) for e in await relay.events()] == [
        ("received", "ann@example.test,cy@amx.test"),
        ("delivered", "ann@example.test"),
        ("deferred", "cy@amx.test"),
        ("delivered", "cy@amx.test"),
    ]
