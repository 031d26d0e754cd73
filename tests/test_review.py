"""`log`, `show` and `stats` as an operator runs them after an incident.

Real SMTP traffic fills the store; the CLI runs as a separate process against
it, often while the relay is still taking mail, exactly as it would in production.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.audit import FIELDS
from tests.conftest import (
    BACKENDS,
    DEADLINE,
    Certificates,
    Relay,
    RelayProcess,
    Reply,
    Upstream,
    base_config,
    cli,
    eventually,
    found_in,
    mail_from_two_users_and_a_trusted_client,
    make_message,
    one_message_and_its_neighbours,
    queued_id,
    repeat_id,
    send,
)


def cli_config(tmp_path: Path, upstream: Upstream | None = None, store: Path | None = None) -> Path:
    """The operator's config: the same store file the relay under test writes."""
    port = upstream.port if upstream is not None else 25
    path = tmp_path / "review.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "store": {"path": str(store or tmp_path / "relay.db")},
                "upstream": {"url": f"smtp://127.0.0.1:{port}"},
            }
        )
    )
    return path


def lines_with(text: str, *needles: str) -> list[str]:
    return [line for line in text.splitlines() if all(n in line for n in needles)]


# --- log -------------------------------------------------------------------


async def test_log_shows_a_suppressed_repeat_with_its_client_and_the_original_queue_id(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    data = make_message(message_id="<receipt-42@shop.example>")
    original = queued_id(await send(relay.port, data))
    repeat = await send(relay.port, data, source="127.0.0.2")
    duplicate = repeat_id(repeat)
    assert original in repeat.text
    await relay.idle()
    config = cli_config(tmp_path, upstream)

    text, js = await asyncio.gather(cli(config, "log"), cli(config, "log", "--json"))

    assert (text.code, text.err) == (0, "")
    header, *rows = text.out.splitlines()
    assert header.split() == ["TIME", "EVENT", "QUEUE", "ID", "CLIENT", "FROM", "RCPTS", "INFO"]
    [line] = lines_with(text.out, " duplicate ")
    assert duplicate in line and "127.0.0.2" in line and f"of {original}" in line
    assert len(rows) == 3
    for row in rows:  # aligned: every column starts where its heading does
        assert row.index(original if duplicate not in row else duplicate) == header.index("QUEUE")
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  ", row)

    assert js.code == 0
    records = js.records()
    assert sorted(js.events()) == ["delivered", "duplicate", "received"]
    assert [r["ts"] for r in records] == sorted(r["ts"] for r in records)
    for record in records:
        assert {"ts", "event", "queue_id", "message_id", "key"} <= record.keys()
        assert record["message_id"] == "receipt-42@shop.example"
    [dup] = [r for r in records if r["event"] == "duplicate"]
    assert (dup["queue_id"], dup["original"], dup["client"]) == (duplicate, original, "127.0.0.2")
    assert dup["strategy"] == "message-id"


async def test_upstream_4xx_then_2xx_shows_deferred_then_delivered_with_upstream_queue_id(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.script.data = ["451 4.3.0 try later"]
    queue_id = queued_id(await send(relay.port, make_message(message_id="<reset-7@shop.example>")))
    await upstream.wait_for(1)
    await relay.idle()
    config = cli_config(tmp_path, upstream)

    js, text, show = await asyncio.gather(
        cli(config, "log", "--message-id", "<reset-7@shop.example>", "--json"),
        cli(config, "log", "--message-id", "reset-7@shop.example"),
        cli(config, "show", queue_id),
    )

    outcome = [(r["event"], r["code"], r["upstream_id"], r["queue_id"]) for r in js.records()]
    assert outcome == [
        ("received", None, None, queue_id),
        ("deferred", 451, None, queue_id),
        ("delivered", 250, "UP0001", queue_id),
    ]
    [deferred] = lines_with(text.out, " deferred ", "451 4.3.0 try later")
    [delivered] = lines_with(text.out, " delivered ", "UP0001")
    assert text.out.index(deferred) < text.out.index(delivered)

    assert show.code == 0, show.err
    timeline = show.out.split("Timeline:")[1]
    assert timeline.index(" deferred ") < timeline.index(" delivered ")
    assert lines_with(show.out.split("Timeline:")[0], "alice@example.org", "delivered", "UP0001")
    assert "State:      done, 2 attempt(s)" in show.out


async def test_log_filters_narrow_to_the_matching_events(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    receipt = make_message(message_id="<f1@shop.example>")
    await send(relay.port, receipt)
    await send(
        relay.port,
        make_message(message_id="<f2@shop.example>", sender="billing@example.com"),
        sender="billing@example.com",
        rcpts=("bob@example.org", "carol@example.org"),
        source="127.0.0.2",
    )
    await send(relay.port, receipt, source="127.0.0.3")
    await relay.idle()
    config = cli_config(tmp_path, upstream)
    local_2000 = "2000-01-01 10:00"
    future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    queries: dict[str, tuple[str, ...]] = {
        "all": (),
        "dup": ("--event", "duplicate"),
        "comma": ("--event", "received,delivered"),
        "repeat": ("--event", "received", "--event", "DUPLICATE"),
        "rcpt": ("--rcpt", "BOB@Example.ORG"),
        "part": ("--rcpt", "ob@example.org"),
        "from": ("--from", "billing@example.com"),
        "client": ("--client", "127.0.0.2"),
        "mid": ("--message-id", "f1@shop.example"),
        "key": ("--key", "f1@shop.example"),
        "both": ("--message-id", "<f1@shop.example>", "--event", "received"),
        "limit": ("--limit", "2"),
        "since": ("--since", "1h"),
        "old": ("--until", local_2000),
        "day": ("--since", "2000-01-01"),
        "future": ("--since", future),
    }
    runs = dict(
        zip(
            queries,
            await asyncio.gather(*(cli(config, "log", "--json", *q) for q in queries.values())),
            strict=True,
        )
    )
    assert {name: run.code for name, run in runs.items()} == dict.fromkeys(queries, 0)
    every = runs["all"].records()
    assert len(every) == 5

    def which(name: str) -> list[tuple[str, str]]:
        return [(r["event"], r["message_id"]) for r in runs[name].records()]

    assert which("dup") == [("duplicate", "f1@shop.example")]
    assert sorted(runs["comma"].events()) == ["delivered", "delivered", "received", "received"]
    assert sorted(runs["repeat"].events()) == ["duplicate", "received", "received"]
    assert sorted(which("rcpt")) == [
        ("delivered", "f2@shop.example"),
        ("received", "f2@shop.example"),
    ]
    assert which("part") == []
    assert which("from") == which("rcpt") == which("client")
    assert sorted(runs["mid"].events()) == ["delivered", "duplicate", "received"]
    assert which("key") == which("mid")
    assert which("both") == [("received", "f1@shop.example")]
    assert runs["limit"].records() == every[-2:]
    assert runs["since"].records() == runs["day"].records() == every
    assert which("old") == which("future") == []


@pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)
async def test_log_by_user_lists_that_users_mail_and_neither_the_other_users_nor_unauthenticated(
    secure: Relay, certificates: Certificates, review_config: Path
) -> None:
    mail = await mail_from_two_users_and_a_trusted_client(secure, certificates)

    alice, bob, everyone, text = await asyncio.gather(
        cli(review_config, "log", "--json", "--user", "alice"),
        cli(review_config, "log", "--json", "--user", "bob"),
        cli(review_config, "log", "--json"),
        cli(review_config, "log", "--user", "alice"),
    )

    for user, run in (("alice", alice), ("bob", bob)):
        assert (run.code, run.err) == (0, ""), user
        assert found_in(run.records()) == mail[user], user
        assert {r["user"] for r in run.records()} == {user}
    # What the searches left out is in the log: every event of everyone's mail, no other.
    assert found_in(everyone.records()) == mail["alice"] + mail["bob"] + mail[None]
    header, *rows = text.out.splitlines()
    assert "QUEUE ID" in header and len(rows) == sum(mail["alice"].values())
    assert all(any(qid in row for _, qid in mail["alice"]) for row in rows)


@pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)
async def test_log_by_queue_id_as_printed_or_lower_cased_is_that_messages_events_only(
    make_relay: Callable[..., Awaitable[Relay]], upstream: Upstream, review_config: Path
) -> None:
    relay = await make_relay()
    ids = await one_message_and_its_neighbours(relay, upstream)

    printed, lower, repeat = await asyncio.gather(
        cli(review_config, "log", "--json", "--queue-id", ids.message),
        cli(review_config, "log", "--json", "--queue-id", f" {ids.message.lower()} "),
        cli(review_config, "log", "--json", "--queue-id", ids.repeat.lower()),
    )

    assert (printed.code, printed.err) == (0, "")
    # Not the repeat that names it as its original, nor the message sent after it.
    assert [(r["event"], r["queue_id"]) for r in printed.records()] == [
        ("received", ids.message),
        ("deferred", ids.message),
        ("delivered", ids.message),
    ]
    assert lower.records() == printed.records()
    assert [(r["event"], r["queue_id"], r["original"]) for r in repeat.records()] == [
        ("duplicate", ids.repeat, ids.message)
    ]


async def test_log_by_rule_and_by_strategy_lists_only_the_mail_they_decided(
    make_relay: Callable[..., Awaitable[Relay]], upstream: Upstream, tmp_path: Path
) -> None:
    relay = await make_relay(
        rules=[{"name": "receipts", "match": {"header": {"Subject": "*receipt*"}}}],
        dedupe={"keys": ["header:Idempotency-Key", "message-id", "fingerprint"]},
    )
    receipt = make_message("Your receipt", message_id="<r-1@shop.example>")
    keyed = make_message("Order", extra={"Idempotency-Key": "order-7"})
    plain = make_message("Hello", message_id="<h-1@shop.example>")
    receipt_ids = [queued_id(await send(relay.port, receipt))]
    receipt_ids.append(repeat_id(await send(relay.port, receipt)))
    keyed_id = queued_id(await send(relay.port, keyed))
    plain_id = queued_id(await send(relay.port, plain))
    await relay.idle()
    config = cli_config(tmp_path, upstream)

    rule, header, message_id, unknown = await asyncio.gather(
        cli(config, "log", "--json", "--rule", "receipts"),
        cli(config, "log", "--json", "--strategy", "header:Idempotency-Key"),
        cli(config, "log", "--json", "--strategy", "message-id", "--event", "received"),
        cli(config, "log", "--json", "--rule", "no-such-rule"),
    )

    assert (rule.code, rule.err) == (0, "")
    assert {r["queue_id"] for r in rule.records()} == set(receipt_ids)
    # The events the rule decided: the accept and the repeat, not the upstream's outcome.
    assert [r["event"] for r in rule.records()] == ["received", "duplicate"]
    # Every event of the mail keyed that way, its outcome included.
    assert [(r["event"], r["queue_id"]) for r in header.records()] == [
        ("received", keyed_id),
        ("delivered", keyed_id),
    ]
    assert {r["key"] for r in header.records()} == {"order-7"}
    assert [r["queue_id"] for r in message_id.records()] == [receipt_ids[0], plain_id]
    assert (unknown.code, unknown.records()) == (0, [])


async def test_log_limit_keeps_the_newest_and_says_older_ones_were_left_out(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    for _ in range(3):
        await send(relay.port, make_message())
    await relay.idle()
    config = cli_config(tmp_path, upstream)

    full, limited, empty = await asyncio.gather(
        cli(config, "log"),
        cli(config, "log", "--limit", "2"),
        cli(config, "log", "--until", "1999-12-31"),
    )

    words = [line.split() for line in full.out.splitlines()]
    assert [line.split() for line in limited.out.splitlines()] == [words[0], *words[-2:]]
    assert "newest 2" in limited.err and full.err == ""
    assert (empty.code, empty.out) == (0, "-- No entries --\n")


async def test_csv_has_a_header_row_and_recipients_joined_with_spaces(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    rcpts = ("alice@example.org", "bob@example.org")
    queue_id = queued_id(await send(relay.port, make_message(), rcpts=rcpts))
    await relay.idle()

    run = await cli(cli_config(tmp_path, upstream), "log", "--csv", "--utc")

    assert run.code == 0
    rows = list(csv.reader(io.StringIO(run.out)))
    assert rows[0] == list(FIELDS)
    records = [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
    assert [r["event"] for r in records] == ["received", "delivered"]
    assert {r["queue_id"] for r in records} == {queue_id}
    assert records[0]["rcpts"] == "alice@example.org bob@example.org"
    assert records[1]["upstream_id"] == "UP0001" and records[1]["code"] == "250"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z", records[0]["ts"])


async def test_times_are_local_by_default_and_utc_with_the_flag(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    await send(relay.port, make_message())
    await relay.idle()
    config = cli_config(tmp_path, upstream)
    zone = "IST-5:30"  # POSIX TZ for UTC+05:30: needs no tz database
    js = await cli(config, "log", "--json", "--event", "received")
    [record] = js.records()
    at = datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
    local = at.astimezone(timezone(timedelta(hours=5, minutes=30)))
    minute_before = (local - timedelta(minutes=1)).strftime("%Y-%m-%d %H:%M")

    text, utc, local_since, utc_since = await asyncio.gather(
        cli(config, "log", "--event", "received", tz=zone),
        cli(config, "log", "--event", "received", "--utc", tz=zone),
        cli(config, "log", "--json", "--since", minute_before, tz=zone),
        cli(config, "log", "--json", "--since", minute_before, "--utc", tz=zone),
    )

    shown = local.strftime("%Y-%m-%d %H:%M:%S.") + f"{local.microsecond // 1000:03d}"
    assert text.out.splitlines()[1].startswith(shown + "  ")
    assert utc.out.splitlines()[1].startswith(at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z  ")
    assert "received" in local_since.events()
    assert utc_since.records() == []  # the same wall-clock text read as UTC is 5h30 later


async def test_text_output_never_passes_an_upstream_escape_sequence_to_the_terminal(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.script.data = ["451 4.3.0 \x1b[2J\x1b]0;pwned\x07 try later"]
    queue_id = queued_id(await send(relay.port, make_message()))
    await relay.idle()
    config = cli_config(tmp_path, upstream)

    text, show, js = await asyncio.gather(
        cli(config, "log"), cli(config, "show", queue_id), cli(config, "log", "--json")
    )

    [deferred] = [r for r in js.records() if r["event"] == "deferred"]
    assert "\x1b[2J" in deferred["reply"]  # the record keeps the truth; only the display is safe
    for run in (text, show):
        assert run.code == 0 and "\x1b" not in run.out and "\x07" not in run.out
        assert lines_with(run.out, " deferred ", "451 4.3.0 ?[2J?]0;pwned? try later")


# --- show ------------------------------------------------------------------


async def test_show_finds_one_timeline_by_queue_id_message_id_or_key_with_its_repeats(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    key = {"Idempotency-Key": "order-1001-receipt"}
    first = make_message(message_id="<r1@shop.example>", extra=key)
    original = queued_id(await send(relay.port, first))
    await upstream.wait_for(1)
    # The app retried with a fresh Message-ID; bob is new, alice already has it.
    retry = make_message(message_id="<r2@shop.example>", extra=key)
    reply = await send(
        relay.port, retry, rcpts=("alice@example.org", "bob@example.org"), source="127.0.0.2"
    )
    repeat = queued_id(reply)
    assert original in reply.text
    await relay.idle()
    config = cli_config(tmp_path, upstream)
    idents = [
        original,
        original.lower(),
        "<r1@shop.example>",
        "r1@shop.example",
        key["Idempotency-Key"],
    ]

    runs = await asyncio.gather(*(cli(config, "show", i) for i in idents))
    js, of_repeat = await asyncio.gather(
        cli(config, "show", original, "--json"), cli(config, "show", "r2@shop.example")
    )

    for ident, run in zip(idents, runs, strict=True):
        assert run.code == 0, (ident, run.err)
        assert run.out == runs[0].out, ident
    out = runs[0].out
    assert out.count("Queue id:") == 1 and f"Queue id:   {original}" in out
    assert f"Repeats:    {repeat}" in out
    assert "Key:        header:Idempotency-Key: order-1001-receipt" in out
    summary, timeline = out.split("Timeline:")
    assert lines_with(summary, "alice@example.org", "delivered", original)  # QUEUE ID column shown
    assert lines_with(summary, "bob@example.org", "delivered", repeat)
    assert lines_with(timeline, " duplicate ", repeat, "127.0.0.2", f"of {original}")
    assert lines_with(timeline, " received ", repeat, "bob@example.org")  # the repeat's own events
    assert lines_with(timeline, " delivered ", repeat)

    [doc] = js.records()
    assert (doc["queue_id"], doc["repeats"]) == (original, [repeat])
    assert doc["message"]["state"] == "done" and doc["message"]["client"] == "127.0.0.1"
    states = {(r["queue_id"], r["rcpt"], r["state"]) for r in doc["recipients"]}
    assert states == {
        (original, "alice@example.org", "delivered"),
        (repeat, "bob@example.org", "delivered"),
    }
    [dup] = [e for e in doc["events"] if e["event"] == "duplicate"]
    assert (dup["queue_id"], dup["client"], dup["original"]) == (repeat, "127.0.0.2", original)
    assert dup["rcpts"] == ["alice@example.org"]

    assert of_repeat.code == 0 and f"Queue id:   {repeat}" in of_repeat.out


@pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)
async def test_show_by_queue_id_as_printed_or_lower_cased_is_that_timeline_and_nothing_else(
    make_relay: Callable[..., Awaitable[Relay]], upstream: Upstream, review_config: Path
) -> None:
    relay = await make_relay()
    ids = await one_message_and_its_neighbours(relay, upstream)

    printed, lower, upper_repeat, lower_repeat = await asyncio.gather(
        cli(review_config, "show", ids.message, "--json"),
        cli(review_config, "show", ids.message.lower(), "--json"),
        cli(review_config, "show", ids.repeat, "--json"),
        cli(review_config, "show", ids.repeat.lower(), "--json"),
    )

    assert printed.code == 0, printed.err
    [doc] = printed.records()
    # Its received and every outcome, in order, and the repeat suppressed against it.
    assert [(e["event"], e["queue_id"]) for e in doc["events"]] == [
        ("received", ids.message),
        ("deferred", ids.message),
        ("delivered", ids.message),
        ("duplicate", ids.repeat),
    ]
    assert (doc["queue_id"], doc["repeats"]) == (ids.message, [ids.repeat])
    assert lower.records() == [doc]
    # A repeat's own queue id is its own timeline: the one event that suppressed it.
    [repeat] = upper_repeat.records()
    assert [(e["event"], e["queue_id"], e["original"]) for e in repeat["events"]] == [
        ("duplicate", ids.repeat, ids.message)
    ]
    assert lower_repeat.records() == [repeat]


async def test_show_prints_every_message_a_shared_message_id_names(
    make_relay: Callable[..., Awaitable[Relay]], upstream: Upstream, tmp_path: Path
) -> None:
    relay = await make_relay(dedupe={"mode": "off"})
    data = make_message(message_id="<same@shop.example>")
    ids = [queued_id(await send(relay.port, data)) for _ in range(2)]
    await relay.idle()
    config = cli_config(tmp_path, upstream)

    text, js = await asyncio.gather(
        cli(config, "show", "<same@shop.example>"),
        cli(config, "show", "same@shop.example", "--json"),
    )

    assert text.code == 0
    assert "matches 2 messages" in text.out
    assert re.findall(r"Queue id:\s+(\w+)", text.out) == ids
    assert [doc["queue_id"] for doc in js.records()] == ids


async def test_show_of_an_unknown_id_exits_1_with_one_clear_line(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    await send(relay.port, make_message())
    await relay.idle()

    run = await cli(cli_config(tmp_path, upstream), "show", "<never-sent@shop.example>")

    assert (run.code, run.out) == (1, "")
    assert run.err.splitlines() == [
        "dedup-relay: no message matches '<never-sent@shop.example>' (queue id, Message-ID or key)"
    ]


# --- stats -----------------------------------------------------------------


async def test_stats_counts_events_duplicates_pending_queue_and_latency(
    relay: Relay, upstream: Upstream, tmp_path: Path
) -> None:
    data = make_message(message_id="<s1@shop.example>")
    delivered_id = queued_id(await send(relay.port, data))
    await upstream.wait_for(1)
    await send(relay.port, data, source="127.0.0.2")
    upstream.script.data = ["451 4.3.0 try later"] * 1000
    queued_id(await send(relay.port, make_message()))

    async def deferred() -> bool:
        return bool(await relay.events("deferred"))

    await eventually(deferred, what="a deferral")
    events = {e["event"]: e for e in await relay.events() if e["queue_id"] == delivered_id}
    latency = round(events["delivered"]["ts"] - events["received"]["ts"], 3)
    config = cli_config(tmp_path, upstream)

    js, text, old = await asyncio.gather(
        cli(config, "stats", "--json"),
        cli(config, "stats"),
        cli(config, "stats", "--json", "--since", "1999-01-01", "--until", "2000-01-01"),
    )

    assert js.code == 0, js.err
    [s] = js.records()
    assert {k: s["events"][k] for k in ("received", "duplicate", "delivered")} == {
        "received": 2,
        "duplicate": 1,
        "delivered": 1,
    }
    assert s["events"]["deferred"] >= 1
    assert s["duplicates_by_action"] == {"drop": 1}
    assert s["duplicates_by_strategy"] == {"message-id": 1}
    assert s["duplicates_by_client"] == {"127.0.0.2": 1}
    assert s["pending"] == 1 and s["queue"]["queued"] + s["queue"]["sending"] == 1
    assert s["queue"]["held"] == 0
    assert 0 <= s["oldest_pending_age"] < DEADLINE
    assert s["latency"] == {
        "count": 1,
        "p50": latency,
        "p90": latency,
        "p99": latency,
        "max": latency,
    }

    assert text.code == 0
    for heading in ("EVENT", "DUPLICATES BY STRATEGY", "DUPLICATES BY CLIENT", "QUEUE (NOW)"):
        assert heading in text.out
    assert lines_with(text.out, "127.0.0.2", "1")
    assert lines_with(text.out, "received -> delivered", "1")

    [before] = old.records()
    assert before["events"] == {} and before["latency"]["count"] == 0
    assert before["pending"] == 1  # queue depth is now, whatever the window


# --- while the relay is busy -----------------------------------------------


async def test_review_answers_while_a_relay_process_takes_mail_from_many_clients(
    relay_process: Callable[[dict[str, Any]], RelayProcess], upstream: Upstream, tmp_path: Path
) -> None:
    proc = relay_process(base_config(tmp_path, upstream.port))
    await asyncio.to_thread(proc.start)
    config = proc.config_path
    stop = asyncio.Event()
    replies: list[Reply] = []

    async def client(n: int) -> None:
        while not stop.is_set():
            replies.append(
                await send(proc.port, make_message(f"receipt {n}"), source=f"127.0.0.{n}")
            )

    first = queued_id(await send(proc.port, make_message(message_id="<busy@shop.example>")))
    senders = [asyncio.create_task(client(n)) for n in range(2, 8)]
    try:
        await eventually(lambda: len(replies) >= 20, what="traffic from six clients")
        accepted_before = len(replies)
        for _ in range(3):
            runs = await asyncio.gather(
                cli(config, "log", "--limit", "50"),
                cli(config, "log", "--json", "--event", "received"),
                cli(config, "show", first),
                cli(config, "stats", "--json"),
            )
            for run in runs:
                assert run.code == 0, run.err
        accepted_during = len(replies) - accepted_before
    finally:
        stop.set()
        await asyncio.gather(*senders)

    assert accepted_during > 0, "the relay stopped accepting while it was being read"
    assert {r.code for r in replies} == {250}
    assert f"Queue id:   {first}" in runs[2].out
    assert len(runs[1].records()) >= accepted_before
    last = await send(proc.port, make_message())
    assert last.code == 250
    assert await asyncio.to_thread(proc.terminate) == 0


# --- bad input -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("log", "--since", "yesterday-ish"), "--since"),
        (("log", "--until", "2026-13-45"), "--until"),
        (("log", "--event", "received,bogus"), "bogus"),
        (("log", "--limit", "0"), "--limit"),
        (("log", "--limit", "ten"), "--limit"),
        (("log", "--json", "--csv"), "--csv"),
        (("log", "--since", "1h", "--until", "2h"), "--since"),
        (("stats", "--since", "soon"), "--since"),
    ],
)
async def test_bad_filter_input_exits_2_with_one_line_and_no_traceback(
    relay: Relay, upstream: Upstream, tmp_path: Path, args: tuple[str, ...], names: str
) -> None:
    await send(relay.port, make_message())  # the store exists: only the input is wrong

    run = await cli(cli_config(tmp_path, upstream), *args)

    assert (run.code, run.out) == (2, "")
    [line] = run.err.splitlines()
    assert line.startswith("dedup-relay: error: ") and names in line


async def test_a_missing_store_exits_2_with_one_line_and_is_not_created(tmp_path: Path) -> None:
    store = tmp_path / "nowhere" / "relay.db"
    config = cli_config(tmp_path, store=store)

    runs = await asyncio.gather(
        cli(config, "log"), cli(config, "show", "ABC"), cli(config, "stats", "--json")
    )

    for run in runs:
        assert (run.code, run.out) == (2, "")
        assert run.err.splitlines() == [
            f"dedup-relay: error: no store at {store}"
            " (is store.path right, and has the relay run yet?)"
        ]
    assert not store.exists()


async def test_stats_tells_forwarded_repeats_from_suppressed_ones(
    make_relay, upstream: Upstream, tmp_path: Path
) -> None:
    relay = await make_relay(dedupe={"mode": "shadow"})
    data = make_message(message_id="<shadowed@shop.example>")
    for _ in range(3):
        await send(relay.port, data)
    await upstream.wait_for(3)
    run = await cli(cli_config(tmp_path, upstream), "stats", "--json")
    [s] = run.records()
    assert s["duplicates_by_action"] == {"shadow": 2}
    text = await cli(cli_config(tmp_path, upstream), "stats")
    assert len(lines_with(text.out, "shadow")) == 1
    assert "DUPLICATES BY ACTION" in text.out


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [
        ([], 0.5, None),
        ([7.0], 0.99, 7.0),
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 0.5, 5.0),
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 0.9, 9.0),
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 0.99, 10.0),
        ([1.0, 2.0, 3.0, 4.0], 0.0, 1.0),  # the lowest rank is the first, never an index of -1
    ],
)
def test_latency_percentiles_are_nearest_rank(
    values: list[float], fraction: float, expected: float | None
) -> None:
    from relay.store.reader import percentile

    assert percentile(values, fraction) == expected


def test_with_several_upstreams_each_attempt_names_the_one_it_went_to() -> None:
    from relay.audit import Event
    from relay.review import info

    delivered = Event(
        ts=0.0,
        event="delivered",
        code=250,
        reply="2.0.0 Ok: queued as B42",
        upstream="backup",
        upstream_id="B42",
        detail="attempt 1; primary down: connection refused",
    )
    assert info(delivered).startswith("backup: 250 2.0.0 Ok: queued as B42")
    failover = Event(ts=0.0, event="failover", code=421, reply="4.3.2 closing", upstream="primary")
    assert info(failover) == "primary: 421 4.3.2 closing"
    # One unnamed upstream: its URL would only repeat itself on every line.
    single = Event(ts=0.0, event="delivered", code=250, reply="Ok", upstream="smtp://mx.example:25")
    assert info(single) == "250 Ok"
