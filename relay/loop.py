"""The event loop the relay runs on: uvloop where it is installed, else asyncio's own.

uvloop (libuv under asyncio's API) runs the same code with less CPU per
connection and per write. It is an optional extra (`pip install
'dedup-relay[uvloop]'`, in the Docker image) rather than a dependency, so the relay
still installs where no wheel exists; `serve` takes it whenever it is importable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "run"]

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for `asyncio.Runner`: uvloop's, or None for asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
