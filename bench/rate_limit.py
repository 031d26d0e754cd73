"""Benchmark: what the upstream rate limiter costs, and how close it keeps to its rate.

    smtp-source --> dedup-relay (upstreams: one, with or without `rate`) --> smtp-sink

Runs the same load with no rate limit, with a rate far above what the machine can send (so
every message books its slot in the store but never waits: the limiter's own cost), and
with a real limit, in one process and in two processes on one store (the limit is shared
through the store, so together they must stay at it). Prints delivered messages per second.

    python bench/rate_limit.py [--messages 3000] [--paced 600] [--rate 50] [--sessions 20]

Needs Debian's postfix package (smtp-source, smtp-sink). Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import Sink, load, relay, require_tools


def run(
    folder: Path,
    sink: Sink,
    label: str,
    messages: int,
    sessions: int,
    rate: str | None,
    processes: int = 1,
) -> float:
    """Delivered messages per second, from the first send to the last arrival."""
    work = folder / label.replace(" ", "-").replace("/", "per")
    work.mkdir()
    upstream: dict[str, object] = {"name": "sink", "url": f"smtp://127.0.0.1:{sink.port}"}
    if rate is not None:
        upstream["rate"] = rate
    # Several processes: `serve --workers N`, which share the store's rate-limit row.
    quiet = {"audit": {"output": "none"}, "runtime": {"log_level": "warning"}}
    extra = {"upstreams": [upstream], "listen": {"max_connections": 1000}, **quiet}
    with relay(work, sink, processes, extra) as server:
        base = sink.count()
        began = load(server.port, messages, sessions, 2000)
        delivered = sink.wait_for(base + messages)
    per_second = messages / (delivered - began)
    print(f"{label:<40} delivered {per_second:8,.1f} msg/s   ({delivered - began:5.1f}s)")
    return per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="for the unpaced runs")
    parser.add_argument("--paced", type=int, default=600, help="messages for the paced runs")
    parser.add_argument("--rate", type=int, default=50, help="messages per second when paced")
    parser.add_argument("--sessions", type=int, default=20)
    args = parser.parse_args()
    require_tools()
    folder = Path(tempfile.mkdtemp(prefix="rate-limit-"))
    print(
        f"2,000-byte messages over {args.sessions} sessions; {os.cpu_count()} CPUs;"
        f" python {sys.version.split()[0]}"
    )
    sink = Sink(folder)
    try:
        off = run(folder, sink, "no rate limit", args.messages, args.sessions, None)
        on = run(
            folder,
            sink,
            "rate 100000/s (books, never waits)",
            args.messages,
            args.sessions,
            "100000/s",
        )
        cost = (1 / on - 1 / off) * 1e6
        share = f"{on / off:.0%} of the unlimited rate"
        print(f"{'limiter cost per message, wall time':<40} {cost:8,.0f} µs   ({share})")
        time.sleep(0.5)  # a benchmark may sleep: let the sink settle between runs
        rate = f"{args.rate}/s"
        for processes in (1, 2):
            got = run(
                folder,
                sink,
                f"rate {rate}, {processes} process{'es' if processes > 1 else ''}",
                args.paced,
                args.sessions,
                rate,
                processes,
            )
            print(f"{'':<40} {got / args.rate:8.1%} of the limit")
    finally:
        sink.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
