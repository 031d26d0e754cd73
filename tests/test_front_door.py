"""The SMTP front door: what it advertises, what it refuses, and that it never crashes."""

from __future__ import annotations

import asyncio
import smtplib

import aiosmtplib
import pytest

from tests.conftest import Relay, Upstream, make_message, send


async def test_ehlo_advertises_size_8bitmime_smtputf8_and_pipelining(relay: Relay) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False)
    await client.connect()
    response = await client.ehlo()
    await client.quit()
    lines = response.message.upper().splitlines()
    assert "SIZE 25000000" in lines
    assert {"8BITMIME", "SMTPUTF8", "PIPELINING"} <= set(lines)


async def test_message_is_forwarded_with_only_headers_prepended(
    relay: Relay, upstream: Upstream
) -> None:
    original = (
        b"From: Shop <shop@example.com>\r\n"
        b"To: alice@example.org\r\n"
        b"Subject: =?utf-8?q?Caf=C3=A9?=   odd   spacing\r\n"
        b"X-Folded: first\r\n\tsecond line\r\n"
        b"Message-ID: <keep-me@example.com>\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"caf\xc3\xa9 \r\n"
        b".leading dot\r\n"
        b"trailing spaces   \r\n"
    )
    reply = await send(relay.port, original)
    assert reply.code == 250
    [delivered] = await upstream.wait_for(1)
    assert delivered.data.endswith(original)
    prepended = delivered.data[: -len(original)].decode().replace("\r\n\t", " ")
    assert prepended.startswith("Received: from ")
    assert "by relay.test (dedup-relay) with ESMTP id" in prepended
    assert "Message-ID" not in prepended


async def test_missing_message_id_is_added(relay: Relay, upstream: Upstream) -> None:
    await send(relay.port, make_message(message_id=None))
    [delivered] = await upstream.wait_for(1)
    assert b"\r\nMessage-ID: <" in delivered.data.split(b"\r\n\r\n")[0]


async def test_size_declared_over_limit_is_refused_at_mail(make_relay, upstream: Upstream) -> None:
    relay = await make_relay(listen={"max_message_size": "10KB"})

    def dialog() -> int:
        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            client.ehlo()
            return client.docmd("MAIL FROM:<a@example.com> SIZE=20000")[0]

    assert await asyncio.to_thread(dialog) == 552


async def test_data_over_limit_gets_552_and_nothing_is_spooled(make_relay) -> None:
    relay = await make_relay(listen={"max_message_size": "10KB"})
    big = make_message(body="x" * 70 + "\n") + (b"y" * 76 + b"\r\n") * 200
    reply = await send(relay.port, big)
    assert reply.code == 552
    assert await relay.rows("SELECT count(*) FROM messages") == [(0,)]
    ok = await send(relay.port, make_message())
    assert ok.code == 250


async def test_too_many_recipients_get_452(make_relay) -> None:
    relay = await make_relay(listen={"max_recipients": 2})

    def dialog() -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            client.ehlo()
            client.mail("a@example.com")
            return [client.rcpt(f"b{n}@example.org") for n in range(3)]

    replies = await asyncio.to_thread(dialog)
    assert [code for code, _ in replies] == [250, 250, 452]
    assert b"Too many recipients" in replies[2][1]


async def test_garbage_commands_get_5xx_and_the_session_goes_on(relay: Relay) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    assert (await reader.readline()).startswith(b"220")
    for garbage in (b"HELLO WORLD\r\n", b"\xff\xfe\x00\r\n", b"MAIL FROM:<<<>\r\n", b"DATA\r\n"):
        writer.write(garbage)
        reply = await reader.readline()
        assert reply[:1] == b"5", (garbage, reply)
    writer.write(b"EHLO client.test\r\n")
    lines = [await reader.readline()]
    while lines[-1][3:4] == b"-":
        lines.append(await reader.readline())
    assert lines[-1].startswith(b"250 ")
    writer.close()
    await writer.wait_closed()
    assert (await send(relay.port, make_message())).code == 250


async def test_client_outside_networks_is_refused_with_554(make_relay, upstream: Upstream) -> None:
    relay = await make_relay(listen={"networks": ["127.0.0.2/32"]})
    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
        await send(relay.port, make_message(), source="127.0.0.1")
    assert refused.value.code == 554
    allowed = await send(relay.port, make_message(), source="127.0.0.2")
    assert allowed.code == 250


async def test_idle_client_is_disconnected_after_command_timeout(make_relay) -> None:
    relay = await make_relay(listen={"command_timeout": "300ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    await reader.readline()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_each_command_restarts_the_idle_timeout(make_relay) -> None:
    relay = await make_relay(listen={"command_timeout": "1s"})
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    await reader.readline()
    for _ in range(6):  # 1.5 s in all, never 1 s without a command
        await asyncio.sleep(0.25)
        writer.write(b"NOOP\r\n")
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"250")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_client_stalled_in_data_is_disconnected(make_relay) -> None:
    relay = await make_relay(listen={"command_timeout": "30s", "data_timeout": "300ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    await reader.readline()
    for command in (
        b"HELO c\r\n",
        b"MAIL FROM:<a@example.com>\r\n",
        b"RCPT TO:<b@example.org>\r\n",
        b"DATA\r\n",
    ):
        writer.write(command)
        await reader.readline()
    writer.write(b"Subject: half a message\r\n")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert await relay.rows("SELECT count(*) FROM messages") == [(0,)]


async def test_null_sender_is_relayed(relay: Relay, upstream: Upstream) -> None:
    reply = await send(relay.port, make_message(), sender="")
    assert reply.code == 250
    [delivered] = await upstream.wait_for(1)
    assert delivered.sender == "<>"


async def test_pipelined_transaction_is_answered_in_order(relay: Relay, upstream: Upstream) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    await reader.readline()
    writer.write(b"EHLO c\r\n")
    while (await reader.readline())[3:4] == b"-":
        pass
    writer.write(
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
        b"RCPT TO:<c@example.org>\r\nDATA\r\n"
    )
    replies = [await reader.readline() for _ in range(4)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354"]
    writer.write(make_message() + b".\r\nQUIT\r\n")
    assert (await reader.readline()).startswith(b"250 2.0.0 Ok: queued as")
    writer.close()
    [delivered] = await upstream.wait_for(1)
    assert delivered.rcpts == ["b@example.org", "c@example.org"]


async def test_non_ascii_address_without_smtputf8_is_refused_with_553(relay: Relay) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    await reader.readline()
    writer.write(b"HELO c\r\n")
    await reader.readline()
    writer.write("MAIL FROM:<jörg@example.com>\r\n".encode())
    assert (await reader.readline()).startswith(b"553 5.6.7")
    writer.write(b"MAIL FROM:<a@example.com>\r\n")
    assert (await reader.readline()).startswith(b"250")
    writer.write("RCPT TO:<zoë@example.org>\r\n".encode())
    assert (await reader.readline()).startswith(b"553 5.6.7")
    writer.write(b"EHLO c\r\n")
    while (await reader.readline())[3:4] == b"-":
        pass
    writer.write("MAIL FROM:<jörg@example.com> SMTPUTF8\r\n".encode())
    assert (await reader.readline()).startswith(b"250")
    writer.close()
