"""Liveness and readiness: what an orchestrator needs to restart the relay or route to it.

Alive means the event loop answers, the store's writer runs and the process is not shutting
down: restarting would help only when one of those fails. Ready means mail sent now would
get a 250: the SMTP port is listening, the store commits a write within a short deadline, and
the process is not draining. On SIGTERM readiness fails first, so traffic moves elsewhere
before the port closes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from relay.store import Store, StoreError

__all__ = ["OK", "WRITE_DEADLINE", "Health", "Verdict"]

OK = "ok"
# A commit normally takes milliseconds; two seconds means the disk or a lock holds it up.
WRITE_DEADLINE = 2.0


@dataclass(frozen=True)
class Verdict:
    """Each check's result, `ok` or why not."""

    status: str
    checks: Mapping[str, str]

    @classmethod
    def judge(cls, checks: Mapping[str, str], *, good: str, bad: str) -> Verdict:
        """Status `good` when every check is ok, else `bad`."""
        return cls(good if all(result == OK for result in checks.values()) else bad, checks)

    @property
    def ok(self) -> bool:
        return all(result == OK for result in self.checks.values())

    @property
    def failing(self) -> tuple[str, ...]:
        return tuple(name for name, result in self.checks.items() if result != OK)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "failing": list(self.failing), "checks": dict(self.checks)}


class Health:
    def __init__(
        self,
        *,
        listening: Callable[[], bool],
        store: Store,
        write_deadline: float = WRITE_DEADLINE,
    ) -> None:
        self._listening = listening
        self._store = store
        self.write_deadline = write_deadline
        self.draining = False

    def _shutdown(self) -> str:
        return "shutting down" if self.draining else OK

    def live(self) -> Verdict:
        checks = {
            "shutdown": self._shutdown(),
            "store": OK if self._store.running else "the store writer has stopped",
        }
        return Verdict.judge(checks, good="alive", bad="not alive")

    async def ready(self) -> Verdict:
        checks = {
            "shutdown": self._shutdown(),
            "smtp": OK if self._listening() else "the SMTP port is not listening",
        }
        if self._store.lost is not None:
            checks["store"] = self._store.lost
        elif not self.draining:  # a store about to close is not worth a write
            checks["store"] = await self._store_write()
        return Verdict.judge(checks, good="ready", bad="not ready")

    async def _store_write(self) -> str:
        try:
            await asyncio.wait_for(self._store.probe(time.time()), self.write_deadline)
        except TimeoutError:
            return f"no write committed within {self.write_deadline:g}s"
        except StoreError as exc:
            return f"write failed: {exc}"
        return OK
