"""The dedupe decision: from what the claim found to a verdict and the SMTP reply it earns.

It is a pure function so that every store backend reaches the same verdict for
the same facts, and so that each branch can be checked from a table. The store
calls it inside the transaction that took the claims, after the unique index
has settled who owns each recipient, and applies the verdict before committing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Claim",
    "ClaimResult",
    "Holder",
    "Verdict",
    "VerdictKind",
    "decide",
    "namespaced_key",
    "needs_holders",
    "normalise_rcpt",
]

VerdictKind = Literal["forward", "drop", "tag", "shadow", "conflict", "reject"]


def normalise_rcpt(rcpt: str) -> str:
    """Claims compare recipients case-insensitively: Bob@X and bob@x are one mailbox in practice."""
    return rcpt.strip().lower()


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
        return namespaced_key(self.strategy, self.key)


def namespaced_key(strategy: str, key: str) -> str:
    """The key a claim is stored under: keys of different strategies never match each other."""
    return f"{strategy.lower()}\x1f{key}"


@dataclass(frozen=True)
class Holder:
    """A live claim of an earlier message on the same key, for one (normalised) recipient."""

    rcpt: str
    queue_id: str
    fingerprint: str


@dataclass(frozen=True)
class ClaimResult:
    """What taking the claims found: recipients won now, and earlier holders, oldest first."""

    claimed: frozenset[str]
    holders: tuple[Holder, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """What happens to a submission, and what its client is told.

    `forward` lists the recipients to spool (as the client spelled them); `duplicates` the
    recipients that already had the email, each with the message they had it from.
    `unclaim` says the submission's own claims must be taken back (a conflict), and
    `duplicate_of` names the original a tagged copy carries in its header.
    """

    kind: VerdictKind
    queue_id: str
    reply: str
    forward: tuple[str, ...] = ()
    duplicates: tuple[tuple[str, str], ...] = ()
    conflict_with: str | None = None
    duplicate_of: str | None = None
    unclaim: bool = False

    @property
    def originals(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(original for _, original in self.duplicates))

    @property
    def accepted(self) -> bool:
        """The client hears 250: the message is spooled, or knowingly not forwarded."""
        return self.reply.startswith("250")


def needs_holders(claim: Claim, claimed: frozenset[str], recipients: int) -> bool:
    """Whether `decide` needs the key's other live holders, read after taking the claims: not
    when a fingerprint key was won for all `recipients`, as it cannot conflict with its own
    content."""
    return len(claimed) != recipients or claim.strategy != "fingerprint"


def _queued_reply(queue_id: str) -> str:
    return f"250 2.0.0 Ok: queued as {queue_id}"


def decide(
    queue_id: str,
    recipients: tuple[str, ...],
    claim: Claim | None,
    result: ClaimResult | None,
) -> Verdict:
    """The verdict for a submission to `recipients` whose claims found `result`.

    Without a claim (dedupe off, a bypass rule) every recipient is forwarded.
    """
    if claim is None or result is None:
        return Verdict("forward", queue_id, _queued_reply(queue_id), forward=recipients)
    conflicting = [h for h in result.holders if h.fingerprint != claim.fingerprint]
    if conflicting:
        return _conflict(queue_id, recipients, claim, result, conflicting[0].queue_id)
    by_norm = {normalise_rcpt(r): r for r in recipients}
    duplicates = tuple(
        (by_norm[h.rcpt], h.queue_id)
        for h in result.holders
        if h.rcpt in by_norm and h.rcpt not in result.claimed
    )
    if not duplicates:
        return Verdict("forward", queue_id, _queued_reply(queue_id), forward=recipients)
    originals = ", ".join(dict.fromkeys(original for _, original in duplicates))
    if claim.shadow:  # shadow mode forwards to everyone and only records
        return Verdict(
            "shadow", queue_id, _queued_reply(queue_id), forward=recipients, duplicates=duplicates
        )
    if claim.on_duplicate == "tag":
        return Verdict(
            "tag",
            queue_id,
            _queued_reply(queue_id),
            forward=recipients,
            duplicates=duplicates,
            duplicate_of=duplicates[0][1],
        )
    new = tuple(r for r in recipients if normalise_rcpt(r) in result.claimed)
    if new:
        reply = (
            f"250 2.0.0 Ok: queued as {queue_id} for {len(new)} new recipient(s);"
            f" {len(duplicates)} already had it from {originals}"
        )
        return Verdict("drop", queue_id, reply, forward=new, duplicates=duplicates)
    if claim.on_duplicate == "reject":
        reply = f"550 5.7.0 Duplicate of message {originals} ({claim.strategy}); not forwarded"
        return Verdict("reject", queue_id, reply, duplicates=duplicates)
    reply = f"250 2.0.0 Ok: duplicate of {originals}, not forwarded (id {queue_id})"
    return Verdict("drop", queue_id, reply, duplicates=duplicates)


def _conflict(
    queue_id: str,
    recipients: tuple[str, ...],
    claim: Claim,
    result: ClaimResult,
    original: str,
) -> Verdict:
    """Same key, different content: never silently treated as a repeat."""
    unclaim = bool(result.claimed)
    if claim.on_conflict == "forward":
        reply = _queued_reply(queue_id)
        return Verdict(
            "conflict",
            queue_id,
            reply,
            forward=recipients,
            conflict_with=original,
            unclaim=unclaim,
        )
    if claim.on_conflict == "drop":
        reply = (
            f"250 2.0.0 Ok: not forwarded, key conflicts with message {original} (id {queue_id})"
        )
    else:
        reply = (
            f"554 5.7.0 Key conflict: {claim.strategy} was first used by message {original}"
            " with different content; not forwarded"
        )
    return Verdict("conflict", queue_id, reply, conflict_with=original, unclaim=unclaim)
