"""The log search behind the page: the same answers as `relay log`, paged by index, exportable.

Real mail fills the store; the page is fetched over HTTP and compared with `relay log` on the
same store, so "the same fields as the CLI" is checked, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import io
import json
import re
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest

from relay.audit import Event
from relay.cli import main
from relay.store.reader import Cursor, EventFilter, open_reader
from relay.store.sqlite import SqliteStore
from tests.conftest import (
    BACKENDS,
    Certificates,
    Found,
    MakeRelay,
    MakeWeb,
    Relay,
    Upstream,
    WebServer,
    cli,
    found_in,
    mail_from_two_users_and_a_trusted_client,
    make_message,
    one_message_and_its_neighbours,
    queued_id,
    send,
)
from tests.test_review import cli_config


async def fetch(server: WebServer, path: str) -> tuple[int, str, str]:
    """Status, content type and body of one GET, redirects not followed."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.url + path, allow_redirects=False) as response,
    ):
        return response.status, response.content_type, await response.text()


async def mixed_traffic(relay: Relay) -> dict[str, str]:
    """Two senders, three clients, a repeat, a message to two recipients, one deferral."""
    receipt = make_message(message_id="<f1@shop.example>")
    ids = {"receipt": queued_id(await send(relay.port, receipt))}
    billing = make_message(message_id="<f2@shop.example>", sender="billing@example.com")
    ids["billing"] = queued_id(
        await send(
            relay.port,
            billing,
            sender="billing@example.com",
            rcpts=("Bob@Example.org", "carol@example.org"),
            source="127.0.0.2",
        )
    )
    await send(relay.port, receipt, source="127.0.0.3")
    await relay.idle()
    return ids


async def relay_log(config: Path, *options: str) -> str:
    """`relay log --utc OPTIONS` in this process (a thread, so the relay keeps serving)."""

    def run() -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["log", "--config", str(config), "--utc", *options]) == 0
        return out.getvalue()

    return await asyncio.to_thread(run)


# The CLI's options; the page takes the same names as URL parameters.
QUERIES: dict[str, list[tuple[str, str]]] = {
    "all": [],
    "dup": [("event", "duplicate")],
    "comma": [("event", "received,delivered")],
    "repeat": [("event", "received"), ("event", "DUPLICATE")],
    "rcpt": [("rcpt", "BOB@example.ORG")],
    "rcpt-second": [("rcpt", "carol@example.org")],
    "part": [("rcpt", "ob@example.org")],
    "from": [("from", "BILLING@example.com")],
    "client": [("client", "127.0.0.2")],
    "mid": [("message-id", "<f1@shop.example>")],
    "key": [("key", "f1@shop.example")],
    "rcpt-event": [("rcpt", "alice@example.org"), ("event", "received")],
    "limit": [("limit", "2")],
    "since": [("since", "1h")],
    "until": [("until", "2000-01-01 10:00")],
}


async def test_exports_are_what_relay_log_prints_for_the_same_filters(
    make_relay: MakeRelay, upstream: Upstream, make_web: MakeWeb, tmp_path: Path
) -> None:
    relay = await make_relay()
    await mixed_traffic(relay)
    server = await make_web(relay)
    config = cli_config(tmp_path, upstream)

    for pairs in QUERIES.values():
        options = [arg for name, value in pairs for arg in (f"--{name}", value)]
        query = urlencode(pairs)
        status, kind, csv_page = await fetch(server, f"/log.csv?{query}")
        assert (status, kind) == (200, "text/csv")
        assert csv_page == await relay_log(config, "--csv", *options), pairs
        status, kind, json_page = await fetch(server, f"/log.json?{query}")
        assert (status, kind) == (200, "application/json")
        lines = (await relay_log(config, "--json", *options)).splitlines()
        assert json.loads(json_page) == [json.loads(line) for line in lines], pairs
    # and once as the separate process an operator runs
    run = await cli(config, "log", "--utc", "--csv", "--rcpt", "bob@example.org")
    assert run.out == (await fetch(server, "/log.csv?rcpt=bob%40example.org"))[2]

    status, _, csv_page = await fetch(server, "/log.csv?rcpt=bob%40example.org")
    assert status == 200
    header, *rows = csv_page.splitlines()
    assert header.startswith("ts,event,queue_id,key,strategy,message_id,sender,rcpts")
    assert len(rows) == 2 and all("Bob@Example.org carol@example.org" in r for r in rows)


# One row of the page's events table: its event and queue id.
EVENT_ROW = re.compile(
    r'<tr class="event-(\w+)">\s*<td>.*?</td>\s*<td>.*?</td>\s*<td>\s*'
    r'(?:<a class="qid" href="[^"]*">|<span class="qid">)(\w+)<',
    re.S,
)


async def search(
    server: WebServer, query: str
) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """The (event, queue id) rows of the page, newest first, and the JSON export, oldest first."""
    status, _, page = await fetch(server, f"/log?{query}")
    assert status == 200, query
    status, _, export = await fetch(server, f"/log.json?{query}")
    assert status == 200, query
    return EVENT_ROW.findall(page), json.loads(export)


@pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)
async def test_a_search_by_user_finds_that_users_mail_and_neither_the_others_nor_unauthenticated(
    secure: Relay, certificates: Certificates, make_web: MakeWeb
) -> None:
    mail = await mail_from_two_users_and_a_trusted_client(secure, certificates)
    server = await make_web(secure)

    for user in ("alice", "bob"):
        rows, export = await search(server, urlencode({"user": user}))
        assert found_in(export) == mail[user], user
        assert {e["user"] for e in export} == {user}
        assert rows == [(e["event"], e["queue_id"]) for e in reversed(export)], user
    # What the searches left out is on the page unfiltered: everyone's mail, nothing more.
    rows, export = await search(server, "")
    everyone: Found = mail["alice"] + mail["bob"] + mail[None]
    assert found_in(export) == everyone and len(rows) == len(export)


@pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)
async def test_a_search_by_queue_id_as_printed_or_lower_cased_is_that_timeline_and_nothing_else(
    make_relay: MakeRelay, upstream: Upstream, make_web: MakeWeb
) -> None:
    relay = await make_relay()
    ids = await one_message_and_its_neighbours(relay, upstream)
    server = await make_web(relay)
    timeline = [("received", ids.message), ("deferred", ids.message), ("delivered", ids.message)]

    for typed in (ids.message, ids.message.lower(), f" {ids.message.lower()} "):
        rows, export = await search(server, urlencode({"queue-id": typed}))
        # Received and every outcome of that message, oldest first in the export; not the
        # repeat that names it as its original, nor the message sent after it.
        assert [(e["event"], e["queue_id"]) for e in export] == timeline, typed
        assert rows == timeline[::-1], typed
    for typed in (ids.repeat, ids.repeat.lower()):
        rows, export = await search(server, urlencode({"queue-id": typed}))
        assert [(e["event"], e["queue_id"], e["original"]) for e in export] == [
            ("duplicate", ids.repeat, ids.message)
        ], typed
        assert rows == [("duplicate", ids.repeat)]
    _, everything = await search(server, "")
    assert {e["queue_id"] for e in everything} == {ids.message, ids.repeat, ids.other}


async def test_the_page_lists_what_the_export_holds_newest_first(
    make_relay: MakeRelay, upstream: Upstream, make_web: MakeWeb
) -> None:
    relay = await make_relay()
    ids = await mixed_traffic(relay)
    server = await make_web(relay)

    _, _, page = await fetch(server, "/log?rcpt=carol%40example.org")
    _, _, export = await fetch(server, "/log.json?rcpt=carol%40example.org")
    events = json.loads(export)
    assert [e["event"] for e in events] == ["received", "delivered"]
    positions = [page.index(f'<span class="tag tag-{e["event"]}">') for e in events]
    assert positions == sorted(positions, reverse=True)
    assert page.count(f'href="/message/{ids["billing"]}"') == 2
    assert "/log.csv?rcpt=carol%40example.org" in page


async def test_keyset_pages_hold_every_match_once_whatever_is_written_meanwhile(
    tmp_path: Path,
) -> None:
    """At the store: pages keyed on (ts, id) neither skip nor repeat an event, even events that
    share a timestamp, while new ones keep arriving at the newest end."""
    path = str(tmp_path / "relay.db")
    store = SqliteStore(path)
    await store.open()
    try:
        for n in range(40):  # pairs share a timestamp, so the id must break the tie
            await store.record(Event(ts=1000.0 + n // 2, event="received", queue_id=f"Q{n:03d}"))
        async with open_reader(path) as reader:
            f = EventFilter(limit=7)
            pages = [await reader.search(f)]
            while pages[-1].older is not None:
                await store.record(Event(ts=5000.0 + len(pages), event="received", queue_id="NEW"))
                pages.append(await reader.search(f, before=pages[-1].older))
            seen = [e.queue_id for p in pages for e in p.events]
            assert seen == [f"Q{n:03d}" for n in reversed(range(40))]
            assert [len(p.events) for p in pages] == [7, 7, 7, 7, 7, 5]

            # Newer pages from the oldest walk back up to everything, new events included.
            back = list(pages[-1].events)
            cursor = pages[-1].newer
            while cursor is not None:
                page = await reader.search(f, after=cursor)
                back = list(page.events) + back
                cursor = page.newer
            assert [e.queue_id for e in back] == ["NEW"] * 5 + seen
            assert pages[0].newer is None and pages[1].newer == Cursor(1016.0, 33)
    finally:
        await store.close()


async def test_recipient_search_covers_events_from_before_the_index_and_forgets_purged_ones(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "relay.db")
    store = SqliteStore(path)
    await store.open()
    await store.record(Event(ts=100.0, event="received", queue_id="OLD", rcpts=("Ann@x.test",)))
    await store.close()
    # A store written by a relay from before the recipient index (schema version 1): no table,
    # no triggers. Opening it migrates it to version 2.
    with sqlite3.connect(path) as db:
        db.executescript(
            "DROP TRIGGER events_rcpt_insert; DROP TRIGGER events_rcpts_insert;"
            " DROP TRIGGER events_rcpts_delete;"
            " DROP TABLE event_rcpts; DELETE FROM meta WHERE name = 'event_rcpts';"
            " UPDATE meta SET value = '1' WHERE name = 'schema';"
            " INSERT INTO events (ts, event, queue_id, rcpts)"
            " VALUES (200.0, 'received', 'OLDER', 'bo@x.test,ann@X.test');"
        )
    store = SqliteStore(path)
    await store.open()
    try:
        now = 10_000.0
        await store.record(Event(ts=now, event="received", queue_id="NEW", rcpts=("ann@x.test",)))
        async with open_reader(path) as reader:
            found = await reader.search(EventFilter(rcpt="ANN@x.test"))
            assert [e.queue_id for e in found.events] == ["NEW", "OLDER", "OLD"]
            assert [
                e.queue_id for e in (await reader.search(EventFilter(rcpt="bo@x.test"))).events
            ] == ["OLDER"]
        await store.purge(now, audit_retention=now - 150.0)
        async with open_reader(path) as reader:
            found = await reader.search(EventFilter(rcpt="ann@x.test"))
            assert [e.queue_id for e in found.events] == ["NEW", "OLDER"]
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT count(*) FROM event_rcpts").fetchone() == (3,)
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("query", "field", "export_too"),
    [
        ("since=yesterday-ish", "since", True),
        ("until=2h&since=1h", "since", True),
        ("event=delivered,bounced", "event", True),
        ("limit=0", "limit", True),
        ("limit=501", "limit", False),  # a page holds 500 at most; an export 100,000
        ("before=not-a-cursor", "before", False),  # exports take no page position
    ],
)
async def test_bad_search_input_is_a_400_that_points_at_the_field(
    relay: Relay, make_web: MakeWeb, query: str, field: str, export_too: bool
) -> None:
    server = await make_web(relay)
    status, kind, page = await fetch(server, f"/log?{query}")
    assert (status, kind) == (400, "text/html")
    assert f'role="alert" id="search-error">{field}:' in page
    if field not in ("before", "limit"):
        assert f'id="f-{field}"' in page and 'aria-invalid="true"' in page
    status, kind, text = await fetch(server, f"/log.csv?{query}")
    if export_too:
        assert (status, kind) == (400, "text/plain") and text.startswith(f"{field}:")
    else:
        assert status == 200


async def test_a_message_id_with_a_slash_opens_its_timeline_and_an_unknown_id_is_404(
    make_relay: MakeRelay, upstream: Upstream, make_web: MakeWeb
) -> None:
    relay = await make_relay()
    data = make_message(message_id="<2026/order+7@shop.example>")
    queue_id = queued_id(await send(relay.port, data))
    await relay.idle()
    server = await make_web(relay)

    status, _, page = await fetch(server, "/message/" + quote("<2026/order+7@shop.example>"))
    assert status == 200 and f'<h1>Message <span class="qid">{queue_id}</span></h1>' in page
    status, _, page = await fetch(server, "/message/2026/order+7@shop.example")
    assert status == 200 and queue_id in page
    status, _, page = await fetch(server, "/message/nothing-like-this")
    assert status == 404 and "Nothing in the store matches <code>nothing-like-this</code>" in page


SOURCE_ROW = re.compile(
    r'<th scope="row">(?:<a href="(?P<url>[^"]+)">)?(?P<name>[^<]+)(?:</a>)?</th>\s*'
    r"<td>(?P<suppressed>\d+)</td>\s*<td>(?P<repeats>\d+)</td>"
)


async def test_where_duplicates_come_from_counts_each_source_and_links_to_just_those_repeats(
    make_relay: MakeRelay, upstream: Upstream, make_web: MakeWeb
) -> None:
    relay = await make_relay(
        rules=[
            {"name": "receipts", "match": {"header": {"Subject": "*receipt*"}}},
            {"name": "news", "match": {"sender": "news@*"}, "on_duplicate": "tag"},
        ]
    )
    receipt = make_message("Your receipt")
    queued_id(await send(relay.port, receipt))
    for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3"):
        await send(relay.port, receipt, source=source)
    news = make_message("Weekly news", sender="news@example.com")
    for _ in range(2):  # the repeat is tagged and forwarded, not suppressed
        queued_id(await send(relay.port, news, sender="news@example.com"))
    await relay.idle()
    server = await make_web(relay)

    status, _, page = await fetch(server, "/?since=1h")
    assert status == 200
    tables = {
        name: {m["name"]: m.groupdict() for m in SOURCE_ROW.finditer(table)}
        for name, table in re.findall(
            r'<table class="source" id="source-(\w+)">(.*?)</table>', page, re.S
        )
    }
    counts = {
        name: {row: (int(r["suppressed"]), int(r["repeats"])) for row, r in rows.items()}
        for name, rows in tables.items()
    }
    assert counts == {
        "client": {"127.0.0.2": (2, 2), "127.0.0.1": (0, 1), "127.0.0.3": (1, 1)},
        "user": {"(no user)": (3, 4)},
        "rule": {"receipts": (3, 3), "news": (0, 1)},
        "strategy": {"message-id": (3, 4)},
    }
    assert re.search(r'id="total-duplicate"><a [^>]*><span class="count">4</span>', page)
    assert "3 of 4 duplicates kept from the upstream" in page
    for name, rows in tables.items():
        for row, found in rows.items():
            if name == "user":
                assert found["url"] is None  # nothing to filter on
                continue
            _, _, export = await fetch(
                server, html.unescape(found["url"]).replace("/log?", "/log.json?")
            )
            events = json.loads(export)
            assert len(events) == int(found["repeats"]), (name, row)
            assert {e["event"] for e in events} == {"duplicate"}
