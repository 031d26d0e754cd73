"""The SMTP front door: who may connect, what the session may send, and when it must stop.

All protocol state lives here; once DATA is complete the bytes go to the intake,
and the reply the intake returns is the reply the client gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay import logs
from relay.config import ListenConfig, Network
from relay.intake import Intake, Transaction, unique_recipients

__all__ = ["NEEDS_SMTPUTF8", "SHUTDOWN_REPLY", "FrontDoor", "Handler", "RelaySMTP", "allowed"]

log = logging.getLogger(__name__)

SHUTDOWN_REPLY = b"421 4.3.2 Service shutting down, try again later\r\n"
# RFC 6531 3.4: a non-ASCII mailbox is only accepted in a transaction that declared SMTPUTF8.
NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address needs MAIL FROM with the SMTPUTF8 parameter"


def allowed(peer: object, networks: tuple[Network, ...]) -> bool:
    """Only configured networks may relay; anything unparseable is refused."""
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class Handler:
    """aiosmtpd's hooks: limits per command, and the hand-off to the intake at end of DATA."""

    def __init__(self, front: FrontDoor) -> None:
        self.front = front

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [responses[0], "250-PIPELINING", *responses[1:]]

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.front.closing:
            return "421 4.3.2 Service shutting down, try again later"
        if not envelope.smtp_utf8 and not address.isascii():
            return NEEDS_SMTPUTF8
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not envelope.smtp_utf8 and not address.isascii():
            return NEEDS_SMTPUTF8
        if len(envelope.rcpt_tos) >= self.front.config.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.front.config.max_recipients})"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content
        if not isinstance(data, bytes):
            return "554 5.6.0 No message data"
        sender = envelope.mail_from or ""
        peer = session.peer
        tx = Transaction(
            sender="" if sender == "<>" else sender,
            recipients=unique_recipients(envelope.rcpt_tos),
            data=data,
            client=str(peer[0]) if isinstance(peer, tuple) and peer else "unknown",
            helo=session.host_name or "",
            esmtp=bool(session.extended_smtp),
            tls=session.ssl is not None,
            user=_login(session),
            smtputf8=bool(envelope.smtp_utf8),
            body8bit="BODY=8BITMIME" in envelope.mail_options,
        )
        return await self.front.intake.submit(tx)

    async def handle_exception(self, error: Exception) -> str:
        log.exception("SMTP session error", exc_info=error)
        return "451 4.3.0 Internal error, try again later"


def _login(session: Session) -> str | None:
    if not getattr(session, "authenticated", False):
        return None
    login = getattr(session.auth_data, "login", None)
    if isinstance(login, bytes):
        return login.decode("utf-8", "replace")
    return login if isinstance(login, str) else None


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with network checks, a DATA stall timeout and graceful shutdown."""

    def __init__(self, front: FrontDoor, **kwargs: Any) -> None:
        super().__init__(Handler(front), **kwargs)
        self.front = front
        self.in_data = False

    async def _handle_client(self) -> None:
        front = self.front
        assert self.session is not None and self.transport is not None
        logs.bind(client=str(self.session.peer[0]) if self.session.peer else None)
        refusal = None
        if not allowed(self.session.peer, front.config.networks):
            log.warning("refused connection from %s: not in listen.networks", self.session.peer)
            refusal = "554 5.7.1 Relay access denied: client not in the relay's listen.networks"
        elif front.closing:
            refusal = SHUTDOWN_REPLY.decode().strip()
        elif len(front.sessions) > front.config.max_connections:
            refusal = "421 4.7.0 Too many connections, try again later"
        if refusal is not None:
            await self.push(refusal)
            self.transport.close()
            return
        await super()._handle_client()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self.front.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.front.sessions.discard(self)
        self.in_data = False
        self.front.wake()
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.in_data:
            self._reset_timeout(self.front.config.data_timeout)

    async def smtp_DATA(self, arg: str) -> None:
        self.in_data = True
        self._reset_timeout(self.front.config.data_timeout)
        try:
            await super().smtp_DATA(arg)
        finally:
            self.in_data = False
            self.front.wake()
            if self.transport is not None:
                self._reset_timeout()
                if self.front.closing:
                    self.close_now()

    def close_now(self) -> None:
        """Say 421 and hang up; only called between commands, never mid-reply."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(SHUTDOWN_REPLY)
            transport.close()


class FrontDoor:
    """Owns the listening socket and every open session."""

    def __init__(self, config: ListenConfig, intake: Intake) -> None:
        self.config = config
        self.intake = intake
        self.sessions: set[RelaySMTP] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Event()

    def wake(self) -> None:
        self._changed.set()

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving() and not self.closing

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> RelaySMTP:
        return RelaySMTP(
            self,
            data_size_limit=self.config.max_message_size,
            enable_SMTPUTF8=True,
            hostname=self.config.hostname,
            ident="dedup-relay ESMTP",
            timeout=self.config.command_timeout,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol,
            host=self.config.host,
            port=self.config.port,
            reuse_address=True,
            reuse_port=self.config.reuse_port,
        )

    async def stop(self, grace: float) -> None:
        """Stop listening, hang up idle sessions, give sessions mid-DATA `grace` seconds."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            for session in list(self.sessions):
                if not session.in_data:
                    session.close_now()
            busy = [s for s in self.sessions if s.in_data]
            remaining = deadline - loop.time()
            if not busy or remaining <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
