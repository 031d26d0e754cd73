"""The event loop the relay runs on: uvloop where it is installed, else asyncio's own.

uvloop (libuv under asyncio's API) runs the same code with less CPU per
connection and per write. It is an optional extra (`pip install
'dedup-relay[uvloop]'`, in the Docker image) rather than a dependency, so the relay
still installs where no wheel exists; `serve` takes it whenever it is importable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

__all__ = ["LoopChoice", "loop_factory", "loop_name", "run"]

T = TypeVar("T")
LoopChoice = Literal["auto", "asyncio", "uvloop"]


def loop_factory(choice: LoopChoice = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for `asyncio.Runner`, or None for asyncio's default loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            from relay.errors import ConfigError

            raise ConfigError(
                "runtime.event_loop: uvloop is not installed (pip install 'dedup-relay[uvloop]')"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    module = type(loop).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], choice: LoopChoice = "auto") -> T:
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
