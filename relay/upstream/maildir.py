"""Delivery into a local Maildir, so the relay works out of the box with nothing else running.

Each message is written to tmp/, synced, then renamed into new/, so a mail reader
never sees half a file. The file name is derived from the queue id and the
recipients of the attempt, so a retry after a crash finds the earlier file
instead of writing a second copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from pathlib import Path

from relay.upstream import Attempt, Gate, Outgoing, RecipientResult
from relay.upstream.replies import Kind, classify_error

__all__ = ["MaildirTransport"]

_CRLF = re.compile(rb"\r\n")


class MaildirTransport:
    def __init__(self, path: str, instance: str) -> None:
        self.root = Path(path)
        self.payload_sent = False
        self._host = re.sub(r"[^A-Za-z0-9.-]", "_", instance)

    def _file_name(self, message: Outgoing) -> str:
        digest = hashlib.sha256("\n".join(sorted(message.recipients)).encode()).hexdigest()[:12]
        return f"{message.queue_id}.{digest}.{self._host}"

    def _deliver(self, message: Outgoing) -> str:
        name = self._file_name(message)
        new = self.root / "new"
        cur = self.root / "cur"
        tmp = self.root / "tmp"
        for folder in (new, cur, tmp):
            folder.mkdir(parents=True, exist_ok=True)
        if (new / name).exists() or any(cur.glob(f"{name}:*")) or (cur / name).exists():
            return name
        envelope = f"Return-Path: <{message.sender}>\n" + "".join(
            f"Delivered-To: {rcpt}\n" for rcpt in message.recipients
        )
        # Maildir files use the local line convention, as every delivery agent writes them.
        body = envelope.encode("utf-8") + _CRLF.sub(b"\n", message.data)
        temp = tmp / f"{name}.{os.getpid()}.{time.monotonic_ns()}"
        with temp.open("wb") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temp, new / name)
        directory = os.open(new, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return name

    async def send(self, message: Outgoing, gate: Gate | None = None) -> Attempt:
        started = time.monotonic()
        self.payload_sent = False
        if gate is not None:
            await gate()
        if message.fence is not None:
            message.fence()
        try:
            name = await asyncio.to_thread(self._deliver, message)
        except OSError as exc:
            kind, code, text = classify_error(exc, payload_sent=False, stage="end-of-data")
            results = tuple(RecipientResult(r, kind, code, text) for r in message.recipients)
            return Attempt(results, None, time.monotonic() - started)
        results = tuple(
            RecipientResult(r, Kind.DELIVERED, 250, f"2.0.0 written to {name}")
            for r in message.recipients
        )
        return Attempt(results, name, time.monotonic() - started)

    async def close_idle(self) -> None:
        return None

    async def close(self) -> None:
        return None
