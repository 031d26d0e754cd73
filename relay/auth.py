"""SMTP AUTH for the front door: password checks off the loop, the brute-force guard, `passwd`.

The users file itself (format, reader, hashes) is relay.users, shared with the web login.
Checking a hash is slow on purpose, so it runs in a worker thread, a few at a time, never on
the event loop that every session shares.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from relay.config import AuthConfig, ConfigError
from relay.limits import Events
from relay.users import HASHER, UsersFile, read_text, valid_name

__all__ = ["MAX_CONCURRENT_CHECKS", "Authenticator", "Guard", "passwd"]

log = logging.getLogger(__name__)

# Each argon2id check holds 64 MiB for ~50 ms: a flood of AUTH waits here instead.
MAX_CONCURRENT_CHECKS = 2


class Authenticator:
    """Checks credentials off the event loop, at most a few at a time; reloadable."""

    def __init__(self, config: AuthConfig) -> None:
        assert config.users_file is not None
        self.config = config
        self.file = UsersFile(config.users_file, "auth.users_file")
        self.file.users.check_limits(config)
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_CHECKS)

    async def verify(self, name: str, password: bytes) -> bool:
        async with self._slots:
            return await asyncio.to_thread(self.file.users.verify, name, password)

    def reload(self) -> None:
        """Read the users file again; on any error the old one stays (ConfigError raised).

        A user that auth.users sets limits for may leave the file: a warning, not a refusal,
        since refusing would keep a user whose access the operator just removed."""
        users = self.file.reload()
        for name in users.missing(self.config):
            log.warning("auth.users.%s: no such user in %s any more", name, users.path)


class Guard:
    """Failed logins per client address; past `max_failures` in the window, a lockout."""

    def __init__(self, config: AuthConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._failures = Events(config.failure_window, clock)
        self._locked: dict[str, float] = {}

    def locked(self, client: str) -> bool:
        until = self._locked.get(client)
        if until is None:
            return False
        if self.clock() >= until:
            del self._locked[client]
            return False
        return True

    def failed(self, client: str) -> int:
        """Count one failure; returns the failures in the window, locking when over the limit."""
        count = self._failures.add(client, keep=self.config.max_failures + 1)
        if count > self.config.max_failures:
            self._locked[client] = self.clock() + self.config.lockout
            if len(self._locked) > Events.MAX_KEYS:
                now = self.clock()
                self._locked = {k: v for k, v in self._locked.items() if v > now}
        return count


# --- the passwd command ------------------------------------------------------


def _read_password(user: str, stdin: TextIO) -> str:
    """From a prompt (asked twice) at a terminal, else the first line of stdin; never argv."""
    if stdin.isatty():
        try:
            first = getpass.getpass(f"Password for {user}: ")
            again = getpass.getpass("Again: ")
        except EOFError:  # Ctrl-D at the prompt
            raise ConfigError("passwd: no password given (end of input at the prompt)") from None
        if again != first:
            raise ConfigError("passwd: the two passwords differ")
        return first
    return stdin.readline().removesuffix("\n").removesuffix("\r")


def passwd(user: str, users_file: str, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Add `user` or change their password in `users_file` (argon2id), keeping every other line."""
    if not valid_name(user):
        raise ConfigError(f"passwd: {user!r} is not a user name (no ':', spaces or controls)")
    path = Path(users_file)
    lines = read_text(users_file, "--users-file").splitlines() if path.exists() else []
    password = _read_password(user, stdin)
    if not password:
        raise ConfigError("passwd: the password is empty")
    entry = f"{user}:{HASHER.hash(password)}"
    found = False
    for i, line in enumerate(lines):
        if line.strip().partition(":")[0] == user and not line.lstrip().startswith("#"):
            lines[i] = entry
            found = True
    if not found:
        lines.append(entry)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    folder = path.parent if str(path.parent) else Path(".")
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(temp, mode)
        os.replace(temp, path)
    except OSError as exc:
        raise ConfigError(f"--users-file: cannot write {users_file}: {exc.strerror}") from None
    print(f"{'changed the password of' if found else 'added'} {user} in {users_file}", file=out)
    return 0
