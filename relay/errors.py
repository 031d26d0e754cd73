"""The relay's error vocabulary and the exit status each error ends a command with.

Every error the relay raises on purpose is a `RelayError`, already phrased as
one line for a person; the command line prints it and exits with the error's
`exit_code`, never with a traceback. Exceptions that are not `RelayError`s are
bugs. The module imports nothing from the relay, so any module may use it.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "BadKey",
    "ConfigError",
    "InstanceBusy",
    "LeaseLost",
    "ListenError",
    "OpenError",
    "ReadError",
    "RelayError",
    "StoreError",
    "StoreLost",
    "StoreUnavailable",
    "UnitError",
    "UsageError",
    "os_reason",
]

EXIT_OK = 0
# The command ran but could not do what was asked: nothing held to requeue, no such message,
# the listening port is taken, the store or the audit log would not open, the store would not
# commit.
EXIT_FAILURE = 1
# The operator's input is wrong (flags, config, a store that is not one); fix it and run again.
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def os_reason(exc: OSError) -> str:
    """The system's words for what went wrong, without Python's `[Errno N]` and repr'd path."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


class RelayError(Exception):
    """Base of every error the relay raises on purpose; its text is for a person."""

    exit_code = EXIT_FAILURE


class UsageError(RelayError):
    """Bad input on the command line."""

    exit_code = EXIT_USAGE


class ConfigError(RelayError, ValueError):
    """A config problem, already phrased as `key: what is wrong`."""

    exit_code = EXIT_USAGE


class UnitError(RelayError, ValueError):
    """A value that is not a duration or size; the message says what is expected."""

    exit_code = EXIT_USAGE


class ReadError(RelayError):
    """The store cannot be read; the message names the file and why."""

    exit_code = EXIT_USAGE


class StoreError(RelayError, RuntimeError):
    """The store could not commit; an SMTP client gets a 4xx and keeps the message."""


class StoreUnavailable(StoreError):
    """The store commits nothing now (a full disk, a read-only file, a lock): try again later.

    Unlike a job of its own that failed, the same write may well succeed once the store
    recovers, so a delivery outcome that meets this is kept and written again.
    """


class StoreLost(StoreUnavailable):
    """The store's file was deleted or replaced under the running relay; only a restart helps."""


class LeaseLost(StoreError):
    """An attempt's outcome came after its lease was taken back by another process, which
    recorded the message `ambiguous` and owns what happens to it now: this outcome must
    not overwrite what that process has since recorded."""


class ListenError(RelayError):
    """A port could not be opened; the message names the key and the reason."""

    @classmethod
    def bind_failed(cls, host: str, port: int, key: str, exc: OSError) -> ListenError:
        """The one wording for a bind that failed, whichever process tried it."""
        reason = os_reason(exc)
        if exc.errno == errno.EADDRINUSE:
            reason += " (another process has it: a relay already running on this config?)"
        return cls(f"cannot listen on {host}:{port} ({key}): {reason}")


class OpenError(RelayError):
    """A file the relay opens at start could not be opened; the message names it and its key.

    Not a ConfigError: the setting is well formed, and check-config, which opens nothing,
    cannot tell. Like a busy port or a store that will not open, it fails the start (status 1).
    """

    @classmethod
    def failed(cls, what: str, path: str, key: str, exc: OSError) -> OpenError:
        return cls(f"cannot open {what} {path} ({key}): {os_reason(exc)}")


class InstanceBusy(RelayError):
    """Another live process holds this instance name in the store."""


class BadKey(RelayError, ValueError):
    """An idempotency header the app got wrong; the client must hear about it, not lose mail."""
