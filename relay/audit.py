"""The audit vocabulary and the JSON-lines emitter.

Events are written to the store in the same transaction as the state change they
describe, and only after that commit are they printed for log shippers, so the
stream never claims something the store does not hold.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from relay.errors import OpenError

__all__ = ["EVENTS", "FIELDS", "Emitter", "Event", "iso_time", "to_json"]

EVENTS = (
    "received",
    "duplicate",
    "conflict",
    "rejected",
    "delivered",
    "deferred",
    "failed",
    "expired",
    "ambiguous",
    "released",
    "requeued",
    "auth_failed",
    "rate_limited",
    "failover",
)


@dataclass(frozen=True)
class Event:
    """One audit record.

    `original` names the first message a duplicate or conflict refers to, and `action` what was
    done about it: drop, reject, tag or shadow for a duplicate; reject, drop or forward for a
    conflict. Only drop and reject keep a repeat from the upstream.
    """

    ts: float
    event: str
    queue_id: str | None = None
    key: str | None = None
    strategy: str | None = None
    message_id: str | None = None
    sender: str | None = None
    rcpts: tuple[str, ...] = ()
    size: int | None = None
    client: str | None = None
    user: str | None = None
    upstream: str | None = None
    code: int | None = None
    reply: str | None = None
    upstream_id: str | None = None
    duration: float | None = None
    original: str | None = None
    action: str | None = None
    detail: str | None = None


FIELDS = tuple(Event.__dataclass_fields__)
# What json.dumps(..., ensure_ascii=False) builds on every call, built once: the same text.
_ENCODER = json.JSONEncoder(ensure_ascii=False)


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_json(event: Event) -> dict[str, Any]:
    # Every field is a scalar or a tuple of strings: a shallow copy, not asdict's deep one.
    record = {name: getattr(event, name) for name in FIELDS}
    record["ts"] = iso_time(event.ts)
    record["rcpts"] = list(event.rcpts)
    if event.duration is not None:
        record["duration"] = round(event.duration, 3)
    return record


class Emitter:
    """Writes committed events as one JSON object per line to stdout, a file, or nowhere."""

    def __init__(self, output: str) -> None:
        self._lock = threading.Lock()
        self._own: TextIO | None = None
        self._out: TextIO | None
        if output == "none":
            self._out = None
        elif output == "stdout":
            self._out = sys.stdout
        else:
            try:
                self._own = Path(output).open("a", encoding="utf-8", buffering=1)  # noqa: SIM115
            except OSError as exc:
                raise OpenError.failed("the audit log", output, "audit.output", exc) from None
            self._out = self._own

    def emit(self, events: list[Event]) -> None:
        if self._out is None or not events:
            return
        encode = _ENCODER.encode
        text = "".join(encode(to_json(e)) + "\n" for e in events)
        with self._lock:
            try:
                self._out.write(text)
                self._out.flush()
            except (OSError, ValueError):
                pass  # a closed stdout must not stop mail; the store holds the record

    def close(self) -> None:
        if self._own is not None:
            self._own.close()
