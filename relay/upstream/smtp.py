"""Delivery over SMTP with aiosmtplib: one reused connection, per-recipient replies.

DATA is driven by hand rather than with `SMTP.data()` so the code knows whether
the upstream had the whole payload when a connection died: before that point a
failure is simply temporary, after it the message may have been accepted. Only a
354 to DATA lets the payload go, and only with a recipient accepted; a reply stream
that holds more replies than commands were sent is never trusted again.

When the upstream offers PIPELINING (RFC 2920), MAIL, every RCPT and DATA go in one
write and their replies are read back in order: one round trip instead of two plus
one per recipient. aiosmtplib reads one reply per command and drops bytes that come
while no command waits, so for that batch `_Replies` takes the connection's place
and keeps every byte; the payload then goes through aiosmtplib's protocol as before.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import SMTPProtocol

from relay.config import UpstreamConfig
from relay.content import normalise_line_endings
from relay.errors import StoreError
from relay.upstream import Attempt, Gate, Outgoing, RecipientResult
from relay.upstream.replies import (
    Kind,
    Stage,
    classify,
    classify_error,
    unsendable,
    unusable,
    upstream_queue_id,
)

__all__ = ["PlaintextAuthRefused", "SmtpTransport", "wire_payload"]

_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)


def wire_payload(data: bytes) -> bytes:
    """CRLF line endings, dot-stuffed, terminated: never lets a bare LF end the DATA early.

    Each rewrite is skipped when a search finds nothing to rewrite, so a clean message
    (the front door already normalised its line endings) is copied once, not three times.
    """
    text = normalise_line_endings(data)
    if text.startswith(b".") or b"\n." in text:
        text = _LEADING_DOT.sub(b"..", text)
    return text + (b".\r\n" if text.endswith(b"\r\n") else b"\r\n.\r\n")


class PlaintextAuthRefused(aiosmtplib.SMTPException):
    """Credentials would cross the wire in clear: the upstream offered no TLS."""


class _Desynced(aiosmtplib.SMTPException):
    """The upstream sent more replies than commands: no later reply can be paired safely."""


_STALE = (aiosmtplib.SMTPServerDisconnected, ConnectionError, aiosmtplib.SMTPTimeoutError)
# aiosmtplib's own limits on a reply, and its rule for what may not appear in a command.
_MAX_LINE = 8192
_MAX_REPLY = _MAX_LINE * 4
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def _command(*args: bytes) -> bytes:
    """One command line, refused (ValueError) exactly where aiosmtplib would refuse it."""
    for arg in args:
        if _CONTROL.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"


@functools.lru_cache(maxsize=4096)
def _quoted(address: str, encoding: str) -> bytes:
    """aiosmtplib's quoting, kept per text: an app's sender and recipients repeat on every
    message, and its parser (the stdlib's `parseaddr`, in Python) is the dearest part of a
    command. A refusal (ValueError) is not kept, so it is raised again each time."""
    return quote_address(address).encode(encoding)


def _address(verb: bytes, prefix: bytes, address: str, encoding: str, *options: str) -> bytes:
    """MAIL or RCPT as `SMTP.mail`/`SMTP.rcpt` would write it, byte for byte."""
    quoted = _quoted(address, encoding)
    return _command(verb, prefix + quoted, *(option.encode("ascii") for option in options))


class _Replies(asyncio.Protocol):
    """Every byte the upstream sends while a pipelined batch is answered.

    Installed on the connection's transport in place of aiosmtplib's protocol (which gets
    the connection back with `release`, or its loss if the connection dies meanwhile):
    replies arriving in one segment or in many are all kept, and bytes past the last
    expected reply are visible as `stray`.
    """

    def __init__(
        self, inner: SMTPProtocol, transport: asyncio.BaseTransport, timeout: float | None
    ) -> None:
        self._inner = inner
        self._timeout = timeout
        self._transport = transport
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: str | None = None
        transport.set_protocol(self)

    def release(self) -> None:
        if not self._transport.is_closing():
            self._transport.set_protocol(self._inner)

    @property
    def stray(self) -> bool:
        return bool(self._buffer)

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        self._wake()

    def eof_received(self) -> bool:
        self._lost = self._lost or "Unexpected EOF received"
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._lost or "Connection lost"
        self._inner.connection_lost(exc)
        self._wake()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> aiosmtplib.SMTPResponse:
        """The next reply, waiting at most the upstream's timeout for it."""
        while (reply := self._parse()) is None:
            if self._lost is not None:
                raise aiosmtplib.SMTPServerDisconnected(self._lost)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self._timeout):
                    await self._waiter
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from None
        return reply

    def _parse(self) -> aiosmtplib.SMTPResponse | None:
        """The first whole reply in the buffer, read as aiosmtplib reads one."""
        buffer = self._buffer
        offset = 0
        text: list[bytes] = []
        while (end := buffer.find(b"\n", offset)) >= 0:
            line = bytes(buffer[offset : end + 1])
            if len(line) > _MAX_LINE:
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
            try:
                code = int(line[:3])
            except ValueError:
                raise aiosmtplib.SMTPResponseException(
                    -1, f"Malformed SMTP response line: {line.decode('utf-8', 'ignore')}"
                ) from None
            offset = end + 1
            text.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del buffer[:offset]
                return aiosmtplib.SMTPResponse(
                    code, b"\n".join(text).decode("utf-8", "surrogateescape")
                )
        if len(buffer) > _MAX_REPLY:
            raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        return None


def _positive(code: int) -> bool:
    """A yes to MAIL or RCPT: any 2xx, as Postfix's client reads it, not only aiosmtplib's
    250 (and 251 for RCPT). The upstream takes the sender or recipient whatever 2xx it
    says, so the relay must count it in: a recipient left out on a 252 would get the
    payload all the same, and was recorded "delivered" by the 252 alone when none went."""
    return 200 <= code < 300


def _stray_replies(client: aiosmtplib.SMTP) -> bool:
    """Bytes already read past the last reply: a reply the relay never asked for."""
    protocol = client.protocol
    return bool(getattr(protocol, "_buffer", b"")) if protocol is not None else False


def _not_started(reply: aiosmtplib.SMTPResponse) -> aiosmtplib.SMTPResponseException:
    """DATA answered with anything but 354: a 2xx here would be "delivered" for a body
    never sent; whatever it is, the upstream did not ask for the payload, so it stays."""
    return aiosmtplib.SMTPResponseException(
        reply.code, f"{reply.message} (answer to DATA instead of 354; message not sent)"
    )


class SmtpTransport:
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.payload_sent = False
        self._stage: Stage = "session"
        self._answered = False  # a reply to the current transaction has come
        self._client: aiosmtplib.SMTP | None = None
        self._sent = 0
        self._last_used = 0.0

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    def _new_client(self) -> aiosmtplib.SMTP:
        c = self.config
        implicit = c.scheme == "smtps"
        # Credentials are not given to the client: it would log in whether or not TLS is up.
        return aiosmtplib.SMTP(
            hostname=c.host,
            port=c.port,
            use_tls=implicit,
            start_tls=False if implicit else (True if c.require_tls else None),
            validate_certs=c.tls_verify,
            cert_bundle=c.ca_file,
            timeout=c.timeout,
            local_hostname=c.helo_name or None,
        )

    async def _connection(self) -> tuple[aiosmtplib.SMTP, bool]:
        """A ready connection and whether it is a reused one (which may have gone stale)."""
        client = self._client
        if (
            client is not None
            and client.is_connected
            and (self._sent < self.config.max_messages_per_connection)
            and not _stray_replies(client)
        ):
            return client, True
        await self.close()
        client = self._new_client()
        self._client = client
        self._sent = 0
        await client.connect()
        if client.is_ehlo_or_helo_needed:
            await client.ehlo()
        await self._login(client)
        return client, False

    async def _login(self, client: aiosmtplib.SMTP) -> None:
        c = self.config
        if c.username is None:
            return
        encrypted = client.get_transport_info("sslcontext") is not None
        if not encrypted and not c.allow_plaintext_auth:
            raise PlaintextAuthRefused(
                f"the upstream {c.label} offers no TLS, so its password was not sent"
                " (allow_plaintext_auth is false for this upstream)"
            )
        await client.login(c.username, c.password.value if c.password else "")

    async def send(self, message: Outgoing, gate: Gate | None = None) -> Attempt:
        started = time.monotonic()
        self.payload_sent = False
        self._stage = "session"
        refused: dict[str, RecipientResult] = {}
        results: tuple[RecipientResult, ...]
        down: str | None = None
        try:
            results, upstream_id = await self._send(message, gate, refused)
        except Exception as exc:
            if self._stage in ("data", "end-of-data"):
                self.abort()  # the upstream may be reading a payload: a QUIT would join it
            else:
                await self.close()
            if isinstance(exc, StoreError):
                raise  # the pacing could not be booked: nothing was sent, nothing is known
            kind, code, text = classify_error(
                exc, payload_sent=self.payload_sent, stage=self._stage
            )
            if not self.payload_sent and unusable(exc, self._stage, code):
                down = text if code is None else f"{code} {text}"
            results = tuple(
                refused.get(r) or RecipientResult(r, kind, code, text, failover=down is not None)
                for r in message.recipients
            )
            upstream_id = None
        self._last_used = time.monotonic()
        return Attempt(results, upstream_id, time.monotonic() - started, down)

    async def _send(
        self, message: Outgoing, gate: Gate | None, refused: dict[str, RecipientResult]
    ) -> tuple[tuple[RecipientResult, ...], str | None]:
        client, reused = await self._connection()
        if gate is not None:
            await gate()
        try:
            return await self._transaction(client, message, refused)
        except _STALE:
            if not reused or self._answered:
                raise
        # A reused connection died before any reply to this transaction: with no reply
        # (MAIL's comes first) nothing was taken, so it goes again on a fresh one, once.
        await self.close()
        self._stage = "session"
        client, _ = await self._connection()
        return await self._transaction(client, message, refused)

    async def _transaction(
        self, client: aiosmtplib.SMTP, message: Outgoing, refused: dict[str, RecipientResult]
    ) -> tuple[tuple[RecipientResult, ...], str | None]:
        self._stage = "mail"
        self._answered = False
        if client.supports_extension("pipelining"):
            return await self._send_pipelined(client, message, refused)
        await self._mail(client, message)
        self._answered = True
        self._sent += 1
        self._stage = "rcpt"
        encoding = "utf-8" if message.smtputf8 else "ascii"
        accepted: list[str] = []
        for rcpt in message.recipients:
            try:
                await client.rcpt(rcpt, encoding=encoding)
            except aiosmtplib.SMTPRecipientRefused as exc:
                if _positive(exc.code):
                    accepted.append(rcpt)  # a 252: the upstream holds the recipient all the same
                    continue
                if exc.code == 421:
                    raise  # the upstream is closing: the transaction is off, for every recipient
                refused[rcpt] = RecipientResult(
                    rcpt, classify(exc.code, "rcpt"), exc.code, exc.message
                )
            except ValueError as exc:
                # Refused by the client library before anything was sent: this recipient
                # can never be sent, and must not hold back the others.
                refused[rcpt] = RecipientResult(rcpt, Kind.PERMANENT, None, unsendable(exc))
            else:
                accepted.append(rcpt)
        if not accepted:
            await self._reset(client)
            return tuple(refused[r] for r in message.recipients), None
        self._stage = "data"
        start = await client.execute_command(b"DATA")
        if start.code != 354:
            raise _not_started(start)
        return await self._deliver(client, message, refused)

    async def _send_pipelined(
        self,
        client: aiosmtplib.SMTP,
        message: Outgoing,
        refused: dict[str, RecipientResult],
    ) -> tuple[tuple[RecipientResult, ...], str | None]:
        """MAIL, RCPT... and DATA in one write; the replies are then judged one by one, as
        on the unpipelined path."""
        encoding = "utf-8" if message.smtputf8 else "ascii"
        try:
            mail = _address(
                b"MAIL", b"FROM:", message.sender, encoding, *self._mail_options(client, message)
            )
        except ValueError as exc:
            raise aiosmtplib.SMTPResponseException(553, unsendable(exc)) from None
        commands = [mail]
        rcpts: list[str] = []
        unwritable: dict[str, RecipientResult] = {}
        for rcpt in message.recipients:
            try:
                commands.append(_address(b"RCPT", b"TO:", rcpt, encoding))
            except ValueError as exc:
                unwritable[rcpt] = RecipientResult(rcpt, Kind.PERMANENT, None, unsendable(exc))
            else:
                rcpts.append(rcpt)
        if not rcpts:
            return tuple(unwritable[r] for r in message.recipients), None
        commands.append(b"DATA\r\n")
        batch = b"".join(commands)
        replies = await self._pipeline(client, batch, len(commands))
        mail_reply, rcpt_replies = replies[0], replies[1 : len(commands) - 1]
        self._stage = "mail"
        if mail_reply.code == 421:
            raise aiosmtplib.SMTPSenderRefused(mail_reply.code, mail_reply.message, message.sender)
        if not _positive(mail_reply.code):
            await self._end_unsent(client, replies[-1])
            kind = classify(mail_reply.code, "mail")
            return tuple(
                RecipientResult(r, kind, mail_reply.code, mail_reply.message)
                for r in message.recipients
            ), None
        self._sent += 1
        self._stage = "rcpt"
        refused.update(unwritable)
        accepted = False
        for rcpt, reply in zip(rcpts, rcpt_replies, strict=False):
            if _positive(reply.code):
                accepted = True
            elif reply.code == 421:
                raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, rcpt)
            else:
                refused[rcpt] = RecipientResult(
                    rcpt, classify(reply.code, "rcpt"), reply.code, reply.message
                )
        self._stage = "data"
        start = replies[-1]
        if not accepted:
            await self._end_unsent(client, start)
            return tuple(refused[r] for r in message.recipients), None
        if start.code != 354:
            raise _not_started(start)
        return await self._deliver(client, message, refused)

    async def _end_unsent(self, client: aiosmtplib.SMTP, start: aiosmtplib.SMTPResponse) -> None:
        """A pipelined transaction that sends no payload (MAIL refused, or no recipient).

        Every reply of the batch was read, so the connection stays (RSET) unless DATA got
        354: the upstream then waits for a payload that will not come, and the line goes.
        """
        if start.code == 354:
            self.abort()
        elif self._client is client:
            await self._reset(client)

    async def _pipeline(
        self,
        client: aiosmtplib.SMTP,
        batch: bytes,
        expected: int,
    ) -> list[aiosmtplib.SMTPResponse]:
        """Write the batch and read its replies, in order, stopping at a 421.

        Any failure, a 421 and a stray reply drop the connection: its reply stream can no
        longer be paired with commands.
        """
        protocol = client.protocol
        transport = protocol.transport if protocol is not None else None
        if protocol is None or transport is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        reader = _Replies(protocol, transport, client.timeout)
        replies: list[aiosmtplib.SMTPResponse] = []
        try:
            protocol.write(batch)
            while len(replies) < expected:
                n = len(replies)
                self._stage = "mail" if n == 0 else "data" if n == expected - 1 else "rcpt"
                reply = await reader.next()
                self._answered = True
                replies.append(reply)
                if reply.code == 421:
                    self.abort()  # the upstream is closing: the transaction is off
                    return replies
            if reader.stray:
                raise _Desynced(
                    "the upstream sent more replies than commands; the message was not sent"
                )
        except BaseException:
            self.abort()
            raise
        finally:
            reader.release()
        return replies

    def _mail_options(self, client: aiosmtplib.SMTP, message: Outgoing) -> list[str]:
        options: list[str] = []
        if client.supports_extension("size"):
            options.append(f"SIZE={len(message.data)}")
        if message.body8bit and client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if message.smtputf8:
            if not client.supports_extension("smtputf8"):
                raise aiosmtplib.SMTPResponseException(
                    554, "5.6.7 the message needs SMTPUTF8, which the upstream does not offer"
                )
            options.append("SMTPUTF8")
        return options

    async def _mail(self, client: aiosmtplib.SMTP, message: Outgoing) -> None:
        options = self._mail_options(client, message)
        try:
            await client.mail(
                message.sender, options=options, encoding="utf-8" if message.smtputf8 else "ascii"
            )
        except aiosmtplib.SMTPSenderRefused as exc:
            if not _positive(exc.code):
                raise
        except ValueError as exc:
            raise aiosmtplib.SMTPResponseException(553, unsendable(exc)) from None

    async def _deliver(
        self, client: aiosmtplib.SMTP, message: Outgoing, refused: dict[str, RecipientResult]
    ) -> tuple[tuple[RecipientResult, ...], str | None]:
        """After a 354 with a recipient accepted: the payload, its reply, and what it means."""
        final = await self._payload(client, message)
        kind = classify(final.code, "end-of-data")
        if kind is Kind.AMBIGUOUS or _stray_replies(client):
            self.abort()  # the next transaction would read this one's leftovers
        elif kind is not Kind.DELIVERED:
            await self._reset(client)
        upstream_id = upstream_queue_id(final.message) if kind is Kind.DELIVERED else None
        results = tuple(
            refused.get(r) or RecipientResult(r, kind, final.code, final.message)
            for r in message.recipients
        )
        return results, upstream_id

    async def _payload(self, client: aiosmtplib.SMTP, message: Outgoing) -> aiosmtplib.SMTPResponse:
        if _stray_replies(client):
            raise _Desynced(
                "the upstream sent more replies than commands; the message was not sent"
            )
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost before the payload")
        if message.fence is not None:
            message.fence()
        payload = wire_payload(message.data)
        self.payload_sent = True
        self._stage = "end-of-data"
        protocol.write(payload)
        # A large payload takes time to cross the wire before the reply can come.
        timeout = (self.config.timeout or 60.0) + len(payload) / 50_000
        return await protocol.read_response(timeout=timeout)

    async def _reset(self, client: aiosmtplib.SMTP) -> None:
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, OSError):
            await self.close()

    async def close_idle(self) -> None:
        if self._client is not None and time.monotonic() - self._last_used > (
            self.config.idle_timeout
        ):
            await self.close()

    def abort(self) -> None:
        """Drop the connection without a word: its reply stream can no longer be trusted."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if client.is_connected:
            try:
                await client.quit(timeout=2)
            except (aiosmtplib.SMTPException, OSError):
                client.close()
        else:
            client.close()
