"""The users file that turns on login for the web page: one `user:hash` per line.

The hash formats are the SMTP AUTH ones: argon2id (argon2-cffi) and bcrypt `$2b$`/`$2y$`, so
a file made with `htpasswd -B` works. Plain text is refused when the file is loaded, naming the
line but never echoing it, since that line may be a password.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import argon2
import bcrypt

from relay.config import ConfigError

__all__ = ["BCRYPT_MAX_BYTES", "Users", "UsersFile", "load_users", "users_file_option", "verify"]

log = logging.getLogger(__name__)

BCRYPT_MAX_BYTES = 72  # bcrypt reads no further; htpasswd and Apache cut there too
_ARGON2 = argon2.PasswordHasher()
_FORMATS = ("$argon2id$", "$2b$", "$2y$")
# Checked when the user is unknown, so a wrong name costs the same time as a wrong password.
_DUMMY = _ARGON2.hash("not a password: the user is unknown")


def verify(encoded: str, password: str) -> bool:
    """True when `password` matches the argon2id or bcrypt hash; never raises on bad input."""
    if encoded.startswith("$argon2id$"):
        try:
            return _ARGON2.verify(encoded, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    if encoded.startswith(("$2b$", "$2y$")):
        secret = password.encode("utf-8")[:BCRYPT_MAX_BYTES]
        try:
            return bcrypt.checkpw(secret, encoded.encode("ascii"))
        except ValueError:
            return False
    return False


@dataclass(frozen=True)
class Users:
    """The loaded file: user name to hash."""

    path: str
    hashes: dict[str, str]

    def check(self, user: str, password: str) -> bool:
        """Slow on purpose (argon2, bcrypt): call it off the event loop."""
        encoded = self.hashes.get(user)
        if encoded is None:
            verify(_DUMMY, password)
            return False
        return verify(encoded, password)

    def stamp(self, user: str) -> bytes:
        """A digest of the user's current hash: a session signed with it dies when it changes."""
        encoded = self.hashes.get(user)
        return b"" if encoded is None else hashlib.sha256(encoded.encode()).digest()

    def known(self, user: str, stamp: bytes) -> bool:
        return user in self.hashes and hmac.compare_digest(self.stamp(user), stamp)


def users_file_option(value: object, key: str = "http.users_file") -> str:
    """The config converter for `http.users_file`: a path to a users file that loads cleanly,
    so a bad file stops `serve` and `check-config` with exit 2, not the first login."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected the path of a users file (user:hash per line)")
    load_users(value.strip(), key=key)
    return value.strip()


def load_users(path: str, *, key: str = "http.users_file") -> Users:
    """Read and check the whole file; any bad line is a ConfigError naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc}") from None
    hashes: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, encoded = line.partition(":")
        user, encoded = user.strip(), encoded.strip()
        where = f"{key}: {path} line {number}"
        if not colon or not user:
            raise ConfigError(f"{where}: expected user:hash")
        if not encoded.startswith(_FORMATS):
            raise ConfigError(
                f"{where}: the password of {user!r} is not an argon2id or bcrypt ($2b$, $2y$)"
                " hash; plain text is refused"
            )
        if user in hashes:
            raise ConfigError(f"{where}: {user!r} is listed twice")
        hashes[user] = encoded
    if not hashes:
        raise ConfigError(f"{key}: {path} lists no users, so nobody could log in")
    return Users(path, hashes)


class UsersFile:
    """The users file, read again when it changes, so adding a user needs no restart."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen = self._signature()
        self.users = load_users(path)

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def current(self) -> Users:
        """The latest good version; a broken edit keeps the last good one (and is logged)."""
        seen = self._signature()
        if seen != self._seen:
            self._seen = seen
            try:
                self.users = load_users(self.path)
            except ConfigError as exc:
                log.warning("keeping the users it had: %s", exc)
        return self.users
