"""Turns one accepted SMTP transaction into one store call and one SMTP reply.

Everything that says what would make the message "the same email" as an earlier
one (rules, keys, fingerprint) happens here, before the store; the store then
claims the key and reaches the verdict (`relay.decision`) in one transaction,
and the verdict carries the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate

from relay import headers, keys, rules
from relay.audit import Event
from relay.clock import SYSTEM, Clock
from relay.config import Config
from relay.decision import Claim, normalise_rcpt
from relay.errors import BadKey, StoreError
from relay.fingerprint import Fingerprint, compute
from relay.ids import new_queue_id
from relay.store import Store, Submission

__all__ = ["STORE_FAILURE_REPLY", "THREAD_THRESHOLD", "Intake", "Transaction", "unique_recipients"]

log = logging.getLogger(__name__)

# Fingerprinting a large message is CPU work; above this size it leaves the event loop.
THREAD_THRESHOLD = 256 * 1024
STORE_FAILURE_REPLY = "451 4.3.0 Temporary storage failure, message not accepted; try again later"


@dataclass(frozen=True)
class Transaction:
    """What the SMTP session collected: envelope, bytes and who sent them."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    client: str
    helo: str
    esmtp: bool
    tls: bool
    user: str | None
    smtputf8: bool
    body8bit: bool


def unique_recipients(rcpts: list[str]) -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for rcpt in rcpts:
        seen.setdefault(normalise_rcpt(rcpt), rcpt)
    return tuple(seen.values())


class Intake:
    def __init__(
        self,
        config: Config,
        store: Store,
        on_spooled: Callable[[], None] | None = None,
        *,
        clock: Clock = SYSTEM,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self._on_spooled = on_spooled

    async def submit(self, tx: Transaction) -> str:
        """The reply line for the end of DATA; 250 only after the store has committed."""
        now = self.clock.time()
        queue_id = new_queue_id(now)
        found = headers.fields(tx.data)
        policy = rules.select(self.config, found, tx.sender, tx.recipients, tx.user)
        message_id = headers.get(found, "Message-ID")
        scope = keys.scope_value(policy.scope, tx.user, tx.sender)
        try:
            claim, derived, note = await self._claim(tx, found, policy, scope)
        except BadKey as exc:
            return await self._refuse(tx, queue_id, now, message_id, str(exc))
        data = tx.data
        strategy = derived.strategy if derived else ""
        if strategy.startswith("header:") and self.config.dedupe.strip_key_header:
            data = headers.remove(data, found, strategy.partition(":")[2])
        added = [self._received(tx, queue_id, now)]
        if message_id is None:
            message_id = self._new_message_id(tx, found, queue_id, scope, derived)
            added.append(f"Message-ID: {message_id}")
        submission = Submission(
            queue_id=queue_id,
            received_at=now,
            sender=tx.sender,
            recipients=tx.recipients,
            data=headers.prepend(data, added),
            message_id=keys.normalise_message_id(message_id),
            client=tx.client,
            user=tx.user,
            helo=tx.helo,
            smtputf8=tx.smtputf8,
            body8bit=tx.body8bit,
            claim=claim,
            rule=policy.rule,
            note=note,
        )
        try:
            verdict = await self.store.accept(submission)
        except StoreError as exc:
            log.error("%s: could not spool a message from %s: %s", queue_id, tx.client, exc)
            return STORE_FAILURE_REPLY
        if verdict.forward and self._on_spooled is not None:
            self._on_spooled()
        return verdict.reply

    async def _claim(
        self, tx: Transaction, found: list[headers.Field], policy: rules.Policy, scope: str
    ) -> tuple[Claim | None, keys.Key | None, str | None]:
        """What makes this message "the same email" as another; nothing for bypassed mail.

        The third value says how the fingerprint was taken when it is not over the
        canonical form, for the audit events.
        """
        if policy.bypass:
            return None, None, None
        dedupe = self.config.dedupe
        fp = await self._fingerprint(tx)
        derived = keys.derive(policy.keys, found, fp.value, dedupe, policy.window)
        note = None
        if fp.raw is not None:
            note = f"fingerprint over the raw bytes, not the canonical MIME form: {fp.raw}"
        claim = Claim(
            scope=scope,
            key=derived.value,
            strategy=derived.strategy,
            fingerprint=fp.value,
            window=derived.window,
            on_duplicate=policy.on_duplicate,
            on_conflict=dedupe.on_conflict,
            shadow=dedupe.mode == "shadow",
        )
        return claim, derived, note

    def _new_message_id(
        self,
        tx: Transaction,
        found: list[headers.Field],
        queue_id: str,
        scope: str,
        derived: keys.Key | None,
    ) -> str:
        """Derived from the key, so every copy of the same email carries the same Message-ID."""
        domain = headers.address_domain(headers.get(found, "From") or "") or (
            headers.address_domain(tx.sender) or self.config.listen.hostname
        )
        if derived is not None:
            return keys.derived_message_id(scope, derived, domain)
        return f"<{queue_id.lower()}@{domain}>"

    async def _fingerprint(self, tx: Transaction) -> Fingerprint:
        dedupe = self.config.dedupe
        args = (tx.sender, tx.data, dedupe.fingerprint_headers, dedupe.volatile_headers)
        if len(tx.data) > THREAD_THRESHOLD:
            return await asyncio.to_thread(compute, *args)
        return compute(*args)

    async def _refuse(
        self, tx: Transaction, queue_id: str, now: float, message_id: str | None, reason: str
    ) -> str:
        with contextlib.suppress(StoreError):
            await self.store.record(
                Event(
                    ts=now,
                    event="rejected",
                    queue_id=queue_id,
                    message_id=keys.normalise_message_id(message_id) if message_id else None,
                    sender=tx.sender,
                    rcpts=tx.recipients,
                    size=len(tx.data),
                    client=tx.client,
                    user=tx.user,
                    code=550,
                    detail=reason,
                )
            )
        return f"550 5.6.0 {reason}; message not accepted"

    def _received(self, tx: Transaction, queue_id: str, now: float) -> str:
        protocol = (
            ("ESMTP" if tx.esmtp else "SMTP") + ("S" if tx.tls else "") + ("A" if tx.user else "")
        )
        helo = "".join(c for c in tx.helo if c.isprintable() and c not in "()\\")[:200] or "unknown"
        when = formatdate(now, localtime=False, usegmt=True)
        value = (
            f"from {helo} ([{tx.client}]) by {self.config.listen.hostname} (dedup-relay)"
            f" with {protocol} id {queue_id}; {when}"
        )
        return headers.fold("Received", value)
