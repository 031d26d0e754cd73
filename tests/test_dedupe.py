"""Deduplication over real SMTP: what counts as the same email, and what happens to a repeat."""

from __future__ import annotations

import asyncio
import time

import pytest

from relay.fingerprint import MAX_DEPTH
from tests.conftest import BACKENDS, Relay, Upstream, eventually, make_message, send

# Every behaviour here holds on both store backends.
pytestmark = pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)


def header(data: bytes, name: str) -> list[str]:
    head = data.split(b"\r\n\r\n")[0].decode("utf-8", "replace").replace("\r\n\t", " ")
    prefix = name.lower() + ":"
    return [
        line.split(":", 1)[1].strip()
        for line in head.split("\r\n")
        if line.lower().startswith(prefix)
    ]


async def forwarded_once(relay: Relay, upstream: Upstream) -> None:
    await relay.idle()
    assert len(upstream.messages) == 1


# --- keys -----------------------------------------------------------------


async def test_repeat_with_same_message_id_is_dropped_and_names_the_original(
    relay: Relay, upstream: Upstream
) -> None:
    message = make_message()
    first = await send(relay.port, message)
    second = await send(relay.port, message)
    original = first.text.rsplit(" ", 1)[1]
    assert second.code == 250
    assert f"duplicate of {original}, not forwarded" in second.text
    await forwarded_once(relay, upstream)
    [duplicate] = await relay.events("duplicate")
    assert duplicate["original"] == original
    assert duplicate["strategy"] == "message-id"
    assert duplicate["client"] == "127.0.0.1"


async def test_idempotency_key_catches_a_retry_with_a_new_message_id_and_is_stripped(
    relay: Relay, upstream: Upstream
) -> None:
    for _ in range(3):
        retry = make_message(extra={"Idempotency-Key": "order-1234-receipt"})
        assert (await send(relay.port, retry)).code == 250
    await forwarded_once(relay, upstream)
    assert header(upstream.messages[0].data, "Idempotency-Key") == []
    events = await relay.events("duplicate")
    assert [e["strategy"] for e in events] == ["header:Idempotency-Key"] * 2
    assert {e["key"] for e in events} == {"order-1234-receipt"}


async def test_key_header_is_kept_when_stripping_is_off(make_relay, upstream: Upstream) -> None:
    relay = await make_relay(dedupe={"strip_key_header": False})
    await send(relay.port, make_message(extra={"Idempotency-Key": "k-1"}))
    [delivered] = await upstream.wait_for(1)
    assert header(delivered.data, "Idempotency-Key") == ["k-1"]


async def test_regenerated_message_is_caught_by_fingerprint(make_relay, upstream: Upstream) -> None:
    relay = await make_relay(dedupe={"keys": ["header:Idempotency-Key", "fingerprint"]})
    for _ in range(2):
        regenerated = make_message("Invoice 42", "Amount due: 10 EUR\n", attachment=b"%PDF-1.4 42")
        assert (await send(relay.port, regenerated)).code == 250
    await forwarded_once(relay, upstream)
    [duplicate] = await relay.events("duplicate")
    assert duplicate["strategy"] == "fingerprint"


async def test_a_regenerated_message_saying_boundary_often_is_caught_by_fingerprint(
    make_relay, upstream: Upstream
) -> None:
    relay = await make_relay(dedupe={"keys": ["fingerprint"]})
    text = "Keep inside the boundary of the form. " * 80 + "\n"
    for _ in range(2):
        regenerated = make_message("Form 7", text, attachment=b"boundary=" * 80)
        assert regenerated.lower().count(b"boundary") > 64
        assert (await send(relay.port, regenerated)).code == 250
    await forwarded_once(relay, upstream)
    [received] = await relay.events("received")
    assert received["detail"] is None
    [duplicate] = await relay.events("duplicate")
    assert duplicate["strategy"] == "fingerprint"


async def test_a_message_too_deep_to_parse_says_its_key_is_over_the_raw_bytes(
    make_relay, upstream: Upstream
) -> None:
    relay = await make_relay(dedupe={"keys": ["fingerprint"]})
    deep = b"From: a@example.com\r\nSubject: deep\r\n" + b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (n, n)
        for n in range(MAX_DEPTH + 1)
    )
    assert (await send(relay.port, deep + b"\r\nhello\r\n")).code == 250
    await forwarded_once(relay, upstream)
    [received] = await relay.events("received")
    assert received["strategy"] == "fingerprint"
    assert received["detail"] == (
        "fingerprint over the raw bytes, not the canonical MIME form:"
        f" its MIME parts are nested more than {MAX_DEPTH} deep"
    )


async def test_one_changed_character_is_a_different_email(make_relay, upstream: Upstream) -> None:
    relay = await make_relay(dedupe={"keys": ["fingerprint"]})
    await send(relay.port, make_message("Invoice 42", "Amount due: 10 EUR\n"))
    await send(relay.port, make_message("Invoice 42", "Amount due: 19 EUR\n"))
    await send(relay.port, make_message("Invoice 43", "Amount due: 10 EUR\n"))
    await send(relay.port, make_message("Invoice 42", "Amount due: 10 EUR\n", sender="b@x.org"))
    await upstream.wait_for(4)
    await relay.idle()
    assert await relay.events("duplicate") == []


async def test_forty_concurrent_identical_sends_forward_exactly_one(
    relay: Relay, upstream: Upstream
) -> None:
    message = make_message(extra={"Idempotency-Key": "burst"})
    replies = await asyncio.gather(*(send(relay.port, message) for _ in range(40)))
    assert all(r.code == 250 for r in replies)
    assert sum("queued as" in r.text for r in replies) == 1
    await forwarded_once(relay, upstream)
    assert len(await relay.events("duplicate")) == 39


# --- persistence and windows ------------------------------------------------


async def test_repeat_is_recognised_after_a_restart(make_relay, upstream: Upstream) -> None:
    message = make_message()
    first = await make_relay()
    await send(first.port, message)
    await upstream.wait_for(1)
    await first.stop()
    second = await make_relay()
    reply = await send(second.port, message)
    assert "not forwarded" in reply.text
    await forwarded_once(second, upstream)


async def test_repeat_while_original_is_still_being_retried_is_dropped(
    make_relay, upstream: Upstream
) -> None:
    upstream.script.data = ["451 4.3.0 try later"] * 3
    relay = await make_relay()
    message = make_message()
    await send(relay.port, message)
    await eventually(lambda: relay.events("deferred"), what="the original deferred")
    assert "not forwarded" in (await send(relay.port, message)).text
    await upstream.wait_for(1)
    await forwarded_once(relay, upstream)


async def claim_expiry(relay: Relay) -> float:
    [(expires_at,)] = await relay.rows("SELECT max(expires_at) FROM claims")
    return float(expires_at)


async def test_repeat_after_the_window_is_forwarded_again(make_relay, upstream: Upstream) -> None:
    relay = await make_relay(dedupe={"window": "1s"})
    message = make_message()
    await send(relay.port, message)
    assert "not forwarded" in (await send(relay.port, message)).text
    await relay.idle()
    expires = await claim_expiry(relay)
    await eventually(lambda: time.time() > expires, what="the window to pass")
    assert "queued as" in (await send(relay.port, message)).text
    await upstream.wait_for(2)


async def test_window_does_not_end_while_the_original_is_undelivered(
    make_relay, upstream: Upstream
) -> None:
    upstream.script.data = ["451 4.3.0 try later"] * 1000
    relay = await make_relay(dedupe={"window": "300ms"})
    message = make_message()
    await send(relay.port, message)
    expires = await claim_expiry(relay)
    await eventually(lambda: time.time() > expires, what="the window to pass")
    assert "not forwarded" in (await send(relay.port, message)).text
    upstream.script.data = []
    await upstream.wait_for(1)
    await forwarded_once(relay, upstream)


async def test_expired_claims_are_purged_but_pending_ones_are_kept(
    make_relay, upstream: Upstream
) -> None:
    relay = await make_relay(dedupe={"window": "200ms"})
    await send(relay.port, make_message("delivered"))
    await relay.idle()
    await upstream.stop()
    await send(relay.port, make_message("stuck"))
    expires = await claim_expiry(relay)
    await eventually(lambda: time.time() > expires, what="both windows to pass")
    purged = await relay.store.purge(time.time(), 86400)
    assert purged["claims"] == 1
    assert await relay.rows("SELECT pending FROM claims") == [(1,)]


# --- recipients ---------------------------------------------------------------


async def test_repeat_with_a_new_recipient_reaches_only_them(
    relay: Relay, upstream: Upstream
) -> None:
    message = make_message(extra={"Idempotency-Key": "welcome-7"})
    await send(relay.port, message, rcpts=("a@example.org", "b@example.org"))
    reply = await send(
        relay.port, message, rcpts=("A@example.org", "b@example.org", "c@example.org")
    )
    assert "for 1 new recipient(s); 2 already had it" in reply.text
    await upstream.wait_for(2)
    await relay.idle()
    # Four workers: the two messages may reach the upstream in either order.
    assert sorted(m.rcpts for m in upstream.messages) == [
        ["a@example.org", "b@example.org"],
        ["c@example.org"],
    ]


async def test_added_message_id_is_derived_from_the_key_so_every_copy_shares_it(
    relay: Relay, upstream: Upstream
) -> None:
    message = make_message(message_id=None, extra={"Idempotency-Key": "reset-99"})
    await send(relay.port, message, rcpts=("a@example.org",))
    await send(relay.port, message, rcpts=("b@example.org",))
    first, second = await upstream.wait_for(2)
    assert header(first.data, "Message-ID") == header(second.data, "Message-ID")
    assert len(header(first.data, "Message-ID")) == 1


# --- actions ------------------------------------------------------------------


async def test_reject_action_answers_550(make_relay, upstream: Upstream) -> None:
    relay = await make_relay(dedupe={"on_duplicate": "reject"})
    message = make_message()
    await send(relay.port, message)
    reply = await send(relay.port, message)
    assert reply.code == 550
    assert reply.text.startswith("5.7.0 Duplicate of message")
    await forwarded_once(relay, upstream)


async def test_tag_action_forwards_with_a_header_naming_the_original(
    make_relay, upstream: Upstream
) -> None:
    relay = await make_relay(dedupe={"on_duplicate": "tag"})
    message = make_message()
    first = await send(relay.port, message)
    await send(relay.port, message)
    original, tagged = await upstream.wait_for(2)
    assert header(original.data, "X-Dedup-Duplicate-Of") == []
    assert header(tagged.data, "X-Dedup-Duplicate-Of") == [first.text.rsplit(" ", 1)[1]]


async def test_shadow_mode_forwards_everything_and_records_what_it_would_drop(
    make_relay, upstream: Upstream
) -> None:
    relay = await make_relay(dedupe={"mode": "shadow"})
    message = make_message()
    for _ in range(3):
        assert "queued as" in (await send(relay.port, message)).text
    await upstream.wait_for(3)
    duplicates = await relay.events("duplicate")
    assert len(duplicates) == 2
    assert all(d["action"] == "shadow" for d in duplicates)


async def test_mode_off_forwards_repeats_without_claims(make_relay, upstream: Upstream) -> None:
    relay = await make_relay(dedupe={"mode": "off"})
    message = make_message()
    await send(relay.port, message)
    await send(relay.port, message)
    await upstream.wait_for(2)
    assert await relay.rows("SELECT count(*) FROM claims") == [(0,)]


# --- rules --------------------------------------------------------------------


async def test_rule_with_its_own_window_lets_a_resend_through_while_others_stay_blocked(
    make_relay, upstream: Upstream
) -> None:
    relay = await make_relay(
        rules=[{"name": "otp", "match": {"header": {"Subject": "*login code*"}}, "window": "1s"}]
    )
    otp = make_message("Your login code", "123456\n")
    receipt = make_message("Your receipt", "Paid.\n")
    for message in (otp, receipt):
        await send(relay.port, message)
    await relay.idle()
    [(otp_expiry,)] = await relay.rows("SELECT min(expires_at) FROM claims")
    await eventually(lambda: time.time() > otp_expiry, what="the OTP window to pass")
    assert "queued as" in (await send(relay.port, otp)).text
    assert "not forwarded" in (await send(relay.port, receipt)).text
    await upstream.wait_for(3)
    [received] = [e for e in await relay.events("received") if e["detail"] == "rule=otp"][:1]
    assert received["strategy"] == "message-id"


async def test_bypass_rule_forwards_every_copy(make_relay, upstream: Upstream) -> None:
    relay = await make_relay(
        rules=[{"name": "alerts", "match": {"sender": "*@alerts.example.com"}, "bypass": True}]
    )
    message = make_message(sender="pager@alerts.example.com")
    for _ in range(2):
        reply = await send(relay.port, message, sender="pager@alerts.example.com")
        assert "queued as" in reply.text
    await upstream.wait_for(2)
    await relay.idle()
    assert len(upstream.messages) == 2
    assert await relay.events("duplicate") == []
    assert await relay.rows("SELECT count(*) FROM claims") == [(0,)]


async def test_sender_domain_scope_keeps_tenants_apart(make_relay, upstream: Upstream) -> None:
    relay = await make_relay(dedupe={"scope": "sender_domain"})
    message = make_message(message_id="<same@shared-library>")
    await send(relay.port, message, sender="app@tenant-one.example")
    await send(relay.port, message, sender="app@tenant-two.example")
    assert "not forwarded" in (await send(relay.port, message, sender="x@tenant-one.example")).text
    await upstream.wait_for(2)
    await relay.idle()
    assert len(upstream.messages) == 2


# --- conflicts and bad keys ---------------------------------------------------


async def test_same_key_with_different_content_is_a_conflict_not_a_repeat(
    relay: Relay, upstream: Upstream
) -> None:
    first = await send(
        relay.port, make_message("Receipt", "Total 10\n", extra={"Idempotency-Key": "k"})
    )
    reply = await send(
        relay.port, make_message("Receipt", "Total 99\n", extra={"Idempotency-Key": "k"})
    )
    assert reply.code == 554
    assert first.text.rsplit(" ", 1)[1] in reply.text
    await forwarded_once(relay, upstream)
    [conflict] = await relay.events("conflict")
    assert conflict["key"] == "k"


async def test_conflict_can_be_configured_to_forward(make_relay, upstream: Upstream) -> None:
    relay = await make_relay(dedupe={"on_conflict": "forward"})
    await send(relay.port, make_message("A", "one\n", extra={"Idempotency-Key": "k"}))
    reply = await send(relay.port, make_message("A", "two\n", extra={"Idempotency-Key": "k"}))
    assert "queued as" in reply.text
    await upstream.wait_for(2)
    assert len(await relay.events("conflict")) == 1


async def test_unusable_idempotency_keys_get_a_clear_5xx(relay: Relay, upstream: Upstream) -> None:
    for bad, reason in (
        (b"", "is empty"),
        (b"k" * 256, "longer than 255"),
        ("caf\u00e9".encode(), "outside printable ASCII"),
    ):
        raw = b"Idempotency-Key: " + bad + b"\r\n" + make_message()
        reply = await send(relay.port, raw)
        assert reply.code == 550, bad
        assert reply.text.startswith("5.6.0 Idempotency-Key header")
        assert reason in reply.text
    assert len(await relay.events("rejected")) == 3
    assert upstream.messages == []


# --- failure releases the key -------------------------------------------------


async def test_final_failure_releases_the_key_for_a_legitimate_resend(
    relay: Relay, upstream: Upstream
) -> None:
    upstream.script.data = ["550 5.1.1 mailbox unavailable"]
    message = make_message()
    await send(relay.port, message)
    await eventually(lambda: relay.events("released"), what="the key released")
    assert "queued as" in (await send(relay.port, message)).text
    await upstream.wait_for(1)


async def test_key_stays_claimed_after_failure_when_release_is_off(
    make_relay, upstream: Upstream
) -> None:
    relay = await make_relay(dedupe={"release_on_failure": False})
    upstream.script.data = ["550 5.1.1 mailbox unavailable"]
    message = make_message()
    await send(relay.port, message)
    await eventually(lambda: relay.events("failed"), what="the failure")
    assert "not forwarded" in (await send(relay.port, message)).text


# --- toward the upstream ------------------------------------------------------


async def test_upstream_idempotency_header_is_stable_across_an_ambiguous_retry(
    make_relay, upstream: Upstream
) -> None:
    upstream.script.drop_after_data = 1
    relay = await make_relay(upstream={"idempotency_header": "Resend-Idempotency-Key"})
    await send(relay.port, make_message(), rcpts=("a@example.org", "b@example.org"))
    [delivered] = await upstream.wait_for(1)
    [dropped] = upstream.dropped
    key = header(delivered.data, "Resend-Idempotency-Key")
    assert len(key) == 1 and key[0].startswith("dedup-relay-")
    assert header(dropped.data, "Resend-Idempotency-Key") == key


# --- replicas -----------------------------------------------------------------


async def test_two_replicas_sharing_one_store_forward_a_repeat_once(
    make_relay, upstream: Upstream
) -> None:
    first = await make_relay(runtime={"instance": "replica-a"})
    second = await make_relay(runtime={"instance": "replica-b"})
    message = make_message(extra={"Idempotency-Key": "shared-store"})
    replies = await asyncio.gather(*(send(relay.port, message) for relay in (first, second) * 20))
    assert all(r.code == 250 for r in replies)
    assert sum("queued as" in r.text for r in replies) == 1
    await upstream.wait_for(1)
    await first.idle()
    assert len(upstream.messages) == 1
    assert len(await first.events("duplicate")) == 39
