"""The store's records and interface: the only place the two halves of the relay meet.

The front half hands the store a `Submission` and replies 250 only once the
store has committed it; the back half leases `Lease`s and reports `Update`s.
Intake, delivery, the CLI and the app know only the `Store` protocol; the SQLite
backend (`relay.store.sqlite`) and the PostgreSQL one (`relay.store.postgres`)
implement it, and `open_store` picks one from the config. The store never reads
a clock: every time it compares against is passed in, from the caller's
injected clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from relay.audit import Event
from relay.decision import Claim, Verdict
from relay.errors import StoreError, StoreLost, StoreUnavailable
from relay.instance import Instance

if TYPE_CHECKING:
    from relay.config import StoreConfig
    from relay.store.migrations import Migrated

RecipientState = Literal["queued", "delivered", "failed", "expired", "held"]
MessageState = Literal["queued", "sending", "held", "done"]
# Message states that still owe an outcome.
PENDING_STATES = ("queued", "sending", "held")
OnCommit = Callable[[list[Event]], None]
# Called after each committed batch with its size and how long it took (for metrics).
OnBatch = Callable[[int, float], None]


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
    # Said in the audit events of this submission: how its key was reached, when it is
    # not the usual way (a fingerprint over the raw bytes of a message that cannot be parsed).
    note: str | None = None


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
    # What routes may match on besides the envelope and headers: the dedupe rule that
    # matched at the door and the authenticated user.
    rule: str | None = None
    user: str | None = None


@dataclass(frozen=True)
class LeaseBatch:
    """What one lease round took, and when the next message falls due.

    A batch shorter than its limit took everything that was due; `next_due` is when the
    rest falls due (None: nothing queued). A full batch may have left due mail behind,
    so the caller leases again at once (its `next_due` may be None).
    """

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
    # The process whose lease this outcome ends (a delivery attempt's): the update lands only
    # while the message is still `sending` under it. None for recovery and requeue, which
    # take the message over themselves.
    owner: str | None = None


@dataclass(frozen=True)
class QueueDepth:
    """Messages in one pending state, and when the oldest of them was received."""

    state: str
    messages: int
    oldest: float | None


class Store(Protocol):
    """What the relay needs from durable storage; every method is one transaction.

    A method returns only after its transaction has committed, and raises
    `StoreError` when it did not: then nothing of it is stored, and the caller
    answers 4xx or tries again later. `StoreUnavailable` (a subclass) means the
    store committed nothing at all (a full disk, a read-only file, a lost
    connection): the same call may succeed later, so delivery keeps an outcome
    that met it and writes it again. Events a method records are handed to
    `on_commit` (given to the constructor) after the commit, never before.
    """

    @property
    def running(self) -> bool:
        """The writer is taking jobs; when it is not, nothing can be accepted or delivered."""
        ...

    @property
    def lost(self) -> str | None:
        """Why this process can never write its store again, or None.

        Set when the store found that what it writes to is no longer the store at its
        address (SQLite: the file was deleted or replaced, its st_dev/st_ino changed).
        Every later call raises `StoreLost`; the front door refuses mail, readiness fails.
        """
        ...

    async def open(self) -> None:
        """Create or upgrade the schema and start the writer."""

    async def close(self) -> None:
        """Finish the jobs already queued, then close; later calls raise StoreError."""

    async def accept(self, sub: Submission) -> Verdict:
        """Claim the key, spool what the verdict forwards, record it; only then may 250 go out."""

    async def record(self, event: Event) -> None:
        """An event with no state change, such as a submission refused for a bad key."""

    async def lease(self, owner: str, limit: int, now: float, lease_for: float) -> LeaseBatch:
        """Take up to `limit` messages due at `now` for `owner` until `now + lease_for`."""

    async def body(self, queue_id: str) -> bytes | None:
        """A spooled body the lease did not carry (a large one); None if it is gone."""

    async def update(self, update: Update) -> MessageState:
        """Apply an attempt's outcome and end the lease; returns the message's new state."""

    async def unlease(self, queue_id: str, next_attempt: float, owner: str) -> None:
        """Give back `owner`'s lease whose attempt never reached the upstream; it does not
        count. A lease another process has taken back meanwhile is left alone."""

    async def renew(self, owner: str, queue_ids: Sequence[str], until: float) -> frozenset[str]:
        """Extend `owner`'s leases on these messages to `until`, while its attempts are alive.

        Only messages still `sending` under `owner` are extended; returns which were, so a
        message settled while the renewal ran does not leave the others unconfirmed.
        """

    async def recover(self, owner: str, now: float, *, hold: bool) -> list[str]:
        """At start-up: take back `owner`'s own leases (its previous run stopped before
        recording their outcome; the instance lock proves no live process holds them) and
        any other lease expired before `now`. Their recipients are ambiguous: queued again
        or (`hold`) held. Returns the queue ids."""

    async def reclaim(self, owner: str, now: float, *, hold: bool) -> list[str]:
        """While running: take back leases of other owners that expired before `now` (a
        replica that died), as `recover` does. Never `owner`'s own: this process still
        holds them, even when it could not renew them in time. Returns the queue ids."""

    async def requeue(self, queue_id: str, now: float) -> int:
        """An operator's decision to send held recipients again; returns how many."""

    async def purge(self, now: float, audit_retention: float) -> dict[str, int]:
        """Drop expired claims, kept bodies past their time and audit rows past retention."""

    async def probe(self, now: float) -> None:
        """Commit one tiny write: ready means the store takes writes, not only that it opened."""

    async def queue_depth(self) -> tuple[QueueDepth, ...]:
        """What is still to be delivered, per pending state, with the oldest receipt time."""

    def subscribe(self, wake: Callable[[], None]) -> None:
        """Call `wake` when another process may have made work due (new mail on another
        replica, a requeue from the command line), so an idle relay need not poll hard."""

    async def acquire_instance(self, me: Instance, stale_after: float) -> Instance:
        """Take the instance name `me.name` for this process, unless a live process holds it.

        In one transaction: read the holder, ask `relay.instance.may_take(holder, me,
        stale_after)`, and if it may, write `me` over it. Returns the holder afterwards:
        `me` (same token) when taken, else the live holder, untouched.
        """
        ...

    async def heartbeat_instance(self, me: Instance, now: float) -> bool:
        """Say that `me` still lives; False when the name is no longer `me`'s (taken over)."""
        ...

    async def release_instance(self, me: Instance) -> None:
        """Give the name up at a clean shutdown, if `me` still holds it."""

    async def reserve_send(self, upstream: str, interval: float, now: float) -> float:
        """Book the next transaction to `upstream` under its rate limit; returns its time.

        The time is the later of `now` and `interval` after the previous booking for the
        same upstream, whichever process or replica made it, and becomes the new last
        booking: one row per upstream, read and moved in one statement. The caller waits
        until the returned time, so transactions to one upstream are never closer than
        `interval`, across every process sharing the store.
        """


def open_store(
    config: StoreConfig, on_commit: OnCommit | None = None, on_batch: OnBatch | None = None
) -> Store:
    """The backend the config names: PostgreSQL when `store.url` is set, else SQLite."""
    if config.url is not None:
        from relay.store.postgres import PostgresStore

        return PostgresStore(config, on_commit=on_commit, on_batch=on_batch)
    from relay.store.sqlite import SqliteStore

    return SqliteStore(
        config.path, keep_bodies=config.keep_bodies, on_commit=on_commit, on_batch=on_batch
    )


async def migrate(config: StoreConfig) -> Migrated:
    """Bring the store's schema up to this relay's version (creating it when there is none)."""
    if config.url is not None:
        from relay.store.postgres import migrate_database

        return await migrate_database(config)
    from relay.store.sqlite import migrate_file

    return await migrate_file(config.path)


__all__ = [
    "PENDING_STATES",
    "Claim",
    "Event",
    "Instance",
    "Lease",
    "LeaseBatch",
    "MessageState",
    "OnBatch",
    "OnCommit",
    "QueueDepth",
    "RecipientState",
    "RecipientUpdate",
    "Store",
    "StoreError",
    "StoreLost",
    "StoreUnavailable",
    "Submission",
    "Update",
    "Verdict",
    "migrate",
    "open_store",
]
