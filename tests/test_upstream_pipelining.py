"""Pipelined delivery (RFC 2920): MAIL, every RCPT and DATA in one batch when the upstream
offers PIPELINING, with every guarantee of the one-command-at-a-time path kept.

The upstream here is an SMTP server written by hand on a raw asyncio socket: when it offers
PIPELINING it holds back its replies to MAIL and RCPT until DATA arrives and then answers all
of them in one write, so a client that waits for each reply before the next command never
gets one (and times out). Without PIPELINING it answers each command as it comes and notes
how many commands each read brought. The last tests put a recording proxy in front of a real
Postfix.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from tests import mta
from tests.conftest import (
    LoopbackServer,
    Relay,
    RelayFactory,
    Upstream,
    eventually,
    make_message,
    primary_and_backup,
    running,
    send,
)
from tests.mta import PostfixFactory

postfix_factory = mta.postfix_factory


OK = b"250 2.1.0 Ok\r\n"
GO = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = b"250 2.0.0 Ok: queued as BATCH1\r\n"
OUTCOMES = ("delivered", "deferred", "failed", "ambiguous")


class BatchUpstream(LoopbackServer):
    """An SMTP server by hand that answers a pipelined batch only once DATA has arrived.

    `mail` and `rcpt` map an address to its reply (default 250), `data` is the reply to DATA,
    `end` the reply to the payload, `stray` bytes sent after the batch's replies in the same
    write. A 421 ends the session right after it is written.

    Records: `batches` (the verbs of each batch, all read before any of them was answered),
    `reads` (the verbs each read from the socket brought), `payloads` (each whole payload),
    `partial` (what came of a payload after a 354 before the client hung up), `sessions`.
    """

    def __init__(self, *, pipelining: bool = True) -> None:
        self.pipelining = pipelining
        self.mail: dict[str, bytes] = {}
        self.rcpt: dict[str, bytes] = {}
        self.data = GO
        self.end = QUEUED
        self.stray = b""
        self.hang_up_after: int | None = None
        self.batches: list[list[str]] = []
        self.reads: list[list[str]] = []
        self.payloads: list[bytes] = []
        self.partial: list[bytes] = []
        self.sessions = 0

    def _ehlo(self) -> bytes:
        extensions = ["8BITMIME", "SIZE 10240000", *(["PIPELINING"] if self.pipelining else [])]
        lines = ["batch.test", *extensions]
        return b"".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n".encode()
            for i, line in enumerate(lines)
        )

    def _answer(self, verb: str, line: bytes, mail_ok: bool) -> bytes:
        address = re.search(rb"<([^>]*)>", line)
        who = address.group(1).decode() if address else ""
        if verb == "MAIL":
            return self.mail.get(who, OK)
        if verb == "RCPT":
            return (
                self.rcpt.get(who, b"250 2.1.5 Ok\r\n") if mail_ok else b"503 5.5.1 need MAIL\r\n"
            )
        if verb == "DATA":
            return self.data if mail_ok else b"503 5.5.1 need RCPT\r\n"
        if verb in ("EHLO", "HELO"):
            return self._ehlo()
        if verb == "QUIT":
            return b"221 2.0.0 Bye\r\n"
        if verb in ("RSET", "NOOP"):
            return b"250 2.0.0 Ok\r\n"
        return b"502 5.5.2 Error: command not recognized\r\n"

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        buffer = b""
        held: list[bytes] = []
        batch: list[str] = []
        mail_ok = False
        in_data = False
        delivered = 0
        try:
            writer.write(b"220 batch.test ESMTP\r\n")
            while chunk := await reader.read(65536):
                buffer += chunk
                verbs: list[str] = []
                while True:
                    if in_data:
                        end = buffer.find(b"\r\n.\r\n")
                        if end < 0:
                            break
                        self.payloads.append(buffer[: end + 5])
                        buffer, in_data, mail_ok = buffer[end + 5 :], False, False
                        delivered += 1
                        writer.write(self.end)
                        continue
                    if b"\r\n" not in buffer:
                        break
                    if self.hang_up_after is not None and delivered >= self.hang_up_after:
                        return  # gone quiet while idle: the client learns it on its next read
                    line, buffer = buffer.split(b"\r\n", 1)
                    verb = line.split(b" ", 1)[0].upper().decode("ascii", "replace")
                    verbs.append(verb)
                    reply = self._answer(verb, line, mail_ok)
                    if verb == "MAIL":
                        mail_ok = reply.startswith(b"2")
                    if self.pipelining and verb in ("MAIL", "RCPT"):
                        held.append(reply)
                        batch.append(verb)
                        continue
                    if verb == "DATA":
                        self.batches.append([*batch, verb])
                        batch.clear()
                    replies = [*held, reply]
                    held.clear()
                    closing = [r for r in replies if r.startswith(b"421")]
                    if closing:
                        writer.write(b"".join(replies[: replies.index(closing[0]) + 1]))
                        return
                    writer.write(b"".join(replies) + (self.stray if verb == "DATA" else b""))
                    if verb == "QUIT":
                        return
                    if verb == "RSET":
                        mail_ok = False
                    in_data = verb == "DATA" and reply.startswith(b"354")
                self.reads.append(verbs)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            if in_data:
                self.partial.append(buffer)
            writer.close()


def url(port: int) -> str:
    return f"smtp://127.0.0.1:{port}"


async def relay_to(make_relay: RelayFactory, port: int, **overrides: Any) -> Relay:
    return await make_relay(upstream={"url": url(port), "timeout": "3s"}, **overrides)


async def outcomes(relay: Relay, rcpts: int = 1) -> list[dict[str, Any]]:
    """The delivery outcomes so far, once they speak for `rcpts` recipients in all."""

    async def after() -> list[dict[str, Any]]:
        return [e for e in await relay.events() if e["event"] in OUTCOMES]

    async def enough() -> bool:
        return sum(len(_rcpts(e)) for e in await after()) >= rcpts

    await eventually(enough, what=f"outcomes for {rcpts} recipient(s)")
    return await after()


def _rcpts(event: dict[str, Any]) -> list[str]:
    return str(event["rcpts"]).split(",")


def by_rcpt(events: list[dict[str, Any]]) -> dict[str, tuple[str, int | None]]:
    return {r: (e["event"], e["code"]) for e in events for r in _rcpts(e)}


# --- one batch when offered, one command at a time when not ----------------------------------


async def test_mail_rcpts_and_data_go_in_one_batch_when_the_upstream_offers_pipelining(
    make_relay: RelayFactory,
) -> None:
    async with running(BatchUpstream()) as server:
        relay = await relay_to(make_relay, server.port)
        rcpts = ("alice@example.org", "bob@example.org")
        assert (await send(relay.port, make_message("batched"), rcpts=rcpts)).code == 250
        events = await outcomes(relay, 2)
        assert by_rcpt(events) == {r: ("delivered", 250) for r in rcpts}
        assert {e["upstream_id"] for e in events} == {"BATCH1"}
        # The server answered nothing until DATA: all four commands came before any reply.
        assert server.batches == [["MAIL", "RCPT", "RCPT", "DATA"]]
        assert len(server.payloads) == 1 and b"Subject: batched" in server.payloads[0]


async def test_without_pipelining_each_command_waits_for_its_reply(
    make_relay: RelayFactory,
) -> None:
    async with running(BatchUpstream(pipelining=False)) as server:
        relay = await relay_to(make_relay, server.port)
        rcpts = ("alice@example.org", "bob@example.org")
        assert (await send(relay.port, make_message("one by one"), rcpts=rcpts)).code == 250
        assert [e["event"] for e in await outcomes(relay, 2)] == ["delivered"]
        commands = [verbs for verbs in server.reads if verbs]
        assert ["MAIL"] in commands and ["DATA"] in commands
        assert all(len(verbs) == 1 for verbs in commands), commands
        assert len(server.payloads) == 1


# --- per-recipient replies -----------------------------------------------------------------


async def test_mixed_recipient_replies_are_judged_per_recipient_and_the_payload_goes_once(
    make_relay: RelayFactory,
) -> None:
    async with running(BatchUpstream()) as server:
        server.rcpt = {
            "bob@example.org": b"550 5.1.1 <bob@example.org>: no such user\r\n",
            "carol@example.org": b"251 2.1.5 will forward\r\n",
        }
        relay = await relay_to(make_relay, server.port)
        rcpts = ("alice@example.org", "bob@example.org", "carol@example.org")
        assert (await send(relay.port, make_message(), rcpts=rcpts)).code == 250
        events = await outcomes(relay, 3)
        await relay.idle()
        assert by_rcpt(events) == {
            "alice@example.org": ("delivered", 250),
            "bob@example.org": ("failed", 550),
            "carol@example.org": ("delivered", 250),
        }
        assert server.batches == [["MAIL", "RCPT", "RCPT", "RCPT", "DATA"]]
        assert len(server.payloads) == 1


ODD_2XX = {
    "mail-251": ("mail", b"251 2.1.0 Sender ok, more or less\r\n"),
    "rcpt-252": ("rcpt", b"252 2.1.5 Cannot verify, but will accept and attempt delivery\r\n"),
}


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
@pytest.mark.parametrize("case", ODD_2XX.values(), ids=ODD_2XX.keys())
async def test_an_odd_2xx_to_mail_or_rcpt_accepts_and_the_payload_goes(
    make_relay: RelayFactory, pipelining: bool, case: tuple[str, bytes]
) -> None:
    # Any 2xx is a yes (the upstream now holds the sender or the recipient, as Postfix's
    # client reads it). It was classified as "delivered" although no payload ever went.
    where, odd = case
    async with running(BatchUpstream(pipelining=pipelining)) as server:
        if where == "mail":
            server.mail = {"shop@example.com": odd}
        else:
            server.rcpt = {"alice@example.org": odd}
        relay = await relay_to(make_relay, server.port)
        assert (await send(relay.port, make_message("odd but fine"))).code == 250
        [event] = await outcomes(relay, 1)
        await relay.idle()
        assert (event["event"], event["code"]) == ("delivered", 250)
        assert len(server.payloads) == 1 and b"Subject: odd but fine" in server.payloads[0]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
async def test_a_recipient_answered_252_shares_the_payloads_fate(
    make_relay: RelayFactory, pipelining: bool
) -> None:
    # The upstream took alice with its 252: a 451 to the payload defers her with bob, and
    # both go on the retry. She was "delivered" by the 252 alone, and never got the mail.
    async with running(BatchUpstream(pipelining=pipelining)) as server:
        server.rcpt = {"alice@example.org": ODD_2XX["rcpt-252"][1]}
        server.end = b"451 4.3.0 Try again later\r\n"
        relay = await relay_to(make_relay, server.port)
        rcpts = ("alice@example.org", "bob@example.org")
        assert (await send(relay.port, make_message(), rcpts=rcpts)).code == 250
        first = await outcomes(relay, 2)
        assert by_rcpt(first) == {r: ("deferred", 451) for r in rcpts}
        server.end = QUEUED
        events = await outcomes(relay, 4)
        await relay.idle()
        assert by_rcpt(events[len(first) :]) == {r: ("delivered", 250) for r in rcpts}
        assert len(server.payloads) == 2


async def test_a_354_after_every_recipient_was_refused_gets_no_payload_and_a_dropped_line(
    make_relay: RelayFactory,
) -> None:
    async with running(BatchUpstream()) as server:
        server.rcpt = {
            "alice@example.org": b"550 5.1.1 no such user\r\n",
            "bob@example.org": b"553 5.1.3 bad address\r\n",
        }
        relay = await relay_to(make_relay, server.port)
        rcpts = ("alice@example.org", "bob@example.org")
        assert (await send(relay.port, make_message("nobody"), rcpts=rcpts)).code == 250
        events = await outcomes(relay, 2)
        assert by_rcpt(events) == {
            "alice@example.org": ("failed", 550),
            "bob@example.org": ("failed", 553),
        }
        # The server waited for a payload after its 354: the relay hung up without a byte.
        await eventually(lambda: server.partial, what="the relay to drop the connection")
        assert server.partial == [b""]
        assert server.payloads == []


async def test_a_refused_mail_sends_nothing_and_the_next_message_reuses_the_connection(
    make_relay: RelayFactory,
) -> None:
    async with running(BatchUpstream()) as server:
        server.mail = {"blocked@example.com": b"550 5.7.1 sender blocked\r\n"}
        relay = await relay_to(make_relay, server.port)
        refused = make_message("blocked", sender="blocked@example.com")
        assert (await send(relay.port, refused, sender="blocked@example.com")).code == 250
        [failed] = await outcomes(relay, 1)
        assert (failed["event"], failed["code"]) == ("failed", 550)
        assert "sender blocked" in failed["reply"]
        assert server.payloads == []
        # The refused batch's RCPT and DATA replies were read: the same connection carries
        # the next message, whose replies pair with its own commands.
        assert (await send(relay.port, make_message("next"))).code == 250
        events = await outcomes(relay, 2)
        assert (events[1]["event"], events[1]["upstream_id"]) == ("delivered", "BATCH1")
        assert len(server.payloads) == 1 and b"Subject: next" in server.payloads[0]
        assert server.sessions == 1
        assert len(server.batches) == 2


# --- the upstream closing, a stale connection, a reply too many -------------------------------


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
async def test_a_421_in_the_batch_fails_over_with_nothing_sent(
    make_relay: RelayFactory, upstream: Upstream, stage: str
) -> None:
    async with running(BatchUpstream()) as primary:
        closing = b"421 4.3.2 Service shutting down\r\n"
        if stage == "mail":
            primary.mail = {"shop@example.com": closing}
        elif stage == "rcpt":
            primary.rcpt = {"alice@example.org": closing}
        else:
            primary.data = closing
        relay = await primary_and_backup(make_relay, primary.port, upstream.port)
        await send(relay.port, make_message())
        await upstream.wait_for(1)
        await relay.idle()
        [failover] = await relay.events("failover")
        assert (failover["upstream"], failover["code"]) == ("primary", 421)
        [delivered] = await relay.events("delivered")
        assert delivered["upstream"] == "backup"
        assert primary.payloads == [] and primary.partial == []
        assert len(upstream.messages) == 1


async def test_a_421_to_the_payload_is_deferred_and_never_fails_over(
    make_relay: RelayFactory, upstream: Upstream
) -> None:
    async with running(BatchUpstream()) as primary:
        primary.end = b"421 4.3.2 Service shutting down\r\n"
        relay = await primary_and_backup(make_relay, primary.port, upstream.port)
        await send(relay.port, make_message())
        event = (await outcomes(relay, 1))[0]
        assert (event["event"], event["code"]) == ("deferred", 421)
        assert len(primary.payloads) >= 1
        assert await relay.events("failover") == []
        assert upstream.connections == 0


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
async def test_a_reused_connection_found_dead_is_replaced_and_the_message_goes_once(
    make_relay: RelayFactory, pipelining: bool
) -> None:
    async with running(BatchUpstream(pipelining=pipelining)) as server:
        server.hang_up_after = 1  # after one message, a session hangs up on the next batch
        relay = await relay_to(make_relay, server.port)
        assert (await send(relay.port, make_message("first"))).code == 250
        await outcomes(relay, 1)
        assert (await send(relay.port, make_message("second"))).code == 250
        events = await outcomes(relay, 2)
        assert [e["event"] for e in events] == ["delivered", "delivered"], events
        assert server.sessions == 2
        assert [b"Subject: first" in p for p in server.payloads] == [True, False]
        assert b"Subject: second" in server.payloads[1]


@pytest.mark.parametrize(
    ("where", "stray"),
    [("after-data", b"250 2.0.0 Ok\r\n"), ("after-data", GO), ("after-mail", OK)],
    ids=["stray-250-at-end", "stray-354-at-end", "stray-250-after-mail"],
)
async def test_a_reply_too_many_in_the_batch_sends_nothing_then_a_sane_upstream_gets_it_once(
    make_relay: RelayFactory, where: str, stray: bytes
) -> None:
    async with running(BatchUpstream()) as server:
        if where == "after-mail":
            server.mail = {"shop@example.com": OK + stray}
        else:
            server.stray = stray
        relay = await relay_to(make_relay, server.port)
        assert (await send(relay.port, make_message("shifted"))).code == 250
        event = (await outcomes(relay, 1))[0]
        assert event["event"] == "deferred", event
        assert server.payloads == [] and not any(server.partial)
        server.mail, server.stray = {}, b""
        await eventually(lambda: server.payloads, what="the payload once the upstream is sane")
        await relay.idle()
        assert len(server.payloads) == 1
        assert len(await relay.events("delivered")) == 1


# --- a real Postfix ---------------------------------------------------------------------------


class Recorder:
    """A TCP proxy on 127.0.0.1 that notes, per connection, which side spoke, in order."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sessions: list[list[tuple[str, bytes]]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _pipe(
        self,
        log: list[tuple[str, bytes]],
        side: str,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
    ) -> None:
        try:
            while chunk := await src.read(65536):
                log.append((side, chunk))
                dst.write(chunk)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            dst.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        log: list[tuple[str, bytes]] = []
        self.sessions.append(log)
        await asyncio.gather(
            self._pipe(log, "client", reader, up_writer),
            self._pipe(log, "server", up_reader, writer),
        )

    def client_turns(self) -> list[list[str]]:
        """What the client said between two replies, connection by connection: the first
        word of each line of each turn."""
        turns: list[list[str]] = []
        for log in self.sessions:
            turns.append([])
            for side, chunk in log:
                if side == "server":
                    turns.append([])
                else:
                    turns[-1].extend(line.split(" ", 1)[0].upper() for line in _lines(chunk))
        return [t for t in turns if t]

    async def __aenter__(self) -> Recorder:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def _lines(chunk: bytes) -> list[str]:
    return [line for line in chunk.decode("ascii", "replace").split("\r\n") if line]


@pytest.mark.parametrize("offered", [True, False], ids=["pipelining", "no-pipelining"])
async def test_postfix_gets_the_batch_when_it_offers_pipelining_and_single_commands_if_not(
    make_relay: RelayFactory, postfix_factory: PostfixFactory, offered: bool
) -> None:
    # reject_unauth_pipelining: Postfix refuses DATA from a client that sent commands ahead
    # of time where it may not, or when PIPELINING was not offered.
    settings = {"smtpd_data_restrictions": "reject_unauth_pipelining"}
    if not offered:
        settings["smtpd_discard_ehlo_keywords"] = "pipelining"
    postfix = await asyncio.to_thread(
        postfix_factory, maildir=True, name=f"up-pipe-{offered:d}", settings=settings
    )
    async with Recorder(postfix.port) as recorder:
        relay = await relay_to(make_relay, recorder.port)
        rcpts = ("alice@example.org", "bob@example.org")
        messages = [make_message(f"pipelined {n}") for n in range(3)]
        for message in messages:
            assert (await send(relay.port, message, rcpts=rcpts)).code == 250
        events = await outcomes(relay, 2 * len(messages))
        assert [e["event"] for e in events] == ["delivered"] * len(messages), events
        assert all(re.fullmatch(r"[0-9A-F]{6,}", e["upstream_id"]) for e in events)
        stored = await asyncio.to_thread(postfix.wait_for_maildir, 2 * len(messages))
        assert len(stored) == 2 * len(messages)
        turns = recorder.client_turns()
        batch = ["MAIL", "RCPT", "RCPT", "DATA"]
        if offered:
            assert turns.count(batch) == len(messages), turns
        else:
            assert batch not in turns
            assert all(len(t) == 1 for t in turns if t[0] in ("MAIL", "RCPT", "DATA")), turns
