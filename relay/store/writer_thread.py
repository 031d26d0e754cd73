"""The SQLite writer's own thread: calls run one at a time, in order, answered on the loop.

`loop.run_in_executor` on a one-thread `ThreadPoolExecutor` did this with a
`concurrent.futures.Future`, a work item, a lock and condition, and a chained asyncio
future per call: about 4 % of the relay's Python time at one session, spent on every
store batch. Here a call is a queue entry and one `call_soon_threadsafe` back.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["WriterThread"]

T = TypeVar("T")

_Call = tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any], asyncio.AbstractEventLoop]


def _answer(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile; the call still ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class WriterThread:
    """One thread, started on the first call; `shutdown` runs what was queued, then ends it."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._lock = threading.Lock()
        self._shut = False

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the thread, after every call queued before it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._shut:
                raise RuntimeError("the store's writer thread has been shut down")
            if self._thread.ident is None:
                self._thread.start()
            self._calls.put((fn, args, future, loop))
        return await future

    def shutdown(self) -> None:
        with self._lock:
            if self._shut:
                return
            self._shut = True
            started = self._thread.ident is not None
            if started:
                self._calls.put(None)
        if started:
            self._thread.join()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, args, future, loop = call
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the caller
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
                loop.call_soon_threadsafe(_answer, future, result, error)
