"""The web login's rules for its users file, on top of relay.users (which SMTP AUTH shares).

Same file format, hashes, reader and errors as `auth.users_file`; one rule more: a file that
turns on login must list someone, or nobody could ever see the pages.
"""

from __future__ import annotations

from relay.config import ConfigError
from relay.users import Users, UsersFile

__all__ = ["load_users", "open_users_file", "users_file_option"]

KEY = "http.users_file"


def users_file_option(value: object, key: str = KEY) -> str:
    """The config converter for `http.users_file`: a path to a users file that loads cleanly,
    so a bad file stops `serve` and `check-config` with exit 2, not the first login."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected the path of a users file (user:hash per line)")
    load_users(value.strip(), key=key)
    return value.strip()


def _someone(users: Users) -> None:
    if not users.hashes:
        raise ConfigError(f"{users.key}: {users.path} lists no users, so nobody could log in")


def load_users(path: str, *, key: str = KEY) -> Users:
    """Read and check the whole file; any bad line is a ConfigError naming the file and line."""
    users = Users.read(path, key)
    _someone(users)
    return users


def open_users_file(path: str) -> UsersFile:
    """The file as the login holds it: read again when it changes, so adding a user needs no
    restart; a broken edit keeps the users it had."""
    return UsersFile(path, KEY, check=_someone)
