"""Queue ids: the same shape as ever, and never the same random tail in two processes."""

from __future__ import annotations

import os
import re

from relay import ids

TAIL = 8
SHAPE = re.compile(r"[0-9BCDFGHJKLMNPQRSTVWXYZ]+")


def tails(count: int) -> list[str]:
    return [ids.new_queue_id(0.0)[-TAIL:] for _ in range(count)]


def test_a_queue_id_is_base31_milliseconds_then_eight_random_digits() -> None:
    queue_id = ids.new_queue_id(1_700_000_000.123)
    assert SHAPE.fullmatch(queue_id)
    assert len(queue_id) == 9 + TAIL
    assert ids.queue_id_time(queue_id) == 1_700_000_000.123
    # The tail keeps its leading zeros, so the time always ends where the tail begins.
    assert all(len(ids.new_queue_id(0.0)) == TAIL for _ in range(200))
    assert ids.new_queue_id(0.031).startswith("10")


def test_a_forked_child_draws_tails_the_parent_never_does() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its draws go to the parent, then it leaves at once
        try:
            os.write(write_end, ",".join(tails(200)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    parent = tails(200)
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read().decode().split(",")
    os.waitpid(pid, 0)
    assert len(child) == 200
    assert not set(child) & set(parent)


def test_reseeding_starts_a_new_sequence() -> None:
    state = ids._random.getstate()
    first = tails(50)
    ids._random.setstate(state)
    assert tails(50) == first  # the same state repeats itself...
    ids._random.setstate(state)
    ids.reseed()
    assert not set(tails(50)) & set(first)  # ...and a reseed leaves it
