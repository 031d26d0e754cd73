"""Benchmark: the dedupe claim path with 1,000,000 live keys in the store, on either backend.

The claim must cost an index lookup, not a scan: a store holding a million live
keys should accept new mail and recognise repeats about as fast as an empty one.

    python bench/claim_bench.py [--backend sqlite|postgres] [--keys 1000000] [--sample 20000]
                                [--seed accept|bulk] [--dir DIR] [--url postgresql://...]
                                [--pragma cache_size=-65536 ...]

Prints accepts per second (256 in flight, as many SMTP sessions would) and the
latency of one accept at a time, for new keys and for repeats, at 0 and N keys,
and the bytes each live claim takes (its row and its indexes), each line with the
load average (the machine may be shared). On a private PostgreSQL cluster it also
prints the server's CPU per accept (the postmaster and all its processes), where
the claim's index work is done. `--pragma` adds a PRAGMA to the SQLite
writer's own, to measure another setting (cache_size, mmap_size) against them.

`--seed accept` seeds every key through the same `accept` the SMTP path uses;
`--seed bulk` (the default on PostgreSQL, where a million accepts take long on a
small machine) writes the claim rows with one INSERT ... SELECT over
generate_series (a recursive CTE on SQLite), rows the accept path would have
made. On PostgreSQL without `--url`, a private cluster is started (tests/pg.py:
initdb + pg_ctl in a temporary directory); its password is read from
$BENCH_PG_PASSWORD with `--url`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg

from relay.config import from_mapping
from relay.store import Claim, Store, Submission, open_store, schema

ROOT = Path(__file__).resolve().parent.parent
PASSWORD_ENV = "BENCH_PG_PASSWORD"
# The private cluster's postmaster, whose CPU (and its children's) is the server's share.
SERVER_PID: int | None = None

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


def server_cpu() -> float:
    """Seconds of CPU the private cluster has used: the postmaster, its live children and
    the children it has reaped (backends that ended). 0 without a private cluster."""
    if SERVER_PID is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(fields[1])
        if pid == SERVER_PID:
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        elif ppid == SERVER_PID:
            total += int(fields[11]) + int(fields[12])
    return total / tick


async def throughput(store: Store, keys: list[str], start: int) -> tuple[float, float, float]:
    """Accepts per second, and CPU microseconds per accept of this process (all threads) and
    of the server: the rate moves with what else runs on the machine, the CPU far less."""
    gate = asyncio.Semaphore(256)

    async def one(n: int, key: str) -> None:
        async with gate:
            await store.accept(submission(start + n, key))

    began, cpu, server = time.perf_counter(), time.process_time(), server_cpu()
    await asyncio.gather(*(one(n, key) for n, key in enumerate(keys)))
    spent, served = time.process_time() - cpu, server_cpu() - server
    return (
        len(keys) / (time.perf_counter() - began),
        spent / len(keys) * 1e6,
        served / len(keys) * 1e6,
    )


async def latency(store: Store, keys: list[str], start: int) -> tuple[float, float]:
    samples = []
    for n, key in enumerate(keys):
        began = time.perf_counter()
        await store.accept(submission(start + n, key))
        samples.append(time.perf_counter() - began)
    samples.sort()
    return statistics.median(samples) * 1e6, samples[int(len(samples) * 0.99)] * 1e6


async def measure(store: Store, label: str, live: list[str], sample: int, seq: int) -> None:
    # New keys land all over the live ones (`live-<random>-…` sorts among `live-<n>`), as
    # random idempotency keys and Message-IDs do: each may touch a page no other touched.
    fresh = [f"live-{random.getrandbits(40)}-{label}-{n}" for n in range(sample)]
    rate, cpu, server = await throughput(store, fresh, seq)
    fresh_lat = [f"live-{random.getrandbits(40)}-lat-{label}-{n}" for n in range(2000)]
    p50, p99 = await latency(store, fresh_lat, seq + sample)
    repeats = random.sample(live + fresh, min(sample, len(live + fresh)))
    repeat_rate, repeat_cpu, repeat_server = await throughput(store, repeats, seq + sample + 2000)
    r50, r99 = await latency(store, repeats[:2000], seq + 2 * sample + 2000)
    print(
        f"{label:>14} | new keys {rate:8,.0f}/s {cpu:4.0f} us CPU{served(server)}"
        f"  p50 {p50:6.0f} us  p99 {p99:6.0f} us | repeats {repeat_rate:8,.0f}/s"
        f" {repeat_cpu:4.0f} us CPU{served(repeat_server)}  p50 {r50:6.0f} us"
        f"  p99 {r99:6.0f} us | load {load()}"
    )


def served(us: float) -> str:
    return f" + {us:4.0f} us server" if SERVER_PID is not None else ""


def load() -> str:
    """The 1-minute load average: the machine is shared, so every figure carries it."""
    return f"{os.getloadavg()[0]:.2f}"


# Rows as the accept path writes them: one claim per key, settled (its message delivered) and
# live for a day. Both statements take the key count and the expiry.
# Keys are stored namespaced by their strategy (`Claim.namespaced`), the first parameter.
PG_BULK = (
    "INSERT INTO claims (scope, key, rcpt, queue_id, fingerprint, claimed_at, expires_at,"
    " pending) SELECT 'global', $3 || 'live-' || n, 'customer' || (n % 5000) || '@example.org',"
    " 'S' || lpad(n::text, 16, '0'), repeat('f', 64), $2 - 60, $2, false"
    " FROM generate_series(0, $1 - 1) AS n"
)
SQLITE_BULK = (
    "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < :keys)"
    " INSERT INTO claims (scope, key, rcpt, queue_id, fingerprint, claimed_at, expires_at,"
    " pending) SELECT 'global', :prefix || 'live-' || i,"
    " 'customer' || (i % 5000) || '@example.org',"
    " printf('S%016d', i), printf('%.64c', 'f'), :expires - 60, :expires, 0 FROM n"
)


@asynccontextmanager
async def postgres(url: str | None) -> AsyncIterator[tuple[str, str]]:
    """A database to measure: the one given, or a private cluster for this run."""
    if url is not None:
        yield url, os.environ.get(PASSWORD_ENV, "")
        return
    sys.path.insert(0, str(ROOT))
    from tests.pg import PASSWORD, private_cluster

    with private_cluster() as cluster:
        with (cluster.data / "postgresql.conf").open("a") as conf:
            conf.write("fsync = on\nfull_page_writes = on\nsynchronous_commit = on\n")
        cluster.restart()
        global SERVER_PID
        SERVER_PID = int((cluster.data / "postmaster.pid").read_text().split()[0])
        yield cluster.url(cluster.create_database()), PASSWORD


async def bulk_seed(store_raw: dict[str, Any], keys: int, password: str) -> None:
    expires = time.time() + 86400.0
    claim = submission(0, "").claim
    assert claim is not None
    prefix = claim.namespaced  # the key itself is ""
    if "url" in store_raw:
        db = await asyncpg.connect(store_raw["url"], password=password)
        try:
            await db.execute(PG_BULK, keys, expires, prefix)
            await db.execute("ANALYZE claims")
        finally:
            await db.close()
        return
    async with aiosqlite.connect(store_raw["path"]) as db:
        await db.execute("PRAGMA cache_size=-1048576")  # seeding only: 1 GB
        await db.execute(SQLITE_BULK, {"keys": keys, "prefix": prefix, "expires": expires})
        await db.commit()
        # Into the file now, as a store grown over days would be: else the writer's first
        # commit checkpoints gigabytes of WAL inside the measurement.
        await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


async def claim_bytes(store_raw: dict[str, Any], password: str) -> int:
    """The claims table with its indexes: heap and index pages (PostgreSQL), or the pages
    SQLite's dbstat counts for the table and its indexes."""
    if "url" in store_raw:
        db = await asyncpg.connect(store_raw["url"], password=password)
        try:
            return int(await db.fetchval("SELECT pg_total_relation_size('claims')"))
        finally:
            await db.close()
    async with aiosqlite.connect(store_raw["path"]) as db:
        cursor = await db.execute(
            "SELECT sum(pgsize) FROM dbstat WHERE name = 'claims'"
            " OR name IN (SELECT name FROM sqlite_master WHERE tbl_name = 'claims')"
        )
        row = await cursor.fetchone()
        return int(row[0]) if row and row[0] is not None else 0


async def run(args: argparse.Namespace, store_raw: dict[str, Any], password: str) -> None:
    if password:
        os.environ[PASSWORD_ENV] = password
        store_raw = {**store_raw, "password_env": PASSWORD_ENV}
    config = from_mapping({"store": store_raw}, check_paths=False).store
    store = open_store(config)
    await store.open()
    try:
        print(
            f"{config.backend} store: {config.where}; sample {args.sample:,} accepts per"
            f" figure, 2,000 for latency; writer {' '.join(schema.PRAGMAS[1:])}"
        )
        await measure(store, "empty store", [], args.sample, 0)
        before = await claim_bytes(store_raw, password)
        began, server = time.perf_counter(), server_cpu()
        seeded = [f"live-{n}" for n in range(args.keys)]
        if args.seed == "bulk":
            await bulk_seed(store_raw, args.keys, password)
        else:
            chunk = 50_000
            for at in range(0, args.keys, chunk):
                await throughput(store, seeded[at : at + chunk], 10_000_000 + at)
        took, served_seed = time.perf_counter() - began, server_cpu() - server
        after = await claim_bytes(store_raw, password)
        print(
            f"seeded {args.keys:,} live keys ({args.seed}) in {took:.0f}s"
            f" ({args.keys / took:,.0f}/s{served(served_seed / args.keys * 1e6)});"
            " claims with their indexes:"
            f" {(after - before) / args.keys:,.0f} bytes per live claim | load {load()}"
        )
        await measure(store, f"{args.keys:,} keys", seeded, args.sample, 50_000_000)
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--sample", type=int, default=20_000)
    parser.add_argument("--seed", choices=("accept", "bulk"), default=None)
    parser.add_argument("--dir", default=None, help="where to put a SQLite store (a temp dir)")
    parser.add_argument("--url", default=None, help="a PostgreSQL database to use")
    parser.add_argument(
        "--pragma",
        action="append",
        default=[],
        help="another PRAGMA for the SQLite writer, after the relay's (e.g. cache_size=-65536)",
    )
    args = parser.parse_args()
    schema.PRAGMAS = (*schema.PRAGMAS, *(f"PRAGMA {p}" for p in args.pragma))
    args.seed = args.seed or ("bulk" if args.backend == "postgres" else "accept")
    if args.backend == "postgres":
        async with postgres(args.url) as (url, password):
            await run(args, {"url": url}, password)
        return
    folder = Path(args.dir or tempfile.mkdtemp(prefix="claim-bench-"))
    path = folder / "bench.db"
    if path.exists():
        os.remove(path)
    await run(args, {"path": str(path)}, "")


if __name__ == "__main__":
    asyncio.run(main())
