"""Benchmark: the dedupe claim path with 1,000,000 live keys in the store.

The claim must cost an index lookup, not a scan: a store holding a million live
keys should accept new mail and recognise repeats about as fast as an empty one.
Every key is seeded through the same `SqliteStore.accept` the SMTP path uses.

    python bench/claim_bench.py [--keys 1000000] [--sample 20000] [--dir DIR]

Prints accepts per second (256 in flight, as many SMTP sessions would) and the
latency of one accept at a time, for new keys and for repeats, at 0 and N keys;
then bytes on disk per live key, table by table and index by index (SQLite's
`dbstat`), so the cost of a claim can be told from the spool and audit rows that
every accepted message also writes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from relay.store import Claim, Submission
from relay.store.sqlite import SqliteStore

BODY = b"From: shop@example.com\r\nSubject: receipt\r\n\r\nThank you.\r\n"


def submission(n: int, key: str) -> Submission:
    return Submission(
        queue_id=f"B{n:09d}{random.getrandbits(32):08x}",
        received_at=time.time(),
        sender="shop@example.com",
        recipients=(f"customer{n % 5000}@example.org",),
        data=BODY,
        message_id=None,
        client="127.0.0.1",
        user=None,
        helo="bench",
        smtputf8=False,
        body8bit=False,
        claim=Claim(
            scope="global",
            key=key,
            strategy="header:Idempotency-Key",
            fingerprint="f" * 64,
            window=86400.0,
            on_duplicate="drop",
            on_conflict="reject",
        ),
    )


async def throughput(store: SqliteStore, keys: list[str], start: int) -> float:
    gate = asyncio.Semaphore(256)

    async def one(n: int, key: str) -> None:
        async with gate:
            await store.accept(submission(start + n, key))

    began = time.perf_counter()
    await asyncio.gather(*(one(n, key) for n, key in enumerate(keys)))
    return len(keys) / (time.perf_counter() - began)


async def latency(store: SqliteStore, keys: list[str], start: int) -> tuple[float, float]:
    samples = []
    for n, key in enumerate(keys):
        began = time.perf_counter()
        await store.accept(submission(start + n, key))
        samples.append(time.perf_counter() - began)
    samples.sort()
    return statistics.median(samples) * 1e6, samples[int(len(samples) * 0.99)] * 1e6


async def measure(store: SqliteStore, label: str, live: list[str], sample: int, seq: int) -> None:
    fresh = [f"new-{label}-{n}" for n in range(sample)]
    rate = await throughput(store, fresh, seq)
    fresh_lat = [f"lat-{label}-{n}" for n in range(2000)]
    p50, p99 = await latency(store, fresh_lat, seq + sample)
    repeats = random.sample(live + fresh, min(sample, len(live + fresh)))
    repeat_rate = await throughput(store, repeats, seq + sample + 2000)
    r50, r99 = await latency(store, repeats[:2000], seq + 2 * sample + 2000)
    print(
        f"{label:>14} | new keys {rate:8,.0f}/s  p50 {p50:6.0f} us  p99 {p99:6.0f} us"
        f" | repeats {repeat_rate:8,.0f}/s  p50 {r50:6.0f} us  p99 {r99:6.0f} us"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--sample", type=int, default=20_000)
    parser.add_argument("--dir", default=None, help="where to put the store (default: a temp dir)")
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="claim-bench-"))
    path = folder / "bench.db"
    if path.exists():
        os.remove(path)
    store = SqliteStore(str(path))
    await store.open()
    try:
        print(f"store: {path}; sample {args.sample:,} accepts per figure, 2,000 for latency")
        await measure(store, "empty store", [], args.sample, 0)
        began = time.perf_counter()
        seeded = [f"live-{n}" for n in range(args.keys)]
        chunk = 50_000
        for at in range(0, args.keys, chunk):
            await throughput(store, seeded[at : at + chunk], 10_000_000 + at)
        took = time.perf_counter() - began
        print(
            f"seeded {args.keys:,} live keys through accept() in {took:.0f}s "
            f"({args.keys / took:,.0f}/s); store file {path.stat().st_size / 1e6:,.0f} MB"
        )
        await measure(store, f"{args.keys:,} keys", seeded, args.sample, 50_000_000)
    finally:
        await store.close()
    space(path, args.keys)


def space(path: Path, keys: int) -> None:
    """Bytes on disk per live key, by table and index (pages in use, from `dbstat`)."""
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"
        ).fetchall()
    total = sum(size for _, size in rows)
    print(f"bytes on disk per live key: {total / keys:,.0f} (file {path.stat().st_size:,} B)")
    for name, size in rows[:12]:
        print(f"  {name:<40} {size / keys:8,.0f} B/key")


if __name__ == "__main__":
    asyncio.run(main())
