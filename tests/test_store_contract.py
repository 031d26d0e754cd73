"""The `Store` contract, proven on both backends by one parametrised fixture.

Every test here runs once on SQLite and once on PostgreSQL (a private cluster, see
tests/pg.py), through the protocol only: what one backend promises, the other must too.
Times are passed in, never read from a clock, as the store itself does.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from relay.audit import Event
from relay.config import from_mapping
from relay.decision import Claim
from relay.errors import LeaseLost, StoreError
from relay.leases import Leases, LeaseUnconfirmed
from relay.store import (
    Instance,
    RecipientUpdate,
    Store,
    Update,
    migrate,
    open_store,
)
from relay.store.reader import EventFilter, open_reader
from tests.conftest import BACKENDS, make_message, submission

pytestmark = pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)

T0 = 1_800_000_000.0
HOUR = 3600.0
MakeStore = Callable[..., Awaitable[Store]]


class Committed:
    """What on_commit was handed, batch by batch."""

    def __init__(self) -> None:
        self.batches: list[list[Event]] = []

    def __call__(self, events: list[Event]) -> None:
        self.batches.append(events)

    @property
    def names(self) -> list[str]:
        return [e.event for batch in self.batches for e in batch]


@pytest.fixture
async def make_store(store_config: dict[str, Any]) -> AsyncIterator[MakeStore]:
    """Open stores on the backend under test; several share one database, as replicas do."""
    opened: list[Store] = []

    async def make(on_commit: Committed | None = None, **store: Any) -> Store:
        config = from_mapping({"store": {**store_config, **store}}, check_paths=False).store
        made = open_store(config, on_commit=on_commit)
        await made.open()
        opened.append(made)
        return made

    yield make
    for made in opened:
        if made.running:
            await made.close()


@pytest.fixture
async def store(make_store: MakeStore) -> Store:
    return await make_store()


def claim(key: str = "k1", fingerprint: str = "a" * 64, window: float = HOUR, **kw: Any) -> Claim:
    return Claim("global", key, "message-id", fingerprint, window, "drop", "reject", **kw)


def outcome(
    queue_id: str, at: float, *rcpts: tuple[str, str], again: float | None = None
) -> Update:
    """`rcpts` as (address, state); delivered gets a 250, anything else a 451."""
    events = {
        "delivered": "delivered",
        "queued": "deferred",
        "failed": "failed",
        "held": "ambiguous",
    }
    return Update(
        queue_id=queue_id,
        recipients=tuple(
            RecipientUpdate(
                rcpt,
                state,  # type: ignore[arg-type]
                events[state],
                250 if state == "delivered" else 451,
                "ok" if state == "delivered" else "try later",
                "UP1" if state == "delivered" else None,
                release=state == "failed",
            )
            for rcpt, state in rcpts
        ),
        next_attempt=again,
        upstream="smtp://upstream.test",
        duration=0.1,
        ts=at,
    )


async def deliver_all(store: Store, at: float) -> list[str]:
    batch = await store.lease("worker", 100, at, 600.0)
    for lease in batch.leases:
        await store.update(
            outcome(lease.queue_id, at, *((r, "delivered") for r in lease.recipients))
        )
    return [lease.queue_id for lease in batch.leases]


# --- the claim -------------------------------------------------------------------


async def test_a_repeat_is_dropped_naming_the_original_and_both_are_audited(
    make_store: MakeStore,
) -> None:
    committed = Committed()
    store = await make_store(committed)
    first = await store.accept(submission("Q1", key=claim()))
    repeat = await store.accept(submission("Q2", at=T0 + 1, key=claim()))
    assert (first.kind, first.forward) == ("forward", ("alice@example.org",))
    assert (repeat.kind, repeat.forward, repeat.duplicates) == (
        "drop",
        (),
        (("alice@example.org", "Q1"),),
    )
    assert committed.names == ["received", "duplicate"]
    depth = {q.state: q.messages for q in await store.queue_depth()}
    assert depth == {"queued": 1, "sending": 0, "held": 0}


async def test_a_repeat_to_a_new_recipient_is_forwarded_to_them_alone(store: Store) -> None:
    await store.accept(submission("Q1", "Bob@example.org", key=claim()))
    verdict = await store.accept(
        submission("Q2", "bob@EXAMPLE.org", "carol@example.org", at=T0 + 1, key=claim())
    )
    assert verdict.forward == ("carol@example.org",)
    assert verdict.duplicates == (("bob@EXAMPLE.org", "Q1"),)


async def test_same_key_with_other_content_is_a_conflict_that_claims_nothing(store: Store) -> None:
    await store.accept(submission("Q1", "bob@example.org", key=claim()))
    conflict = await store.accept(
        submission("Q2", "carol@example.org", at=T0 + 1, key=claim(fingerprint="b" * 64))
    )
    assert (conflict.kind, conflict.conflict_with, conflict.accepted) == ("conflict", "Q1", False)
    # Q2 took carol's claim and gave it back: the original content still reaches carol.
    again = await store.accept(submission("Q3", "carol@example.org", at=T0 + 2, key=claim()))
    assert again.forward == ("carol@example.org",)


async def test_a_window_ends_only_once_the_original_is_settled(store: Store) -> None:
    await store.accept(submission("Q1", key=claim(window=60.0)))
    later = T0 + 120
    pending = await store.accept(submission("Q2", at=later, key=claim(window=60.0)))
    assert pending.kind == "drop", "a window must not end while its original is undelivered"
    assert await deliver_all(store, later) == ["Q1"]
    after = await store.accept(submission("Q3", at=later + 1, key=claim(window=60.0)))
    assert after.forward == ("alice@example.org",)
    within = await store.accept(submission("Q4", at=later + 2, key=claim(window=60.0)))
    assert within.duplicates == (("alice@example.org", "Q3"),)


async def test_a_final_failure_frees_the_key_for_a_resend(store: Store) -> None:
    await store.accept(submission("Q1", key=claim()))
    batch = await store.lease("worker", 10, T0, 600.0)
    state = await store.update(outcome("Q1", T0 + 1, ("alice@example.org", "failed")))
    assert (len(batch.leases), state) == (1, "done")
    resend = await store.accept(submission("Q2", at=T0 + 2, key=claim()))
    assert resend.forward == ("alice@example.org",)


@pytest.mark.parametrize("last", ["delivered", "failed"])
async def test_an_outcome_after_the_key_was_claimed_again_leaves_the_new_claim_alone(
    store: Store, last: str
) -> None:
    # Two spellings of one mailbox share one claim: the first settles it, its window ends and
    # Q2 claims the key again, then the second spelling's outcome arrives for Q1. A header
    # strategy spelled in capitals, as the configuration keeps it, is lowered alike everywhere.
    key = dataclasses.replace(claim(window=HOUR), strategy="header:Idempotency-Key")
    await store.accept(submission("Q1", "Ann@x.test", "ann@x.test", key=key))
    await store.lease("worker", 10, T0, 600.0)
    first = outcome(
        "Q1", T0 + 1, ("Ann@x.test", "delivered"), ("ann@x.test", "queued"), again=T0 + 2 * HOUR
    )
    assert await store.update(first) == "queued"
    again = await store.accept(submission("Q2", "ann@x.test", at=T0 + HOUR + 2, key=key))
    assert again.forward == ("ann@x.test",), "a settled claim ends with its window"
    batch = await store.lease("worker", 10, T0 + 2 * HOUR, 600.0)
    assert sorted(lease.queue_id for lease in batch.leases) == ["Q1", "Q2"]
    assert await store.update(outcome("Q1", T0 + 2 * HOUR, ("ann@x.test", last))) == "done"
    # Q2 is still undelivered: its claim is live past its window, whatever became of Q1.
    repeat = await store.accept(submission("Q3", "ann@x.test", at=T0 + 3 * HOUR, key=key))
    assert (repeat.kind, repeat.duplicates) == ("drop", (("ann@x.test", "Q2"),))


async def test_replicas_claiming_one_key_at_once_forward_it_exactly_once(
    make_store: MakeStore,
) -> None:
    replicas = [await make_store() for _ in range(3)]
    verdicts = await asyncio.gather(
        *(
            replicas[n % 3].accept(submission(f"Q{n}", at=T0 + n / 100, key=claim()))
            for n in range(30)
        )
    )
    forwarded = [v.queue_id for v in verdicts if v.forward]
    assert len(forwarded) == 1
    assert {v.duplicates[0][1] for v in verdicts if not v.forward} == set(forwarded)


async def test_rate_limited_sends_are_booked_an_interval_apart_across_replicas(
    make_store: MakeStore,
) -> None:
    replicas = [await make_store() for _ in range(3)]
    booked = await asyncio.gather(
        *(replicas[n % 3].reserve_send("smtp://a.test", 0.5, T0) for n in range(12))
    )
    assert sorted(booked) == [T0 + 0.5 * n for n in range(12)]
    assert await replicas[0].reserve_send("smtp://b.test", 0.5, T0) == T0, "its own row"
    assert await replicas[1].reserve_send("smtp://a.test", 0.5, T0 + 60) == T0 + 60, "idle"


async def test_concurrent_accepts_share_a_commit_and_a_failing_one_fails_alone(
    make_store: MakeStore,
) -> None:
    committed = Committed()
    store = await make_store(committed)
    jobs = [store.accept(submission(f"Q{n}", key=claim(f"k{n}"))) for n in range(20)]
    jobs.append(store.update(outcome("NO-SUCH-MESSAGE", T0, ("x@example.org", "delivered"))))
    results = await asyncio.gather(*jobs, return_exceptions=True)
    assert all(not isinstance(r, BaseException) and r.forward for r in results[:20])
    assert isinstance(results[20], StoreError)
    assert len(committed.batches) < 20, "concurrent accepts were not batched"
    assert committed.names.count("received") == 20


# --- lease, outcome, recovery ------------------------------------------------------


async def test_a_lease_carries_the_rule_and_user_that_routes_match_on(store: Store) -> None:
    await store.accept(dataclasses.replace(submission("Q1", user="app1"), rule="receipts"))
    (lease,) = (await store.lease("worker", 10, T0, 600.0)).leases
    assert (lease.rule, lease.user) == ("receipts", "app1")


async def test_a_lease_takes_due_messages_once_with_their_bodies_and_the_next_due_time(
    make_store: MakeStore,
) -> None:
    first, second = await make_store(), await make_store()
    bodies = [make_message(subject=f"Q{n}") for n in range(6)]
    bodies[0] = make_message(subject="big", attachment=b"x" * 400_000)
    for n, data in enumerate(bodies):
        await first.accept(submission(f"Q{n}", at=T0 + n, data=data))
    await first.accept(submission("LATER", at=T0 + HOUR))
    a, b = await asyncio.gather(
        first.lease("a", 4, T0 + 10, 600.0), second.lease("b", 4, T0 + 10, 600.0)
    )
    taken = [lease.queue_id for lease in (*a.leases, *b.leases)]
    assert sorted(taken) == [f"Q{n}" for n in range(6)]
    assert max(len(a.leases), len(b.leases)) <= 4
    rest = await first.lease("a", 4, T0 + 10, 600.0)
    assert (rest.leases, rest.next_due) == ((), T0 + HOUR)
    leases = {lease.queue_id: lease for lease in (*a.leases, *b.leases)}
    assert leases["Q0"].data is None, "a large body is read apart, not with the lease"
    assert await first.body("Q0") == bodies[0]
    assert [leases[f"Q{n}"].data for n in range(1, 6)] == bodies[1:]
    assert all(lease.attempts == 1 for lease in leases.values())
    depth = {q.state: q.messages for q in await first.queue_depth()}
    assert depth == {"queued": 1, "sending": 6, "held": 0}


async def test_an_outcome_settles_each_recipient_and_a_deferral_comes_due_again(
    store: Store,
) -> None:
    await store.accept(submission("Q1", "a@example.org", "b@example.org"))
    await store.lease("worker", 10, T0, 600.0)
    state = await store.update(
        outcome(
            "Q1", T0 + 1, ("a@example.org", "delivered"), ("b@example.org", "queued"), again=T0 + 60
        )
    )
    assert state == "queued"
    assert (await store.lease("worker", 10, T0 + 59, 600.0)).leases == ()
    retry = await store.lease("worker", 10, T0 + 60, 600.0)
    assert [(lease.recipients, lease.attempts) for lease in retry.leases] == [
        (("b@example.org",), 2)
    ]
    assert await store.update(outcome("Q1", T0 + 61, ("b@example.org", "delivered"))) == "done"
    assert await store.body("Q1") is None, "a delivered body is dropped unless kept"


async def test_bodies_are_kept_for_keep_bodies_then_purged(make_store: MakeStore) -> None:
    store = await make_store(keep_bodies="1h")
    await store.accept(submission("Q1"))
    await deliver_all(store, T0)
    assert await store.body("Q1") is not None
    assert (await store.purge(T0 + 60, 30 * 86400.0))["bodies"] == 0
    assert (await store.purge(T0 + HOUR + 1, 30 * 86400.0))["bodies"] == 1
    assert await store.body("Q1") is None


async def test_an_attempt_given_back_does_not_count(store: Store) -> None:
    await store.accept(submission("Q1"))
    await store.lease("worker", 10, T0, 600.0)
    await store.unlease("Q1", T0 + 5, "worker")
    again = await store.lease("worker", 10, T0 + 5, 600.0)
    assert [lease.attempts for lease in again.leases] == [1]


@pytest.mark.parametrize("hold", [False, True])
async def test_recovery_takes_back_own_and_expired_leases_as_ambiguous(
    make_store: MakeStore, hold: bool
) -> None:
    committed = Committed()
    store = await make_store(committed)
    for n, name in enumerate(("MINE", "DEAD", "ALIVE")):
        await store.accept(submission(name, at=T0 + n))
    now = T0 + 10
    assert [lease.queue_id for lease in (await store.lease("me", 1, now, 600.0)).leases] == ["MINE"]
    await store.lease("dead", 1, now, 60.0)
    await store.lease("alive", 1, now, 600.0)
    recovered = await store.recover("me", now + 61, hold=hold)
    assert sorted(recovered) == ["DEAD", "MINE"]
    assert committed.names.count("ambiguous") == 2
    depth = {q.state: q.messages for q in await store.queue_depth()}
    assert depth == {"queued": 0 if hold else 2, "sending": 1, "held": 2 if hold else 0}
    assert await store.recover("me", now + 62, hold=hold) == []
    if hold:
        assert await store.requeue("MINE", now + 70) == 1
        assert await store.requeue("MINE", now + 71) == 0
        retried = await store.lease("me", 9, now + 70, 60.0)
        assert [lease.queue_id for lease in retried.leases] == ["MINE"]


async def test_two_replicas_recovering_a_dead_ones_lease_record_it_once(
    make_store: MakeStore,
) -> None:
    committed = Committed()
    first, second = await make_store(committed), await make_store(committed)
    await first.accept(submission("DEAD"))
    await first.lease("dead", 1, T0, 60.0)
    found = await asyncio.gather(
        first.recover("", T0 + 61, hold=False), second.recover("", T0 + 61, hold=False)
    )
    assert sorted(q for ids in found for q in ids) == ["DEAD"]
    assert committed.names.count("ambiguous") == 1


async def test_renewal_keeps_own_leases_and_reclaim_takes_only_others_run_out(
    make_store: MakeStore,
) -> None:
    committed = Committed()
    mine, theirs = await make_store(committed), await make_store(committed)
    await mine.accept(submission("MINE"))
    await mine.accept(submission("THEIRS", at=T0 + 1))
    await mine.lease("me", 1, T0 + 2, 60.0)
    await theirs.lease("them", 1, T0 + 2, 60.0)
    assert await mine.renew("me", ["MINE", "THEIRS"], T0 + 200) == {"MINE"}, "only its own lease"
    # At T0 + 100 their lease has run out, mine was renewed: each takes back only the other's.
    assert await mine.reclaim("me", T0 + 100, hold=False) == ["THEIRS"]
    assert await theirs.reclaim("them", T0 + 300, hold=False) == ["MINE"]
    assert committed.names.count("ambiguous") == 2
    assert await mine.reclaim("me", T0 + 400, hold=False) == []


async def test_a_lease_settled_while_a_renewal_ran_leaves_the_others_confirmed(
    make_store: MakeStore,
) -> None:
    # A's outcome lands after the renewal took its list of held leases, before it ran.
    store = await make_store()
    for queue_id in ("A", "B"):
        await store.accept(submission(queue_id))
    await store.lease("me", 2, T0, 30.0)
    leases = Leases(store, "me", 30.0)
    leases.took(["A", "B"], T0 + 30)
    await store.update(
        dataclasses.replace(outcome("A", T0 + 5, ("alice@example.org", "delivered")), owner="me")
    )
    await leases.renew(T0 + 10)
    # B is this process's until T0 + 40 now: its payload may still go at T0 + 25.
    leases.check("B", T0 + 25)
    with pytest.raises(LeaseUnconfirmed):
        leases.check("B", T0 + 31)


async def test_an_outcome_or_give_back_after_the_lease_was_taken_over_changes_nothing(
    make_store: MakeStore,
) -> None:
    # "a" leased Q1 and went quiet; "b" took the lease back (ambiguous), leased and delivered.
    store = await make_store()
    await store.accept(submission("Q1", key=claim()))
    await store.lease("a", 1, T0, 60.0)
    assert await store.reclaim("b", T0 + 100, hold=False) == ["Q1"]
    await store.lease("b", 1, T0 + 100, 60.0)
    await store.unlease("Q1", T0 + 101, "a")  # a's give-back must not end b's lease
    assert await store.renew("b", ["Q1"], T0 + 200) == {"Q1"}
    delivered = outcome("Q1", T0 + 102, ("alice@example.org", "delivered"))
    await store.update(dataclasses.replace(delivered, owner="b"))
    late = dataclasses.replace(outcome("Q1", T0 + 103, ("alice@example.org", "failed")), owner="a")
    with pytest.raises(LeaseLost):
        await store.update(late)
    assert [lease.queue_id for lease in (await store.lease("c", 1, T0 + 400, 60.0)).leases] == []
    repeat = await store.accept(submission("Q2", at=T0 + 104, key=claim()))
    assert repeat.forward == (), "the key is still taken: the resend is a repeat"


async def test_an_instance_name_is_held_by_one_live_process_at_a_time(
    make_store: MakeStore,
) -> None:
    first, second = await make_store(), await make_store()
    me = Instance("relay-a", "host-1", 1, "token-1", "", T0, T0)
    other = Instance("relay-a", "host-2", 2, "token-2", "", T0 + 10, T0 + 10)
    held = await asyncio.gather(
        first.acquire_instance(me, 60.0), second.acquire_instance(other, 60.0)
    )
    assert {h.token for h in held} == {held[0].token}, "both starters see one holder"
    winner, loser = (me, other) if held[0].token == me.token else (other, me)
    assert await first.heartbeat_instance(winner, T0 + 20)
    assert not await first.heartbeat_instance(loser, T0 + 20)
    # Silent for longer than stale_after: another host may take the name over.
    later = Instance("relay-a", "host-3", 3, "token-3", "", T0 + 200, T0 + 200)
    assert (await second.acquire_instance(later, 60.0)).token == "token-3"
    assert not await first.heartbeat_instance(winner, T0 + 210)
    await second.release_instance(later)
    assert (await first.acquire_instance(me, 60.0)).token == "token-1"


# --- housekeeping, probes, events -------------------------------------------------------


async def test_purge_drops_what_is_expired_and_settled_and_keeps_the_rest(store: Store) -> None:
    await store.accept(submission("OLD", "a@example.org", key=claim("old", window=60.0)))
    await deliver_all(store, T0 + 1)
    await store.accept(submission("STUCK", at=T0 + 2, key=claim("stuck", window=60.0)))
    counts = await store.purge(T0 + HOUR, audit_retention=HOUR / 2)
    assert counts == {"claims": 1, "bodies": 0, "events": 3, "messages": 1}
    again = await store.accept(submission("NEW", at=T0 + HOUR, key=claim("stuck", window=60.0)))
    assert again.kind == "drop", "a pending claim survives the purge"
    assert await store.purge(T0 + HOUR, audit_retention=HOUR / 2) == dict.fromkeys(counts, 0)


async def test_an_event_without_a_state_change_is_committed_then_handed_on(
    make_store: MakeStore,
) -> None:
    committed = Committed()
    store = await make_store(committed)
    await store.record(Event(ts=T0, event="rejected", client="127.0.0.9", detail="bad key"))
    await store.probe(T0)
    assert committed.names == ["rejected"]


async def test_a_closed_store_refuses_work(store: Store) -> None:
    await store.close()
    assert not store.running
    with pytest.raises(StoreError):
        await store.accept(submission("Q1"))


# --- migrations ---------------------------------------------------------------


async def test_migrate_brings_a_store_to_the_latest_version_once(
    store_config: dict[str, Any], make_store: MakeStore
) -> None:
    config = from_mapping({"store": store_config}, check_paths=False).store
    first = await migrate(config)
    second = await migrate(config)
    assert first.applied and first.before == 0
    assert (second.before, second.after, second.applied) == (first.after, first.after, ())
    store = await make_store()
    assert (await store.accept(submission("Q1"))).forward


async def test_a_store_newer_than_the_relay_is_refused(
    store_config: dict[str, Any], make_store: MakeStore
) -> None:
    store = await make_store()
    await store.accept(submission("Q1"))
    await store.close()
    config = from_mapping({"store": store_config}, check_paths=False).store
    await _set_schema_version(config, "99")
    with pytest.raises(StoreError, match="schema version 99, newer than this relay"):
        await migrate(config)
    with pytest.raises(StoreError, match="newer than this relay"):
        await make_store()


async def _set_schema_version(config: Any, version: str) -> None:
    if config.url is None:
        import sqlite3

        db = sqlite3.connect(config.path)
        db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (version,))
        db.commit()
        db.close()
        return
    import asyncpg

    from relay.store.postgres import connect_options

    db = await asyncpg.connect(**connect_options(config))
    await db.execute("UPDATE meta SET value = $1 WHERE name = 'schema'", version)
    await db.close()


# --- the review reader ------------------------------------------------------------


async def test_the_reader_answers_log_show_stats_and_searches_alike(
    store_config: dict[str, Any], make_store: MakeStore
) -> None:
    store = await make_store()
    await store.accept(
        submission(
            "Q1", "Ann@X.test", "bo@x.test", sender="Shop@Example.com", user="api", key=claim()
        )
    )
    await store.accept(submission("Q2", "ann@x.test", at=T0 + 1, key=claim()))
    for n in range(5):
        await store.accept(
            submission(f"P{n}", "pat@x.test", at=T0 + 10 + n, sender="other@example.com")
        )
    await deliver_all(store, T0 + 20)
    config = from_mapping({"store": store_config}, check_paths=False).store
    async with open_reader(config) as reader, reader.snapshot():
        by_rcpt = await reader.events(EventFilter(rcpt="ANN@x.test"))
        assert [(e.event, e.queue_id) for e in by_rcpt.events] == [
            ("received", "Q1"),
            ("duplicate", "Q2"),
            ("delivered", "Q1"),
        ]
        by_sender = await reader.events(
            EventFilter(sender="shop@example.COM", events=("received",))
        )
        assert [e.queue_id for e in by_sender.events] == ["Q1"]
        assert [e.queue_id for e in (await reader.events(EventFilter(user="api"))).events] == [
            "Q1",
            "Q1",
        ]
        # Keyset paging through the recipient index, two at a time, newest first.
        page = await reader.search(EventFilter(rcpt="PAT@x.test", limit=2))
        seen = [e.queue_id for e in page.events]
        while page.older is not None:
            page = await reader.search(EventFilter(rcpt="pat@x.test", limit=2), before=page.older)
            seen += [e.queue_id for e in page.events]
        assert seen.count("P4") == 2 and len(seen) == 10
        back = await reader.search(EventFilter(rcpt="pat@x.test", limit=2), after=page.newer)
        assert len(back.events) == 2
        assert await reader.find("k1") == ["Q1"], "a repeat folds into its original"
        assert await reader.find("Q2@example.com") == ["Q2"]
        timeline = await reader.timeline("Q1")
        assert timeline.repeats == ("Q2",)
        assert timeline.message is not None and timeline.message.state == "done"
        assert {r.rcpt for r in timeline.recipients} == {"Ann@X.test", "bo@x.test"}
        stats = await reader.stats(T0 - 1, T0 + HOUR)
        counts = {c.name: c.count for c in stats.events}
        assert counts == {"received": 6, "duplicate": 1, "delivered": 6}
        assert stats.latency.count == 6 and stats.pending == 0
        activity = await reader.activity(T0 - 1, T0 + 60, 3600.0, ["received", "delivered"])
        assert {(b.event, b.count) for b in activity} == {("received", 6), ("delivered", 6)}
        sources = await reader.repeat_sources(T0 - 1, T0 + HOUR)
        assert [(s.client, s.strategy, s.action, s.count) for s in sources] == [
            ("127.0.0.1", "message-id", "drop", 1)
        ]
        assert await reader.message_head("Q1") is None, "delivered bodies are not kept"
