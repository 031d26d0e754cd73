"""Benchmark: separate relay processes (replicas) on one store, SQLite or PostgreSQL.

    smtp-source (N sessions) --> dedup-relay --> smtp-sink
    smtp-source (N sessions) --> Postfix     --> smtp-sink      (--postfix, the yardstick)

Prints, for each run: how fast messages were accepted (every 250 is a durable
commit), how fast they reached the sink, and for the repeat run how many of N
identical sends were forwarded (must be 1).

    python bench/replicas.py [--messages 5000] [--sessions 20] [--size 2000] [--postfix]
                               [--processes 1 2 3] [--store sqlite|postgres]

With `--store postgres` the relay processes are replicas sharing one PostgreSQL
database (a fresh one per run, in a private cluster started for the benchmark
with fsync on: tests/pg.py), as on several hosts; with SQLite they share one file.

Needs Debian's postfix package (smtp-source, smtp-sink), and postgresql for
`--store postgres`. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import ROOT, Sink, free_port, load, require_tools, wait_port

PASSWORD_ENV = "BENCH_PG_PASSWORD"


@contextmanager
def relay(
    folder: Path,
    sink_port: int,
    processes: int,
    extra: dict[str, object] | None = None,
    store: dict[str, object] | None = None,
) -> Iterator[int]:
    """`processes` relays on one port (SO_REUSEPORT) sharing one store, as in production.

    `extra` adds top-level config sections (such as `upstreams`); `store` replaces the
    SQLite file (a PostgreSQL database, for replicas)."""
    port = free_port()
    config: dict[str, object] = {
        "listen": {"port": port, "max_connections": 1000, "reuse_port": processes > 1},
        "upstream": {"url": f"smtp://127.0.0.1:{sink_port}"},
        "store": store or {"path": str(folder / "relay.db")},
        "audit": {"output": "none"},
        "runtime": {"log_level": "warning"},
        **(extra or {}),
    }
    path = folder / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    procs = [
        subprocess.Popen(
            # One process each (--workers 1): separate replicas, as on several hosts.
            [
                *(sys.executable, "-m", "relay", "serve", "--config", str(path)),
                *("--instance", f"p{n}", "--workers", "1"),
            ],
            cwd=ROOT,
            stderr=(folder / f"relay-{n}.log").open("wb"),
        )
        for n in range(processes)
    ]
    try:
        wait_port(port)
        time.sleep(0.5)  # a benchmark may sleep: let every process reach its listen()
        yield port
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def report(label: str, messages: int, began: float, accepted: float, delivered: float) -> None:
    print(
        f"{label:<34} accepted {messages / (accepted - began):7,.0f} msg/s"
        f"   delivered {messages / (delivered - began):7,.0f} msg/s"
        f"   ({delivered - began:5.1f}s for {messages:,})"
    )


@contextmanager
def databases(kind: str) -> Iterator[Callable[[], dict[str, object] | None]]:
    """A fresh store section per run: None (a SQLite file in the run's folder), or a new
    database in a private PostgreSQL cluster (fsync on, as in production)."""
    if kind == "sqlite":
        yield lambda: None
        return
    sys.path.insert(0, str(ROOT))
    from tests.pg import PASSWORD, private_cluster

    os.environ[PASSWORD_ENV] = PASSWORD
    with private_cluster() as cluster:
        with (cluster.data / "postgresql.conf").open("a") as conf:
            conf.write("fsync = on\nfull_page_writes = on\nsynchronous_commit = on\n")
        cluster.restart()
        yield lambda: {"url": cluster.url(cluster.create_database()), "password_env": PASSWORD_ENV}


def run_relay(args: argparse.Namespace, folder: Path) -> None:
    sink = Sink(folder)
    try:
        with databases(args.store) as store:
            for processes in args.processes:
                run_replicas(args, folder, sink, processes, store())
            run_repeats(args, folder, sink, store())
    finally:
        sink.stop()


def run_repeats(
    args: argparse.Namespace, folder: Path, sink: Sink, store: dict[str, object] | None
) -> None:
    run = folder / "relay-repeats"
    run.mkdir()
    fixed = run / "message.txt"
    fixed.write_text(
        "From: app@example.com\nTo: user@example.org\nSubject: your receipt\n"
        "Message-ID: <same-receipt-1@example.com>\n\nThank you for your order.\n"
    )
    with relay(run, sink.port, max(args.processes), store=store) as port:
        base = sink.count()
        began = load(port, args.messages, args.sessions, args.size, fixed)
        accepted = time.monotonic()
        sink.wait_for(base + 1)
        time.sleep(1.0)  # a benchmark may sleep: anything forwarded late would show here
        forwarded = sink.count() - base
        print(
            f"{'dedup-relay, identical sends':<34} accepted "
            f"{args.messages / (accepted - began):7,.0f} msg/s"
            f"   forwarded {forwarded} of {args.messages:,}"
            f" ({max(args.processes)} process(es), {args.store})"
        )


def run_replicas(
    args: argparse.Namespace,
    folder: Path,
    sink: Sink,
    processes: int,
    store: dict[str, object] | None,
) -> None:
    run = folder / f"relay-p{processes}"
    run.mkdir()
    with relay(run, sink.port, processes, store=store) as port:
        base = sink.count()
        began = load(port, args.messages, args.sessions, args.size)
        accepted = time.monotonic()
        delivered = sink.wait_for(base + args.messages)
        report(
            f"dedup-relay ({processes} process{'es' if processes > 1 else ''}, {args.store})",
            args.messages,
            began,
            accepted,
            delivered,
        )


def run_postfix(args: argparse.Namespace, folder: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.mta import Postfix  # the test harness knows how to run a private Postfix

    sink = Sink(folder)
    try:
        with Postfix(relayhost=sink.port) as postfix:
            began = load(postfix.port, args.messages, args.sessions, args.size)
            accepted = time.monotonic()
            delivered = sink.wait_for(args.messages)
            report("Postfix 3 (same load, same sink)", args.messages, began, accepted, delivered)
    finally:
        sink.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2000, help="body bytes per message")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="one SQLite file, or replicas on one PostgreSQL database",
    )
    parser.add_argument("--postfix", action="store_true", help="also measure Postfix itself")
    args = parser.parse_args()
    require_tools()
    folder = Path(tempfile.mkdtemp(prefix="throughput-"))
    print(
        f"{args.messages:,} messages of {args.size:,} bytes over {args.sessions} sessions; "
        f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}"
    )
    try:
        run_relay(args, folder)
        if args.postfix:
            run_postfix(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
