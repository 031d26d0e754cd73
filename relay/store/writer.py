"""Group commit: many callers' jobs, one transaction and one durable commit per batch.

Intake and delivery queue jobs; the writer takes everything waiting (up to a
limit) and hands it to the backend's batch runner, which runs the jobs in one
transaction, keeps out any job that fails, and commits once. One fsync then
answers many SMTP sessions, which is what lets durability keep up with them.

The writer knows nothing of SQL. The runner reports each job's result or error
and the events the surviving jobs recorded; the writer resolves each caller's
future and passes the events on only after the commit. A runner that raises
has committed nothing, and every job of that batch fails with `StoreError`.

A backend whose writers take turns with other processes (SQLite's `-writer` lock) waits for
its turn after the first job of a batch arrives and before the batch is taken (`turn`), so
that everything queued while it waited joins that batch; its runner gives the turn back.
While one worker process commits, the other's jobs gather into one larger batch instead of
a batch of one that waits and the rest that follow.

A store that stops committing (a full disk, a read-only file) fails every batch
until it recovers, and callers try again every second or so. The writer logs one
line when commits start failing, one when the reason changes and one when they
succeed again (`Condition`); the callers log no traceback of their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, NamedTuple, TypeVar

from relay.audit import Event
from relay.errors import StoreError, StoreUnavailable

__all__ = ["BATCH_LIMIT", "BatchResult", "Condition", "GroupCommit", "Outcome"]

log = logging.getLogger(__name__)

T = TypeVar("T")
J = TypeVar("J")

BATCH_LIMIT = 512

# One job's result, or the exception that kept its writes out of the commit.
Outcome = tuple[Any, BaseException | None]


class BatchResult(NamedTuple):
    """Each job's outcome, the events the surviving jobs recorded, and whether it wrote.

    A commit that changed nothing (an idle poll) proves nothing about a full disk, so
    only one that `wrote` ends a failing spell.
    """

    outcomes: list[Outcome]
    events: list[Event]
    wrote: bool = True


class Condition:
    """Whether the store commits, logged once per change rather than once per failure."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.problem: str | None = None
        self._since = 0.0
        self._failures = 0

    def failed(self, reason: str) -> None:
        if reason != self.problem:
            if self.problem is None:
                self._since = self._clock()
                self._failures = 0
            log.error(
                "store: cannot commit: %s; mail is refused with 451 and delivery waits"
                " until it can (said once, not per attempt)",
                reason,
            )
            self.problem = reason
        self._failures += 1

    def committed(self) -> None:
        if self.problem is None:
            return
        log.warning(
            "store: commits again after %.1fs (%d failed attempt(s) meanwhile)",
            self._clock() - self._since,
            self._failures,
        )
        self.problem = None


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
        outage: Callable[[BaseException], bool] = lambda error: False,
        turn: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`outage` says whether a job's error is the store's (a full disk), not the job's;
        `turn` is awaited before each batch is taken (see the module's docstring)."""
        self._run_batch = run_batch
        self._turn = turn
        self._outage = outage
        self.condition = Condition()
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
    def queued(self) -> int:
        """Jobs waiting for a batch."""
        return self._jobs.qsize()

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
            raise StoreUnavailable("store is not open")
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
            first = await self._jobs.get()
            refused: Exception | None = None
            if first is not None and self._turn is not None:
                try:
                    await self._turn()
                except Exception as exc:  # the batch fails as if its commit had
                    refused = exc
            batch, stopping = self._take(first)
            if batch:
                await self._commit(batch, refused)

    async def _commit(
        self, batch: list[tuple[J, asyncio.Future[Any]]], refused: Exception | None = None
    ) -> None:
        started = time.perf_counter()
        try:
            if refused is not None:
                raise refused
            outcomes, events, wrote = await self._run_batch([job for job, _ in batch])
        except Exception as exc:
            self.failed_batches += 1
            self.condition.failed(str(exc))
            unavailable = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(str(exc))
            for _, future in batch:
                if not future.done():
                    # One instance per caller, as each raises it on its own; a backend's own
                    # kind (it says whether anything was stored) is kept.
                    future.set_exception(type(unavailable)(str(unavailable)))
            return
        self.batches += 1
        self.jobs_run += len(batch)
        if self._on_batch is not None:
            self._on_batch(len(batch), time.perf_counter() - started)
        outage = None
        for (_, future), (result, error) in zip(batch, outcomes, strict=True):
            failure: StoreError | None = None
            if error is not None and (isinstance(error, StoreUnavailable) or self._outage(error)):
                outage = str(error)
                failure = error if isinstance(error, StoreUnavailable) else StoreUnavailable(outage)
            elif error is not None:
                log.error("store job failed: %r", error)
                failure = error if isinstance(error, StoreError) else StoreError(str(error))
            if future.done():
                continue
            if failure is None:
                future.set_result(result)
            else:
                future.set_exception(failure)
        if outage is None and wrote:
            self.condition.committed()
        elif outage is not None:
            self.condition.failed(outage)
        if self._on_commit is not None and events:
            self._on_commit(events)
