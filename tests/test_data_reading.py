"""DATA read a buffer at a time (relay/dataread.py) answers exactly as aiosmtpd's line loop.

Two servers over loopback take the same bytes in the same packets: aiosmtpd's own SMTP and
one whose DATA is relay.dataread's. What each client is told, and what each handler is
handed, must be the same, for random bodies cut into random packets around small line and
size limits. Then the relay itself: what reaches the upstream, and the replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.dataread import Body, DataPhase, Verdict
from tests.conftest import DEADLINE, Dialog, Relay, RelayFactory, Upstream, eventually, make_message

# --- the same bytes to aiosmtpd's DATA and to relay.dataread's -------------------------------


class Keeper:
    """A handler that keeps what DATA hands it."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, Any]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.seen.append((envelope.content, envelope.original_content))
        return "250 Kept"


@dataclass
class Limits:
    line: int
    size: int | None
    decode_data: bool
    smtputf8: bool


@dataclass
class Served:
    """One server's side of a session: bytes received so far, and what its handler saw."""

    received: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    keeper: Keeper = field(default_factory=Keeper)


def counting(base: type[SMTP], limits: Limits, served: Served) -> SMTP:
    class Counting(base):  # type: ignore[valid-type,misc]
        def data_received(self, data: bytes) -> None:
            served.received += len(data)
            served.arrived.set()
            super().data_received(data)

        async def smtp_DATA(self, arg: str) -> None:
            # Small limits for DATA only (the commands before it are longer). aiosmtpd
            # made its reader's limit line_length_limit; both change together.
            self.line_length_limit = self._reader._limit = limits.line
            await super().smtp_DATA(arg)

    return Counting(  # type: ignore[no-any-return]
        served.keeper,
        hostname="test",
        data_size_limit=limits.size,
        decode_data=limits.decode_data,
        enable_SMTPUTF8=limits.smtputf8,
        loop=asyncio.get_running_loop(),
    )


async def dialog(base: type[SMTP], limits: Limits, pieces: list[bytes]) -> tuple[bytes, Keeper]:
    """Everything the server says when the pieces come one packet at a time (and QUIT after)."""
    served = Served()
    server = await asyncio.get_running_loop().create_server(
        lambda: counting(base, limits, served), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    talk = Dialog(reader, writer)
    try:
        assert (await talk.reply()).startswith("220")
        for command in ("EHLO c", "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.org>"):
            assert (await talk.command(command)).startswith("250")
        assert (await talk.command("DATA")).startswith("354")
        sent = served.received
        for piece in pieces:
            writer.write(piece)
            sent += len(piece)
            # The next piece goes once this one is in: each packet reaches DATA on its own.
            deadline = time.monotonic() + DEADLINE
            while served.received < sent:
                served.arrived.clear()
                await asyncio.wait_for(served.arrived.wait(), deadline - time.monotonic())
        writer.write(b"QUIT\r\n")
        transcript = await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        await talk.close()
        server.close()
        await server.wait_closed()
    return transcript, served.keeper


class Fast(DataPhase):
    pass


def compare(limits: Limits, pieces: list[bytes]) -> tuple[bytes, Keeper]:
    async def both() -> tuple[tuple[bytes, Keeper], tuple[bytes, Keeper]]:
        return await dialog(SMTP, limits, pieces), await dialog(Fast, limits, pieces)

    (expected, theirs), (got, ours) = asyncio.run(both())
    assert got == expected
    assert ours.seen == theirs.seen
    return got, ours


def until_the_end(stream: bytes) -> bytes:
    """The stream up to and with its first end of DATA (one is added when there is none)."""
    stream += b"\r\n.\r\n"
    if stream.startswith(b".\r\n"):
        return stream[:3]
    return stream[: stream.index(b"\r\n.\r\n") + 5]


def cut(stream: bytes, at: list[int]) -> list[bytes]:
    edges = [0, *sorted({a % (len(stream) + 1) for a in at}), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges) if b > a]


# Line ends, dots and the limits are where the cases are; "é" is for strict ASCII mode.
_pieces = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"x", b"xxxxxxx", b"\xc3\xa9"]),
    max_size=60,
)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    body=_pieces.map(b"".join),
    at=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    line=st.integers(min_value=5, max_value=24),  # QUIT and its CRLF must fit
    size=st.one_of(st.none(), st.integers(min_value=0, max_value=120)),
    decode_data=st.booleans(),
    smtputf8=st.booleans(),
)
@example(body=b"", at=[], line=8, size=None, decode_data=False, smtputf8=True)
@example(body=b".", at=[1, 2], line=8, size=None, decode_data=False, smtputf8=True)
@example(body=b"x" * 40, at=[3, 11], line=8, size=20, decode_data=False, smtputf8=True)
@example(
    body=b"x" * 7 + b"\r\n" + b"x" * 30, at=[], line=8, size=12, decode_data=False, smtputf8=True
)
# A line one past the reader's limit is refused before it is counted, one just over the
# line limit after; and a CR may end a packet without the line being too long yet.
@example(
    body=b"x" * 6 + b"\r\n" + b"x" * 9, at=[], line=8, size=12, decode_data=False, smtputf8=True
)
@example(
    body=b"x" * 6 + b"\r\n" + b"x" * 8 + b"\r\ny",
    at=[19],
    line=8,
    size=12,
    decode_data=False,
    smtputf8=True,
)
def test_aiosmtpd_and_dataread_tell_the_client_and_the_handler_the_same(
    body: bytes,
    at: list[int],
    line: int,
    size: int | None,
    decode_data: bool,
    smtputf8: bool,
) -> None:
    stream = until_the_end(body)
    compare(Limits(line, size, decode_data, smtputf8), cut(stream, at))


@pytest.mark.parametrize("packets", ["one", "bytes"])
def test_the_same_at_aiosmtpds_own_limits_in_one_packet_and_byte_by_byte(packets: str) -> None:
    # 1001 bytes a line with its CRLF, 1002 and 1003 refused after counting, 1004 before.
    lines = [b"." * n + b"\r\n" for n in (997, 998, 999, 1000, 1001, 1002)]
    limits = Limits(SMTP.line_length_limit, 4000, False, True)
    for line in lines:
        stream = b"a\r\n" + line + b"b\r\n.\r\n"
        pieces = [stream] if packets == "one" else [bytes([c]) for c in stream]
        transcript, keeper = compare(limits, pieces)
        if len(line) <= 1001:
            assert transcript.startswith(b"250 Kept")
            assert keeper.seen[0][1] == b"a\r\n" + line[1:] + b"b\r\n"
        else:
            assert transcript.startswith(b"500 Line too long")


# --- Body alone: what it keeps and what it refuses ---------------------------------------------


def test_dots_are_unstuffed_at_every_line_start_and_only_there() -> None:
    body = Body(1001, None)
    body.take(b"..first\r\n...\r\nmid.dle\r\n")
    body.take(b".\r\n..")
    body.take(b"\r\nlast.\r\n")
    assert body.verdict is Verdict.NOMINAL
    assert body.content() == b".first\r\n..\r\nmid.dle\r\n\r\n.\r\nlast.\r\n"


@pytest.mark.parametrize(
    ("chunks", "verdict"),
    [
        ([b"x" * 9 + b"\r\n"], Verdict.NOMINAL),  # 11 bytes: at the line limit and in the size
        ([b"x" * 10 + b"\r\n"], Verdict.TOO_LONG),  # 12 bytes: one over, still in the size
        ([b"x" * 5 + b"\r\n", b"x" * 5 + b"\r\n"], Verdict.TOO_MUCH),  # 14 bytes of short lines
        # A line one or two bytes over is counted before it is measured...
        ([b"x" * 8 + b"\r\n", b"x" * 10 + b"\r\n"], Verdict.TOO_MUCH),
        # ...one past the reader's limit is refused before it is counted.
        ([b"x" * 8 + b"\r\n", b"x" * 12 + b"\r\n"], Verdict.TOO_LONG),
        ([b"x" * 20], Verdict.TOO_LONG),  # and it need not end first
    ],
)
def test_which_limit_a_line_breaks_first(chunks: list[bytes], verdict: Verdict) -> None:
    body = Body(11, 12)
    for chunk in chunks:
        body.take(chunk)
    assert body.verdict is verdict
    if verdict is not Verdict.NOMINAL:
        assert body.kept == [] and body.open == b""


def test_a_huge_line_is_not_kept_while_it_arrives() -> None:
    body = Body(1001, None)
    for _ in range(1000):
        body.take(b"y" * 1000)
    assert body.verdict is Verdict.TOO_LONG
    assert body.kept == [] and body.open == b""


# --- the relay: what reaches the upstream, and the replies ------------------------------------


@contextlib.contextmanager
def no_leaks(relay: Relay) -> Iterator[None]:
    yield
    assert relay.app.front.budget.used == 0


async def data_session(relay: Relay) -> Dialog:
    talk, greeting = await Dialog.open(relay.port)
    assert greeting.startswith("220")
    for line in ("EHLO client.test", "MAIL FROM:<shop@example.com>", "RCPT TO:<a@example.org>"):
        assert (await talk.command(line)).startswith("250")
    assert (await talk.command("DATA")).startswith("354")
    return talk


async def send_in(relay: Relay, talk: Dialog, pieces: list[bytes]) -> None:
    """Each piece once the relay has taken the one before (its DATA budget counts them)."""
    budget = relay.app.front.budget
    expected = budget.used
    for piece in pieces[:-1]:
        talk.writer.write(piece)
        expected += len(piece)
        await eventually(
            lambda expected=expected: budget.used >= expected, what="the relay to take the piece"
        )
    talk.writer.write(pieces[-1])


HEAD = b"Subject: dots\r\nMessage-ID: <dots@example.com>\r\n\r\n"
STUFFED = HEAD + b"..one\r\n...two\r\n..\r\nmiddle.\r\n..three.\r\nend.\r\n"
UNSTUFFED = HEAD + b".one\r\n..two\r\n.\r\nmiddle.\r\n.three.\r\nend.\r\n"


@pytest.mark.parametrize("packets", ["one", "lines", "bytes"])
async def test_dot_stuffed_lines_reach_the_upstream_unstuffed(
    relay: Relay, upstream: Upstream, packets: str
) -> None:
    stream = STUFFED + b".\r\n"
    if packets == "one":
        pieces = [stream]
    elif packets == "lines":
        pieces = [line + b"\n" for line in stream.split(b"\n")[:-1]]
    else:
        pieces = [bytes([c]) for c in stream]
    with no_leaks(relay):
        talk = await data_session(relay)
        await send_in(relay, talk, pieces)
        assert (await talk.reply()).startswith("250 2.0.0 Ok: queued as")
        assert (await talk.command("QUIT")).startswith("221")
        await talk.close()
    [delivered] = await upstream.wait_for(1)
    assert delivered.data.endswith(b"\r\n" + UNSTUFFED)


@pytest.mark.parametrize(
    "split",
    [
        [b"Subject: s\r\n\r\nbody\r", b"\n.\r\n"],
        [b"Subject: s\r\n\r\nbody\r\n", b".\r\n"],
        [b"Subject: s\r\n\r\nbody\r\n.", b"\r\n"],
        [b"Subject: s\r\n\r\nbody\r\n.\r", b"\n"],
        [b"Subject: s\r\n\r\nbody\r\n", b".", b"\r", b"\n"],
    ],
)
async def test_the_final_dot_split_across_packets_ends_data(
    relay: Relay, upstream: Upstream, split: list[bytes]
) -> None:
    talk = await data_session(relay)
    await send_in(relay, talk, split)
    assert (await talk.reply()).startswith("250 2.0.0 Ok: queued as")
    await talk.close()
    [delivered] = await upstream.wait_for(1)
    assert delivered.data.endswith(b"\r\n\r\nbody\r\n")


async def test_a_line_at_the_limit_passes_and_one_byte_more_gets_500_after_the_dot(
    relay: Relay, upstream: Upstream
) -> None:
    at_limit = b"z" * 999 + b"\r\n"  # 1001 bytes with its CRLF: RFC 5321's 1000 and a dot
    talk = await data_session(relay)
    await send_in(relay, talk, [make_message() + at_limit + b".\r\n"])
    assert (await talk.reply()).startswith("250 2.0.0")
    for command in ("MAIL FROM:<shop@example.com>", "RCPT TO:<a@example.org>", "DATA"):
        assert (await talk.command(command))[:1] in ("2", "3")
    # Nothing is said until the final dot, however long the line goes on.
    await send_in(relay, talk, [make_message(), b"z" * 1000 + b"\r\n", b"w" * 5000, b"\r\n.\r\n"])
    assert await talk.reply() == "500 Line too long (see RFC5321 4.5.3.1.6)"
    assert (await talk.command("NOOP")).startswith("250")
    await talk.close()
    [delivered] = await upstream.wait_for(1)
    assert delivered.data.endswith(at_limit)
    assert relay.app.front.budget.used == 0


async def test_too_much_data_is_refused_after_the_dot_and_the_session_goes_on(
    make_relay: RelayFactory, upstream: Upstream
) -> None:
    relay = await make_relay(listen={"max_message_size": "10KB"})
    talk = await data_session(relay)
    line = b"q" * 98 + b"\r\n"
    await send_in(relay, talk, [make_message(), line * 60, line * 60, b"z" * 3000 + b"\r\n.\r\n"])
    assert await talk.reply() == "552 Error: Too much mail data"
    for command in ("MAIL FROM:<shop@example.com>", "RCPT TO:<a@example.org>", "DATA"):
        assert (await talk.command(command))[:1] in ("2", "3")
    await send_in(relay, talk, [make_message(), b".\r\n"])
    assert (await talk.reply()).startswith("250 2.0.0")
    await talk.close()
    assert len(await upstream.wait_for(1)) == 1
    assert relay.app.front.budget.used == 0


async def test_a_connection_lost_mid_data_leaves_nothing_behind(relay: Relay) -> None:
    front = relay.app.front
    talk = await data_session(relay)
    await send_in(relay, talk, [make_message()[:200], b"x" * 3000])
    talk.writer.transport.abort()
    await eventually(
        lambda: not front.sessions and not front.budget.used,
        what="the session to end with its connection",
    )
    assert await relay.rows("SELECT count(*) FROM messages") == [(0,)]
