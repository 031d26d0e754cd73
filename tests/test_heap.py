"""The serving process's garbage collector: start-up frozen, the young collected less often."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from relay import heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_freezes_what_start_up_made_and_collects_the_young_less_often(
    restored_gc: None,
) -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    garbage = Cycle()
    gone = weakref.ref(garbage)
    del garbage
    kept = Cycle()
    assert gone() is not None  # a cycle: only the collector frees it
    heap.settle()
    assert gc.get_threshold() == heap.THRESHOLD
    assert gc.get_threshold()[0] > 700  # CPython's default
    # Garbage at settle-time was collected, not frozen for the life of the process;
    # what lives was moved out of every later collection's sight.
    assert gone() is None
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())
