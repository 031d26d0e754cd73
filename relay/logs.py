"""Operational logs on stderr: text for a terminal, or JSON lines for a log collector.

Context fields (the queue id a worker is delivering, the client of an SMTP session) are bound
once per task and added to every line logged from it, so no log call has to repeat them.
The audit trail is not a log: it keeps its own stream (relay/audit.py).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType

from relay.audit import iso_time
from relay.escape import LogEscaper

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "bind", "context", "setup"]

CONTEXT_FIELDS = ("queue_id", "client")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_EMPTY: Mapping[str, str] = MappingProxyType({})
_context: ContextVar[Mapping[str, str]] = ContextVar("relay_log_context", default=_EMPTY)


def bind(**fields: str | None) -> None:
    """Set (or with None, clear) context fields for the rest of the current task."""
    merged = dict(_context.get())
    for name, value in fields.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    _context.set(MappingProxyType(merged))


def context() -> Mapping[str, str]:
    return _context.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, context, and exc when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_context.get())
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def setup(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(LogEscaper())
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
