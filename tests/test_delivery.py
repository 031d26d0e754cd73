"""Delivery to a misbehaving upstream: every reply class, lost connections, outages, TLS, AUTH."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Certificates,
    Relay,
    Upstream,
    eventually,
    make_message,
    running,
    send,
)


async def test_tempfail_is_retried_until_delivered(make_relay, upstream: Upstream) -> None:
    upstream.script.data = ["451 4.3.0 try later", "421 4.7.0 busy"]
    relay = await make_relay()
    assert (await send(relay.port, make_message())).code == 250
    await upstream.wait_for(1)
    await relay.idle()
    events = [e["event"] for e in await relay.events()]
    assert events == ["received", "deferred", "deferred", "delivered"]
    [delivered] = await relay.events("delivered")
    assert delivered["upstream_id"] == "UP0001"
    assert delivered["code"] == 250


async def test_permanent_failure_is_not_retried(make_relay, upstream: Upstream) -> None:
    upstream.script.data = ["554 5.7.1 rejected by policy", "250 would have worked"]
    relay = await make_relay()
    await send(relay.port, make_message())
    await relay.idle()
    [failed] = await relay.events("failed")
    assert failed["code"] == 554
    assert "rejected by policy" in failed["reply"]
    assert upstream.messages == []
    assert await relay.rows("SELECT state FROM messages") == [("done",)]


async def test_each_recipient_gets_its_own_outcome_and_only_tempfailed_are_retried(
    make_relay, upstream: Upstream
) -> None:
    upstream.script.rcpt = {
        "gone@example.org": "550 5.1.1 no such user",
        "full@example.org": "452 4.2.2 mailbox full",
    }
    relay = await make_relay()
    rcpts = ("ok@example.org", "gone@example.org", "full@example.org")
    await send(relay.port, make_message(), rcpts=rcpts)
    first = (await upstream.wait_for(1))[0]
    assert first.rcpts == ["ok@example.org"]
    upstream.script.rcpt = {"gone@example.org": "550 5.1.1 no such user"}
    await upstream.wait_for(2)
    await relay.idle()
    assert upstream.messages[1].rcpts == ["full@example.org"]
    states = dict(await relay.rows("SELECT rcpt, state FROM recipients"))
    assert states == {
        "ok@example.org": "delivered",
        "gone@example.org": "failed",
        "full@example.org": "delivered",
    }


async def test_connection_lost_after_data_is_ambiguous_and_retried_by_default(
    make_relay, upstream: Upstream
) -> None:
    upstream.script.drop_after_data = 1
    relay = await make_relay()
    await send(relay.port, make_message())
    await upstream.wait_for(1)
    await relay.idle()
    assert len(upstream.dropped) == 1
    [ambiguous] = await relay.events("ambiguous")
    assert "after the message was sent" in ambiguous["reply"]
    assert [e["event"] for e in await relay.events()][-1] == "delivered"


async def test_connection_lost_after_data_is_held_under_hold_policy(
    make_relay, upstream: Upstream
) -> None:
    upstream.script.drop_after_data = 1
    relay = await make_relay(delivery={"on_ambiguous": "hold"})
    await send(relay.port, make_message())
    await eventually(lambda: relay.events("ambiguous"), what="an ambiguous event")
    await relay.idle()
    assert await relay.rows("SELECT state FROM messages") == [("held",)]
    assert upstream.messages == []
    [(queue_id,)] = await relay.rows("SELECT queue_id FROM messages")
    assert await relay.store.requeue(queue_id, 0.0) == 1
    relay.app.delivery.wake()
    await upstream.wait_for(1)


async def test_slow_upstream_within_timeout_delivers(make_relay, upstream: Upstream) -> None:
    upstream.script.data_delay = 0.5
    relay = await make_relay(upstream={"timeout": "5s"})
    await send(relay.port, make_message())
    await upstream.wait_for(1)
    await relay.idle()
    assert [e["event"] for e in await relay.events()] == ["received", "delivered"]


async def test_upstream_slower_than_timeout_after_data_is_ambiguous(
    make_relay, upstream: Upstream
) -> None:
    upstream.script.data_delay = 1.5
    relay = await make_relay(upstream={"timeout": "300ms"}, delivery={"on_ambiguous": "hold"})
    await send(relay.port, make_message())
    await eventually(lambda: relay.events("ambiguous"), what="an ambiguous event")
    [event] = await relay.events("ambiguous")
    assert "timed out" in event["reply"]


async def test_upstream_down_then_back_gets_every_message(make_relay, upstream: Upstream) -> None:
    relay = await make_relay()
    await upstream.stop()
    for n in range(5):
        assert (await send(relay.port, make_message(f"order {n}"))).code == 250

    async def all_deferred() -> bool:
        rows = await relay.rows(
            "SELECT count(DISTINCT queue_id) FROM events WHERE event = 'deferred'"
        )
        return rows == [(5,)]

    await eventually(all_deferred, what="every message deferred")
    assert upstream.messages == []
    deferred = await relay.events("deferred")
    assert all(e["code"] is None for e in deferred)
    await upstream.start()
    await upstream.wait_for(5)
    await relay.idle()
    assert sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in upstream.messages) == [
        f"order {n}".encode() for n in range(5)
    ]


async def test_message_expires_after_max_age_and_releases_its_key(
    make_relay, upstream: Upstream
) -> None:
    upstream.script.data = ["451 4.3.0 try later"] * 100
    relay = await make_relay(delivery={"max_age": "1s"})
    message = make_message()
    await send(relay.port, message)
    await eventually(lambda: relay.events("expired"), what="an expired event")
    await relay.idle()
    [released] = await relay.events("released")
    assert released["rcpts"] == "alice@example.org"
    upstream.script.data = []
    assert (await send(relay.port, message)).text.startswith("2.0.0 Ok: queued as")
    await upstream.wait_for(1)


async def test_upstream_connection_is_reused_across_messages(
    make_relay, upstream: Upstream
) -> None:
    relay = await make_relay(delivery={"concurrency": 1})
    for n in range(5):
        await send(relay.port, make_message(f"n{n}"))
        await upstream.wait_for(n + 1)
    assert upstream.connections == 1


async def test_starttls_to_upstream_verifies_its_certificate(
    make_relay, certificates: Certificates
) -> None:
    async with running(Upstream(tls_context=certificates.server_context())) as tls_upstream:
        relay = await make_relay(
            upstream={
                "url": f"smtp://127.0.0.1:{tls_upstream.port}",
                "ca_file": str(certificates.ca_file),
            }
        )
        await send(relay.port, make_message())
        [delivered] = await tls_upstream.wait_for(1)
        assert delivered.tls


async def test_untrusted_upstream_certificate_defers_instead_of_sending_in_clear(
    make_relay, certificates: Certificates
) -> None:
    async with running(Upstream(tls_context=certificates.server_context())) as tls_upstream:
        relay = await make_relay(upstream={"url": f"smtp://127.0.0.1:{tls_upstream.port}"})
        await send(relay.port, make_message())
        await eventually(lambda: relay.events("deferred"), what="a deferral")
        [event, *_] = await relay.events("deferred")
        assert "certificate" in event["reply"].lower()
        assert tls_upstream.messages == []


async def test_implicit_tls_upstream(make_relay, certificates: Certificates) -> None:
    implicit = Upstream(tls_context=certificates.server_context(), implicit_tls=True)
    async with running(implicit) as tls_upstream:
        relay = await make_relay(
            upstream={
                "url": f"smtps://127.0.0.1:{tls_upstream.port}",
                "ca_file": str(certificates.ca_file),
            }
        )
        assert (await send(relay.port, make_message())).code == 250
        [delivered] = await tls_upstream.wait_for(1)
        assert delivered.tls
        await relay.idle()
        [event] = await relay.events("delivered")
        assert event["upstream"] == f"smtps://127.0.0.1:{tls_upstream.port}"


@contextlib.asynccontextmanager
async def relay_behind_login(
    make_relay,
    monkeypatch: pytest.MonkeyPatch,
    password: str,
    certificates: Certificates | None,
    **upstream: Any,
) -> AsyncIterator[tuple[Relay, Upstream]]:
    """A relay whose upstream wants AUTH as relayuser/s3cret-pass; `password` is what it has.

    With `certificates` the upstream offers STARTTLS with a certificate the relay trusts;
    without, it offers no TLS at all.
    """
    monkeypatch.setenv("TEST_UPSTREAM_PASSWORD", password)
    tls = certificates.server_context() if certificates else None
    async with running(Upstream(tls_context=tls, auth=("relayuser", "s3cret-pass"))) as server:
        relay = await make_relay(
            upstream={
                "url": f"smtp://127.0.0.1:{server.port}",
                "username": "relayuser",
                "password_env": "TEST_UPSTREAM_PASSWORD",
                "ca_file": str(certificates.ca_file) if certificates else None,
                **upstream,
            }
        )
        yield relay, server


async def test_upstream_login_uses_password_from_environment(
    make_relay, monkeypatch: pytest.MonkeyPatch, certificates: Certificates
) -> None:
    login = relay_behind_login(make_relay, monkeypatch, "s3cret-pass", certificates)
    async with login as (relay, upstream):
        await send(relay.port, make_message())
        [delivered] = await upstream.wait_for(1)
        assert delivered.login == "relayuser"
        assert delivered.tls
        assert "s3cret-pass" not in repr(relay.app.config)


async def test_password_is_never_sent_to_an_upstream_without_tls(
    make_relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with relay_behind_login(make_relay, monkeypatch, "s3cret-pass", None) as (relay, up):
        assert (await send(relay.port, make_message())).code == 250
        [deferred, *_] = await relay.wait_for_events("deferred")
        assert "offers no TLS, so its password was not sent" in deferred["reply"]
        assert "allow_plaintext_auth" in deferred["reply"]
        assert up.auth_attempts == 0
        assert up.messages == []
        assert await relay.rows("SELECT state FROM recipients") == [("queued",)]


async def test_allow_plaintext_auth_sends_the_password_without_tls_when_configured(
    make_relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    login = relay_behind_login(
        make_relay, monkeypatch, "s3cret-pass", None, allow_plaintext_auth=True
    )
    async with login as (relay, upstream):
        await send(relay.port, make_message())
        [delivered] = await upstream.wait_for(1)
        assert (delivered.login, delivered.tls) == ("relayuser", False)


async def test_maildir_upstream_writes_complete_files_a_reader_can_open(
    make_relay, tmp_path: Path
) -> None:
    import mailbox

    maildir = tmp_path / "mail"
    relay = await make_relay(upstream={"url": f"maildir:{maildir}"})
    for n in range(3):
        await send(relay.port, make_message(f"maildir {n}"), rcpts=("a@example.org", "b@x.org"))
    await relay.idle()
    box = mailbox.Maildir(str(maildir), create=False)
    subjects = sorted(str(m["Subject"]) for m in box)
    assert subjects == ["maildir 0", "maildir 1", "maildir 2"]
    assert all(m.get_all("Delivered-To") == ["a@example.org", "b@x.org"] for m in box)
    assert os.listdir(maildir / "tmp") == []
    written = {e["upstream_id"] for e in await relay.events("delivered")}
    assert written == set(os.listdir(maildir / "new"))


async def test_sigterm_finishes_the_upstream_transaction_under_way(
    make_relay, upstream: Upstream
) -> None:
    upstream.script.data_delay = 1.0
    relay = await make_relay()
    await send(relay.port, make_message())
    await eventually(
        lambda: relay.rows("SELECT 1 FROM messages WHERE state = 'sending'"), what="sending"
    )
    await asyncio.wait_for(relay.stop(), 10)
    assert len(upstream.messages) == 1


async def test_wrong_upstream_password_defers_and_never_fails_the_mail(
    make_relay, monkeypatch: pytest.MonkeyPatch, certificates: Certificates
) -> None:
    async with relay_behind_login(make_relay, monkeypatch, "wrong", certificates) as (relay, _):
        await send(relay.port, make_message())
        await eventually(
            lambda: relay.rows("SELECT 1 FROM events WHERE event = 'deferred' LIMIT 1 OFFSET 1"),
            what="two deferrals",
        )
        [deferred, *_] = await relay.events("deferred")
        assert deferred["code"] == 535
        assert await relay.events("failed") == []
        assert await relay.rows("SELECT state FROM recipients") == [("queued",)]


async def test_a_message_too_big_to_ride_with_its_lease_is_read_apart_and_delivered_whole(
    relay: Relay, upstream: Upstream
) -> None:
    from relay.store.sqlite import INLINE_BODY_LIMIT

    body = "".join(f"line {n:07d} of a long statement\n" for n in range(INLINE_BODY_LIMIT // 20))
    message = make_message("big", body)
    assert len(message) > INLINE_BODY_LIMIT
    assert (await send(relay.port, message)).code == 250
    [delivered] = await upstream.wait_for(1)
    assert delivered.data.endswith(message.split(b"\r\n\r\n", 1)[1])
    assert delivered.data.count(b" of a long statement") == INLINE_BODY_LIMIT // 20


async def test_mail_sent_one_at_a_time_is_leased_once_per_message(
    make_relay, upstream: Upstream
) -> None:
    """A lease batch shorter than its limit took all that was due, and a finished attempt
    frees a slot nobody was waiting for: neither is a reason to look again at once (each
    look is a write transaction, and with workers or replicas, a turn at the store)."""
    from relay.clock import ManualClock
    from relay.store import open_store

    looks: list[int] = []

    def counting(*args: Any) -> Any:
        store = open_store(*args)
        lease = store.lease

        async def counted(*lease_args: Any) -> Any:
            batch = await lease(*lease_args)
            looks.append(len(batch.leases))
            return batch

        store.lease = counted  # type: ignore[method-assign]
        return store

    # Time stands still, so no poll interval passes and every look is one the relay chose.
    relay = await make_relay(store_factory=counting, clock=ManualClock())
    await eventually(lambda: looks, what="the dispatcher's first look, at start")
    looks.clear()
    for n in range(5):
        assert (await send(relay.port, make_message(f"one at a time {n}"))).code == 250
        await upstream.wait_for(n + 1)
        await relay.idle()
    assert len(await relay.events("delivered")) == 5
    assert looks == [1] * 5
