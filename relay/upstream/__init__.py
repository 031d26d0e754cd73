"""Transports that hand a spooled message to an upstream, one connection each.

A transport reports what happened per recipient and never decides policy: whether a
result is final, retried, or tried on another upstream is the caller's business
(`relay.upstream.failover`, `relay.delivery`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from relay.config import UpstreamConfig
from relay.upstream.replies import Kind

if TYPE_CHECKING:
    from relay.upstream.mx import Resolver

__all__ = [
    "Attempt",
    "Gate",
    "Outgoing",
    "RecipientResult",
    "Transport",
    "open_transport",
]

# Awaited by a transport once its connection is ready, just before MAIL FROM: the pacing of
# the upstream's rate limit, so connecting never counts against it.
Gate = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Outgoing:
    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    smtputf8: bool
    body8bit: bool
    # Called just before the payload goes: it raises (a StoreError) when the message may no
    # longer be this process's to send (its lease ran out unrenewed), and nothing is sent.
    fence: Callable[[], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RecipientResult:
    """One recipient's outcome at one upstream.

    `failover`: the upstream itself could not be used (unreachable, TLS, greeting, 421) and
    nothing of the message reached it, so another upstream may be tried at once.
    `upstream_id` overrides the attempt's when recipients went through different
    transactions (direct delivery to several domains).
    """

    rcpt: str
    kind: Kind
    code: int | None
    reply: str
    failover: bool = False
    upstream_id: str | None = None


@dataclass(frozen=True)
class Attempt:
    """What one transport did with one message.

    `down` names why the upstream as a whole is unusable (it is then marked down for a
    while); None when it answered.
    """

    results: tuple[RecipientResult, ...]
    upstream_id: str | None
    duration: float
    down: str | None = None


class Transport(Protocol):
    """One connection to an upstream; `payload_sent` marks the RFC 1047 window."""

    @property
    def payload_sent(self) -> bool: ...

    async def send(self, message: Outgoing, gate: Gate | None = None) -> Attempt: ...

    async def close_idle(self) -> None: ...

    async def close(self) -> None: ...


def open_transport(
    config: UpstreamConfig, instance: str, resolvers: dict[str, Resolver] | None = None
) -> Transport:
    """A new connection to `config`; `resolvers` keeps one DNS resolver (and its cache) per
    `mx:` upstream, shared by all of that upstream's connections."""
    if config.scheme == "maildir":
        from relay.upstream.maildir import MaildirTransport

        return MaildirTransport(config.path, instance)
    if config.scheme == "mx":
        from relay.upstream.mx import MxTransport, Resolver

        shared = {} if resolvers is None else resolvers
        if config.label not in shared:
            shared[config.label] = Resolver(config.dns_servers, config.timeout)
        return MxTransport(config, shared[config.label])
    from relay.upstream.smtp import SmtpTransport

    return SmtpTransport(config)
