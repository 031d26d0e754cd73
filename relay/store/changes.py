"""What every store backend records the same way, whatever SQL it speaks.

The audit events for an accept and for an attempt's outcome, a message's state
derived from its recipients', the updates that recovery and `requeue` make, and
the rows the SQL reads and writes (a spooled message, a claim, a lease, the end
of a lease). A backend only runs SQL around these, so two backends cannot drift
apart in what they store or what the audit log says.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from relay.audit import FIELDS, Event
from relay.decision import Claim, Verdict, normalise_rcpt
from relay.errors import LeaseLost
from relay.store import Lease, MessageState, RecipientUpdate, Submission, Update

__all__ = [
    "FINAL_STATES",
    "INLINE_BODY_LIMIT",
    "PURGE_CHUNK",
    "MessageFields",
    "accept_events",
    "claim_params",
    "event_row",
    "lease_end",
    "lease_of",
    "message_row",
    "message_state",
    "purge",
    "recovery_update",
    "requeue_update",
    "settlement",
    "update_events",
]

# A recipient in one of these states owes nothing more: its claim settles (or is released).
FINAL_STATES = ("delivered", "failed", "expired")
# Bodies up to this size are read in the lease itself, sparing a round-trip per message.
INLINE_BODY_LIMIT = 256 * 1024
# Rows a purge deletes per transaction, so a big purge never holds up the intake for long.
PURGE_CHUNK = 5000


@dataclass(frozen=True)
class MessageFields:
    """The audit fields a message's events share, as the store holds them."""

    key: str | None
    strategy: str | None
    message_id: str | None
    sender: str | None
    size: int | None
    client: str | None
    user: str | None
    scope: str | None


def _submission_fields(sub: Submission) -> dict[str, Any]:
    return {
        "queue_id": sub.queue_id,
        "key": sub.claim.key if sub.claim else None,
        "strategy": sub.claim.strategy if sub.claim else None,
        "message_id": sub.message_id,
        "sender": sub.sender,
        "size": len(sub.data),
        "client": sub.client,
        "user": sub.user,
    }


def accept_events(sub: Submission, verdict: Verdict) -> list[Event]:
    """`received` for what is spooled, then the conflict or duplicate the verdict found."""
    common = _submission_fields(sub)
    rule = "; ".join(filter(None, (f"rule={sub.rule}" if sub.rule else None, sub.note))) or None
    events: list[Event] = []
    if verdict.forward:
        events.append(
            Event(
                ts=sub.received_at, event="received", rcpts=verdict.forward, detail=rule, **common
            )
        )
    claim = sub.claim
    if claim is None:
        return events
    if verdict.conflict_with is not None:
        events.append(
            Event(
                ts=sub.received_at,
                event="conflict",
                rcpts=sub.recipients,
                original=verdict.conflict_with,
                action=claim.on_conflict,
                detail="; ".join(filter(None, ("same key, different content", sub.note))),
                **common,
            )
        )
    elif verdict.duplicates:
        events.append(
            Event(
                ts=sub.received_at,
                event="duplicate",
                rcpts=tuple(r for r, _ in verdict.duplicates),
                original=verdict.duplicates[0][1],
                action="shadow" if claim.shadow else claim.on_duplicate,
                detail=rule,
                **common,
            )
        )
    return events


def event_row(e: Event) -> tuple[Any, ...]:
    """An event as the events table holds it, in the order of FIELDS: recipients comma-joined."""
    return tuple(",".join(e.rcpts) if name == "rcpts" else getattr(e, name) for name in FIELDS)


def _group(updates: Sequence[RecipientUpdate]) -> list[list[RecipientUpdate]]:
    """One audit event per distinct outcome, listing every recipient it applies to."""
    groups: dict[tuple[Any, ...], list[RecipientUpdate]] = {}
    for r in updates:
        groups.setdefault((r.event, r.code, r.reply, r.upstream_id), []).append(r)
    return list(groups.values())


def update_events(u: Update, message: MessageFields, released: tuple[str, ...]) -> list[Event]:
    """One event per distinct outcome, and `released` for keys freed by a final failure."""
    common: dict[str, Any] = {
        "key": message.key,
        "strategy": message.strategy,
        "message_id": message.message_id,
        "sender": message.sender,
        "size": message.size,
        "client": message.client,
        "user": message.user,
    }
    events = [
        Event(
            ts=u.ts,
            event=group[0].event,
            queue_id=u.queue_id,
            rcpts=tuple(r.rcpt for r in group),
            upstream=u.upstream,
            code=group[0].code,
            reply=group[0].reply,
            upstream_id=group[0].upstream_id,
            duration=u.duration,
            detail=u.detail,
            **common,
        )
        for group in _group(u.recipients)
    ]
    if released:
        events.append(
            Event(
                ts=u.ts,
                event="released",
                queue_id=u.queue_id,
                rcpts=released,
                detail=f"key released in scope {message.scope} after final failure",
                **common,
            )
        )
    return events


def message_state(recipient_states: Iterable[str]) -> MessageState:
    """A message is queued while any recipient is, held while any is held, else done."""
    states = set(recipient_states)
    return "queued" if "queued" in states else "held" if "held" in states else "done"


def recovery_update(
    queue_id: str, rcpts: Sequence[str], now: float, *, hold: bool, holder: str | None, owner: str
) -> Update:
    """A message left mid-attempt: whether the upstream has it is unknown, so it is ambiguous.

    `holder` is the lease's owner as stored; the detail names it when it is not `owner`, the
    process recovering (which is otherwise taking back what its own previous run left).
    """
    if holder == owner:
        cause = "the relay stopped before the outcome of a delivery attempt was recorded"
    else:
        cause = (
            f"the lease of {holder or 'an unknown process'} ran out during a delivery attempt"
            " (that process stopped, or could not reach the store to renew it)"
        )
    return Update(
        queue_id=queue_id,
        recipients=tuple(
            RecipientUpdate(r, "held" if hold else "queued", "ambiguous") for r in rcpts
        ),
        next_attempt=now,
        upstream=None,
        duration=None,
        ts=now,
        detail=f"{cause}; " + ("held for an operator" if hold else "will be retried"),
    )


def check_lease(u: Update, state: str | None, lease_owner: str | None) -> None:
    """An attempt's outcome lands only while its own lease still holds the message.

    Once another process has taken the lease back (recorded `ambiguous`) it may have sent
    the message again and recorded that; a late outcome written over it turned a delivery
    into "failed" and freed the key, so a repeat was forwarded.
    """
    if u.owner is None or (state == "sending" and lease_owner == u.owner):
        return
    now = f"{state}, leased by {lease_owner}" if lease_owner else str(state)
    raise LeaseLost(
        f"{u.owner}'s lease on {u.queue_id} was taken back during the attempt (now {now})"
    )


def requeue_update(queue_id: str, rcpts: Sequence[str], now: float) -> Update:
    return Update(
        queue_id=queue_id,
        recipients=tuple(RecipientUpdate(r, "queued", "requeued") for r in rcpts),
        next_attempt=now,
        upstream=None,
        duration=None,
        ts=now,
        detail="requeued by an operator",
    )


def claim_params(sub: Submission, claim: Claim) -> dict[str, Any]:
    """The claim's values; `rcpts` are the normalised recipients, each once, sorted (so that
    concurrent claims lock rows in one order)."""
    return {
        "scope": claim.scope,
        "key": claim.namespaced,
        "queue_id": sub.queue_id,
        "fingerprint": claim.fingerprint,
        "now": sub.received_at,
        "expires_at": sub.received_at + claim.window,
        "rcpts": sorted({normalise_rcpt(r) for r in sub.recipients}),
    }


def message_row(sub: Submission, verdict: Verdict) -> dict[str, Any]:
    """A spooled message's row (its recipients are `verdict.forward`)."""
    claim = sub.claim
    return {
        "queue_id": sub.queue_id,
        "received_at": sub.received_at,
        "sender": sub.sender,
        "size": len(sub.data),
        "message_id": sub.message_id,
        "scope": claim.scope if claim else None,
        "key": claim.key if claim else None,
        "strategy": claim.strategy if claim else None,
        "fingerprint": claim.fingerprint if claim else None,
        "rule": sub.rule,
        "client": sub.client,
        "user": sub.user,
        "helo": sub.helo,
        "smtputf8": sub.smtputf8,
        "body8bit": sub.body8bit,
        "duplicate_of": verdict.duplicate_of,
        "data": sub.data,
    }


def lease_of(row: Any, recipients: tuple[str, ...], data: bytes | None) -> Lease:
    """A leased message from its row (read by column name, whichever backend returned it)."""
    return Lease(
        queue_id=row["queue_id"],
        sender=row["sender"],
        recipients=recipients,
        received_at=row["received_at"],
        attempts=row["attempts"],
        message_id=row["message_id"],
        key=row["key"],
        strategy=row["strategy"],
        scope=row["scope"],
        size=row["size"],
        smtputf8=bool(row["smtputf8"]),
        body8bit=bool(row["body8bit"]),
        duplicate_of=row["duplicate_of"],
        data=None if data is None else bytes(data),
        rule=row["rule"],
        user=row["user"],
    )


def settlement(u: Update) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Recipients whose claim now only waits for its window to end, and recipients whose claim
    is freed (a final failure under release_on_failure)."""
    final = [r for r in u.recipients if r.state in FINAL_STATES]
    return tuple(r.rcpt for r in final if not r.release), tuple(r.rcpt for r in final if r.release)


def lease_end(u: Update, state: MessageState) -> dict[str, Any]:
    """The message's row after an attempt: due again, held, or finished."""
    return {
        "queue_id": u.queue_id,
        "state": state,
        "next_attempt": u.next_attempt if state == "queued" else None,
        "finished_at": u.ts if state == "done" else None,
    }


async def purge(
    chunk: Callable[[str, float], Awaitable[int]],
    now: float,
    keep_bodies: float,
    audit_retention: float,
) -> dict[str, int]:
    """`Store.purge` for any backend: claims past their window, bodies kept past `keep_bodies`,
    events and finished messages past `audit_retention`, in that order.

    `chunk(kind, cutoff)` deletes up to `PURGE_CHUNK` rows of one kind in one transaction, so a
    big purge never holds up the intake for long; it runs again until one comes up short.
    """
    cutoffs = {
        "claims": now,
        "bodies": now - keep_bodies,
        "events": now - audit_retention,
        "messages": now - audit_retention,
    }
    totals: dict[str, int] = {}
    for kind, cutoff in cutoffs.items():
        totals[kind] = 0
        while True:
            deleted = max(await chunk(kind, cutoff), 0)
            totals[kind] += deleted
            if deleted < PURGE_CHUNK:
                break
    return totals
