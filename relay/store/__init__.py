"""The store's records and interface: the only place the two halves of the relay meet.

The front half hands the store a `Submission` and replies 250 only once the
store has committed it; the back half leases `Lease`s and reports `Update`s.
A PostgreSQL twin of `SqliteStore` would implement the same methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from relay.audit import Event

RecipientState = Literal["queued", "delivered", "failed", "expired", "held"]
# Message states that still owe an outcome.
PENDING_STATES = ("queued", "sending", "held")


@dataclass(frozen=True)
class Claim:
    """What makes a submission "the same email" as an earlier one, and what to do if it is."""

    scope: str
    key: str
    strategy: str
    fingerprint: str
    window: float
    on_duplicate: Literal["drop", "reject", "tag"]
    on_conflict: Literal["reject", "drop", "forward"]
    shadow: bool = False

    @property
    def namespaced(self) -> str:
        """Keys of different strategies never match each other."""
        return f"{self.strategy.lower()}\x1f{self.key}"


@dataclass(frozen=True)
class Submission:
    queue_id: str
    received_at: float
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    message_id: str | None
    client: str
    user: str | None
    helo: str
    smtputf8: bool
    body8bit: bool
    claim: Claim | None
    rule: str | None = None


@dataclass(frozen=True)
class Acceptance:
    """The store's verdict: who gets the message, who already had it, or a conflict."""

    queue_id: str
    forwarded: tuple[str, ...]
    duplicates: tuple[tuple[str, str], ...] = ()
    conflict_with: str | None = None

    @property
    def originals(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(original for _, original in self.duplicates))


@dataclass(frozen=True)
class Lease:
    """A message taken for one delivery attempt by one worker."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    received_at: float
    attempts: int
    message_id: str | None
    key: str | None
    strategy: str | None
    scope: str | None
    size: int
    smtputf8: bool
    body8bit: bool
    duplicate_of: str | None
    data: bytes | None = None  # small bodies ride along with the lease; large ones are read apart


@dataclass(frozen=True)
class LeaseBatch:
    """What one lease round took, and when the next message falls due (None: nothing queued)."""

    leases: tuple[Lease, ...]
    next_due: float | None


@dataclass(frozen=True)
class RecipientUpdate:
    """A recipient's new state after an attempt, and the audit event that says why."""

    rcpt: str
    state: RecipientState
    event: str
    code: int | None = None
    reply: str | None = None
    upstream_id: str | None = None
    release: bool = False


@dataclass(frozen=True)
class Update:
    queue_id: str
    recipients: tuple[RecipientUpdate, ...]
    next_attempt: float | None
    upstream: str | None
    duration: float | None
    ts: float
    detail: str | None = None


@dataclass(frozen=True)
class QueueDepth:
    """Messages in one pending state, and when the oldest of them was received."""

    state: str
    messages: int
    oldest: float | None


class StoreError(RuntimeError):
    """The store could not commit; the client gets a 4xx and keeps the message."""


__all__ = [
    "PENDING_STATES",
    "Acceptance",
    "Claim",
    "Event",
    "Lease",
    "LeaseBatch",
    "QueueDepth",
    "RecipientUpdate",
    "StoreError",
    "Submission",
    "Update",
]
