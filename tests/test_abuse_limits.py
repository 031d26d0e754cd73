"""Limits that keep one client from starving the others: connections per address, slow DATA,
huge headers, and the memory all sessions share (issue 14 items 12-14, issue 15).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tracemalloc

import pytest

from relay.limits import Budget
from relay.upstream.smtp import wire_payload
from tests.conftest import (
    ROOT,
    Dialog,
    RelayFactory,
    Upstream,
    eventually,
    make_message,
    send,
)


async def open_data(port: int, source: str | None = None) -> Dialog:
    """A session that has just been told 354."""
    dialog, _ = await Dialog.open(port, source=source)
    for line in ("EHLO client.test", "MAIL FROM:<shop@example.com>", "RCPT TO:<a@example.org>"):
        assert (await dialog.command(line)).startswith("250")
    assert (await dialog.command("DATA")).startswith("354")
    return dialog


# --- connections per client address ----------------------------------------------------------


async def test_the_connection_past_max_connections_per_client_gets_421(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(listen={"max_connections_per_client": 2})
    first, _ = await Dialog.open(relay.port)
    second, _ = await Dialog.open(relay.port)
    third, greeting = await Dialog.open(relay.port)
    assert greeting.startswith("421 4.7.0")
    assert await third.closed() == b""
    neighbour, greeting = await Dialog.open(relay.port, source="127.0.0.2")
    assert greeting.startswith("220")
    await first.close()
    await eventually(lambda: relay.app.front.per_client["127.0.0.1"] == 1, what="a slot")
    again, greeting = await Dialog.open(relay.port)
    assert greeting.startswith("220")
    for dialog in (second, third, neighbour, again):
        await dialog.close()


# --- slow DATA ------------------------------------------------------------------------------


async def test_a_client_trickling_data_is_cut_off_at_the_minimum_rate(
    make_relay: RelayFactory,
) -> None:
    # One byte every 50ms never trips the 1s idle timeout, but is far below 1000 bytes/s.
    relay = await make_relay(listen={"data_timeout": "1s", "min_data_rate": 1000})
    dialog = await open_data(relay.port)

    async def trickle() -> None:
        for _ in range(2000):
            dialog.writer.write(b"x")
            await dialog.writer.drain()
            await asyncio.sleep(0.05)

    dripping = asyncio.create_task(trickle())
    try:
        assert (await dialog.closed()).startswith(b"421 4.4.2")
    finally:
        dripping.cancel()
        await asyncio.gather(dripping, return_exceptions=True)
        await dialog.close()
    assert await relay.rows("SELECT count(*) FROM messages") == [(0,)]
    assert (await send(relay.port, make_message())).code == 250


# A body of 500-byte lines (with their CRLF); each client shape below cuts the same stream into
# packets of its own size, so bytes, packets and lines per second differ by shape.
PACED_BODY = b"Subject: paced\r\n\r\n" + (b"x" * 498 + b"\r\n") * 400
# (bytes a packet, seconds between packets): their quotient is the most bytes per second the
# client sends (a late wake only lowers it), far more than its packets or lines per second.
TINY_PACKETS = (50, 0.01)  # 5,000 bytes/s in 100 packets/s, 10 lines/s
LARGE_PACKETS = (4000, 0.25)  # 16,000 bytes/s in 4 packets/s, 32 lines/s


async def send_paced(dialog: Dialog, packet: int, every: float, seconds: float) -> None:
    """Packets of PACED_BODY, `every` seconds apart for `seconds`; then the rest of the line
    under way and the end of DATA."""
    loop = asyncio.get_running_loop()
    sent, stop = 0, loop.time() + seconds
    while loop.time() < stop:
        assert sent + packet < len(PACED_BODY), "PACED_BODY is too short for this pace"
        dialog.writer.write(PACED_BODY[sent : sent + packet])
        sent += packet
        await dialog.writer.drain()
        await asyncio.sleep(every)
    line_end = PACED_BODY.index(b"\r\n", max(sent - 1, 0)) + 2
    dialog.writer.write(PACED_BODY[sent:line_end] + b".\r\n")
    await dialog.writer.drain()


@pytest.mark.parametrize(("packet", "every"), [TINY_PACKETS, LARGE_PACKETS], ids=["tiny", "large"])
@pytest.mark.parametrize(
    ("share", "seconds", "verdict"),
    [
        # A tenth of its byte rate: far over its packets or lines per second, so a door that
        # counted those would cut the client off about a second in; bytes let it finish.
        (0.1, 2.0, "250"),
        # Three times its byte rate: cut off well before it would end DATA.
        (3.0, 10.0, "421 4.4.2"),
    ],
    ids=["above-rate", "below-rate"],
)
async def test_the_minimum_data_rate_is_bytes_per_second_whatever_the_packets_or_lines(
    make_relay: RelayFactory,
    packet: int,
    every: float,
    share: float,
    seconds: float,
    verdict: str,
) -> None:
    min_rate = int(packet / every * share)
    relay = await make_relay(listen={"data_timeout": "1s", "min_data_rate": min_rate})
    dialog = await open_data(relay.port)
    sending = asyncio.create_task(send_paced(dialog, packet, every, seconds))
    try:
        reply = await dialog.reply()  # whichever comes first: the cut-off or the end of DATA
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        await dialog.close()
    assert reply.startswith(verdict), (min_rate, reply)


async def test_a_whole_data_phase_has_a_deadline_even_at_a_good_rate(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(listen={"data_timeout": "5s", "max_data_time": "1s"})
    dialog = await open_data(relay.port)

    async def steady() -> None:
        for _ in range(2000):
            dialog.writer.write(b"y" * 70 + b"\r\n")
            await dialog.writer.drain()
            await asyncio.sleep(0.02)

    sending = asyncio.create_task(steady())
    try:
        assert (await dialog.closed()).startswith(b"421 4.4.2")
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await dialog.close()


# --- headers ----------------------------------------------------------------------------------


def test_a_header_folded_over_a_million_lines_parses_in_one_pass() -> None:
    # Before: each folded line copied the whole field again; minutes for this 4 MB input,
    # hours at 25 MB. Now it is one pass, a second or two.
    script = (
        "from relay import headers\n"
        "data = b'Subject: x\\r\\n' + b' y\\r\\n' * 1_000_000 + b'\\r\\nbody\\r\\n'\n"
        "[field] = headers.fields(data)\n"
        "assert len(field.raw) == 4_000_004, len(field.raw)\n"
    )
    # The deadline only catches the hang; the parse itself takes well under a second.
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


async def test_header_size_and_count_limits_get_552_like_postfixs_header_size_limit(
    make_relay: RelayFactory, upstream: Upstream
) -> None:
    relay = await make_relay(
        listen={"max_header_size": "10KB", "max_header_fields": 50, "max_message_size": "5MB"}
    )
    folded = b"X-Folded: start\r\n" + b" more\r\n" * 5000
    many = b"".join(b"X-N%d: v\r\n" % n for n in range(60))
    for header, expected in ((folded, "X-Folded"), (many, "More than 50 header fields")):
        reply = await send(relay.port, header + make_message())
        assert (reply.code, reply.text[:5]) == (552, "5.3.4"), reply
        assert expected in reply.text
    assert await relay.rows("SELECT count(*) FROM messages") == [(0,)]
    assert (await send(relay.port, many[: 40 * 9] + make_message())).code == 250
    rejected = await relay.events("rejected")
    assert [e["code"] for e in rejected] == [552, 552]


# --- memory in flight -------------------------------------------------------------------------


async def test_when_the_memory_budget_is_spent_new_mail_waits_with_452_and_421(
    make_relay: RelayFactory, upstream: Upstream
) -> None:
    relay = await make_relay(listen={"max_message_size": "100KB", "max_bytes_in_flight": "150KB"})
    budget = relay.app.front.budget
    holder = await open_data(relay.port)
    first = make_message() + (b"z" * 76 + b"\r\n") * 1150
    holder.writer.write(first)
    await holder.writer.drain()
    await eventually(lambda: budget.used == len(first), what="the first message in memory")

    sized, _ = await Dialog.open(relay.port)
    await sized.command("EHLO client.test")
    reply = await sized.command("MAIL FROM:<shop@example.com> SIZE=70000")
    assert reply.startswith("452 4.3.1"), reply
    await sized.close()

    undeclared = await open_data(relay.port)
    undeclared.writer.write((b"w" * 76 + b"\r\n") * 800)
    await undeclared.writer.drain()
    assert (await undeclared.closed()).startswith(b"421 4.3.1")
    await undeclared.close()

    assert (await holder.command(b".")).startswith("250")
    await holder.close()
    await eventually(lambda: budget.used == 0, what="the budget to be given back")
    assert (await send(relay.port, make_message(body="w" * 60_000 + "\n"))).code == 250
    await upstream.wait_for(2)


def test_the_budget_never_charges_what_does_not_fit() -> None:
    budget = Budget(100)
    assert budget.take(60) and not budget.take(41) and budget.take(40)
    budget.give_back(100)
    assert budget.used == 0 and budget.fits(100) and not budget.fits(101)


def test_a_clean_message_is_copied_once_on_its_way_upstream() -> None:
    size = 8_000_000
    data = (b"z" * 998 + b"\r\n") * (size // 1000)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        payload = wire_payload(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert payload.endswith(b"\r\n.\r\n") and len(payload) == len(data) + 3
    # Before: three full copies (line endings, dot-stuffing, terminator) at once.
    assert peak < 1.2 * size, peak
