"""The users file: one reader and one users type for SMTP AUTH and the web login.

One `user:hash` line per user (`#` comments and blank lines skipped). Passwords are stored only
as argon2id (argon2-cffi) or bcrypt hashes (the bcrypt package reads htpasswd's `$2y$` too).
Every read, at start, on reload and by `passwd`, goes through `read_text`, so an unreadable or
non-UTF-8 file is the same ConfigError everywhere: naming the setting and the file, never a
byte of its content, since a line may be a password.

Both checks are slow on purpose: callers run `Users.verify` in a worker thread.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import argon2
import bcrypt

from relay.config import AuthConfig, ConfigError

__all__ = [
    "HASHER",
    "Users",
    "UsersFile",
    "check_password",
    "hash_kind",
    "parse_users",
    "read_text",
    "read_users",
    "valid_name",
]

log = logging.getLogger(__name__)

_BCRYPT = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
_NAME = re.compile(r"^[^\s:\x00-\x1f\x7f]{1,256}$")
HASHER = argon2.PasswordHasher()


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


def read_text(path: str, key: str) -> str:
    """The file's text; OSError and UnicodeDecodeError become a ConfigError naming `key` and
    the file, never the bytes (the decoder's message quotes one)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None


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


def read_users(path: str, key: str = "auth.users_file") -> dict[str, str]:
    """A users file read and checked whole."""
    return parse_users(read_text(path, key), path, key)


@dataclass(frozen=True)
class Users:
    """The users file as loaded: name -> hash, and the setting that named it (for errors)."""

    path: str
    hashes: Mapping[str, str]
    key: str = "auth.users_file"

    @classmethod
    def read(cls, path: str, key: str = "auth.users_file") -> Users:
        return cls(path, read_users(path, key), key)

    @classmethod
    def load(cls, config: AuthConfig) -> Users:
        """SMTP AUTH's file at start: limits under auth.users must name a listed user."""
        assert config.users_file is not None
        users = cls.read(config.users_file)
        users.check_limits(config)
        return users

    def check_limits(self, config: AuthConfig) -> None:
        """At start: limits for a name the file lacks are a typo that would limit nobody."""
        for name in self.missing(config):
            raise ConfigError(f"auth.users.{name}: no such user in {self.path}")

    def missing(self, config: AuthConfig) -> list[str]:
        """The users auth.users sets limits for that the file does not list."""
        return [name for name in config.users if name not in self.hashes]

    def verify(self, name: str, password: bytes) -> bool:
        """Slow on purpose; an unknown name costs the same as a wrong password."""
        return check_password(self.hashes.get(name), password)

    def stamp(self, name: str) -> bytes:
        """A digest of the user's current hash: a session signed with it dies when it changes."""
        encoded = self.hashes.get(name)
        return b"" if encoded is None else hashlib.sha256(encoded.encode()).digest()

    def known(self, name: str, stamp: bytes) -> bool:
        return name in self.hashes and hmac.compare_digest(self.stamp(name), stamp)


def _anything(users: Users) -> None:
    """The default check of a users file read again: any well-formed file will do."""


class UsersFile:
    """The last good version of a users file, for a server that reads it again while running.

    SMTP AUTH calls `reload` on SIGHUP; the web login calls `current` on each request, which
    reads the file again when it changed on disk. Either way a broken file leaves the users
    that were there.
    """

    def __init__(self, path: str, key: str, check: Callable[[Users], None] = _anything) -> None:
        self._check = check
        self._seen = self._signature(path)
        self.users = self._read(path, key)

    def _read(self, path: str, key: str) -> Users:
        users = Users.read(path, key)
        self._check(users)
        return users

    @staticmethod
    def _signature(path: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def reload(self) -> Users:
        """Read the file again; on any error a ConfigError is raised and the old users stay."""
        self._seen = self._signature(self.users.path)
        self.users = self._read(self.users.path, self.users.key)
        return self.users

    def current(self) -> Users:
        """The latest good version; a broken edit keeps the last good one, logged once."""
        if self._signature(self.users.path) != self._seen:
            try:
                self.reload()
            except ConfigError as exc:
                log.warning("keeping the users it had: %s", exc)
        return self.users


def check_password(stored: str | None, password: bytes) -> bool:
    """Slow on purpose; None (an unknown user) costs the same as a wrong password."""
    if stored is None:
        _check(_dummy_hash(), password)
        return False
    return _check(stored, password)


def _check(stored: str, password: bytes) -> bool:
    if stored.startswith("$argon2"):
        try:
            return bool(HASHER.verify(stored, password))
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
        _DUMMY.append(HASHER.hash(secrets.token_hex(16)))
    return _DUMMY[0]
