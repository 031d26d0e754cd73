"""The dedupe decision on its own: every verdict and the reply each earns, from a table."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from relay.decision import Claim, ClaimResult, Holder, Verdict, decide, normalise_rcpt

QID = "NEWQID"
FP = "f" * 64
OTHER_FP = "0" * 64

CLAIM = Claim(
    scope="global",
    key="order-1",
    strategy="header:Idempotency-Key",
    fingerprint=FP,
    window=3600.0,
    on_duplicate="drop",
    on_conflict="reject",
)


def held(*rcpts: str, by: str = "ORIG1", fingerprint: str = FP) -> tuple[Holder, ...]:
    return tuple(Holder(r, by, fingerprint) for r in rcpts)


@dataclass(frozen=True)
class Case:
    name: str
    recipients: tuple[str, ...]
    result: ClaimResult | None
    kind: str
    reply: str
    forward: tuple[str, ...] = ()
    duplicates: tuple[tuple[str, str], ...] = ()
    claim: Claim | None = CLAIM
    conflict_with: str | None = None
    duplicate_of: str | None = None
    unclaim: bool = False


QUEUED = f"250 2.0.0 Ok: queued as {QID}"

CASES = [
    Case(
        "no claim (dedupe off or a bypass rule) forwards to everyone",
        ("a@x.org", "b@x.org"),
        None,
        "forward",
        QUEUED,
        forward=("a@x.org", "b@x.org"),
        claim=None,
    ),
    Case(
        "a new key forwards to everyone",
        ("a@x.org",),
        ClaimResult(frozenset({"a@x.org"})),
        "forward",
        QUEUED,
        forward=("a@x.org",),
    ),
    Case(
        "a repeat to the same recipient is dropped with a 250 naming the original",
        ("a@x.org",),
        ClaimResult(frozenset(), held("a@x.org")),
        "drop",
        f"250 2.0.0 Ok: duplicate of ORIG1, not forwarded (id {QID})",
        duplicates=(("a@x.org", "ORIG1"),),
    ),
    Case(
        "a repeat under reject gets 550",
        ("a@x.org",),
        ClaimResult(frozenset(), held("a@x.org")),
        "reject",
        "550 5.7.0 Duplicate of message ORIG1 (header:Idempotency-Key); not forwarded",
        duplicates=(("a@x.org", "ORIG1"),),
        claim=replace(CLAIM, on_duplicate="reject"),
    ),
    Case(
        "a repeat with a new recipient reaches only them, in the client's spelling",
        ("A@x.org", "c@x.org"),
        ClaimResult(frozenset({"c@x.org"}), held("a@x.org")),
        "drop",
        f"250 2.0.0 Ok: queued as {QID} for 1 new recipient(s); 1 already had it from ORIG1",
        forward=("c@x.org",),
        duplicates=(("A@x.org", "ORIG1"),),
    ),
    Case(
        "under reject, a repeat with a new recipient still reaches the new one with 250",
        ("a@x.org", "c@x.org"),
        ClaimResult(frozenset({"c@x.org"}), held("a@x.org")),
        "drop",
        f"250 2.0.0 Ok: queued as {QID} for 1 new recipient(s); 1 already had it from ORIG1",
        forward=("c@x.org",),
        duplicates=(("a@x.org", "ORIG1"),),
        claim=replace(CLAIM, on_duplicate="reject"),
    ),
    Case(
        "recipients that had it from two originals name both, once each",
        ("a@x.org", "b@x.org", "c@x.org"),
        ClaimResult(frozenset(), held("a@x.org", by="O1") + held("b@x.org", "c@x.org", by="O2")),
        "drop",
        f"250 2.0.0 Ok: duplicate of O1, O2, not forwarded (id {QID})",
        duplicates=(("a@x.org", "O1"), ("b@x.org", "O2"), ("c@x.org", "O2")),
    ),
    Case(
        "tag forwards the repeat to everyone, naming the original",
        ("a@x.org",),
        ClaimResult(frozenset(), held("a@x.org")),
        "tag",
        QUEUED,
        forward=("a@x.org",),
        duplicates=(("a@x.org", "ORIG1"),),
        claim=replace(CLAIM, on_duplicate="tag"),
        duplicate_of="ORIG1",
    ),
    Case(
        "shadow forwards the repeat to everyone and only records it, whatever the action",
        ("a@x.org",),
        ClaimResult(frozenset(), held("a@x.org")),
        "shadow",
        QUEUED,
        forward=("a@x.org",),
        duplicates=(("a@x.org", "ORIG1"),),
        claim=replace(CLAIM, on_duplicate="reject", shadow=True),
    ),
    Case(
        "a holder for another recipient only is no repeat",
        ("a@x.org",),
        ClaimResult(frozenset({"a@x.org"}), held("z@x.org")),
        "forward",
        QUEUED,
        forward=("a@x.org",),
    ),
    Case(
        "same key, different content under reject: 554, own claims taken back",
        ("a@x.org",),
        ClaimResult(frozenset({"a@x.org"}), held("z@x.org", fingerprint=OTHER_FP)),
        "conflict",
        "554 5.7.0 Key conflict: header:Idempotency-Key was first used by message ORIG1"
        " with different content; not forwarded",
        conflict_with="ORIG1",
        unclaim=True,
    ),
    Case(
        "a conflict with nothing claimed has nothing to take back",
        ("a@x.org",),
        ClaimResult(frozenset(), held("a@x.org", fingerprint=OTHER_FP)),
        "conflict",
        "554 5.7.0 Key conflict: header:Idempotency-Key was first used by message ORIG1"
        " with different content; not forwarded",
        conflict_with="ORIG1",
    ),
    Case(
        "a conflict under drop answers 250 and forwards nothing",
        ("a@x.org",),
        ClaimResult(frozenset(), held("a@x.org", fingerprint=OTHER_FP)),
        "conflict",
        f"250 2.0.0 Ok: not forwarded, key conflicts with message ORIG1 (id {QID})",
        claim=replace(CLAIM, on_conflict="drop"),
        conflict_with="ORIG1",
    ),
    Case(
        "a conflict under forward sends to everyone and still takes its claims back",
        ("a@x.org", "b@x.org"),
        ClaimResult(frozenset({"b@x.org"}), held("a@x.org", fingerprint=OTHER_FP)),
        "conflict",
        QUEUED,
        forward=("a@x.org", "b@x.org"),
        claim=replace(CLAIM, on_conflict="forward"),
        conflict_with="ORIG1",
        unclaim=True,
    ),
    Case(
        "a conflict outranks a repeat on the same key",
        ("a@x.org", "b@x.org"),
        ClaimResult(
            frozenset(),
            held("a@x.org", by="SAME") + held("b@x.org", by="DIFF", fingerprint=OTHER_FP),
        ),
        "conflict",
        "554 5.7.0 Key conflict: header:Idempotency-Key was first used by message DIFF"
        " with different content; not forwarded",
        conflict_with="DIFF",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_verdict(case: Case) -> None:
    verdict = decide(QID, case.recipients, case.claim, case.result)
    assert verdict == Verdict(
        kind=case.kind,  # type: ignore[arg-type]
        queue_id=QID,
        reply=case.reply,
        forward=case.forward,
        duplicates=case.duplicates,
        conflict_with=case.conflict_with,
        duplicate_of=case.duplicate_of,
        unclaim=case.unclaim,
    )


def test_only_verdicts_that_spool_or_knowingly_drop_answer_250() -> None:
    accepted = {c.name for c in CASES if decide(QID, c.recipients, c.claim, c.result).accepted}
    refused = {c.name for c in CASES} - accepted
    assert refused == {
        "a repeat under reject gets 550",
        "same key, different content under reject: 554, own claims taken back",
        "a conflict with nothing claimed has nothing to take back",
        "a conflict outranks a repeat on the same key",
    }


@pytest.mark.parametrize(
    ("written", "normalised"),
    [("Bob@Example.ORG", "bob@example.org"), ("  a@x.org ", "a@x.org"), ("a@x.org", "a@x.org")],
)
def test_recipients_compare_case_insensitively(written: str, normalised: str) -> None:
    assert normalise_rcpt(written) == normalised
