"""Benchmark: the relay alone, for comparing two checkouts' CPU per message (A/B).

    smtp-source --> dedup-relay (the checkout given) --> smtp-sink

Runs `serve` from the checkout named by `--checkout` (default: this one) with the same default
config as `bench/throughput.py`, sends 500 messages to warm it, then `--messages` over
`--sessions` sessions, and prints delivered msg/s and the relay's user and system CPU per
message (every process of it, from /proc). Alternate two checkouts a few times each:

    python bench/relay_cpu.py --checkout /path/to/a --sessions 1 --messages 1000
    python bench/relay_cpu.py --checkout /path/to/b --sessions 1 --messages 1000

Needs Debian's postfix package (smtp-source, smtp-sink). Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import throughput as bench  # beside this script: python bench/...

HERE = Path(__file__).resolve().parent


def user_system(pids: list[int]) -> tuple[float, float]:
    """User and system seconds of `pids`, those still alive (a relay reaps no child in a run)."""
    times = [found[1:3] for found in map(bench.stat, pids) if found is not None]
    return sum(user for user, _ in times), sum(system for _, system in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=HERE.parent, help="relay to run")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=2000, help="body bytes per message")
    parser.add_argument("--workers", type=int, default=None, help="relay --workers")
    args = parser.parse_args()
    if args.sessions < 1 or args.messages < 1 or args.size < 1:
        parser.error("--sessions, --messages and --size must be at least 1")
    checkout = args.checkout.resolve()
    if not (checkout / "relay" / "__main__.py").is_file():
        parser.error(f"{checkout} is not a dedup-relay checkout")
    bench.require_tools()
    bench.ROOT = checkout
    os.environ["PYTHONPATH"] = str(checkout)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sink = bench.Sink(folder)
        try:
            with bench.relay(folder, sink, args.workers) as server:
                pids = list(bench.tree(server.root))
                bench.closed_loop(server, 500, args.sessions, args.size)
                user0, system0 = user_system(pids)
                run = bench.closed_loop(server, args.messages, args.sessions, args.size)
                user1, system1 = user_system(pids)
        finally:
            sink.stop()
    per = 1000 / args.messages
    print(
        f"{checkout}: {args.sessions} session(s), {server.processes} worker(s):"
        f" {run.delivered_rate:,.0f} msg/s, CPU {run.cpu_ms:.2f} ms/msg"
        f" (user {(user1 - user0) * per:.2f}, system {(system1 - system0) * per:.2f});"
        f" load {run.load}"
    )


if __name__ == "__main__":
    main()
