"""The users file that turns on login for the web page: one `user:hash` per line.

The file and its hash formats are those of SMTP AUTH (relay.auth reads both): argon2id and
bcrypt `$2b$`/`$2y$`, so a file made with `htpasswd -B` works. Plain text is refused when the
file is loaded, naming the line but never echoing it, since that line may be a password.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass

from relay.auth import check_password, read_users
from relay.config import ConfigError

__all__ = ["Users", "UsersFile", "load_users", "users_file_option"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Users:
    """The loaded file: user name to hash."""

    path: str
    hashes: dict[str, str]

    def check(self, user: str, password: str) -> bool:
        """Slow on purpose (argon2, bcrypt): call it off the event loop."""
        return check_password(self.hashes.get(user), password.encode("utf-8"))

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
    hashes = read_users(path, key)
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
