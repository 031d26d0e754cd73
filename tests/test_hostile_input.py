"""Hostile bytes at the front door: control characters in addresses, bare CR and LF (SMTP
smuggling), escape sequences aimed at an operator's terminal, formulas aimed at a spreadsheet.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiosmtplib.email import quote_address
from hypothesis import given
from hypothesis import strategies as st

from relay import content
from relay.server import address_problem
from relay.store import Submission
from tests import mta
from tests.conftest import (
    Dialog,
    Relay,
    RelayFactory,
    RelayProcess,
    Upstream,
    base_config,
    cli,
    deep_merge,
    free_port,
    make_message,
    send,
)
from tests.mta import Postfix

# Any byte drawn becomes CR, LF, a dot or a letter: where line-end edge cases live.
LINE_BYTES = bytes(b"\r\n.a"[i % 4] for i in range(256))

postfix_factory = mta.postfix_factory


async def transaction(relay: Relay, sender: str, *rcpts: str) -> list[str]:
    """The replies to MAIL and each RCPT, sent raw so the bytes are exactly these."""
    dialog, _ = await Dialog.open(relay.port)
    await dialog.command("EHLO client.test")
    replies = [await dialog.command(f"MAIL FROM:<{sender}>".encode())]
    replies += [await dialog.command(f"RCPT TO:<{rcpt}>".encode()) for rcpt in rcpts]
    await dialog.close()
    return replies


# --- envelope addresses (issue 14, items 2 and 9) -------------------------------------------


@pytest.mark.parametrize("control", ["\t", "\x1b", "\x00", "\r", "\x7f", "\x85"])
async def test_control_characters_in_a_quoted_recipient_are_refused_with_553_5_1_3(
    relay: Relay, control: str
) -> None:
    [mail, good, bad] = await transaction(
        relay, "shop@example.com", "alice@example.org", f'"a{control}b"@example.org'
    )
    assert mail.startswith("250") and good.startswith("250")
    assert bad.startswith("553 5.1.3"), bad


@pytest.mark.parametrize("control", ["\r", "\x1b", "\t"])
async def test_control_characters_in_the_sender_are_refused_with_553(
    relay: Relay, control: str
) -> None:
    [mail] = await transaction(relay, f'"shop{control}x"@example.com')
    assert mail.startswith("553 5.1.7"), mail


async def test_an_ehlo_name_with_control_characters_is_refused(relay: Relay) -> None:
    dialog, _ = await Dialog.open(relay.port)
    assert (await dialog.command(b"EHLO evil\rReceived: forged")).startswith("501")
    assert (await dialog.command("MAIL FROM:<a@example.com>")).startswith("503")
    await dialog.close()


TRICKY = [
    '"john smith"@example.org',
    '"a,b"@example.org',
    '"<evil@example.net>"@example.org',
    '"x@evil.example"@example.org',
    '"quoted\\"quote"@example.org',
    '"(comment)"@example.org',
    "o'brien@example.org",
    "plus+tag@example.org",
    "=formula@example.org",
]


class RecordingUpstream:
    """A minimal SMTP server that keeps the raw MAIL and RCPT lines the relay sends."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.messages = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 recorder\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-recorder\r\n250 SMTPUTF8\r\n")
                elif verb in (b"MAIL", b"RCPT"):
                    self.lines.append(line)
                    writer.write(b"250 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
                    self.messages += 1
                    writer.write(b"250 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        finally:
            writer.close()


async def test_what_reaches_the_upstream_is_exactly_the_address_the_log_names(
    make_relay: RelayFactory,
) -> None:
    recorder = RecordingUpstream()
    await recorder.start()
    try:
        relay = await make_relay(upstream={"url": f"smtp://127.0.0.1:{recorder.port}"})
        replies = await transaction(relay, "shop@example.com", *TRICKY)
        accepted = [a for a, r in zip(TRICKY, replies[1:], strict=True) if r.startswith("250")]
        assert len(accepted) >= 5, replies
        reply = await send(relay.port, make_message(), rcpts=tuple(accepted))
        assert reply.code == 250
        await relay.idle()
        [received] = await relay.events("received")
        logged = received["rcpts"].split(",")
        sent = [line.decode().strip() for line in recorder.lines if line.startswith(b"RCPT")]
        assert sorted(sent) == sorted(f"RCPT TO:<{rcpt}>" for rcpt in logged)
        assert logged == accepted
    finally:
        await recorder.stop()


@given(
    st.text(
        alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF, exclude_characters='"\\'),
        min_size=1,
        max_size=12,
    ),
    st.booleans(),
)
def test_every_address_the_front_door_takes_is_sent_upstream_unchanged(
    local: str, quoted: bool
) -> None:
    address = (f'"{local}"' if quoted else local) + "@example.org"
    if address_problem(address) is None:
        assert quote_address(address) == f"<{address}>"


async def test_one_unsendable_recipient_in_the_queue_does_not_hold_back_the_others(
    relay: Relay, upstream: Upstream
) -> None:
    # Accepted before the front door refused such addresses: it must fail alone.
    now = time.time()
    bad = '"a\tb"@example.org'
    await relay.store.accept(
        Submission(
            queue_id="OLDQUEUEDMESSAGE1",
            received_at=now,
            sender="shop@example.com",
            recipients=("alice@example.org", bad, "bob@example.org"),
            data=make_message(),
            message_id="old@example.com",
            client="127.0.0.1",
            user=None,
            helo="client.test",
            smtputf8=False,
            body8bit=False,
            claim=None,
        )
    )
    relay.app.delivery.wake()
    [delivered] = await upstream.wait_for(1)
    assert delivered.rcpts == ["alice@example.org", "bob@example.org"]
    await relay.idle()
    [failed] = await relay.events("failed")
    assert failed["rcpts"] == bad
    assert "cannot be written on an SMTP command line" in failed["reply"]


# --- bare CR and LF in DATA (issue 14 item 11, issue 15 smuggling) ----------------------------


async def data_reply(relay: Relay, payload: bytes) -> str:
    dialog, _ = await Dialog.open(relay.port)
    for line in ("EHLO client.test", "MAIL FROM:<shop@example.com>", "RCPT TO:<a@example.org>"):
        await dialog.command(line)
    assert (await dialog.command("DATA")).startswith("354")
    reply = await dialog.command(payload + b"\r\n.")
    await dialog.close()
    return reply


async def test_a_bare_cr_in_a_header_is_refused_not_turned_into_an_injected_header(
    relay: Relay, upstream: Upstream
) -> None:
    payload = (
        b"From: shop@example.com\r\nSubject: Your order\rReply-To: thief@example.net\r\n\r\nbody"
    )
    reply = await data_reply(relay, payload)
    assert reply.startswith("550 5.6.0"), reply
    assert await relay.rows("SELECT count(*) FROM messages") == [(0,)]
    [rejected] = await relay.events("rejected")
    assert rejected["code"] == 550


async def test_bare_lf_is_normalised_so_the_relay_stores_and_sends_what_it_parsed(
    relay: Relay, upstream: Upstream
) -> None:
    payload = b"From: shop@example.com\nSubject: unix tool\nMessage-ID: <lf@example.com>\n\nhi\r"
    assert (await data_reply(relay, payload)).startswith("250")
    [delivered] = await upstream.wait_for(1)
    original = payload.replace(b"\r", b"\r\n").replace(b"\n", b"\r\n").replace(b"\r\r", b"\r")
    assert delivered.data.endswith(original + b"\r\n")
    [(stored,)] = await relay.rows("SELECT size FROM messages")
    assert stored == len(delivered.data)


@given(st.binary(max_size=64).map(lambda b: b.translate(LINE_BYTES)))
def test_line_endings_become_crlf_exactly_as_a_full_rewrite_would(data: bytes) -> None:
    normalised = content.normalise_line_endings(data)
    assert normalised == re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if normalised == data:
        assert normalised is data  # no copy when nothing changes


@given(st.text(alphabet=st.characters(), max_size=16))
def test_control_characters_are_unicode_categories_cc_and_cs(text: str) -> None:
    expected = any(unicodedata.category(c) in ("Cc", "Cs") for c in text)
    problem = address_problem(f"a{text}@example.com")
    assert (problem == "control character or invalid UTF-8 in the address") == expected


@pytest.mark.parametrize("code", [0, 0x1F, 0x7F, 0x80, 0x9F, 0xD800, 0xDFFF])
def test_each_edge_of_the_control_ranges_is_refused(code: int) -> None:
    assert address_problem(f"a{chr(code)}b@example.com") == (
        "control character or invalid UTF-8 in the address"
    )


@pytest.mark.parametrize("code", [0x20, 0x7E, 0xA0, 0xD7FF, 0xE000])
def test_the_first_character_past_each_control_range_is_not(code: int) -> None:
    assert address_problem(f"a{chr(code)}b@example.com") != (
        "control character or invalid UTF-8 in the address"
    )


SMUGGLING = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r.\r\n",
    b"\n.\r\r\n",
]


@pytest.mark.parametrize("boundary", SMUGGLING, ids=[repr(b)[2:-1] for b in SMUGGLING])
async def test_a_fake_end_of_data_never_becomes_a_second_message_at_postfix(
    make_relay: RelayFactory,
    postfix_factory: Callable[..., Postfix],
    boundary: bytes,
) -> None:
    # Postfix 3.7 with smtpd_forbid_bare_newline = no reads a bare LF as a line end: the
    # downstream that a smuggled message would fool (CVE-2023-51764).
    postfix = await asyncio.to_thread(postfix_factory, maildir=True, name="smuggle")
    relay = await make_relay(upstream={"url": f"smtp://127.0.0.1:{postfix.port}"})
    smuggled = (
        b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
        b"From: ceo@bank.example\r\nSubject: smuggled\r\n\r\nwire the money\r\n.\r\n"
    )
    payload = b"From: shop@example.com\r\nSubject: receipt\r\n\r\nline" + boundary + smuggled
    reply = await data_reply(relay, payload)
    if not reply.startswith("250"):
        assert reply.startswith("5"), reply  # refusing is safe too
        return
    await relay.idle()
    await asyncio.to_thread(postfix.wait_for_empty_queue)
    stored = await asyncio.to_thread(postfix.wait_for_maildir, 1)
    assert len(stored) == 1
    assert b"Subject: receipt" in stored[0] and b"wire the money" in stored[0]
    assert "victim@example.org" not in postfix.log()


# --- what people read: terminal, log, spreadsheet (issue 14 item 11) -----------------------


def review_config(tmp_path: Path) -> Path:
    path = tmp_path / "review.yaml"
    path.write_text(f"store: {{path: {tmp_path / 'relay.db'}}}\n")
    return path


async def test_show_and_log_escape_control_characters_from_any_field(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    # As if accepted before the front door refused such bytes: an ESC in every column.
    evil = "\x1b]0;pwned\x07\x1b[2J"
    await relay.store.accept(
        Submission(
            queue_id="ESCAPEDMESSAGE001",
            received_at=time.time(),
            sender=f'"s{evil}"@example.com',
            recipients=(f'"r{evil}"@example.org',),
            data=make_message(),
            message_id=f"id{evil}@example.com",
            client=f"10.0.0.1{evil}",
            user=f"u{evil}",
            helo=evil,
            smtputf8=False,
            body8bit=False,
            claim=None,
        )
    )
    config = review_config(tmp_path)
    runs = await asyncio.gather(
        cli(config, "log"), cli(config, "show", "ESCAPEDMESSAGE001"), cli(config, "stats")
    )
    for run in runs:
        assert run.code == 0
        assert "\x1b" not in run.out and "\x07" not in run.out
    assert "]0;pwned" in runs[1].out  # shown, defanged


async def test_csv_export_neutralises_formula_prefixes(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    reply = await send(
        relay.port,
        make_message(message_id="<=1+1@example.com>"),
        sender="=cmd@example.com",
        rcpts=("+1@example.org", "-x@example.org"),
    )
    assert reply.code == 250
    await relay.idle()
    run = await cli(review_config(tmp_path), "log", "--csv")
    assert run.code == 0
    rows = list(csv.DictReader(io.StringIO(run.out)))
    received = next(r for r in rows if r["event"] == "received")
    assert received["sender"] == "'=cmd@example.com"
    assert received["rcpts"] == "'+1@example.org -x@example.org"
    assert received["message_id"] == "'=1+1@example.com"
    for row in rows:
        assert not any(v.startswith(("=", "+", "-", "@")) for v in row.values()), row


async def test_the_stderr_log_escapes_what_a_client_typed(
    tmp_path: Path, upstream: Upstream, relay_process: Callable[[dict[str, Any]], RelayProcess]
) -> None:
    config = deep_merge(base_config(tmp_path, upstream.port), {"listen": {"port": free_port()}})
    relay = relay_process(config)
    await asyncio.to_thread(relay.start)
    dialog, _ = await Dialog.open(relay.port)
    assert (await dialog.command(b"\x1b]0;pwned\x07\x1b[2JHELLO")).startswith("500")
    await dialog.command("QUIT")
    await dialog.close()
    assert await asyncio.to_thread(relay.terminate) == 0
    assert relay.proc is not None and relay.proc.stderr is not None
    log = "".join(relay.stderr_lines) + relay.proc.stderr.read().decode()
    assert "\\x1b]0;PWNED\\x07\\x1b[2JHELLO" in log
    assert "\x1b" not in log and "\x07" not in log
