"""Group commit: many callers' jobs, one transaction and one durable commit per batch.

Intake and delivery queue jobs; the writer takes everything waiting (up to a
limit) and hands it to the backend's batch runner, which runs the jobs in one
transaction, each inside its own savepoint, and commits once. One fsync then
answers many SMTP sessions, which is what lets durability keep up with them.

The writer knows nothing of SQL. The runner reports each job's result or error
and the events the surviving jobs recorded; the writer resolves each caller's
future and passes the events on only after the commit. A runner that raises
has committed nothing, and every job of that batch fails with `StoreError`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from relay.audit import Event
from relay.errors import StoreError

__all__ = ["BATCH_LIMIT", "BatchResult", "GroupCommit", "Outcome"]

log = logging.getLogger(__name__)

T = TypeVar("T")
J = TypeVar("J")

BATCH_LIMIT = 512

# One job's result, or the exception that rolled it back to its savepoint.
Outcome = tuple[Any, BaseException | None]
BatchResult = tuple[list[Outcome], list[Event]]


class GroupCommit(Generic[J]):
    """A queue of jobs of type `J` and the task that runs them in batches."""

    def __init__(
        self,
        run_batch: Callable[[list[J]], Awaitable[BatchResult]],
        *,
        limit: int = BATCH_LIMIT,
        on_commit: Callable[[list[Event]], None] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "store-writer",
    ) -> None:
        self._run_batch = run_batch
        self._limit = limit
        self._on_commit = on_commit
        self._on_batch = on_batch
        self._name = name
        self._jobs: asyncio.Queue[tuple[J, asyncio.Future[Any]] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.jobs_run = 0
        self.failed_batches = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        """Run what is already queued, then stop."""
        if self._task is not None:
            await self._jobs.put(None)
            await self._task
            self._task = None

    def submit(self, job: J) -> asyncio.Future[Any]:
        """Queue `job` now; the future resolves once its batch has committed (or failed)."""
        if not self.running:
            raise StoreError("store is not open")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait((job, future))
        return future

    async def run(self, job: J) -> Any:
        return await self.submit(job)

    def _take(
        self, first: tuple[J, asyncio.Future[Any]] | None
    ) -> tuple[list[tuple[J, asyncio.Future[Any]]], bool]:
        """Everything already waiting, up to the limit, and whether a stop was asked for."""
        batch: list[tuple[J, asyncio.Future[Any]]] = []
        item = first
        while True:
            if item is None:
                return batch, True
            batch.append(item)
            if len(batch) >= self._limit or self._jobs.empty():
                return batch, False
            item = self._jobs.get_nowait()

    async def _loop(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._take(await self._jobs.get())
            if batch:
                await self._commit(batch)

    async def _commit(self, batch: list[tuple[J, asyncio.Future[Any]]]) -> None:
        started = time.perf_counter()
        try:
            outcomes, events = await self._run_batch([job for job, _ in batch])
        except Exception as exc:
            self.failed_batches += 1
            log.error("store: batch of %d not committed: %s", len(batch), exc)
            for _, future in batch:
                if not future.done():
                    # A backend's own StoreError (it says whether anything was stored) keeps
                    # its type; one instance per caller, as each raises it on its own.
                    if isinstance(exc, StoreError):
                        future.set_exception(type(exc)(str(exc)))
                    else:
                        future.set_exception(StoreError(f"store unavailable: {exc}"))
            return
        self.batches += 1
        self.jobs_run += len(batch)
        if self._on_batch is not None:
            self._on_batch(len(batch), time.perf_counter() - started)
        for (_, future), (result, error) in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if error is None:
                future.set_result(result)
                continue
            log.error("store job failed: %r", error)
            future.set_exception(error if isinstance(error, StoreError) else StoreError(str(error)))
        if self._on_commit is not None and events:
            self._on_commit(events)
