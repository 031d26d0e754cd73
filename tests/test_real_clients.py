"""Real mail clients sending into the relay: swaks, nodemailer, smtplib, aiosmtplib and Postfix.

Each client brings its own habits (pipelining, MIME layout, fresh Message-ID and boundary per
send, an MTA's queue and retries); the relay must forward what they send byte for byte apart
from the headers it prepends, and forward each logical email once.

The in-process relay runs on the test's event loop, so every blocking client (a subprocess,
smtplib, the harness's polling waits) goes through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import base64
import smtplib
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Callable
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests import mta
from tests.conftest import (
    Relay,
    RelayFactory,
    RelayProcess,
    Upstream,
    base_config,
    deep_merge,
    eventually,
    free_port,
)
from tests.mta import Postfix, PostfixFactory, run_nodemailer, swaks, swaks_replies

# The harness's factory fixture, made visible to this module.
postfix_factory = mta.postfix_factory

RelayProcessFactory = Callable[[dict[str, Any]], RelayProcess]

SENDER = "app@example.com"
RECIPIENT = "alice@example.org"


# --- helpers -------------------------------------------------------------------------------


async def run_swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """swaks from SENDER to RECIPIENT (unless overridden) at 127.0.0.1:port, off the loop."""
    defaults: list[str] = []
    if "--from" not in args:
        defaults += ["--from", SENDER]
    if "--to" not in args:
        defaults += ["--to", RECIPIENT]
    argv = ["--server", f"127.0.0.1:{port}", "--timeout", "15", *defaults, *args]
    return await asyncio.to_thread(swaks, *argv)


def swaks_data(result: subprocess.CompletedProcess[str]) -> bytes:
    """The DATA payload swaks put on the wire, rebuilt from its transcript (ASCII mail only)."""
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("<-  354"))
    sent: list[str] = []
    for line in lines[start + 1 :]:
        if not line.startswith(" -> "):
            continue
        text = line[4:]
        if text == ".":
            break
        sent.append(text[1:] if text.startswith("..") else text)
    return "".join(f"{line}\r\n" for line in sent).encode("ascii")


def swaks_data_file(path: Path, original: bytes) -> str:
    """A --data file for `original`; swaks ends DATA with CRLF "." so the file leaves it out."""
    assert original.endswith(b"\r\n")
    path.write_bytes(original[:-2])
    return f"@{path}"


def prepended_fields(delivered: bytes, original: bytes) -> list[str]:
    """Names of the header fields the relay put in front of `original`; fails if it changed it."""
    assert delivered.endswith(original), "the relay changed the message bytes"
    prefix = delivered[: len(delivered) - len(original)].decode("utf-8")
    assert prefix.endswith("\r\n")
    names: list[str] = []
    for line in prefix[:-2].split("\r\n"):
        if line[:1] in (" ", "\t"):
            assert names, f"continuation line without a field: {line!r}"
            continue
        names.append(line.split(":", 1)[0])
    return names


def header_values(data: bytes, name: str) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").replace("\r\n\t", " ")
    prefix = name.lower() + ":"
    return [
        line.split(":", 1)[1].strip()
        for line in head.split("\r\n")
        if line.lower().startswith(prefix)
    ]


def parsed(data: bytes) -> EmailMessage:
    message = BytesParser(EmailMessage, policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def record_mail_options(upstream: Upstream) -> list[list[str]]:
    """MAIL FROM parameters (SIZE, BODY, SMTPUTF8) the relay used at the upstream, in order."""
    seen: list[list[str]] = []
    original = upstream.handle_MAIL

    async def handle_mail(*args: Any) -> str:
        seen.append(list(args[-1]))
        return await original(*args)

    upstream.handle_MAIL = handle_mail  # type: ignore[method-assign,assignment]
    return seen


async def forwarded(relay: Relay, upstream: Upstream, count: int) -> None:
    """The queue has drained and exactly `count` messages reached the upstream."""
    await upstream.wait_for(count)
    await relay.idle()
    assert len(upstream.messages) == count, [m.data[:300] for m in upstream.messages]


def message_id_counts(upstream: Upstream) -> Counter[str]:
    counts: Counter[str] = Counter()
    for message in upstream.messages:
        counts.update(header_values(message.data, "Message-ID"))
    return counts


async def nodemailer(port: int, **message: Any) -> dict[str, Any]:
    return await asyncio.to_thread(run_nodemailer, port, **message)


# --- swaks -----------------------------------------------------------------------------------


async def test_swaks_message_arrives_byte_for_byte_with_only_received_prepended(
    relay: Relay, upstream: Upstream
) -> None:
    result = await run_swaks(relay.port, "--header", "Subject: plain swaks")
    assert result.returncode == 0, result.stdout
    assert swaks_replies(result)[-2].startswith("250 2.0.0 Ok: queued as ")
    await forwarded(relay, upstream, 1)
    [delivered] = upstream.messages
    assert prepended_fields(delivered.data, swaks_data(result)) == ["Received"]
    assert (delivered.sender, delivered.rcpts) == (SENDER, [RECIPIENT])


async def test_swaks_pipelined_transaction_with_three_recipients_is_forwarded_once(
    relay: Relay, upstream: Upstream
) -> None:
    rcpts = ["a@example.org", "b@example.org", "c@example.net"]
    result = await run_swaks(
        relay.port, "--pipeline", "--to", ",".join(rcpts), "--header", "Subject: pipelined"
    )
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    # Pipelined: MAIL, every RCPT and DATA go out before the first reply to any of them.
    mail_at = next(i for i, line in enumerate(lines) if line.startswith(" -> MAIL FROM:"))
    commands = [line[4:].split(":")[0] for line in lines[mail_at : mail_at + 5]]
    assert commands == ["MAIL FROM", "RCPT TO", "RCPT TO", "RCPT TO", "DATA"], result.stdout
    replies = [line[4:7] for line in lines[mail_at + 5 : mail_at + 10]]
    assert replies == ["250", "250", "250", "250", "354"], result.stdout
    await forwarded(relay, upstream, 1)
    [delivered] = upstream.messages
    assert delivered.rcpts == rcpts
    assert prepended_fields(delivered.data, swaks_data(result)) == ["Received"]


async def test_swaks_8bit_body_is_forwarded_unchanged(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    # swaks (Debian 12) cannot declare BODY=8BITMIME; it just sends the raw bytes it is given.
    original = (
        b"From: app@example.com\r\n"
        b"To: alice@example.org\r\n"
        b"Subject: 8-bit body\r\n"
        b"Message-ID: <eight-bit@example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"gr\xc3\xbc\xc3\x9fe, \xe2\x82\xac 10, \xf0\x9f\x93\xa6\r\n"
        b"latin-1 byte \xe9 and a C1 byte \x85 left alone\r\n"
        b".a line swaks dot-stuffs\r\n"
        b".\r\n"
        b"trailing spaces   \r\n"
    )
    data_file = swaks_data_file(tmp_path / "eight-bit.eml", original)
    options = record_mail_options(upstream)
    result = await run_swaks(relay.port, "--data", data_file)
    assert result.returncode == 0, result.stdout
    await forwarded(relay, upstream, 1)
    [delivered] = upstream.messages
    assert prepended_fields(delivered.data, original) == ["Received"]
    # The client declared nothing, so neither does the relay.
    assert not any(o.startswith("BODY=") for o in options[0])


async def test_swaks_utf8_headers_with_ascii_envelope_are_forwarded_unchanged(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    # RFC 6532 header content: a UTF-8 local part in From and raw UTF-8 in Subject.
    original = (
        "From: Jörg Müller <jörg@example.com>\r\n"
        "To: Zoë <zoë@example.org>\r\n"
        "Subject: Grüße — ünïcödé subject\r\n"
        "Message-ID: <utf8-header@example.com>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Hallo Zoë.\r\n"
    ).encode()
    data_file = swaks_data_file(tmp_path / "utf8.eml", original)
    result = await run_swaks(relay.port, "--data", data_file)
    assert result.returncode == 0, result.stdout
    await forwarded(relay, upstream, 1)
    [delivered] = upstream.messages
    assert prepended_fields(delivered.data, original) == ["Received"]
    assert parsed(delivered.data)["Subject"] == "Grüße — ünïcödé subject"


async def test_swaks_utf8_sender_without_smtputf8_is_refused_or_delivered_never_lost(
    relay: Relay, upstream: Upstream
) -> None:
    # swaks has no SMTPUTF8 option: it puts a UTF-8 address in MAIL FROM without the parameter.
    # RFC 6531 3.4 says to refuse that (553 5.6.7). Refusing is fine, and so is delivering to
    # this upstream, which offers SMTPUTF8; a 250 followed by a permanent failure is not: the
    # client was promised delivery and nobody is told it did not happen.
    result = await run_swaks(relay.port, "--from", "jörg@example.com", "--header", "Subject: u")
    lines = result.stdout.splitlines()
    mail_at = next(i for i, line in enumerate(lines) if line.startswith(" -> MAIL FROM:"))
    mail_reply = next(line for line in lines[mail_at:] if line.startswith("<"))
    if result.returncode != 0:
        assert mail_reply.startswith("<** 553"), result.stdout
        assert upstream.messages == []
        return
    assert swaks_replies(result)[-2].startswith("250 2.0.0 Ok: queued as ")
    await relay.idle()
    failed = [(e["sender"], e["reply"]) for e in await relay.events("failed")]
    assert failed == [], "accepted with 250, then failed for good at an SMTPUTF8 upstream"
    assert [m.sender for m in upstream.messages] == ["jörg@example.com"]


async def test_swaks_attachment_arrives_intact(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    attachment = tmp_path / "invoice-42.pdf"
    content = bytes(range(256)) * 40 + b"%PDF-1.4 end"
    attachment.write_bytes(content)
    result = await run_swaks(
        relay.port,
        "--header", "Subject: invoice with attachment",
        "--attach-type", "application/pdf",
        "--attach", f"@{attachment}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    await forwarded(relay, upstream, 1)
    [delivered] = upstream.messages
    assert prepended_fields(delivered.data, swaks_data(result)) == ["Received"]
    [part] = parsed(delivered.data).iter_attachments()
    assert part.get_filename() == "invoice-42.pdf"
    assert part.get_content_type() == "application/pdf"
    assert part.get_content() == content


async def test_swaks_message_without_message_id_gets_one_prepended(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    original = b"From: app@example.com\r\nTo: alice@example.org\r\nSubject: no id\r\n\r\nbody\r\n"
    data_file = swaks_data_file(tmp_path / "no-id.eml", original)
    result = await run_swaks(relay.port, "--data", data_file)
    assert result.returncode == 0, result.stdout
    await forwarded(relay, upstream, 1)
    [delivered] = upstream.messages
    assert prepended_fields(delivered.data, original) == ["Received", "Message-ID"]


# --- nodemailer ------------------------------------------------------------------------------

# The same logical email as an app builds it each time it sends: nodemailer makes a fresh
# Message-ID, MIME boundary and Date on every sendMail call.
RECEIPT: dict[str, Any] = {
    "from_": "Shop <shop@example.com>",
    "to": RECIPIENT,
    "subject": "Your receipt #1042",
    "text": "Thank you for your order #1042.\nTotal: 19.90 EUR\n",
    "html": "<p>Thank you for your order <b>#1042</b>.</p><p>Total: 19.90 EUR</p>",
}


@pytest.mark.parametrize(
    "keys", [["fingerprint"], ["header:Idempotency-Key", "fingerprint"]], ids=["fp", "key-fp"]
)
async def test_nodemailer_sending_the_same_email_twice_is_forwarded_once_under_fingerprint(
    make_relay: RelayFactory, upstream: Upstream, keys: list[str]
) -> None:
    relay = await make_relay(dedupe={"keys": keys})
    first = await nodemailer(relay.port, **RECEIPT)
    second = await nodemailer(relay.port, **RECEIPT)
    assert first["messageId"] != second["messageId"]
    assert "queued as" in first["response"]
    assert "not forwarded" in second["response"]
    await forwarded(relay, upstream, 1)
    assert header_values(upstream.messages[0].data, "Message-ID") == [first["messageId"]]
    [duplicate] = await relay.events("duplicate")
    assert duplicate["strategy"] == "fingerprint"


async def test_nodemailer_idempotency_key_header_dedupes_under_default_keys(
    relay: Relay, upstream: Upstream
) -> None:
    replies = [
        await nodemailer(relay.port, headers={"Idempotency-Key": "receipt-1042"}, **RECEIPT)
        for _ in range(2)
    ]
    assert replies[0]["messageId"] != replies[1]["messageId"]
    assert "not forwarded" in replies[1]["response"]
    await forwarded(relay, upstream, 1)
    [delivered] = upstream.messages
    assert header_values(delivered.data, "Idempotency-Key") == []
    [duplicate] = await relay.events("duplicate")
    assert duplicate["strategy"] == "header:Idempotency-Key"


async def test_nodemailer_twice_without_a_key_is_forwarded_twice_under_default_keys(
    relay: Relay, upstream: Upstream
) -> None:
    # The trade-off of the default key order: Message-ID comes before fingerprint, and
    # nodemailer makes a new Message-ID per send, so a regenerated email is new mail.
    first = await nodemailer(relay.port, **RECEIPT)
    second = await nodemailer(relay.port, **RECEIPT)
    await forwarded(relay, upstream, 2)
    assert message_id_counts(upstream) == Counter({first["messageId"]: 1, second["messageId"]: 1})
    assert await relay.events("duplicate") == []
    received = await relay.events("received")
    assert [e["strategy"] for e in received] == ["message-id", "message-id"]


async def test_nodemailer_same_attachment_dedupes_and_a_changed_one_does_not(
    make_relay: RelayFactory, upstream: Upstream
) -> None:
    relay = await make_relay(dedupe={"keys": ["fingerprint"]})

    def invoice(pdf: str) -> dict[str, Any]:
        attachment = {"filename": "invoice-1042.pdf", "content": pdf, "encoding": "base64"}
        return {**RECEIPT, "subject": "Invoice #1042", "attachments": [attachment]}

    pdf = base64.b64encode(b"%PDF-1.4\n" + bytes(range(256)) * 20 + b"\n%%EOF\n").decode()
    changed = base64.b64encode(b"%PDF-1.4\n" + bytes(range(256)) * 20 + b"\n%%EOF!\n").decode()
    sends = [invoice(pdf), invoice(pdf), invoice(changed)]
    replies = [await nodemailer(relay.port, **message) for message in sends]
    assert ["not forwarded" in r["response"] for r in replies] == [False, True, False]
    await forwarded(relay, upstream, 2)
    payloads = [next(parsed(m.data).iter_attachments()).get_content() for m in upstream.messages]
    assert [base64.b64encode(p).decode() for p in payloads] == [pdf, changed]
    [duplicate] = await relay.events("duplicate")
    assert duplicate["strategy"] == "fingerprint"


async def test_nodemailer_utf8_recipient_is_relayed_with_smtputf8(
    relay: Relay, upstream: Upstream
) -> None:
    options = record_mail_options(upstream)
    info = await nodemailer(
        relay.port, to="zoë@example.org", subject="Grüße", text="Hallo Zoë, € 10.\n"
    )
    assert info["accepted"] == ["zoë@example.org"]
    await forwarded(relay, upstream, 1)
    [delivered] = upstream.messages
    assert delivered.rcpts == ["zoë@example.org"]
    assert "SMTPUTF8" in options[0]
    assert parsed(delivered.data)["Subject"] == "Grüße"


# --- Python clients ---------------------------------------------------------------------------


def python_message(
    subject: str = "Order shipped", body: str = "Your parcel is on its way.\n"
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Shop <shop@example.com>"
    message["To"] = RECIPIENT
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="example.com")
    message.set_content(body)
    return message


async def test_smtplib_send_and_resend_in_a_thread_forwards_once(
    relay: Relay, upstream: Upstream
) -> None:
    message = python_message()

    def send_twice() -> list[tuple[int, bytes]]:
        replies: list[tuple[int, bytes]] = []
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as client:
            for _ in range(2):
                client.ehlo_or_helo_if_needed()
                assert client.mail("shop@example.com")[0] == 250
                assert client.rcpt(RECIPIENT)[0] == 250
                replies.append(client.data(message.as_bytes(policy=policy.SMTP)))
        return replies

    first, second = await asyncio.to_thread(send_twice)
    assert first[0] == second[0] == 250
    assert b"queued as" in first[1]
    assert b"not forwarded" in second[1]
    await forwarded(relay, upstream, 1)
    assert prepended_fields(upstream.messages[0].data, message.as_bytes(policy=policy.SMTP)) == [
        "Received"
    ]


async def test_smtplib_smtputf8_and_8bitmime_reach_the_upstream_as_declared(
    relay: Relay, upstream: Upstream
) -> None:
    message = python_message("Grüße aus Köln", "Der Betrag: 10 €.\n")
    message.replace_header("From", "Jörg <jörg@example.com>")
    message.replace_header("To", "Zoë <zoë@example.org>")
    data = message.as_bytes(policy=policy.SMTPUTF8)
    assert b"\xc3\xb6" in data.split(b"\r\n\r\n")[0]  # raw UTF-8 in the header block
    options = record_mail_options(upstream)

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as client:
            return client.sendmail(
                "jörg@example.com", ["zoë@example.org"], data, ["SMTPUTF8", "BODY=8BITMIME"]
            )

    assert await asyncio.to_thread(send) == {}
    await forwarded(relay, upstream, 1)
    [delivered] = upstream.messages
    assert (delivered.sender, delivered.rcpts) == ("jörg@example.com", ["zoë@example.org"])
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(options[0])
    assert prepended_fields(delivered.data, data) == ["Received"]


async def test_aiosmtplib_concurrent_sends_and_resends_forward_each_email_once(
    relay: Relay, upstream: Upstream
) -> None:
    messages = [python_message(f"Order {n} shipped") for n in range(10)]

    async def deliver(message: EmailMessage) -> str:
        _, reply = await aiosmtplib.send(message, hostname="127.0.0.1", port=relay.port)
        return reply

    replies = await asyncio.gather(*(deliver(m) for m in messages + messages))
    assert sum("queued as" in r for r in replies) == 10
    assert sum("not forwarded" in r for r in replies) == 10
    await forwarded(relay, upstream, 10)
    assert set(message_id_counts(upstream).values()) == {1}
    assert len(await relay.events("duplicate")) == 10


# --- Postfix as the client ------------------------------------------------------------------


async def start_postfix(factory: PostfixFactory, relay_port: int, name: str) -> Postfix:
    return await asyncio.to_thread(factory, relayhost=relay_port, name=name)


async def test_mail_submitted_to_postfix_reaches_the_upstream_once(
    relay: Relay, upstream: Upstream, postfix_factory: PostfixFactory
) -> None:
    postfix = await start_postfix(postfix_factory, relay.port, "client-once")
    result = await run_swaks(postfix.port, "--header", "Subject: via postfix")
    assert result.returncode == 0, result.stdout
    [sent] = await asyncio.to_thread(postfix.wait_for_log, r"status=sent \(250 .*queued as (\S+)\)")
    await forwarded(relay, upstream, 1)
    [delivered] = upstream.messages
    assert parsed(delivered.data)["Subject"] == "via postfix"
    assert f"from {postfix.hostname} ([127.0.0.1])" in delivered.data.decode().replace(
        "\r\n\t", " "
    )
    # Postfix logged the relay's own queue id from the 250 reply.
    [received] = await relay.events("received")
    assert sent.group(1) == received["queue_id"]
    await asyncio.to_thread(postfix.wait_for_empty_queue)


async def test_postfix_retries_while_the_relay_is_down_and_every_message_arrives_once(
    tmp_path: Path,
    upstream: Upstream,
    relay_process: RelayProcessFactory,
    postfix_factory: PostfixFactory,
) -> None:
    config = deep_merge(base_config(tmp_path, upstream.port), {"listen": {"port": free_port()}})
    relay = relay_process(config)
    await asyncio.to_thread(relay.start)
    postfix = await start_postfix(postfix_factory, relay.port, "client-retry")
    ids = [f"<postfix-retry-{n}@example.com>" for n in range(6)]

    async def submit(message_id: str) -> None:
        result = await run_swaks(postfix.port, "--header", f"Message-Id: {message_id}")
        assert result.returncode == 0, result.stdout

    def relay_idle() -> bool:
        with sqlite3.connect(tmp_path / "relay.db") as db:
            sql = "SELECT count(*) FROM messages WHERE state IN ('queued', 'sending')"
            busy: int = db.execute(sql).fetchone()[0]
            return busy == 0

    await submit(ids[0])
    await upstream.wait_for(1)
    # Killed only once the delivery is recorded: a kill between the upstream's 250 and that
    # record is the ambiguous case (sent again, by design), which is not what this test is about.
    await eventually(relay_idle, what="the first delivery to be recorded")
    # Postfix removes its queue file a moment after the relay's 250: counted below.
    await asyncio.to_thread(postfix.wait_for_empty_queue)
    relay.kill()
    for message_id in ids[1:]:
        await submit(message_id)
    deferrals = await asyncio.to_thread(
        postfix.wait_for_log, r"status=deferred \((.*)\)", count=len(ids) - 1
    )
    refused = f"connect to 127.0.0.1[127.0.0.1]:{relay.port}: Connection refused"
    assert all(refused in d.group(1) for d in deferrals), [d.group(1) for d in deferrals]
    assert len(await asyncio.to_thread(postfix.queue)) == len(ids) - 1
    restarted = relay_process(config)
    await asyncio.to_thread(restarted.start)
    await asyncio.to_thread(postfix.flush)
    await upstream.wait_for(len(ids))
    await asyncio.to_thread(postfix.wait_for_empty_queue)
    await eventually(relay_idle, what="the restarted relay to drain")
    assert message_id_counts(upstream) == Counter({i: 1 for i in ids})
    await asyncio.to_thread(restarted.terminate)


async def test_postfix_resubmitting_the_same_message_id_is_delivered_upstream_once(
    relay: Relay, upstream: Upstream, postfix_factory: PostfixFactory
) -> None:
    postfix = await start_postfix(postfix_factory, relay.port, "client-resubmit")
    message_id = "<resubmitted-1042@example.com>"
    for _ in range(2):
        # --header replaces swaks's own Message-Id; --add-header would add a second one.
        result = await run_swaks(
            postfix.port, "--header", f"Message-Id: {message_id}", "--header", "Subject: again"
        )
        assert result.returncode == 0, result.stdout
        sent_ids = [line for line in result.stdout.splitlines() if "Message-Id:" in line]
        assert sent_ids == [f" -> Message-Id: {message_id}"]
    # Postfix does not dedupe: it hands both to the relay, which says 250 to both.
    matches = await asyncio.to_thread(postfix.wait_for_log, r"status=sent \((250 .*)\)", count=2)
    assert "not forwarded" in matches[1].group(1)
    await forwarded(relay, upstream, 1)
    assert message_id_counts(upstream) == Counter({message_id: 1})
    [duplicate] = await relay.events("duplicate")
    assert duplicate["strategy"] == "message-id"
