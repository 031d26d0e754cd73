"""Benchmark: the relay against Postfix on the same machine, same load, same sink.

    smtp-source / latency client --> dedup-relay --> smtp-sink
    smtp-source / latency client --> Postfix     --> smtp-sink

Both run side by side and take turns, one scenario at a time, so both see the
same machine. The relay runs as a new user would start it: `serve` with its
default config apart from the upstream URL (dedupe on, durable spool, as many
worker processes as CPUs). Prints one table:

- delivered msg/s at 20 sessions and at 1 session, a new connection per message
  (smtp-source), and the ratio relay/Postfix;
- CPU per message: user + system time of every process of each server (the relay's
  parent and workers; Postfix's master and all its daemons), read from /proc;
- accept latency (the final "." to the 250, which for both is a durable commit)
  at 1 session and under an open-loop load of 200 msg/s (each on a new connection);
- identical sends: how many of N copies of one message reached the sink (must be 1);
- resident memory of one relay process holding 1,000 idle SMTP sessions.

    python bench/throughput.py [--messages 5000] [--size 2000] [--workers N] [--no-postfix]
                               [--rounds N]

`--rounds N` runs each scenario N times for each server, in turn (relay first, then
Postfix first, ...), and prints the median of each figure, with the range of the
per-round ratios: on a host whose speed drifts from one minute to the next, a ratio
taken within one round is fairer than either rate alone.

Needs Debian's postfix package (smtp-source, smtp-sink, and a private Postfix, which
runs as root). Everything binds 127.0.0.1. Machine load is printed with every
figure, since other work on a shared machine moves them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
SENDER = "app@example.com"
RCPT = "user@example.org"
SESSION_DEADLINE = 60.0  # seconds for one open-loop message, greeting to QUIT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, deadline: float = 30.0) -> None:
    until = time.monotonic() + deadline
    while time.monotonic() < until:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise SystemExit(f"nothing listening on 127.0.0.1:{port}")


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# --- /proc: CPU and memory of a process tree --------------------------------------


def stat(pid: int) -> tuple[int, float, float, float] | None:
    """(parent pid, user seconds, system seconds, seconds of the children it has reaped)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    reaped = (int(fields[13]) + int(fields[14])) / TICK
    return int(fields[1]), int(fields[11]) / TICK, int(fields[12]) / TICK, reaped


def tree(root: int) -> dict[int, float]:
    """CPU seconds of `root` and every live descendant, each with the children it has reaped."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = stat(int(entry))
            if found is not None:
                parent, user, system, reaped = found
                parents[int(entry)], cpu[int(entry)] = parent, user + system + reaped
    members = {root}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in members and pid not in members:
                members.add(pid)
                grew = True
    return {pid: cpu[pid] for pid in members if pid in cpu}


class CpuMeter:
    """CPU used by a process tree between start() and stop(), processes born meanwhile too.

    Postfix's smtpd and cleanup exit after 100 connections (`max_use`), so with a new
    connection per message they come and go during a run. The master reaps them, and the
    kernel adds their whole CPU to its count of reaped children: a process gone by stop()
    is counted there, less what it had spent before start().
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self._before: dict[int, float] = {}

    def start(self) -> None:
        self._before = tree(self.root)

    def stop(self) -> float:
        after = tree(self.root)
        grown = sum(cpu - self._before.get(pid, 0.0) for pid, cpu in after.items())
        return grown - sum(cpu for pid, cpu in self._before.items() if pid not in after)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- the sink -------------------------------------------------------------------


class Sink:
    """smtp-sink counting messages; its -c counter is the only thing read back."""

    def __init__(self, folder: Path, name: str = "") -> None:
        self.port = free_port()
        self.out = folder / f"sink-{name or self.port}.txt"
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{self.port}", "1000"],
            stdout=self.out.open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_port(self.port)

    def count(self) -> int:
        found = re.findall(rb"mesg=(\d+)", self.out.read_bytes()[-200:])
        return int(found[-1]) if found else 0

    def wait_for(self, count: int, deadline: float = 600.0) -> float:
        until = time.monotonic() + deadline
        while self.count() < count:
            if time.monotonic() > until:
                raise SystemExit(f"sink has {self.count()} of {count} messages")
            time.sleep(0.005)
        return time.monotonic()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# --- the servers ----------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    root: int  # pid whose process tree is the server
    sink: Sink
    processes: int = 1


@contextmanager
def relay(
    folder: Path, sink: Sink, workers: int | None, extra: dict[str, Any] | None = None
) -> Iterator[Server]:
    """`serve` with the defaults, apart from the upstream URL (and a port and a store path).

    `extra` adds top-level config sections (`upstreams`; keys of `listen` are merged)."""
    port = free_port()
    extra = dict(extra or {})
    config = {
        "listen": {"port": port, **extra.pop("listen", {})},
        "upstream": {"url": f"smtp://127.0.0.1:{sink.port}"},
        "store": {"path": str(folder / "relay.db")},
        **extra,
    }
    path = folder / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "relay", "serve", "--config", str(path)]
    if workers is not None:
        command += ["--workers", str(workers)]
    # The default audit output is JSON lines on stdout and logs on stderr: both to files.
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=(folder / "audit.jsonl").open("ab"),
        stderr=(folder / "relay.log").open("ab"),
    )
    try:
        wait_port(port)
        # Until the process tree has stopped growing: every worker forked and listening.
        seen, steady = 0, time.monotonic()
        while time.monotonic() - steady < 1.0:
            now = len(tree(proc.pid))
            if now != seen:
                seen, steady = now, time.monotonic()
            time.sleep(0.05)
        yield Server("dedup-relay", port, proc.pid, sink, max(len(tree(proc.pid)) - 1, 1))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def postfix(sink: Sink) -> Iterator[Server]:
    sys.path.insert(0, str(ROOT))
    from tests.mta import Postfix  # the test harness knows how to run a private Postfix

    with Postfix(relayhost=sink.port, name="bench") as server:
        assert server._master_pid is not None
        yield Server("Postfix", server.port, server._master_pid, sink)


# --- load -----------------------------------------------------------------------


def load(port: int, messages: int, sessions: int, size: int, fixed: Path | None = None) -> float:
    """smtp-source to the end; returns when it began (time.monotonic)."""
    command = ["smtp-source", "-s", str(sessions), "-m", str(messages)]
    command += ["-f", SENDER, "-t", RCPT, "-M", "bench.example"]
    command += ["-F", str(fixed)] if fixed is not None else ["-l", str(size)]
    began = time.monotonic()
    subprocess.run([*command, f"127.0.0.1:{port}"], check=True)
    return began


def require_tools() -> None:
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install -y postfix")


@dataclass
class Run:
    delivered_rate: float = 0.0
    accepted_rate: float = 0.0
    cpu_ms: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    refused: int = 0  # sends that got no 250 (a busy server's 421, a reset)
    load: str = field(default_factory=load_average)


def closed_loop(server: Server, messages: int, sessions: int, size: int) -> Run:
    """smtp-source at `sessions`, a new connection per message; until the sink has them all."""
    meter = CpuMeter(server.root)
    base = server.sink.count()
    meter.start()
    began = load(server.port, messages, sessions, size)
    accepted = time.monotonic()
    delivered = server.sink.wait_for(base + messages)
    cpu = meter.stop()
    return Run(
        delivered_rate=messages / (delivered - began),
        accepted_rate=messages / (accepted - began),
        cpu_ms=cpu / messages * 1000,
    )


def message_bytes(n: int, size: int) -> bytes:
    line = b"X" * 76 + b"\r\n"
    body = line * max(size // len(line), 1)
    return (
        f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: latency {n}\r\n"
        f"Message-ID: <lat-{os.getpid()}-{time.time_ns()}-{n}@bench.example>\r\n\r\n"
    ).encode() + body


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line


async def one_message(port: int, n: int, size: int) -> float:
    """One message on its own connection; seconds from the final "." to its reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        greeting = await _reply(reader)
        if not greeting.startswith(b"220"):
            raise RuntimeError(f"greeting: {greeting!r}")
        for command in (
            b"EHLO bench.example\r\n",
            f"MAIL FROM:<{SENDER}>\r\n".encode(),
            f"RCPT TO:<{RCPT}>\r\n".encode(),
            b"DATA\r\n",
        ):
            writer.write(command)
            reply = await _reply(reader)
            if reply[:1] not in b"23":
                raise RuntimeError(f"{command!r}: {reply!r}")
        writer.write(message_bytes(n, size))
        began = time.perf_counter()
        writer.write(b".\r\n")
        reply = await _reply(reader)
        took = time.perf_counter() - began
        if not reply.startswith(b"250"):
            raise RuntimeError(f"end of DATA: {reply!r}")
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(ConnectionError):
            await _reply(reader)
        return took
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    # Nearest rank: the smallest sample with at least p% of them at or below it.
    return ordered[min(len(ordered), max(math.ceil(p / 100 * len(ordered)), 1)) - 1]


def latency(server: Server, messages: int, size: int, rate: float | None) -> Run:
    """Accept latency, one message at a time (rate None) or open loop at `rate` per second."""

    async def run() -> list[float | BaseException]:
        if rate is None:
            return [await one_message(server.port, n, size) for n in range(messages)]
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for n in range(messages):
            # Open loop: sends start on schedule whether or not earlier ones are answered.
            delay = start + n / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            # A session the server never answers counts as refused, not as a hung benchmark.
            send = asyncio.wait_for(one_message(server.port, n, size), SESSION_DEADLINE)
            tasks.append(asyncio.create_task(send))
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    base = server.sink.count()
    meter = CpuMeter(server.root)
    meter.start()
    results = asyncio.run(run())
    samples = [r for r in results if isinstance(r, float)]
    server.sink.wait_for(base + len(samples))
    cpu = meter.stop()
    return Run(
        cpu_ms=cpu / max(len(samples), 1) * 1000,
        p50_ms=percentile(samples, 50) * 1000,
        p99_ms=percentile(samples, 99) * 1000,
        refused=len(results) - len(samples),
    )


def identical(server: Server, messages: int, folder: Path) -> int:
    fixed = folder / "message.txt"
    fixed.write_text(
        "From: app@example.com\nTo: user@example.org\nSubject: your receipt\n"
        f"Message-ID: <same-receipt-{time.time_ns()}@example.com>\n\nThank you for your order.\n"
    )
    base = server.sink.count()
    load(server.port, messages, 20, 0, fixed)
    server.sink.wait_for(base + 1)
    time.sleep(1.0)  # a benchmark may sleep: anything forwarded late would show here
    return server.sink.count() - base


def idle_sessions(folder: Path, sink: Sink, count: int) -> tuple[float, float, str]:
    """RSS of one relay process before and with `count` idle sessions (banner and EHLO done)."""
    with relay(folder, sink, 1, {"listen": {"max_connections": count + 10}}) as server:
        pid = tree(server.root)
        worker = max(pid, key=lambda p: p != server.root)
        before = rss_mb(worker)

        async def hold() -> float:
            streams = []
            for n in range(count):
                # Several loopback sources, each within max_connections_per_client (50).
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", server.port, local_addr=(f"127.0.0.{2 + n // 40}", 0)
                )
                await _reply(reader)
                writer.write(b"EHLO bench.example\r\n")
                await _reply(reader)
                streams.append(writer)
            await asyncio.sleep(1.0)
            held = rss_mb(worker)
            for writer in streams:
                writer.close()
            return held

        held = asyncio.run(hold())
        return before, held, load_average()


# --- the report -----------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000, help="per throughput run")
    parser.add_argument("--single", type=int, default=1000, help="messages at 1 session")
    parser.add_argument("--size", type=int, default=2000, help="body bytes per message")
    parser.add_argument("--latency", type=int, default=500, help="messages for latency at 1")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop messages/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="open-loop duration")
    parser.add_argument("--idle", type=int, default=1000, help="idle sessions held open")
    parser.add_argument(
        "--workers", type=int, default=None, help="relay --workers (default: its own)"
    )
    parser.add_argument("--no-postfix", action="store_true", help="the relay alone")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each scenario per server")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    require_tools()
    folder = Path(tempfile.mkdtemp(prefix="throughput-"))
    sqlite = __import__("sqlite3").sqlite_version
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs ({_cpu_model()}), Linux {platform.release()},"
        f" Python {platform.python_version()}, SQLite {sqlite}, {_loop()}; load {load_average()}"
    )
    rows: list[tuple[str, str, str, str]] = []
    # SIGTERM (a timeout, a kill) unwinds like Ctrl-C: the servers and sinks are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    relay_sink, postfix_sink = Sink(folder, "relay"), Sink(folder, "postfix")
    try:
        store = folder / "relay"
        store.mkdir()
        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(relay(store, relay_sink, args.workers))]
            if not args.no_postfix:
                servers.append(stack.enter_context(postfix(postfix_sink)))
            print(f"relay: {servers[0].processes} worker process(es); {args.size:,} B messages")
            scenarios = [
                (
                    f"delivered msg/s, 20 sessions ({args.messages:,})",
                    "rate",
                    lambda s: closed_loop(s, args.messages, 20, args.size),
                ),
                (
                    f"delivered msg/s, 1 session ({args.single:,})",
                    "rate",
                    lambda s: closed_loop(s, args.single, 1, args.size),
                ),
                (
                    f"accept latency, 1 session ({args.latency:,})",
                    "latency",
                    lambda s: latency(s, args.latency, args.size, None),
                ),
                (
                    f"accept latency, open loop {args.rate:g}/s",
                    "latency",
                    lambda s: latency(s, int(args.rate * args.seconds), args.size, args.rate),
                ),
            ]
            for label, kind, scenario in scenarios:
                rounds = [_round(scenario, servers, n) for n in range(args.rounds)]
                rows.extend(_rows(label, kind, rounds))
                _flush(rows)
                rows.clear()
            forwarded = identical(servers[0], args.messages, folder)
            rows.append(
                (f"identical sends forwarded ({args.messages:,})", str(forwarded), "", "must be 1")
            )
        before, held, load = (
            idle_sessions(folder / "idle", relay_sink, args.idle)
            if _mkdir(folder / "idle")
            else (0, 0, "")
        )
        rows.append(
            (
                f"RSS of one process, {args.idle:,} idle sessions",
                f"{held:.0f} MB",
                "",
                f"{before:.0f} MB idle; load {load}",
            )
        )
        _flush(rows)
    finally:
        relay_sink.stop()
        postfix_sink.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _mkdir(path: Path) -> bool:
    path.mkdir()
    return True


_printed_header = False


def _flush(rows: list[tuple[str, str, str, str]]) -> None:
    global _printed_header
    if not _printed_header:
        print("| scenario | dedup-relay | Postfix | relay/Postfix, notes |")
        print("| --- | --- | --- | --- |")
        _printed_header = True
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


def _round(scenario: Any, servers: list[Server], n: int) -> list[Run]:
    """One run per server, the relay first in even rounds and last in odd ones."""
    order = range(len(servers)) if n % 2 == 0 else reversed(range(len(servers)))
    runs = {i: scenario(servers[i]) for i in order}
    return [runs[i] for i in range(len(servers))]


def _median(runs: list[Run]) -> Run:
    """Each figure's median over the rounds (the first round's load, every refusal)."""
    if len(runs) == 1:
        return runs[0]
    return Run(
        delivered_rate=statistics.median(r.delivered_rate for r in runs),
        accepted_rate=statistics.median(r.accepted_rate for r in runs),
        cpu_ms=statistics.median(r.cpu_ms for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        refused=sum(r.refused for r in runs),
        load=runs[0].load,
    )


def _spread(rounds: list[list[Run]], ratio: Any, label: str = "rounds") -> str:
    """The per-round ratios' range, when there are several rounds against Postfix."""
    if len(rounds) < 2 or len(rounds[0]) < 2:
        return ""
    ratios = sorted(ratio(relay_run, other) for relay_run, other in rounds)
    return f" ({label} {ratios[0]:.2f} to {ratios[-1]:.2f}x)"


def _rows(label: str, kind: str, rounds: list[list[Run]]) -> list[tuple[str, str, str, str]]:
    runs = [_median([r[i] for r in rounds]) for i in range(len(rounds[0]))]
    relay_run = runs[0]
    other = runs[1] if len(runs) > 1 else None
    load = f"load {relay_run.load}"
    cpu = (
        f"{relay_run.cpu_ms:.2f}",
        f"{other.cpu_ms:.2f}" if other else "",
        load,
    )
    if kind == "rate":
        ratio = f"{relay_run.delivered_rate / other.delivered_rate:.2f}x" if other else ""
        ratio += _spread(rounds, lambda a, b: a.delivered_rate / b.delivered_rate)
        return [
            (
                label,
                f"{relay_run.delivered_rate:,.0f}",
                f"{other.delivered_rate:,.0f}" if other else "",
                ratio,
            ),
            ("  CPU ms per message", *cpu),
        ]
    p50 = f"{relay_run.p50_ms:.2f} / {relay_run.p99_ms:.2f}"
    other_p = f"{other.p50_ms:.2f} / {other.p99_ms:.2f}" if other else ""
    ratio = (
        f"p50 {relay_run.p50_ms / other.p50_ms:.2f}x, p99 {relay_run.p99_ms / other.p99_ms:.2f}x"
        if other
        else ""
    )
    ratio += _spread(rounds, lambda a, b: a.p99_ms / b.p99_ms, "p99 rounds")
    refused = [
        f"{r.refused} of the sends to {name} got no 250"
        for r, name in zip(runs, ("the relay", "Postfix"), strict=False)
        if r.refused
    ]
    if refused:
        ratio += "; " + ", ".join(refused)
    return [(f"{label}: p50 / p99 ms", p50, other_p, ratio), ("  CPU ms per message", *cpu)]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def _loop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio loop (uvloop not installed)"
    return f"uvloop {uvloop.__version__}"


if __name__ == "__main__":
    main()
