"""Fingerprint time against MIME nesting depth: the stdlib's parser and the relay's.

The stdlib's feedparser tries every line against every open boundary, so a message
nested D deep with L delimiter-like lines costs D x L pattern matches. The relay's
input (`relay.fingerprint._LinearInput`) tries only the boundary a line names.

    python bench/fingerprint_depth.py [--lines 100000]
"""

from __future__ import annotations

import argparse
import email
import time
from collections.abc import Callable

from relay import fingerprint


def nested(depth: int, lines: int) -> bytes:
    head = b"From: a@example.com\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"
    tail = b""
    for level in range(depth):
        mark = b"b%d" % level
        head += b'Content-Type: multipart/mixed; boundary="%s"\r\n\r\n--%s\r\n' % (mark, mark)
        tail = b"\r\n--" + mark + b"--\r\n" + tail
    return head + b"Content-Type: text/plain\r\n\r\n" + b"--x\r\n" * lines + tail


def timed(parse: Callable[[bytes], object], data: bytes) -> float:
    """The best of three runs, so another process on the machine weighs less."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        parse(data)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    print(f"{'depth':>6} {'bytes':>9} {'stdlib s':>9} {'relay s':>8}")
    for depth in (1, 64, 150, fingerprint.MAX_DEPTH - 1):
        data = nested(depth, args.lines)
        stdlib = timed(lambda d: email.message_from_bytes(d, policy=fingerprint._POLICY), data)
        relay = timed(fingerprint._parse, data)
        print(f"{depth:>6} {len(data):>9} {stdlib:>9.2f} {relay:>8.2f}")


if __name__ == "__main__":
    main()
