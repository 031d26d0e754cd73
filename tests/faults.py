"""Fault injection for the store: SQLite statements that fail on cue, with SQLite's own errors.

`Faults.fail("COMMIT")` makes the next COMMIT raise as a full or failing disk
would; `when` narrows a fault to one job (say, the body insert of one message).
The faults live in a `sqlite3.Connection` subclass given to the real
`SqliteStore`, so everything around the failing statement runs for real.

A real full disk is `small_disk` (a tmpfs, mounted as root) and `fill`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.config import StoreConfig
from relay.store import OnBatch, OnCommit, Store
from relay.store.sqlite import SqliteStore

__all__ = ["DISK_FULL", "READ_ONLY", "Fault", "Faults", "fill", "small_disk"]

DISK_FULL = "database or disk is full"
READ_ONLY = "attempt to write a readonly database"


@dataclass
class Fault:
    statement: str
    error: str
    times: int
    when: Callable[[Any], bool] | None


class Faults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._planned: list[Fault] = []
        self.fired: list[str] = []

    def fail(
        self,
        statement: str,
        error: str = "disk I/O error",
        *,
        times: int = 1,
        when: Callable[[Any], bool] | None = None,
    ) -> None:
        """The next `times` statements starting with `statement` (and matching `when`) fail."""
        with self._lock:
            self._planned.append(Fault(statement, error, times, when))

    def clear(self) -> None:
        """Every planned fault is off: the store works again."""
        with self._lock:
            self._planned.clear()

    def check(self, statement: str, params: Any) -> None:
        with self._lock:
            for fault in self._planned:
                if fault.times <= 0 or not statement.lstrip().startswith(fault.statement):
                    continue
                if fault.when is not None and not fault.when(params):
                    continue
                fault.times -= 1
                self.fired.append(fault.statement)
                raise sqlite3.OperationalError(fault.error)

    def connection(self) -> type[sqlite3.Connection]:
        faults = self

        class FaultyConnection(sqlite3.Connection):
            def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
                faults.check(sql, parameters)
                return super().execute(sql, parameters)

            def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
                rows = list(parameters)
                for row in rows:
                    faults.check(sql, row)
                return super().executemany(sql, rows)

        return FaultyConnection

    def store_factory(self) -> Callable[[StoreConfig, OnCommit, OnBatch], Store]:
        """For `App(store_factory=...)`: the real SQLite store on a faulty connection."""

        def make(config: StoreConfig, on_commit: OnCommit, on_batch: OnBatch) -> Store:
            return SqliteStore(
                config.path,
                keep_bodies=config.keep_bodies,
                on_commit=on_commit,
                on_batch=on_batch,
                connection_factory=self.connection(),
            )

        return make


@contextlib.contextmanager
def small_disk(folder: Path, size: str, *, files: int | None = None) -> Iterator[Path]:
    """A tmpfs of `size` at `folder` (needs root), unmounted however the test ends.

    `files` caps its inodes (the root directory takes one): `files=1` is a disk on which no
    file can be created, however much space is left.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    if shutil.which("mount") is None:
        pytest.skip("mount(8) is missing: apt-get install -y mount")
    folder.mkdir()
    inodes = "" if files is None else f",nr_inodes={files}"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700{inodes}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {done.stderr}"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(ballast: Path) -> None:
    """Write `ballast` until its file system has no byte left."""
    chunk = b"\0" * 65536
    with ballast.open("wb", buffering=0) as out:
        while True:  # a short write fills the last page; the next one raises
            try:
                out.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return
