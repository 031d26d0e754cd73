"""A real MTA upstream: the relay delivering to Postfix and to smtp-sink in its fault modes.

Postfix is the upstream many relays actually feed: it pipelines, offers STARTTLS with a
certificate the test makes, and answers ``250 2.0.0 Ok: queued as ID``. smtp-sink answers
every SMTP stage with whatever fault a test asks for, so each reply class meets the relay's
retry policy for real. Every server is private, on 127.0.0.1, and torn down by its fixture.

The in-process relay runs on the test's event loop, so every blocking harness call (starting a
server, polling its log, Maildir or dump directory) goes through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
from collections import Counter
from collections.abc import Callable
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest

from tests import mta
from tests.conftest import Relay, RelayFactory, eventually, make_message, send
from tests.mta import END_OF_DATA, CertificateAuthority, Postfix, PostfixFactory, SmtpSink

# The harness's factory fixtures, made visible to this module.
sink_factory = mta.sink_factory
postfix_factory = mta.postfix_factory

SinkFactory = Callable[..., SmtpSink]

RECIPIENT = "alice@example.org"


# --- helpers -------------------------------------------------------------------------------


async def start_postfix(factory: PostfixFactory, **options: Any) -> Postfix:
    return await asyncio.to_thread(factory, **options)


async def start_sink(factory: SinkFactory, **options: Any) -> SmtpSink:
    return await asyncio.to_thread(factory, **options)


async def relay_to(make_relay: RelayFactory, port: int, **overrides: Any) -> Relay:
    """A relay whose upstream is 127.0.0.1:port, with the short timeouts of these tests."""
    upstream = {"url": f"smtp://127.0.0.1:{port}", "timeout": "5s", **overrides.pop("upstream", {})}
    return await make_relay(upstream=upstream, **overrides)


def message_id(data: bytes) -> str:
    value = BytesParser(policy=policy.default).parsebytes(data)["Message-ID"]
    assert value is not None
    return str(value).strip()


def postfix_message_ids(postfix: Postfix) -> dict[str, str]:
    """Postfix queue id -> Message-ID, from its cleanup log lines."""
    pattern = re.compile(r"\]: ([0-9A-F]{6,}): message-id=(<[^>]*>)", re.MULTILINE)
    return {m.group(1): m.group(2) for m in pattern.finditer(postfix.log())}


async def message_state(relay: Relay) -> tuple[str, int]:
    [(state, attempts)] = await relay.rows("SELECT state, attempts FROM messages")
    return str(state), int(attempts)


def mail_commands(sink: SmtpSink) -> int:
    """MAIL FROM commands in smtp-sink's transcript: one per delivery attempt that got that far."""
    return len(re.findall(r"^\S*smtp-sink: MAIL FROM:", sink.log(), re.MULTILINE))


# --- Postfix as the upstream -------------------------------------------------------------------


async def test_batch_reaches_postfix_maildir_exactly_once_and_repeats_never_reach_postfix(
    make_relay: RelayFactory, postfix_factory: PostfixFactory
) -> None:
    postfix = await start_postfix(postfix_factory, maildir=True, name="up-batch")
    relay = await relay_to(make_relay, postfix.port)
    batch = [make_message(f"order {n}", f"Order {n} confirmed.\n") for n in range(12)]
    replies = await asyncio.gather(*(send(relay.port, m) for m in batch))
    assert all("queued as" in r.text for r in replies)
    repeats = await asyncio.gather(*(send(relay.port, m) for m in batch[::2]))
    assert all(r.code == 250 and "not forwarded" in r.text for r in repeats)
    await relay.idle()
    assert len(await relay.events("delivered")) == len(batch)
    await asyncio.to_thread(postfix.wait_for_empty_queue)
    stored = await asyncio.to_thread(postfix.wait_for_maildir, len(batch))
    # The queue is empty and every accepted message is in the Maildir: this count is final.
    assert len(stored) == len(batch)
    assert Counter(message_id(m) for m in stored) == Counter(message_id(m) for m in batch)
    by_id = {message_id(m): m for m in stored}
    for original in batch:
        # Postfix stores LF line endings; the relay's bytes reach the mailbox unchanged.
        assert by_id[message_id(original)].endswith(original.replace(b"\r\n", b"\n"))
    assert len(re.findall(r"\]: [0-9A-F]+: client=", postfix.log())) == len(batch)


async def test_postfix_queue_id_is_the_upstream_id_of_each_delivered_event(
    make_relay: RelayFactory, postfix_factory: PostfixFactory, sink_factory: SinkFactory
) -> None:
    sink = await start_sink(sink_factory)
    postfix = await start_postfix(postfix_factory, relayhost=sink.port, name="up-ids")
    relay = await relay_to(make_relay, postfix.port)
    for n in range(3):
        assert (await send(relay.port, make_message(f"receipt {n}"))).code == 250
    await relay.idle()
    delivered = await relay.events("delivered")
    assert len(delivered) == 3
    await asyncio.to_thread(postfix.wait_for_log, r"status=sent", count=3)
    postfix_ids = postfix_message_ids(postfix)
    for event in delivered:
        assert re.fullmatch(r"[0-9A-F]{6,}", event["upstream_id"]), event["reply"]
        assert f"queued as {event['upstream_id']}" in event["reply"]
        assert postfix_ids[event["upstream_id"]] == f"<{event['message_id']}>"
    # Postfix handed each one on to smtp-sink, once.
    received = await asyncio.to_thread(sink.wait_for, 3)
    assert sorted(message_id(m.data) for m in received) == sorted(postfix_ids.values())


async def test_starttls_to_postfix_is_verified_against_the_test_ca(
    make_relay: RelayFactory, postfix_factory: PostfixFactory
) -> None:
    postfix = await start_postfix(postfix_factory, maildir=True, tls=True, name="up-tls")
    assert postfix.ca_file is not None
    relay = await relay_to(make_relay, postfix.port, upstream={"ca_file": str(postfix.ca_file)})
    assert (await send(relay.port, make_message("over tls"))).code == 250
    await relay.idle()
    [delivered] = await relay.events("delivered")
    [stored] = await asyncio.to_thread(postfix.wait_for_maildir, 1)
    assert b"Subject: over tls" in stored
    await asyncio.to_thread(postfix.wait_for_log, r"Anonymous TLS connection established from")
    # Postfix's own Received header: the message came in over ESMTPS, with our queue id.
    head = stored.split(b"\n\n", 1)[0].decode().replace("\n\t", " ").replace("\n ", " ")
    assert re.search(rf"with ESMTPS id {delivered['upstream_id']}\b", head), head


@pytest.mark.parametrize("trust", ["another-ca", "no-ca-file"])
async def test_untrusted_postfix_certificate_defers_and_never_sends_in_clear(
    make_relay: RelayFactory, postfix_factory: PostfixFactory, tmp_path: Path, trust: str
) -> None:
    postfix = await start_postfix(postfix_factory, maildir=True, tls=True, name="up-untrusted")
    upstream: dict[str, str] = {}
    if trust == "another-ca":
        other = await asyncio.to_thread(CertificateAuthority, tmp_path / "other", "other CA")
        upstream["ca_file"] = str(other.cert_file)
    relay = await relay_to(make_relay, postfix.port, upstream=upstream)
    assert (await send(relay.port, make_message("never in clear"))).code == 250
    deferred = await relay.wait_for_events("deferred", count=2)
    assert all("certificate" in e["reply"].lower() for e in deferred), deferred
    assert (await message_state(relay))[0] in ("queued", "sending")
    assert await relay.events("delivered") == []
    # Postfix saw the handshakes fail and never got as far as a MAIL FROM.
    await asyncio.to_thread(postfix.wait_for_log, r"lost connection after STARTTLS", count=2)
    assert ": client=" not in postfix.log()
    assert postfix.maildir_messages() == []


async def test_smtputf8_message_reaches_postfix_with_its_utf8_envelope(
    make_relay: RelayFactory, postfix_factory: PostfixFactory
) -> None:
    postfix = await start_postfix(postfix_factory, maildir=True, name="up-utf8")
    relay = await relay_to(make_relay, postfix.port)
    original = (
        "From: Jörg <jörg@example.com>\r\n"
        "To: Zoë <zoë@example.org>\r\n"
        "Subject: Grüße\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        "Message-ID: <utf8-upstream@example.com>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Zoë, der Betrag ist 10 €.\r\n"
    ).encode()

    def submit() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as client:
            options = ["SMTPUTF8", "BODY=8BITMIME"]
            return client.sendmail("jörg@example.com", ["zoë@example.org"], original, options)

    assert await asyncio.to_thread(submit) == {}
    await relay.idle()
    [delivered] = await relay.events("delivered")
    [stored] = await asyncio.to_thread(postfix.wait_for_maildir, 1)
    assert stored.endswith(original.replace(b"\r\n", b"\n"))
    head = stored.split(b"\n\n", 1)[0].decode().replace("\n\t", " ")
    assert re.search(rf"with UTF8SMTP id {delivered['upstream_id']}\b", head), head
    assert "Delivered-To: zoë@example.org" in head
    log = postfix.log()
    assert f"{delivered['upstream_id']}: from=<jörg@example.com>" in log


# --- smtp-sink fault modes ---------------------------------------------------------------------

STAGES = mta.FAULT_STAGES


@pytest.mark.parametrize("stage", STAGES)
async def test_tempfail_at_each_stage_defers_then_a_clean_upstream_gets_it_once(
    make_relay: RelayFactory, sink_factory: SinkFactory, stage: str
) -> None:
    faulty = await start_sink(sink_factory, tempfail=STAGES[stage])
    relay = await relay_to(make_relay, faulty.port)
    assert (await send(relay.port, make_message(f"tempfail at {stage}"))).code == 250
    deferred = await relay.wait_for_events("deferred", count=2)
    # An attempt that reached the upstream records its 4xx. One refused before MAIL marks the
    # upstream down for a while: attempts meanwhile are deferred untried, with that reason.
    tried = [e for e in deferred if "down:" not in (e["detail"] or "")]
    assert tried[0] == deferred[0]
    assert all(e["code"] is not None and e["code"] // 100 == 4 for e in tried), deferred
    assert all("command failed" in e["reply"] for e in deferred), deferred
    assert await relay.events("failed") == []
    assert (await message_state(relay))[0] in ("queued", "sending")
    # smtp-sink keeps the bytes it got before refusing the final dot, and only then.
    refused_after_data = faulty.count()
    assert (refused_after_data >= 2) if stage == "end-of-data" else (refused_after_data == 0)
    await asyncio.to_thread(faulty.stop)
    clean = await start_sink(sink_factory, port=faulty.port)
    [message] = await asyncio.to_thread(clean.wait_for, 1)
    await relay.idle()
    assert message.email()["Subject"] == f"tempfail at {stage}"
    assert len(await relay.events("delivered")) == 1
    assert clean.count() == 1


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data", "end-of-data"])
async def test_hardfail_in_the_transaction_fails_the_message_and_never_retries(
    make_relay: RelayFactory, sink_factory: SinkFactory, stage: str
) -> None:
    sink = await start_sink(sink_factory, hardfail=STAGES[stage])
    relay = await relay_to(make_relay, sink.port)
    assert (await send(relay.port, make_message(f"hardfail at {stage}"))).code == 250
    [failed] = await relay.wait_for_events("failed")
    await relay.idle()
    assert failed["code"] // 100 == 5, failed
    assert await relay.events("deferred") == []
    # "done" is never leased again: one attempt, one MAIL FROM, and that is final.
    assert await message_state(relay) == ("done", 1)
    assert await relay.rows("SELECT state FROM recipients") == [("failed",)]
    assert mail_commands(sink) == 1
    assert sink.count() == (1 if stage == "end-of-data" else 0)


@pytest.mark.parametrize("stage", ["connect", "helo"])
async def test_hardfail_before_mail_defers_and_keeps_the_message(
    make_relay: RelayFactory, sink_factory: SinkFactory, stage: str
) -> None:
    # A 5xx greeting or EHLO/HELO refusal says nothing about this message: Postfix, for one,
    # skips such a server and defers. The relay must not throw the message away over it.
    faulty = await start_sink(sink_factory, hardfail=STAGES[stage])
    relay = await relay_to(make_relay, faulty.port)
    assert (await send(relay.port, make_message(f"hardfail at {stage}"))).code == 250

    async def outcome() -> bool:
        return bool(await relay.events("failed")) or len(await relay.events("deferred")) >= 2

    await eventually(outcome, what="the relay to decide about a 5xx before MAIL")
    failed = await relay.events("failed")
    assert failed == [], f"a 5xx at {stage} failed the message for good: {failed[0]['reply']!r}"
    # What the relay does: each attempt is a deferral that records the upstream's 5xx reply;
    # while the upstream is marked down for it, attempts are deferred with that reason untried.
    deferred = await relay.events("deferred")
    tried = [e for e in deferred if "down:" not in (e["detail"] or "")]
    assert tried[0] == deferred[0]
    assert all(e["code"] == 500 for e in tried), deferred
    assert all("command failed" in e["reply"] for e in deferred), deferred
    assert (await message_state(relay))[0] in ("queued", "sending")
    assert mail_commands(faulty) == 0
    await asyncio.to_thread(faulty.stop)
    clean = await start_sink(sink_factory, port=faulty.port)
    await asyncio.to_thread(clean.wait_for, 1)
    await relay.idle()
    assert clean.count() == 1


async def test_lost_reply_after_data_is_ambiguous_and_retried_at_least_once(
    make_relay: RelayFactory, sink_factory: SinkFactory
) -> None:
    # Retries a second apart: the faulty sink is stopped between two attempts, not during one.
    delivery = {"retry_initial": "1s", "retry_max": "1s"}
    faulty = await start_sink(sink_factory, drop=[END_OF_DATA])
    relay = await relay_to(make_relay, faulty.port, delivery=delivery)
    assert (await send(relay.port, make_message("reply lost"))).code == 250
    [ambiguous] = await relay.wait_for_events("ambiguous")
    assert "after the message was sent" in ambiguous["reply"]
    await asyncio.to_thread(faulty.stop)
    clean = await start_sink(sink_factory, port=faulty.port)
    await asyncio.to_thread(clean.wait_for, 1)
    await relay.idle()
    ambiguous_events = await relay.events("ambiguous")
    deferred = await relay.events("deferred")  # only if a retry met the swap of sinks
    assert len(await relay.events("delivered")) == 1
    assert await message_state(relay) == ("done", len(ambiguous_events) + len(deferred) + 1)
    # At-least-once: the upstream got it once per lost reply, plus the acknowledged delivery.
    assert faulty.count() + clean.count() == 1 + len(ambiguous_events)
    assert clean.count() == 1


async def test_lost_reply_after_data_is_held_and_not_retried_under_hold(
    make_relay: RelayFactory, sink_factory: SinkFactory
) -> None:
    sink = await start_sink(sink_factory, drop=[END_OF_DATA])
    relay = await relay_to(make_relay, sink.port, delivery={"on_ambiguous": "hold"})
    assert (await send(relay.port, make_message("reply lost, hold"))).code == 250
    [ambiguous] = await relay.wait_for_events("ambiguous")
    await relay.idle()
    assert await message_state(relay) == ("held", 1)
    assert await relay.rows("SELECT state FROM recipients") == [("held",)]
    assert await relay.events("delivered") == []
    assert await relay.events("deferred") == []
    # The one copy that arrived is the only one: at-most-once.
    assert [m.email()["Subject"] for m in await asyncio.to_thread(sink.wait_for, 1)] == [
        "reply lost, hold"
    ]
    assert mail_commands(sink) == 1
    assert ambiguous["queue_id"] == (await relay.rows("SELECT queue_id FROM messages"))[0][0]
