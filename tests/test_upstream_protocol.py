"""Upstreams that break the SMTP protocol: only a 354 lets the payload go, and after the payload
only a clear final reply says what became of the message.

aiosmtpd and smtp-sink are too well behaved for this, so the upstream here is an SMTP server
written by hand on a raw asyncio socket: it answers each command with whatever bytes the test
gives it, including replies nobody asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import (
    LoopbackServer,
    Relay,
    RelayFactory,
    eventually,
    make_message,
    running,
    send,
)

GOOD = {
    "EHLO": b"250-raw.test\r\n250 8BITMIME\r\n",
    "MAIL": b"250 2.1.0 Ok\r\n",
    "RCPT": b"250 2.1.5 Ok\r\n",
    "DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    ".": b"250 2.0.0 Ok: queued as RAW1\r\n",
    "RSET": b"250 2.0.0 Ok\r\n",
    "QUIT": b"221 2.0.0 Bye\r\n",
}


class RawUpstream(LoopbackServer):
    """An SMTP server by hand: `replies` maps a verb (and "." for the payload) to raw bytes.

    `payloads` holds every payload that arrived whole; `partial` what arrived of one before
    the client hung up after a 354 (b"" when it sent nothing). Tests change `replies` while
    the relay runs.
    """

    def __init__(self, **replies: bytes) -> None:
        self.greeting = b"220 raw.test ESMTP\r\n"
        self.replies = {**GOOD, **{k.replace("end", "."): v for k, v in replies.items()}}
        self.payloads: list[bytes] = []
        self.partial: list[bytes] = []

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.greeting)
            while line := await reader.readline():
                verb = line.split(b" ", 1)[0].strip().upper().decode("ascii", "replace")
                reply = self.replies.get(verb, b"502 5.5.2 Error: command not recognized\r\n")
                writer.write(reply)
                await writer.drain()
                if verb == "QUIT":
                    break
                if verb == "DATA" and reply.startswith(b"354"):
                    try:
                        payload = await reader.readuntil(b"\r\n.\r\n")
                    except asyncio.IncompleteReadError as exc:
                        self.partial.append(exc.partial)
                        break
                    self.payloads.append(payload)
                    writer.write(self.replies["."])
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def raw_upstream(**replies: bytes) -> contextlib.AbstractAsyncContextManager[RawUpstream]:
    return running(RawUpstream(**replies))


async def relay_to_raw(
    make_relay: RelayFactory,
    server: RawUpstream,
    upstream_extra: dict[str, Any] | None = None,
    **overrides: Any,
) -> Relay:
    upstream = {"url": f"smtp://127.0.0.1:{server.port}", **(upstream_extra or {})}
    return await make_relay(upstream=upstream, **overrides)


async def first_outcome(relay: Relay) -> dict[str, Any]:
    """The first event after `received`: what the relay made of its first attempt."""

    async def outcome() -> bool:
        return len(await relay.events()) >= 2

    await eventually(outcome, what="the outcome of the first attempt")
    return (await relay.events())[1]


async def deferred_unsent_then_sent_once(
    relay: Relay, server: RawUpstream, mend: Callable[[], None]
) -> dict[str, Any]:
    """The first attempt sends no payload and is deferred; once the upstream is `mend`ed, the
    message goes exactly once. Returns the deferred event."""
    event = await first_outcome(relay)
    assert event["event"] == "deferred", event
    assert await relay.events("delivered") == []
    assert server.payloads == [] and not any(server.partial)
    mend()
    await eventually(lambda: server.payloads, what="the payload once the upstream is sane")
    await relay.idle()
    assert len(server.payloads) == 1
    assert len(await relay.events("delivered")) == 1
    return event


# --- only 354 lets the payload go ----------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [b"250 2.0.0 Ok\r\n", b"251 2.0.0 Ok, I guess\r\n", b"220 ready\r\n"],
    ids=["250", "251", "220"],
)
async def test_a_reply_to_data_other_than_354_is_a_failed_attempt_never_a_delivery(
    make_relay: RelayFactory, reply: bytes
) -> None:
    async with raw_upstream(DATA=reply) as server:
        relay = await relay_to_raw(make_relay, server)
        assert (await send(relay.port, make_message("no body went out"))).code == 250
        # The upstream mends its ways: the message is still there, and goes exactly once.
        event = await deferred_unsent_then_sent_once(
            relay, server, lambda: server.replies.update(DATA=GOOD["DATA"])
        )
        assert "instead of 354" in event["reply"]
        assert b"no body went out" in server.payloads[0]


async def test_a_5xx_to_data_fails_the_message_without_sending_it(
    make_relay: RelayFactory,
) -> None:
    async with raw_upstream(DATA=b"554 5.5.1 Error: no valid recipients\r\n") as server:
        relay = await relay_to_raw(make_relay, server)
        await send(relay.port, make_message())
        event = await first_outcome(relay)
        assert (event["event"], event["code"]) == ("failed", 554)
        assert server.payloads == []


@pytest.mark.parametrize(
    "stray",
    [b"250 2.0.0 Ok\r\n", b"354 go ahead\r\n"],
    ids=["stray-250", "stray-354"],
)
async def test_a_stray_reply_that_shifts_the_stream_is_a_failed_attempt_never_a_delivery(
    make_relay: RelayFactory, stray: bytes
) -> None:
    # One reply too many, in the same packet as the last RCPT's: the DATA command would read
    # it as its own answer.
    async with raw_upstream(RCPT=GOOD["RCPT"] + stray) as server:
        relay = await relay_to_raw(make_relay, server)
        assert (await send(relay.port, make_message("shifted"))).code == 250
        await deferred_unsent_then_sent_once(
            relay, server, lambda: server.replies.update(RCPT=GOOD["RCPT"])
        )


# --- a 2xx where another reply was due is no delivery -----------------------------------------


SESSION_2XX = {
    # A greeting that is no SMTP greeting (an NNTP server answers 200 on connect).
    "greeting-200": ("greeting", b"200 news.test NNRP service ready\r\n", b"220 raw.test\r\n"),
    "auth-250": ("AUTH", b"250 2.7.0 Ok\r\n", b"235 2.7.0 Authentication successful\r\n"),
}


@pytest.mark.parametrize("case", SESSION_2XX.values(), ids=SESSION_2XX.keys())
async def test_a_2xx_before_mail_that_the_session_did_not_expect_is_no_delivery(
    make_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch, case: tuple[str, bytes, bytes]
) -> None:
    # The session never reached MAIL, so no payload went: whatever the code, the recipients
    # wait for a sane upstream. A 2xx here was read as "delivered", and the mail was lost.
    where, odd, sane = case
    monkeypatch.setenv("RAW_UPSTREAM_PASSWORD", "s3cret")
    ehlo = b"250-raw.test\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n"
    async with raw_upstream(EHLO=ehlo, AUTH=SESSION_2XX["auth-250"][2]) as server:

        def answer(reply: bytes) -> None:
            if where == "greeting":
                server.greeting = reply
            else:
                server.replies[where] = reply

        answer(odd)
        login = {"username": "relay", "password_env": "RAW_UPSTREAM_PASSWORD"}
        relay = await relay_to_raw(
            make_relay, server, upstream_extra={**login, "allow_plaintext_auth": True}
        )
        assert (await send(relay.port, make_message("not lost"))).code == 250
        event = await deferred_unsent_then_sent_once(relay, server, lambda: answer(sane))
        assert event["code"] == int(odd[:3])
        assert b"not lost" in server.payloads[0]


# --- after the payload, only a clear reply is an answer ----------------------------------


UNCLEAR = {
    "garbled": b"garbage that is no SMTP reply\r\n",
    "no-code": b"OK\r\n",
    "354-again": b"354 go ahead\r\n",
    "code-199": b"199 what\r\n",
    "code-600": b"600 queued, maybe\r\n",
}


@pytest.mark.parametrize("reply", UNCLEAR.values(), ids=UNCLEAR.keys())
async def test_an_unclear_reply_after_the_payload_is_ambiguous_and_held_not_resent(
    make_relay: RelayFactory, reply: bytes
) -> None:
    async with raw_upstream(end=reply) as server:
        relay = await relay_to_raw(make_relay, server, delivery={"on_ambiguous": "hold"})
        assert (await send(relay.port, make_message())).code == 250
        event = await first_outcome(relay)
        assert event["event"] == "ambiguous", event
        await relay.idle()  # held mail is not waiting to be sent
        assert await relay.rows("SELECT state FROM recipients") == [("held",)]
        assert await relay.events("deferred") == []
        assert len(server.payloads) == 1


async def test_an_unclear_reply_after_the_payload_is_ambiguous_under_retry_too(
    make_relay: RelayFactory,
) -> None:
    async with raw_upstream(end=UNCLEAR["garbled"]) as server:
        relay = await relay_to_raw(make_relay, server)
        await send(relay.port, make_message())
        event = await first_outcome(relay)
        assert event["event"] == "ambiguous", event
        assert "no clear reply after the message was sent" in event["reply"]
        assert len(server.payloads) >= 1
