"""Transports that hand a spooled message to the real upstream, one connection per worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from relay.config import UpstreamConfig
from relay.upstream.replies import Kind

__all__ = ["Attempt", "Outgoing", "RecipientResult", "Transport", "describe", "open_transport"]


@dataclass(frozen=True)
class Outgoing:
    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    smtputf8: bool
    body8bit: bool


@dataclass(frozen=True)
class RecipientResult:
    rcpt: str
    kind: Kind
    code: int | None
    reply: str


@dataclass(frozen=True)
class Attempt:
    results: tuple[RecipientResult, ...]
    upstream_id: str | None
    duration: float


class Transport(Protocol):
    """One worker's channel to the upstream; `payload_sent` marks the RFC 1047 window."""

    payload_sent: bool

    async def send(self, message: Outgoing) -> Attempt: ...

    async def close_idle(self) -> None: ...

    async def close(self) -> None: ...


def describe(config: UpstreamConfig) -> str:
    if config.scheme == "maildir":
        return f"maildir:{config.path}"
    return f"{config.scheme}://{config.host}:{config.port}"


def open_transport(config: UpstreamConfig, instance: str) -> Transport:
    if config.scheme == "maildir":
        from relay.upstream.maildir import MaildirTransport

        return MaildirTransport(config.path, instance)
    from relay.upstream.smtp import SmtpTransport

    return SmtpTransport(config)
