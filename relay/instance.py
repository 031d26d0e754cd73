"""One live process per instance name: the row that says who holds it, and when to take it over.

A process's instance name (`runtime.instance`) owns its delivery leases, and at
start-up a relay takes back every lease under its name as left by a crash. That
is right only if no other live process uses the name, so the name is a lock in
the store: a row with the holder's host, pid and a heartbeat. A second `serve` on
the same name is refused while the holder lives. A holder on this host is dead
when its pid is gone (or now belongs to a younger process); on another host, when
its heartbeat is older than `STALE_AFTER`. The store applies `may_take` inside
one transaction (`Store.acquire_instance`), so two starters cannot both win.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from relay.clock import SYSTEM, Clock
from relay.errors import InstanceBusy, StoreError

if TYPE_CHECKING:
    from relay.store import Store

__all__ = [
    "HEARTBEAT_INTERVAL",
    "STALE_AFTER",
    "Instance",
    "InstanceLock",
    "describe",
    "may_take",
    "this_process",
]

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 10.0
# A holder on another host that has not said it lives for this long is taken for dead.
STALE_AFTER = 60.0

# Tokens held by live locks in this very process (tests run several relays in one).
_HELD_HERE: set[str] = set()


@dataclass(frozen=True)
class Instance:
    """Who holds an instance name, as the store keeps it."""

    name: str
    host: str
    pid: int
    token: str  # random per lock: tells this holder from an earlier one with the same pid
    started: str  # the process's start time as the kernel counts it ('' where unknown)
    since: float
    heartbeat: float


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 3 on), [] if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()
    except OSError:
        return []


def _process_start(pid: int) -> str:
    """Field 22 of /proc/PID/stat: with the pid, it names one process, not a reused pid."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else ""


def _exited(pid: int) -> bool:
    """A zombie (or dead) process holds nothing: it has exited and waits to be reaped.

    Workers killed with their parent (`serve --workers N` after `kill -9`) are orphans that
    init reaps when it gets to them; until then their pid still answers `kill(pid, 0)`.
    """
    fields = _stat(pid)
    return bool(fields) and fields[0] in ("Z", "X")


def this_process(name: str, now: float) -> Instance:
    pid = os.getpid()
    return Instance(
        name=name,
        host=socket.gethostname(),
        pid=pid,
        token=secrets.token_hex(8),
        started=_process_start(pid),
        since=now,
        heartbeat=now,
    )


def _alive(holder: Instance) -> bool:
    """Whether the holder's process still runs on this host."""
    if holder.token in _HELD_HERE:
        return True
    if holder.pid == os.getpid():
        return False  # a predecessor with our pid: a restarted container
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    if _exited(holder.pid):
        return False
    return not holder.started or _process_start(holder.pid) in ("", holder.started)


def may_take(holder: Instance | None, me: Instance, stale_after: float = STALE_AFTER) -> bool:
    """Whether `me` may take the name from `holder` (None: nobody holds it).

    On this host the process table is the truth, whatever the heartbeat says: a
    holder stalled on a full disk is still alive. Elsewhere only the heartbeat tells.
    """
    if holder is None or holder.token == me.token:
        return True
    if holder.host == me.host:
        return not _alive(holder)
    return holder.heartbeat < me.heartbeat - stale_after


def describe(holder: Instance) -> str:
    return f"pid {holder.pid} on {holder.host}"


class InstanceLock:
    """This process's hold on its instance name, from start-up to shutdown.

    `on_lost` is called if another process took the name over (this one looked dead
    to it); the relay then stops, as two processes must not share leases.
    """

    def __init__(
        self,
        store: Store,
        name: str,
        *,
        clock: Clock = SYSTEM,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.clock = clock
        self._on_lost = on_lost
        self.me: Instance | None = None
        self._task: asyncio.Task[None] | None = None

    async def acquire(self) -> None:
        """Take the name, or raise InstanceBusy naming the live holder."""
        me = this_process(self.name, self.clock.time())
        holder = await self.store.acquire_instance(me, STALE_AFTER)
        if holder.token != me.token:
            raise InstanceBusy(
                f"instance {self.name!r} is already running ({describe(holder)}) on this store;"
                " give each process sharing a store its own name (--instance NAME or"
                " runtime.instance)"
            )
        self.me = me
        _HELD_HERE.add(me.token)
        self._task = asyncio.create_task(self._heartbeat(), name="instance-heartbeat")

    async def _heartbeat(self) -> None:
        while self.me is not None:
            await self.clock.sleep(HEARTBEAT_INTERVAL)
            now = self.clock.time()
            try:
                held = await self.store.heartbeat_instance(self.me, now)
            except StoreError:
                continue  # the store's own log says why; a holder on this host stays alive
            if not held:
                reason = (
                    f"instance {self.name!r} was taken over by another process while this one"
                    " could not reach the store; stopping, as two processes must not share it"
                )
                log.critical("%s", reason)
                _HELD_HERE.discard(self.me.token)
                self.me = None
                if self._on_lost is not None:
                    self._on_lost(reason)
                return
            self.me = replace(self.me, heartbeat=now)

    async def release(self) -> None:
        """Give the name up (clean shutdown), so the next start needs no wait."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        me, self.me = self.me, None
        if me is None:
            return
        _HELD_HERE.discard(me.token)
        with contextlib.suppress(StoreError):
            await self.store.release_instance(me)
