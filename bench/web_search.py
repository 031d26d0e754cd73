"""Benchmark: log search on the web page over a store of 1,000,000 audit events.

A support engineer's searches must answer in well under a second whatever the store holds:
each is a keyset page over an index, never a scan. The store is seeded through the same
`SqliteStore.record` the relay writes events with (30 days of mail: received and delivered
events, one repeat in five, some deferrals, a few conflicts; 200,000 recipients, one of them
hot), then the page is served by `relay.web.create_app` on 127.0.0.1 and asked over HTTP, one
request at a time, as a browser would.

    python bench/web_search.py [--events 1000000] [--rounds 40] [--dir DIR]

Prints p50/p95/p99/max per kind of search, every search together, the dashboard, and an export.
With --dir, a store seeded by an earlier run with as many events is reused.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from relay.audit import Event
from relay.config import from_mapping
from relay.store.reader import EventFilter, open_reader
from relay.store.sqlite import SqliteStore
from relay.web import create_app
from relay.web.query import format_cursor

DAYS = 30
RECIPIENTS = 200_000
HOT = "ops-alerts@example.org"
SENDERS = [f"app{n}@shop.example" for n in range(20)]
CLIENTS = [f"10.0.{n // 10}.{n % 10}" for n in range(30)]


def message_events(n: int, ts: float, rng: random.Random) -> list[Event]:
    """The events of one message: received, maybe a deferral and repeats, delivered."""
    rcpt = HOT if rng.random() < 0.02 else f"customer{rng.randrange(RECIPIENTS)}@example.org"
    cc = f"cc{rng.randrange(RECIPIENTS)}@example.org"
    received = Event(
        ts=ts,
        event="received",
        queue_id=f"Q{n:010d}",
        key=f"order-{n}",
        strategy="header:Idempotency-Key",
        message_id=f"{n}.{rng.getrandbits(40):x}@shop.example",
        sender=rng.choice(SENDERS),
        rcpts=(rcpt,) if rng.random() < 0.95 else (rcpt, cc),
        size=2000,
        client=rng.choice(CLIENTS),
    )
    events = [received]
    if rng.random() < 0.03:
        events.append(replace(received, ts=ts + 0.5, event="deferred", code=451, reply="4.3.0"))
    repeats = 2 if rng.random() < 0.05 else 1 if rng.random() < 0.2 else 0
    for r in range(repeats):
        events.append(
            replace(
                received,
                ts=ts + 1 + r,
                event="duplicate",
                queue_id=f"R{n:010d}{r}",
                original=received.queue_id,
                action="drop",
            )
        )
    if rng.random() < 0.002:
        events.append(
            replace(
                received,
                ts=ts + 2,
                event="conflict",
                queue_id=f"C{n:010d}",
                original=received.queue_id,
                action="reject",
            )
        )
    reply = f"2.0.0 Ok: queued as U{n}"
    events.append(
        replace(received, ts=ts + 3, event="delivered", code=250, reply=reply, upstream_id=f"U{n}")
    )
    return events


async def seed(path: str, total: int) -> None:
    store = SqliteStore(path)
    await store.open()
    rng = random.Random(13)
    began = time.perf_counter()
    written = n = 0
    start = time.time() - DAYS * 86400
    step = DAYS * 86400 / (total / 2.4)
    try:
        while written < total:
            batch: list[Event] = []
            while len(batch) < 20_000 and written + len(batch) < total:
                batch += message_events(n, start + n * step, rng)
                n += 1
            await asyncio.gather(*(store.record(e) for e in batch))
            written += len(batch)
            if written % 200_000 < len(batch):
                rate = written / (time.perf_counter() - began)
                print(f"  seeded {written:,} events ({rate:,.0f}/s)")
    finally:
        await store.close()
    took = time.perf_counter() - began
    print(f"seeded {written:,} events through record() in {took:.0f}s ({written / took:,.0f}/s)")


async def samples(path: str, rounds: int) -> dict[str, list[str]]:
    """`rounds` URLs of each kind, for values that exist in the store (and a few that do not)."""
    rng = random.Random(7)
    async with open_reader(path) as reader:
        newest = (await reader.search(EventFilter(limit=1))).events[0]
        span_end = newest.ts
        kinds: dict[str, list[str]] = {k: [] for k in KINDS}
        for _ in range(rounds):
            some = (
                await reader.search(
                    EventFilter(limit=1, until=span_end - rng.uniform(0, DAYS * 86400))
                )
            ).events
            e = some[0] if some else newest
            mid = span_end - rng.uniform(1, DAYS - 1) * 86400
            urls = {
                "newest page": {},
                "recipient": {"rcpt": rng.choice(e.rcpts).upper()},
                "recipient, none": {"rcpt": f"nobody{rng.randrange(10**6)}@example.org"},
                "recipient, hot": {"rcpt": HOT},
                "recipient + range": {"rcpt": HOT, "since": _iso(mid - 86400), "until": _iso(mid)},
                "sender": {"from": rng.choice(SENDERS)},
                "sender + client": {"from": rng.choice(SENDERS), "client": rng.choice(CLIENTS)},
                "client + event": {"client": rng.choice(CLIENTS), "event": "deferred"},
                "message-id": {"message-id": f"<{e.message_id}>"},
                "key": {"key": e.key or ""},
                "queue id": {"queue-id": e.queue_id or ""},
                "event duplicate": {"event": "duplicate"},
                "event conflict": {"event": "conflict"},
                "events received+delivered": {"event": "received,delivered"},
                "time range": {"since": _iso(mid - 3600), "until": _iso(mid)},
            }
            for kind, params in urls.items():
                kinds[kind].append("/log?" + urlencode(params))
            cursor = (await reader.search(EventFilter(limit=50, until=mid))).older
            if cursor is not None:
                kinds["deep page (keyset)"].append(
                    "/log?" + urlencode({"before": format_cursor(cursor)})
                )
                deep = (
                    await reader.search(EventFilter(limit=50, sender=SENDERS[0], until=mid))
                ).older
                if deep is not None:
                    kinds["deep page, sender"].append(
                        "/log?" + urlencode({"from": SENDERS[0], "before": format_cursor(deep)})
                    )
    return kinds


KINDS = (
    "newest page",
    "recipient",
    "recipient, none",
    "recipient, hot",
    "recipient + range",
    "sender",
    "sender + client",
    "client + event",
    "message-id",
    "key",
    "queue id",
    "event duplicate",
    "event conflict",
    "events received+delivered",
    "time range",
    "deep page (keyset)",
    "deep page, sender",
)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _summary(label: str, times: list[float]) -> str:
    ordered = sorted(times)

    def pct(p: float) -> float:
        return ordered[max(int(len(ordered) * p + 0.999999) - 1, 0)] * 1000

    return (
        f"{label:<28} n={len(ordered):4d}  p50 {statistics.median(ordered) * 1000:7.1f} ms"
        f"  p95 {pct(0.95):7.1f} ms  p99 {pct(0.99):7.1f} ms  max {ordered[-1] * 1000:7.1f} ms"
    )


async def timed(session: aiohttp.ClientSession, url: str) -> float:
    began = time.perf_counter()
    async with session.get(url) as response:
        await response.read()
        assert response.status == 200, (response.status, url)
    return time.perf_counter() - began


async def measure(path: str, rounds: int) -> None:
    config = from_mapping({"store": {"path": path}, "upstream": {"url": "smtp://127.0.0.1:25"}})
    runner = web.AppRunner(create_app(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        kinds = await samples(path, rounds)
        async with aiohttp.ClientSession(base) as session:
            for url in ("/log", "/", "/log?rcpt=x%40y"):  # warm the page cache once
                await timed(session, url)
            every: list[float] = []
            order = [(kind, url) for kind, urls in kinds.items() for url in urls]
            random.Random(3).shuffle(order)
            times: dict[str, list[float]] = {kind: [] for kind in kinds}
            for kind, url in order:
                took = await timed(session, url)
                times[kind].append(took)
                every.append(took)
            print(f"\nsearch over HTTP, one request at a time ({len(every)} requests):")
            for kind in KINDS:
                if times[kind]:
                    print("  " + _summary(kind, times[kind]))
            print("  " + _summary("every search", every))
            print("\ndashboard and export:")
            timeline = kinds["queue id"][0].replace("/log?queue-id=", "/message/")
            for label, url in (
                ("dashboard, 24 hours", "/?since=24h"),
                ("dashboard, 7 days", "/?since=7d"),
                ("dashboard, 30 days", "/?since=30d"),
                ("timeline of a message", timeline),
                ("export CSV, 1,000 rows", "/log.csv?from=" + SENDERS[1]),
            ):
                print("  " + _summary(label, [await timed(session, url) for _ in range(5)]))
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=40, help="searches of each kind")
    parser.add_argument("--dir", default=None, help="where the store is (default: a temp dir)")
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="web-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"events-{args.events}.db"
    if path.exists():
        print(f"reusing {path}")
    else:  # seeded under another name, so an interrupted run is never reused
        partial = folder / f"events-{args.events}.part.db"
        for leftover in folder.glob(partial.name + "*"):
            leftover.unlink()
        asyncio.run(seed(str(partial), args.events))
        partial.rename(path)
    print(f"store {path}: {path.stat().st_size / 1e6:,.0f} MB")
    asyncio.run(measure(str(path), args.rounds))


if __name__ == "__main__":
    main()
