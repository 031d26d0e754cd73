"""Delivery over SMTP with aiosmtplib: one reused connection, per-recipient replies.

DATA is driven by hand rather than with `SMTP.data()` so the code knows whether
the upstream had the whole payload when a connection died: before that point a
failure is simply temporary, after it the message may have been accepted. Only a
354 to DATA lets the payload go, and a reply stream that holds more replies than
commands were sent is never trusted again.
"""

from __future__ import annotations

import re
import time

import aiosmtplib

from relay.config import UpstreamConfig
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

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)


def wire_payload(data: bytes) -> bytes:
    """CRLF line endings, dot-stuffed, terminated: never lets a bare LF end the DATA early.

    Each rewrite is skipped when a search finds nothing to rewrite, so a clean message
    (the front door already normalised its line endings) is copied once, not three times.
    """
    text = _LINE_ENDINGS.sub(b"\r\n", data) if _BARE_LINE_END.search(data) else data
    if text.startswith(b".") or b"\n." in text:
        text = _LEADING_DOT.sub(b"..", text)
    return text + (b".\r\n" if text.endswith(b"\r\n") else b"\r\n.\r\n")


class PlaintextAuthRefused(aiosmtplib.SMTPException):
    """Credentials would cross the wire in clear: the upstream offered no TLS."""


class _Desynced(aiosmtplib.SMTPException):
    """The upstream sent more replies than commands: no later reply can be paired safely."""


def _stray_replies(client: aiosmtplib.SMTP) -> bool:
    """Bytes already read past the last reply: a reply the relay never asked for."""
    protocol = client.protocol
    return bool(getattr(protocol, "_buffer", b"")) if protocol is not None else False


class SmtpTransport:
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.payload_sent = False
        self._stage: Stage = "session"
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
        self._stage = "mail"
        try:
            await self._mail(client, message)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError, aiosmtplib.SMTPTimeoutError):
            if not reused:
                raise
            await self.close()  # a stale reused connection: nothing was sent yet, so reconnect
            self._stage = "session"
            client, _ = await self._connection()
            self._stage = "mail"
            await self._mail(client, message)
        self._sent += 1
        self._stage = "rcpt"
        encoding = "utf-8" if message.smtputf8 else "ascii"
        accepted: list[str] = []
        for rcpt in message.recipients:
            try:
                await client.rcpt(rcpt, encoding=encoding)
            except aiosmtplib.SMTPRecipientRefused as exc:
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
        final = await self._data(client, message)
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

    async def _mail(self, client: aiosmtplib.SMTP, message: Outgoing) -> None:
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
        try:
            await client.mail(
                message.sender, options=options, encoding="utf-8" if message.smtputf8 else "ascii"
            )
        except ValueError as exc:
            raise aiosmtplib.SMTPResponseException(553, unsendable(exc)) from None

    async def _data(self, client: aiosmtplib.SMTP, message: Outgoing) -> aiosmtplib.SMTPResponse:
        start = await client.execute_command(b"DATA")
        if start.code != 354:
            # A 2xx here would be "delivered" for a body never sent; whatever it is, the
            # upstream did not ask for the payload, so the payload does not go.
            raise aiosmtplib.SMTPResponseException(
                start.code, f"{start.message} (answer to DATA instead of 354; message not sent)"
            )
        if _stray_replies(client):
            raise _Desynced(
                "the upstream sent more replies than commands; the message was not sent"
            )
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost before the payload")
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
