"""The leases this process holds, and the outcomes the store has not taken yet.

A leased message belongs to this process until its outcome is recorded or the
lease is given back. While it does, the lease is renewed, so no other replica
takes it back as abandoned, however long the attempt runs. An outcome the store
refuses (a full disk, a read-only file) is kept here and written again until the
store takes it; meanwhile the message stays leased, so it is neither sent again
nor called ambiguous. Only a process that stops with outcomes still unwritten
leaves them to be recovered, as ambiguous, at the next start.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from relay.errors import LeaseLost, StoreError, StoreUnavailable
from relay.store import Store, Update

__all__ = ["GiveBack", "LeaseUnconfirmed", "Leases", "Settlement"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GiveBack:
    """A lease whose attempt never reached the upstream, handed back uncounted."""

    queue_id: str
    next_attempt: float


Settlement = Update | GiveBack


class LeaseUnconfirmed(StoreError):
    """The lease went unrenewed so long that another replica may take it over: the payload
    must not go (nothing was sent, so the lease is given back if it is still this one's)."""


def _describe(settlement: Settlement) -> str:
    if isinstance(settlement, GiveBack):
        return "given back unsent"
    outcomes = sorted({f"{r.event} {r.code or ''}".strip() for r in settlement.recipients})
    return f"{', '.join(outcomes)} for {len(settlement.recipients)} recipient(s)"


class Leases:
    def __init__(self, store: Store, owner: str, lease_timeout: float) -> None:
        self.store = store
        self.owner = owner
        self.lease_timeout = lease_timeout
        self._held: set[str] = set()
        # Until when each held lease is known to be this process's: its lease or last renewal.
        self._until: dict[str, float] = {}
        self._waiting: dict[str, Settlement] = {}
        self._waiting_since = 0.0

    def took(self, queue_ids: Iterable[str], until: float = math.inf) -> None:
        for queue_id in queue_ids:
            self._held.add(queue_id)
            self._until[queue_id] = until

    def check(self, queue_id: str, now: float) -> None:
        """Raise `LeaseUnconfirmed` once the lease has gone two renewal rounds unconfirmed.

        Another replica takes a lease back only after it has run out unrenewed
        (`lease_timeout`); stopping a third of that earlier leaves room for clocks a little
        out of step. Called just before the payload goes, so an attempt whose renewals failed
        never sends while the replica that took the message over sends it too."""
        until = self._until.get(queue_id, math.inf)
        if now >= until - self.lease_timeout / 3:
            raise LeaseUnconfirmed(
                f"{queue_id}: the lease was last confirmed until {until:.0f}, and another"
                " replica may take it over: not sent"
            )

    async def settle(self, settlement: Settlement) -> None:
        """Record an outcome or give a lease back; if the store cannot take it now, keep it."""
        try:
            await self._write(settlement)
        except StoreUnavailable as exc:
            if not self._waiting:
                self._waiting_since = time.monotonic()
            self._waiting[settlement.queue_id] = settlement
            log.error(
                "%s: outcome not recorded (%s): %s; kept and written when the store takes"
                " writes again, and not sent again meanwhile",
                settlement.queue_id,
                _describe(settlement),
                exc,
            )

    async def flush(self) -> bool:
        """Write the kept outcomes, oldest first; True once none is left."""
        if not self._waiting:
            return True
        written = 0
        for queue_id, settlement in list(self._waiting.items()):
            try:
                await self._write(settlement)
            except StoreUnavailable:
                return False
            del self._waiting[queue_id]
            written += 1
        log.warning(
            "recorded %d outcome(s) the store had refused, %.1fs late",
            written,
            time.monotonic() - self._waiting_since,
        )
        return True

    async def _write(self, settlement: Settlement) -> None:
        try:
            if isinstance(settlement, GiveBack):
                await self.store.unlease(settlement.queue_id, settlement.next_attempt, self.owner)
            else:
                await self.store.update(settlement)
        except StoreUnavailable:
            raise
        except LeaseLost as exc:
            # The process that took it back logged it ambiguous and now decides its fate.
            log.error(
                "%s: outcome not recorded (%s): %s; that process recorded it ambiguous",
                settlement.queue_id,
                _describe(settlement),
                exc,
            )
        except StoreError as exc:
            # This write itself is wrong (the message is gone): trying again cannot help.
            log.error(
                "%s: outcome not recorded and dropped (%s): %s; the message stays leased and"
                " comes back as ambiguous at the next start",
                settlement.queue_id,
                _describe(settlement),
                exc,
            )
        self._held.discard(settlement.queue_id)
        self._until.pop(settlement.queue_id, None)

    def abandon(self) -> None:
        """At shutdown: what could not be written is said once more, for the operator."""
        for queue_id, settlement in self._waiting.items():
            log.error(
                "%s: stopping with its outcome unrecorded (%s); the message stays leased by %s"
                " and comes back as ambiguous at the next start",
                queue_id,
                _describe(settlement),
                self.owner,
            )
        self._waiting.clear()

    async def renew(self, now: float) -> None:
        """Extend every held lease by `lease_timeout` from `now`."""
        held = sorted(self._held)
        if not held:
            return
        try:
            renewed = await self.store.renew(self.owner, held, now + self.lease_timeout)
        except StoreError:
            return  # the store logs its own state; the next round tries again
        for queue_id in renewed:
            if queue_id in self._held:  # not settled while the renewal ran
                self._until[queue_id] = now + self.lease_timeout
        # A lease settled while the renewal ran is gone by right; any other was taken over.
        lost = [q for q in held if q not in renewed and q in self._held]
        if lost:
            log.warning(
                "%d of %d lease(s) held by %s were no longer its own when renewed: %s",
                len(lost),
                len(held),
                self.owner,
                ", ".join(lost[:10]),
            )
