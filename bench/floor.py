"""Benchmark: what the relay's own parts cost alone, beside Postfix and the relay, in one run.

Issue 11 asks for the relay to beat Postfix on this machine. This prints, under the same
`smtp-source` load as `bench/throughput.py` (2 KB messages, a new connection per message):

- Postfix relaying to `smtp-sink`, and the relay (`serve`, default config) doing the same;
- aiosmtpd alone: the stock `SMTP` class answering 250 to every message and doing nothing else
  (no store, no fingerprint, no forwarding), in as many processes as the relay has workers,
  sharing the port as the relay's workers do (`SO_REUSEPORT`, uvloop): the most any front door
  built on aiosmtpd can do here;
- the relay's own front door (`FrontDoor`: aiosmtpd with the relay's cuts, its checks and
  limits) with an intake that answers 250 and keeps nothing: what the front door costs;
- one `asyncio.Protocol` answering the same (no streams, no checks): the least any front door
  in Python can cost, to tell what aiosmtpd's design adds;
- aiosmtplib alone: one process sending 2 KB messages to `smtp-sink` over kept connections
  (10 at once): the client side of forwarding;
- SQLite alone: one 2 KB row per transaction, `COMMIT` in WAL mode with `synchronous=FULL`,
  one after another: the wait any durable accept adds before its 250.

    python bench/floor.py [--messages 5000] [--processes N]

Needs Debian's postfix package (smtp-source, smtp-sink). Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import throughput as bench  # beside this script: python bench/...

# --- aiosmtpd alone ----------------------------------------------------------------


class _Accept:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


class _Minimal(asyncio.Protocol):
    """An SMTP responder in one `asyncio.Protocol`: no streams, no task per session, no
    checks. Not a server anyone should run; the least any front door in Python can cost here,
    to tell what aiosmtpd's design (a stream reader and a coroutine per session, a `drain`
    per reply) adds on top of it."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buffer = b""
        self.in_data = False
        transport.write(b"220 floor ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    break
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                replies.append(b"250 OK\r\n")
                continue
            line, found, rest = self.buffer.partition(b"\r\n")
            if not found:
                break
            self.buffer = rest
            verb = line[:4].upper()
            if verb == b"EHLO":
                replies.append(b"250-floor\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.in_data = True
                self.buffer = b"\r\n" + self.buffer  # the first line may be "."
                replies.append(b"354 go on\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 bye\r\n")
                self.transport.write(b"".join(replies))
                self.transport.close()
                return
            else:
                replies.append(b"250 OK\r\n")
        if replies:
            self.transport.write(b"".join(replies))


class _Answer:
    """What the relay's front door asks of its intake, answering 250 without storing."""

    class store:
        lost = False

    async def submit(self, tx: Any) -> str:
        return "250 OK"


def serve_front_door(port: int) -> None:
    """One process of the relay's own front door (`relay.server.FrontDoor`, default `listen`
    settings, aiosmtpd with the relay's cuts: the set-up, the DATA reader, the address cache)
    whose intake answers 250 and keeps nothing (run with `--front-door PORT`)."""
    from relay import heap, logs
    from relay import loop as event_loop
    from relay.config import from_mapping
    from relay.server import FrontDoor

    config = from_mapping(
        {
            "listen": {"host": "127.0.0.1", "port": port, "reuse_port": True},
            "upstream": {"url": "smtp://127.0.0.1:25"},
        },
        check_paths=False,
    )
    logs.setup(config.runtime.log_level, config.runtime.log_format)

    async def main() -> None:
        front = FrontDoor(config.listen, _Answer())  # type: ignore[arg-type]
        await front.start()
        heap.settle()
        await asyncio.Event().wait()

    event_loop.run(main())


def serve_bare(port: int, minimal: bool = False) -> None:
    """One process of the bare front door (run by this script with `--bare PORT`)."""
    from aiosmtpd.smtp import SMTP

    def protocol() -> asyncio.Protocol:
        return _Minimal() if minimal else SMTP(_Accept())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(protocol, "127.0.0.1", port, reuse_port=True)
        await server.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def bare_front_door(messages: int, processes: int, flag: str = "--bare") -> dict[str, float]:
    port = bench.free_port()
    # One parent whose tree holds the processes, so CPU is counted as for the relay's workers.
    script = " & ".join(
        f"{sys.executable} {Path(__file__).resolve()} {flag} {port}" for _ in range(processes)
    )
    parent = subprocess.Popen(["sh", "-c", f"{script} & wait"])
    try:
        bench.wait_port(port)
        time.sleep(0.5)  # every process bound, not only the first
        bench.load(port, 500, 20, 2000)
        found: dict[str, float] = {}
        for sessions, count in ((20, messages), (1, messages // 5)):
            meter = bench.CpuMeter(parent.pid)
            meter.start()
            began = bench.load(port, count, sessions, 2000)
            found[f"rate{sessions}"] = count / (time.monotonic() - began)
            found[f"cpu{sessions}"] = meter.stop() / count * 1000
        found["p50"] = _accept_p50(port, 500)
        return found
    finally:
        subprocess.run(["pkill", "-P", str(parent.pid)], check=False)
        parent.wait()


def _accept_p50(port: int, messages: int) -> float:
    """Accept latency p50 (ms), one message at a time: `throughput.latency` without a sink."""

    async def one_at_a_time() -> list[float]:
        return [await bench.one_message(port, n, 2000) for n in range(messages)]

    return float(bench.percentile(asyncio.run(one_at_a_time()), 50) * 1000)


# --- aiosmtplib alone ----------------------------------------------------------------


def bare_client(sink_port: int, messages: int) -> float:
    """CPU ms per message of this process sending `messages` over 10 kept connections."""
    import aiosmtplib

    body = bench.message_bytes(0, 2000)

    async def send(count: int) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink_port)
        await client.connect()
        for _ in range(count):
            await client.sendmail(bench.SENDER, [bench.RCPT], body)
        await client.quit()

    async def main() -> float:
        await send(200)
        before = os.times()
        await asyncio.gather(*(send(messages // 10) for _ in range(10)))
        after = os.times()
        spent = after.user - before.user + after.system - before.system
        return spent / (messages // 10 * 10) * 1000

    return asyncio.run(main())


# --- SQLite alone ----------------------------------------------------------------------


def bare_commit(folder: Path, commits: int) -> tuple[float, float]:
    """p50 and p99 ms of one 2 KB insert and its COMMIT, WAL, synchronous=FULL."""
    db = sqlite3.connect(folder / "floor.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE bodies (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
    blob = os.urandom(2000)
    samples = []
    for n in range(commits + 100):
        began = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO bodies (data) VALUES (?)", (blob,))
        db.execute("COMMIT")
        if n >= 100:
            samples.append(time.perf_counter() - began)
    db.close()
    return bench.percentile(samples, 50) * 1000, bench.percentile(samples, 99) * 1000


# --- the report --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000, help="per run at 20 sessions")
    parser.add_argument(
        "--processes", type=int, default=os.cpu_count() or 1, help="aiosmtpd processes"
    )
    parser.add_argument("--bare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--minimal", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--front-door", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare is not None or args.minimal is not None:
        serve_bare(args.bare or args.minimal, minimal=args.minimal is not None)
        return
    if args.front_door is not None:
        serve_front_door(args.front_door)
        return
    if args.messages < 100 or args.processes < 1:
        parser.error("--messages must be at least 100 and --processes at least 1")
    bench.require_tools()
    os.environ["PYTHONPATH"] = str(bench.ROOT)
    single = args.messages // 5
    rows: list[tuple[str, str, str, str, str]] = []

    def servers(server: Any) -> tuple[str, str, str, str, str]:
        many = bench.closed_loop(server, args.messages, 20, 2000)
        one = bench.closed_loop(server, single, 1, 2000)
        p50 = bench.latency(server, 500, 2000, None).p50_ms
        return (
            server.name,
            f"{many.delivered_rate:,.0f}",
            f"{many.cpu_ms:.2f}",
            f"{one.delivered_rate:,.0f}",
            f"{p50:.2f}",
        )

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sink = bench.Sink(folder)
        try:
            with bench.postfix(sink) as server:
                bench.closed_loop(server, 500, 20, 2000)
                rows.append(servers(server))
            with bench.relay(folder, sink, None) as server:
                bench.closed_loop(server, 500, 20, 2000)
                _, *rest = servers(server)
                rows.append((f"dedup-relay ({server.processes} workers)", *rest))
            bare = bare_front_door(args.messages, args.processes)
            rows.append(
                (
                    f"aiosmtpd alone: 250 to all, nothing stored or sent ({args.processes} proc.)",
                    f"{bare['rate20']:,.0f} accepted",
                    f"{bare['cpu20']:.2f}",
                    f"{bare['rate1']:,.0f} accepted",
                    f"{bare['p50']:.2f}",
                )
            )
            for flag, name in (
                ("--front-door", "the relay's front door: 250 to all, nothing stored"),
                ("--minimal", "one asyncio.Protocol: 250 to all, no checks"),
            ):
                found = bare_front_door(args.messages, args.processes, flag)
                rows.append(
                    (
                        f"{name} ({args.processes} proc.)",
                        f"{found['rate20']:,.0f} accepted",
                        f"{found['cpu20']:.2f}",
                        f"{found['rate1']:,.0f} accepted",
                        f"{found['p50']:.2f}",
                    )
                )
            client = bare_client(sink.port, args.messages)
            rows.append(("aiosmtplib alone: sending to smtp-sink", "", f"{client:.2f}", "", ""))
        finally:
            sink.stop()
        p50, p99 = bare_commit(folder, 1000)
        rows.append(("SQLite alone: 2 KB row, COMMIT (WAL, FULL)", "", "", "", f"{p50:.2f}"))

    print(f"vm: {os.cpu_count()} CPUs; load {bench.load_average()}; 2,000 B messages")
    print("| part | msg/s, 20 sessions | CPU ms/msg | msg/s, 1 session | accept p50 ms |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"SQLite COMMIT p99: {p99:.2f} ms")


if __name__ == "__main__":
    main()
