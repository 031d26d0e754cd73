"""The PostgreSQL store when the database misbehaves at a chosen moment.

A private cluster (tests/pg.py) sits behind a TCP proxy (tests/pgproxy.py) that can cut a
connection right after the client sent COMMIT, once the server has answered it (the commit
landed, the client cannot know), or just before COMMIT leaves (nothing landed). Locks held
from a second connection make a statement wait past `store.statement_timeout`. The relay
speaks SMTP to a recording upstream; the store-level tests drive `PostgresStore` directly,
with times passed in.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from relay.config import from_mapping
from relay.decision import Claim
from relay.store import RecipientUpdate, Update
from relay.store.postgres import CommitUnknown, PostgresStore, connect_options
from tests.conftest import (
    PG_PASSWORD_ENV,
    Relay,
    Upstream,
    eventually,
    make_message,
    send,
    submission,
)
from tests.pg import Cluster
from tests.pgproxy import PgProxy

T0 = 1_800_000_000.0
LEASE_FOR = 300.0


def through(url: str, port: int) -> str:
    """The same database, reached through the proxy."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urlunsplit(parts._replace(netloc=netloc, query="sslmode=disable"))


@pytest.fixture
async def proxy(pg_cluster: Cluster) -> AsyncIterator[PgProxy]:
    p = PgProxy(pg_cluster.port)
    await p.start()
    yield p
    await p.close()


@pytest.fixture
async def direct(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own, straight to the server (no proxy, no timeouts)."""
    config = from_mapping(
        {"store": {"url": pg_url, "password_env": PG_PASSWORD_ENV}}, check_paths=False
    ).store
    options = connect_options(config)
    options.pop("command_timeout")
    options["server_settings"] = {"application_name": "test"}
    db = await asyncpg.connect(**options)
    yield db
    await db.close()


MakeStore = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture
async def make_store(pg_url: str, proxy: PgProxy) -> AsyncIterator[MakeStore]:
    opened: list[PostgresStore] = []

    async def make(**store: Any) -> PostgresStore:
        raw = {"url": through(pg_url, proxy.port), "password_env": PG_PASSWORD_ENV, **store}
        made = PostgresStore(from_mapping({"store": raw}, check_paths=False).store)
        await made.open()
        opened.append(made)
        return made

    yield make
    for made in opened:
        await made.close()


def keyed(queue_id: str) -> Claim:
    return Claim("global", f"{queue_id}-key", "message-id", "f" * 64, 86400.0, "drop", "reject")


async def state(db: asyncpg.Connection, queue_id: str) -> asyncpg.Record:
    row = await db.fetchrow(
        "SELECT state, lease_owner, attempts FROM messages WHERE queue_id = $1", queue_id
    )
    assert row is not None
    return row


# --- a lease whose COMMIT's answer was lost ------------------------------------


async def test_a_lease_whose_commit_answer_was_lost_is_given_back_not_left_sending(
    make_store: MakeStore, proxy: PgProxy, direct: asyncpg.Connection
) -> None:
    """The lost commit leased the message under this process's name, but no caller knows it
    has it: nobody sends it, renews it, or (being this owner's) takes it back while the
    process runs. The next lease must hand it out, counted once."""
    store = await make_store()
    assert (await store.accept(submission("Q1", key=keyed("Q1")))).forward
    fired = proxy.arm("after")
    with pytest.raises(CommitUnknown):
        await store.lease("relay-a", 10, T0, LEASE_FOR)
    assert fired.is_set()
    assert (await state(direct, "Q1"))["state"] == "sending"  # the commit did land

    # The same moment again (a manual clock, or a fast one): it must not matter.
    batch = await store.lease("relay-a", 10, T0, LEASE_FOR)
    assert [lease.queue_id for lease in batch.leases] == ["Q1"]
    assert batch.leases[0].attempts == 1
    row = await state(direct, "Q1")
    assert (row["state"], row["lease_owner"], row["attempts"]) == ("sending", "relay-a", 1)


@pytest.mark.parametrize("held_by", ["lease", "renewal"])
async def test_giving_back_a_lost_lease_leaves_the_leases_this_process_holds_alone(
    make_store: MakeStore, proxy: PgProxy, direct: asyncpg.Connection, held_by: str
) -> None:
    """A message this process holds (being sent) is not given back with a lost lease, though
    its expiry was written at the same moment: by a lease just before the lost one, or by the
    renewal task just after it. Giving it back would send it twice at once."""
    store = await make_store()
    took_at = T0 if held_by == "lease" else T0 - 10
    await store.accept(submission("Q1", key=keyed("Q1"), at=took_at))
    held = await store.lease("relay-a", 10, took_at, LEASE_FOR)
    assert [lease.queue_id for lease in held.leases] == ["Q1"]
    await store.accept(submission("Q2", key=keyed("Q2")))
    proxy.arm("after")
    with pytest.raises(CommitUnknown):
        await store.lease("relay-a", 10, T0, LEASE_FOR)
    if held_by == "renewal":
        assert await store.renew("relay-a", ["Q1"], T0 + LEASE_FOR) == {"Q1"}

    again = await store.lease("relay-a", 10, T0, LEASE_FOR)
    assert [lease.queue_id for lease in again.leases] == ["Q2"]
    row = await state(direct, "Q1")
    assert (row["state"], row["lease_owner"], row["attempts"]) == ("sending", "relay-a", 1)
    assert (await store.lease("relay-a", 10, T0, LEASE_FOR)).leases == ()


# --- the database gives up on one statement ----------------------------------


async def test_an_outcome_that_waits_past_the_statement_timeout_is_written_once_the_lock_goes(
    make_store: MakeStore, direct: asyncpg.Connection
) -> None:
    """statement_timeout cancels the outcome's statement (another session held the message's
    row). The upstream said 250: the outcome must be written when the database can, not
    dropped as if the job itself were wrong, which left the message `sending` and sent it
    again, as ambiguous, once the lease ran out."""
    store = await make_store(statement_timeout="1s")
    await store.accept(submission("Q1", key=keyed("Q1")))
    assert len((await store.lease("relay-a", 10, T0, LEASE_FOR)).leases) == 1

    locker = direct.transaction()
    await locker.start()
    await direct.execute("SELECT 1 FROM messages WHERE queue_id = 'Q1' FOR UPDATE")
    outcome = Update(
        queue_id="Q1",
        recipients=(RecipientUpdate("alice@example.org", "delivered", "delivered", 250, "ok"),),
        next_attempt=None,
        upstream="smtp",
        duration=0.1,
        ts=T0 + 1,
    )
    written = asyncio.create_task(store.update(outcome))
    # Wait for the statement to be cancelled at least once (or for the call to give up).
    await eventually(
        lambda: written.done() or store.writer.condition.problem is not None,
        what="the outcome's statement to time out",
    )
    await locker.rollback()

    assert await written == "done"
    row = await state(direct, "Q1")
    assert (row["state"], row["lease_owner"]) == ("done", None)
    names = [r["event"] for r in await direct.fetch("SELECT event FROM events ORDER BY id")]
    assert names.count("delivered") == 1
    pending = await direct.fetchval("SELECT pending FROM claims WHERE queue_id = 'Q1'")
    assert pending is False


# --- through the relay, over SMTP -------------------------------------------------


@pytest.fixture
def store_config(pg_url: str, proxy: PgProxy) -> dict[str, Any]:
    """`make_relay`'s store: this test's database, through the proxy."""
    return {"url": through(pg_url, proxy.port), "password_env": PG_PASSWORD_ENV}


async def test_an_accept_whose_commit_answer_was_lost_gets_4xx_and_its_retry_is_a_repeat(
    make_relay: Callable[..., Awaitable[Relay]],
    proxy: PgProxy,
    upstream: Upstream,
    direct: asyncpg.Connection,
) -> None:
    relay = await make_relay()
    data = make_message(message_id="<lost-answer@example.com>")
    fired = proxy.arm("after", within=b"lost-answer@example.com")
    reply = await send(relay.port, data)
    assert fired.is_set()
    assert 400 <= reply.code < 500, reply  # never 250 without knowing it committed
    # It did commit: the client's retry meets the claim and is a repeat.
    assert (await send(relay.port, data)).code == 250
    await upstream.wait_for(1)
    await relay.idle()
    names = [r["event"] for r in await direct.fetch("SELECT event FROM events ORDER BY id")]
    assert names.count("received") == 1
    assert names.count("duplicate") == 1
    assert names.count("delivered") == 1
    assert len(upstream.messages) == 1


async def test_an_accept_cut_before_its_commit_gets_4xx_and_its_retry_is_delivered_once(
    make_relay: Callable[..., Awaitable[Relay]],
    proxy: PgProxy,
    upstream: Upstream,
    direct: asyncpg.Connection,
) -> None:
    relay = await make_relay()
    data = make_message(message_id="<cut-early@example.com>")
    fired = proxy.arm("before", within=b"cut-early@example.com")
    reply = await send(relay.port, data)
    assert fired.is_set()
    assert 400 <= reply.code < 500, reply
    assert await direct.fetchval("SELECT count(*) FROM messages") == 0
    assert (await send(relay.port, data)).code == 250
    await upstream.wait_for(1)
    await relay.idle()
    names = [r["event"] for r in await direct.fetch("SELECT event FROM events ORDER BY id")]
    assert (names.count("received"), names.count("duplicate")) == (1, 0)
    assert len(upstream.messages) == 1


async def test_an_outcome_whose_commit_answer_was_lost_is_recorded_once_and_not_resent(
    make_relay: Callable[..., Awaitable[Relay]],
    proxy: PgProxy,
    upstream: Upstream,
    direct: asyncpg.Connection,
) -> None:
    relay = await make_relay()
    # The outcome's batch is the one that carries the upstream's reply.
    fired = proxy.arm("after", within=b"queued as UP0001")
    assert (await send(relay.port, make_message(message_id="<outcome@example.com>"))).code == 250
    await upstream.wait_for(1)
    await eventually(fired.is_set, what="the outcome's commit to be cut")
    await relay.idle()
    # Stopping waits for the workers, so for the outcome to be written again (or found).
    await relay.stop()
    names = [r["event"] for r in await direct.fetch("SELECT event FROM events ORDER BY id")]
    assert names.count("delivered") == 1
    assert "ambiguous" not in names
    assert len(upstream.messages) == 1
