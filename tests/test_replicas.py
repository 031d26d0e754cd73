"""Replicas on several hosts: three relay processes on three ports share one PostgreSQL database.

Each replica is `python -m relay serve`, as a user runs it; the database is a private
cluster (tests/pg.py); the upstream is an aiosmtpd server in this process that records
every message it is given. Message-IDs tell which email each upstream copy is.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import aiosmtplib
import asyncpg
import pytest

from relay.config import from_mapping
from relay.store.postgres import connect_options
from tests.conftest import (
    DEADLINE,
    PG_PASSWORD_ENV,
    RelayProcess,
    Reply,
    Upstream,
    eventually,
    make_message,
    send,
    transact,
)
from tests.pg import Cluster

ReplicaFactory = Callable[..., RelayProcess]


def replica_config(url: str, upstream: Upstream, name: str, **delivery: Any) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0, "hostname": f"{name}.test"},
        "upstream": {"url": f"smtp://127.0.0.1:{upstream.port}", "timeout": "2s"},
        "store": {"url": url, "password_env": PG_PASSWORD_ENV},
        "delivery": {
            "retry_initial": "100ms",
            "retry_max": "500ms",
            "concurrency": 4,
            "lease_timeout": "3s",
            **delivery,
        },
        "audit": {"output": "none"},
        "runtime": {"instance": name, "shutdown_grace": "2s"},
    }


@pytest.fixture
def replicas(
    pg_url: str, upstream: Upstream, relay_process: Callable[..., RelayProcess]
) -> Iterator[Callable[..., list[RelayProcess]]]:
    def start(count: int = 3, **delivery: Any) -> list[RelayProcess]:
        started = []
        for n in range(count):
            process = relay_process(replica_config(pg_url, upstream, f"replica-{n}", **delivery))
            process.start()
            process.drain_stderr()
            started.append(process)
        return started

    yield start


async def rows(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    config = from_mapping(
        {"store": {"url": url, "password_env": PG_PASSWORD_ENV}}, check_paths=False
    ).store
    db = await asyncpg.connect(**connect_options(config))
    try:
        return await db.fetch(sql, *args)
    finally:
        await db.close()


async def drained(url: str) -> None:
    async def idle() -> bool:
        pending = await rows(url, "SELECT count(*) FROM messages WHERE state <> 'done'")
        return pending[0][0] == 0

    await eventually(idle, what="every replica's queue to drain")


def message_ids(upstream: Upstream) -> collections.Counter[str]:
    found = collections.Counter[str]()
    for item in upstream.messages:
        match = re.search(rb"^Message-ID: <([^>]+)>", item.data, re.MULTILINE | re.IGNORECASE)
        assert match, item.data[:200]
        found[match.group(1).decode()] += 1
    return found


def numbered(count: int, tag: str) -> dict[str, bytes]:
    return {
        f"{tag}-{n}@example.com": make_message(
            subject=f"{tag} {n}", message_id=f"<{tag}-{n}@example.com>"
        )
        for n in range(count)
    }


async def send_all(
    ports: Callable[[], Sequence[int]], messages: dict[str, bytes], senders: int = 24
) -> dict[str, Reply]:
    """Every message over `senders` SMTP sessions that each send many, spread over the ports.

    A session that breaks (a replica killed) is opened again on the next port and the message
    is sent again, as an application retries; the reply kept is the last one.
    """
    queue = list(messages.items())
    replies: dict[str, Reply] = {}

    async def session(n: int) -> None:
        client: aiosmtplib.SMTP | None = None
        turn = n
        while queue:
            ident, data = queue.pop()
            while True:
                try:
                    if client is None:
                        live = ports()
                        port = live[turn % len(live)]
                        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=DEADLINE)
                        await client.connect()
                        await client.ehlo()
                    replies[ident] = await transact(
                        client, data, "shop@example.com", ("alice@example.org",)
                    )
                    await client.rset()
                    break
                except (aiosmtplib.SMTPException, OSError):
                    with contextlib.suppress(Exception):
                        if client is not None:
                            client.close()
                    client = None
                    turn += 1
        if client is not None:
            with contextlib.suppress(Exception):
                await client.quit()

    await asyncio.gather(*(session(n) for n in range(senders)))
    return replies


async def test_forty_clients_sending_one_email_to_three_replicas_forward_it_once(
    replicas: Callable[..., list[RelayProcess]], pg_url: str, upstream: Upstream
) -> None:
    three = replicas()
    message = make_message(extra={"Idempotency-Key": "order-4711-receipt"})
    replies = await asyncio.gather(*(send(three[n % 3].port, message) for n in range(40)))
    assert all(r.code == 250 for r in replies), replies
    assert sum("queued as" in r.text for r in replies) == 1
    await upstream.wait_for(1)
    await drained(pg_url)
    assert len(upstream.messages) == 1
    counts = dict(await rows(pg_url, "SELECT event, count(*) FROM events GROUP BY event"))
    assert counts == {"received": 1, "duplicate": 39, "delivered": 1}


async def test_two_thousand_emails_spread_over_three_replicas_are_each_forwarded_once(
    replicas: Callable[..., list[RelayProcess]], pg_url: str, upstream: Upstream
) -> None:
    three = replicas()
    messages = numbered(2000, "spread")
    replies = await send_all(lambda: [r.port for r in three], messages)
    assert {r.code for r in replies.values()} == {250}
    await upstream.wait_for(2000, timeout=120)
    await drained(pg_url)
    assert message_ids(upstream) == dict.fromkeys(messages, 1)
    counts = dict(await rows(pg_url, "SELECT event, count(*) FROM events GROUP BY event"))
    assert counts == {"received": 2000, "delivered": 2000}


async def test_a_replica_killed_mid_traffic_leaves_its_mail_to_the_survivors(
    replicas: Callable[..., list[RelayProcess]], pg_url: str, upstream: Upstream
) -> None:
    three = replicas()
    live = list(three)
    messages = numbered(600, "kill")
    upstream.script.data_delay = 0.01  # deliveries under way when the replica dies
    sending = asyncio.create_task(send_all(lambda: [r.port for r in live], messages, senders=12))
    await eventually(lambda: len(upstream.messages) >= 100, what="traffic to flow")
    victim = live.pop(1)
    victim.kill()
    replies = await sending
    accepted = {ident for ident, reply in replies.items() if reply.code == 250}
    assert accepted == set(messages), "every message is accepted once the client retries"
    await eventually(
        lambda: set(message_ids(upstream)) >= accepted, timeout=60, what="survivors to deliver"
    )
    await drained(pg_url)
    copies = message_ids(upstream)
    ambiguous = {
        row["message_id"]
        for row in await rows(pg_url, "SELECT message_id FROM events WHERE event = 'ambiguous'")
    }
    duplicated = {ident for ident, n in copies.items() if n > 1}
    assert duplicated <= ambiguous, "a second copy only where the audit says ambiguous"
    leases = await rows(pg_url, "SELECT count(*) FROM messages WHERE lease_owner = 'replica-1'")
    assert leases[0][0] == 0, "nothing is left leased by the dead replica"


# --- the database restarted --------------------------------------------------


@contextlib.asynccontextmanager
async def database_down(cluster: Cluster) -> AsyncIterator[None]:
    """The shared cluster stopped as an operator stops it; started again whatever happens."""
    await asyncio.to_thread(cluster.stop, "fast")
    try:
        yield
    finally:
        await asyncio.to_thread(cluster.start)


async def test_clients_hear_4xx_while_the_database_is_down_and_the_relay_reconnects_by_itself(
    replicas: Callable[..., list[RelayProcess]],
    pg_cluster: Cluster,
    pg_url: str,
    upstream: Upstream,
) -> None:
    (relay,) = replicas(1)
    before, during = numbered(2, "outage").values()
    assert (await send(relay.port, before)).code == 250
    await upstream.wait_for(1)

    async with database_down(pg_cluster):
        refused = await send(relay.port, during)
        assert 400 <= refused.code < 500, refused

    # No operator step: the next attempt finds the database again.
    async def accepted() -> bool:
        reply = await send(relay.port, during)
        assert reply.code == 250 or 400 <= reply.code < 500, reply
        return reply.code == 250

    await eventually(accepted, what="the relay to take mail again")
    await upstream.wait_for(2)
    await drained(pg_url)
    assert message_ids(upstream) == {"outage-0@example.com": 1, "outage-1@example.com": 1}


async def test_a_database_restart_under_load_loses_nothing_accepted(
    replicas: Callable[..., list[RelayProcess]],
    pg_cluster: Cluster,
    pg_url: str,
    upstream: Upstream,
) -> None:
    two = replicas(2)
    replies: dict[str, list[Reply]] = collections.defaultdict(list)
    restarted = asyncio.Event()
    after_restart = 0
    enough = asyncio.Event()
    counter = iter(range(1_000_000))

    async def session(n: int) -> None:
        nonlocal after_restart
        while not enough.is_set():
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=two[n % 2].port, timeout=DEADLINE)
            try:
                await client.connect()
                await client.ehlo()
                while not enough.is_set():
                    ident = f"restart-{next(counter)}@example.com"
                    data = make_message(subject=ident, message_id=f"<{ident}>")
                    reply = await transact(client, data, "shop@example.com", ("a@example.org",))
                    replies[ident].append(reply)
                    if reply.code == 250 and restarted.is_set():
                        after_restart += 1
                        if after_restart >= 30:
                            enough.set()
                    await client.rset()
            except (aiosmtplib.SMTPException, OSError):
                pass  # a session the relay closed (421): open a new one, as an application does
            finally:
                client.close()

    sessions = [asyncio.create_task(session(n)) for n in range(6)]
    await eventually(lambda: len(upstream.messages) >= 30, what="traffic to flow")
    await asyncio.to_thread(pg_cluster.restart, "fast")
    restarted.set()
    await asyncio.wait_for(asyncio.gather(*sessions), 120)

    codes = {reply.code for answers in replies.values() for reply in answers}
    assert all(code == 250 or 400 <= code < 500 for code in codes), codes
    accepted = {ident for ident, answers in replies.items() if answers[-1].code == 250}
    await eventually(
        lambda: set(message_ids(upstream)) >= accepted, timeout=60, what="every 250 delivered"
    )
    await drained(pg_url)
    ambiguous = {
        row["message_id"]
        for row in await rows(pg_url, "SELECT message_id FROM events WHERE event = 'ambiguous'")
    }
    duplicated = {ident for ident, n in message_ids(upstream).items() if n > 1}
    assert duplicated <= ambiguous, "a second copy only where the audit says ambiguous"
