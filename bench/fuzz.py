"""Benchmark: a long fuzz of the front door, with a count of the inputs tried.

Random SMTP sessions (command lines, random DATA bytes, random MIME) go to a relay
running as its own process, exactly as in tests/test_fuzz.py but many more. For
each session: every command answered, no internal error, every 250 backed by the
store, a second session still served; at the end the relay must still be alive.

    python bench/fuzz.py [--sessions 3000] [--seconds 600] [--seed N]

Prints sessions, command lines, transactions, DATA payloads and 250s checked.
Everything binds 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.smtp_fuzz import (  # noqa: E402
    Session,
    Transaction,
    check_stored,
    send_control,
    sessions,
)

BATCH = 100  # sessions per hypothesis run; runs repeat until the count or the time is reached


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_relay(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = {
        "listen": {"port": port, "hostname": "fuzz.test", "max_message_size": "64KB"},
        "upstream": {"url": f"maildir:{folder / 'maildir'}"},
        "store": {"path": str(folder / "relay.db")},
        "audit": {"output": "none"},
        "runtime": {"instance": "fuzz", "log_level": "error"},
    }
    path = folder / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (folder / "stderr.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("relay exited during start:\n" + (folder / "stderr.log").read_text())
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    raise SystemExit("relay did not start listening")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=3000, help="random sessions to try")
    parser.add_argument("--seconds", type=float, default=600.0, help="stop after this long")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed, to replay")
    args = parser.parse_args()

    counts: collections.Counter[str] = collections.Counter()
    promised: list[str] = []
    controls = itertools.count()
    with tempfile.TemporaryDirectory(prefix="relay-fuzz-") as tmp:
        folder = Path(tmp)
        proc, port = start_relay(folder)
        started = time.monotonic()
        stop_at = started + args.seconds

        @settings(
            max_examples=BATCH,
            deadline=None,
            database=None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(steps=sessions)
        def one_session(steps: list[bytes | Transaction]) -> None:
            counts["sessions"] += 1
            for step in steps:
                if isinstance(step, Transaction):
                    counts["transactions"] += 1
                    counts["data bytes"] += len(step.data)
                else:
                    counts["command lines"] += 1
            control = Session(port)
            try:
                fuzz = Session(port)
                try:
                    outcome = fuzz.run(steps)
                finally:
                    fuzz.close()
                counts["replies checked"] += len(outcome.replies)
                counts["250s to DATA"] += len(outcome.stored)
                promised.extend(outcome.stored)
                reply = send_control(control, next(controls))
                promised.append(reply.split("queued as ", 1)[1].split()[0])
            finally:
                control.close()
            assert proc.poll() is None, "the relay died"

        outcome = "ok"
        batch = 0
        try:
            while counts["sessions"] < args.sessions and time.monotonic() < stop_at:
                run = one_session if args.seed is None else seed(args.seed + batch)(one_session)
                run()
                batch += 1
        except Exception as exc:  # a finding: report it and the counts so far
            outcome = f"FAILED: {type(exc).__name__}: {exc}"
        elapsed = time.monotonic() - started
        try:
            check_stored(folder / "relay.db", promised)
            counts["250s verified in the store"] = len(set(promised))
        except AssertionError as exc:
            outcome = f"FAILED: {exc}"
        alive = proc.poll() is None
        proc.terminate()
        proc.wait(30)
        print(f"fuzz: {outcome}; relay alive to the end: {alive}")
        print(f"elapsed: {elapsed:.1f}s, {counts['sessions'] / max(elapsed, 1e-9):.1f} sessions/s")
        for name in (
            "sessions",
            "command lines",
            "transactions",
            "data bytes",
            "replies checked",
            "250s to DATA",
            "250s verified in the store",
        ):
            print(f"  {name:<28} {counts[name]:>10,}")
        return 0 if outcome.startswith("ok") and alive else 1


if __name__ == "__main__":
    raise SystemExit(main())
