"""SMTP AUTH for the front door: the users file, password checks and the brute-force guard.

Passwords are stored only as argon2id (argon2-cffi) or bcrypt hashes (the bcrypt
package reads htpasswd's `$2y$` too). Both are slow on purpose, so checking one
runs in a worker thread, a few at a time, never on the event loop that every
session shares.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import argon2
import bcrypt

from relay.config import AuthConfig, ConfigError
from relay.limits import Events

__all__ = [
    "MAX_CONCURRENT_CHECKS",
    "Authenticator",
    "Guard",
    "Users",
    "check_password",
    "hash_kind",
    "parse_users",
    "passwd",
    "read_users",
    "valid_name",
]

log = logging.getLogger(__name__)

# Each argon2id check holds 64 MiB for ~50 ms: a flood of AUTH waits here instead.
MAX_CONCURRENT_CHECKS = 2
_BCRYPT = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
_NAME = re.compile(r"^[^\s:\x00-\x1f\x7f]{1,256}$")
_HASHER = argon2.PasswordHasher()


def valid_name(name: str) -> bool:
    """A user name: no colon (the file's separator), no whitespace or control characters."""
    return bool(_NAME.match(name))


def hash_kind(value: str) -> str | None:
    """ "argon2" or "bcrypt" for a hash this relay can check; None for anything else."""
    if value.startswith("$argon2id$"):
        try:
            argon2.extract_parameters(value)
        except argon2.exceptions.InvalidHashError:
            return None
        return "argon2"
    if _BCRYPT.match(value):
        return "bcrypt"
    return None


def parse_users(text: str, source: str, key: str = "auth.users_file") -> dict[str, str]:
    """`user:hash` lines; `#` comments and blank lines are skipped. Errors name the line."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, value = line.partition(":")
        where = f"{key}: {source} line {number}"
        if not colon or not valid_name(name):
            raise ConfigError(f"{where}: expected user:hash")
        if name in users:
            raise ConfigError(f"{where}: {name!r} is listed twice")
        if hash_kind(value) is None:
            raise ConfigError(
                f"{where}: the password of {name!r} is not an argon2id or bcrypt hash (plain"
                f" text is refused); set it with: python -m relay passwd {name}"
                f" --users-file {source}"
            )
        users[name] = value
    return users


@dataclass(frozen=True)
class Users:
    """The users file as loaded: name -> hash."""

    path: str
    hashes: Mapping[str, str]

    @classmethod
    def load(cls, config: AuthConfig) -> Users:
        assert config.users_file is not None
        users = cls(config.users_file, read_users(config.users_file))
        for name in config.users:
            if name not in users.hashes:
                raise ConfigError(f"auth.users.{name}: no such user in {config.users_file}")
        return users

    def verify(self, name: str, password: bytes) -> bool:
        """Slow on purpose; an unknown name costs the same as a wrong password."""
        return check_password(self.hashes.get(name), password)


def read_users(path: str, key: str = "auth.users_file") -> dict[str, str]:
    """A users file read and checked whole; the SMTP front door and the web page share it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    return parse_users(text, path, key)


def check_password(stored: str | None, password: bytes) -> bool:
    """Slow on purpose; None (an unknown user) costs the same as a wrong password."""
    if stored is None:
        _check(_dummy_hash(), password)
        return False
    return _check(stored, password)


def _check(stored: str, password: bytes) -> bool:
    if stored.startswith("$argon2"):
        try:
            return bool(_HASHER.verify(stored, password))
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False
    # bcrypt looks at 72 bytes at most, as htpasswd does; the library refuses more.
    try:
        return bcrypt.checkpw(password[:72], stored.encode("ascii"))
    except ValueError:
        return False


_DUMMY: list[str] = []


def _dummy_hash() -> str:
    if not _DUMMY:
        _DUMMY.append(_HASHER.hash(secrets.token_hex(16)))
    return _DUMMY[0]


class Authenticator:
    """Checks credentials off the event loop, at most a few at a time; reloadable."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.users = Users.load(config)
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_CHECKS)

    async def verify(self, name: str, password: bytes) -> bool:
        async with self._slots:
            return await asyncio.to_thread(self.users.verify, name, password)

    def reload(self) -> None:
        """Read the users file again; on any error the old one stays (ConfigError raised)."""
        text = Path(self.users.path).read_text(encoding="utf-8")
        self.users = Users(self.users.path, parse_users(text, self.users.path))
        for name in self.config.users:
            if name not in self.users.hashes:
                log.warning("auth.users.%s: no such user in %s any more", name, self.users.path)


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
        first = getpass.getpass(f"Password for {user}: ")
        if getpass.getpass("Again: ") != first:
            raise ConfigError("passwd: the two passwords differ")
        return first
    return stdin.readline().removesuffix("\n").removesuffix("\r")


def passwd(user: str, users_file: str, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Add `user` or change their password in `users_file` (argon2id), keeping every other line."""
    if not valid_name(user):
        raise ConfigError(f"passwd: {user!r} is not a user name (no ':', spaces or controls)")
    path = Path(users_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--users-file: cannot read {users_file}: {exc}") from None
    password = _read_password(user, stdin)
    if not password:
        raise ConfigError("passwd: the password is empty")
    entry = f"{user}:{_HASHER.hash(password)}"
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
