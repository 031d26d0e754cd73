"""The command line: `serve`, `check-config`, `health`, `backup`, `migrate`, `requeue`, `purge`,
and the reviews.

Every usage or config mistake ends with one line on stderr and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

from relay import __version__, review
from relay.config import Config, Layers, read_layers, to_yaml_with_sources
from relay.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    RelayError,
    UsageError,
    os_reason,
)
from relay.workers import (
    WORKER_OPTION,
    ReadyPipe,
    WorkerSlot,
    default_workers,
    die_with_parent,
    parse_worker_option,
)

if TYPE_CHECKING:
    from relay.store import Store

__all__ = ["DEFAULT_CONFIG", "EXIT_USAGE", "UsageError", "build_parser", "main"]

T = TypeVar("T")

DEFAULT_CONFIG = "config/relay.yaml"


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help=f"YAML config (default: $RELAY_CONFIG, else {DEFAULT_CONFIG} if it exists, else"
        " none: defaults and RELAY_<SECTION>__<KEY> environment variables)",
    )


def config_path(given: str | None) -> str | None:
    """The file to read: named, else $RELAY_CONFIG, else the default one if present, else none."""
    if given is not None:
        return given
    named = os.environ.get("RELAY_CONFIG")
    if named:
        return named
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None


class _Parser(argparse.ArgumentParser):
    """A flag mistake ends as a config mistake does: one line, exit status 2.

    argparse's own error prints the usage block above a line prefixed with the subcommand's
    name; the pointer to --help keeps what the usage block offered. Subparsers inherit it.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"dedup-relay: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dedup-relay",
        description="An SMTP relay that forwards every unique message once.",
    )
    parser.add_argument("--version", action="version", version=f"dedup-relay {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the relay in the foreground",
        description="Runs the relay in the foreground until SIGTERM or SIGINT, which stop it"
        " gracefully; SIGHUP reloads the TLS certificate and the users file. Logs go to stderr,"
        " audit events to audit.output (stdout by default).",
    )
    _config_arg(serve)
    serve.add_argument(
        "--instance",
        metavar="NAME",
        help="this process's name in delivery leases (overrides runtime.instance); give each"
        " process sharing a store its own",
    )
    serve.add_argument(
        "--workers",
        type=_positive,
        metavar="N",
        help="relay processes sharing the port (SO_REUSEPORT) and the store, under one"
        " supervising parent (default: the number of CPUs; 1 runs the relay in this process)",
    )
    serve.add_argument(WORKER_OPTION, type=parse_worker_option, help=argparse.SUPPRESS)

    check = commands.add_parser(
        "check-config",
        help="validate and print the effective config, and where each value came from",
        description="Prints the effective config, secrets masked, each value marked default,"
        " file or env RELAY_...; a mistake ends with one line naming the key and exit status 2.",
    )
    _config_arg(check)

    health = commands.add_parser(
        "health",
        help="ask the running relay if it is ready (exit 0) or not (exit 1)",
        description="Asks http.listen's /readyz, or without it whether the SMTP port greets"
        " with 220, and prints one line. For Docker's HEALTHCHECK.",
    )
    _config_arg(health)

    backup = commands.add_parser(
        "backup",
        help="copy the store consistently while the relay runs (SQLite online backup)",
        description="Writes one consistent snapshot of the SQLite store, checked and renamed"
        " over FILE only when complete. For PostgreSQL use pg_dump or pg_basebackup.",
    )
    backup.add_argument("--to", metavar="FILE", required=True, help="where to write the copy")
    _config_arg(backup)

    migrate = commands.add_parser(
        "migrate",
        help="bring the store's schema up to this version (serve does it too at start)",
        description="Applies the schema steps the store lacks, in one transaction; creates the"
        " store when there is none. Safe to run while other replicas run or start.",
    )
    _config_arg(migrate)

    requeue = commands.add_parser(
        "requeue",
        help="send held (ambiguous) recipients again",
        description="Queues a message's held recipients (delivery.on_ambiguous: hold) for"
        " delivery again; exits 1 when it holds none.",
    )
    requeue.add_argument("queue_id", metavar="QUEUE_ID", help="the message's queue id")
    _config_arg(requeue)

    purge = commands.add_parser(
        "purge",
        help="drop expired claims, kept bodies and audit rows past retention, now",
        description="Runs once what the relay's housekeeping runs every minute, and prints what"
        " it dropped.",
    )
    _config_arg(purge)

    passwd = commands.add_parser(
        "passwd",
        help="add a user to the AUTH users file or change their password (argon2id)",
        description="Reads the password from a prompt, or from the first line of stdin when it is"
        " not a terminal; never from the command line.",
    )
    passwd.add_argument("user", metavar="USER", help="the user name (no ':', spaces or controls)")
    passwd.add_argument(
        "--users-file",
        required=True,
        metavar="FILE",
        help="auth.users_file or http.users_file (one format); created 0600 if missing",
    )

    review.add_commands(commands, _config_arg)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _serve(config: Config, args: argparse.Namespace, parent: ReadyPipe | None) -> int:
    """Run the relay: here, as a worker reporting to `parent`, or as the parent of N workers.

    What fails at start says what and which key (a busy port: ListenError; the store:
    StoreError; the audit log: OpenError). An OSError that gets here is none of those.
    """
    from relay import logs
    from relay import loop as event_loop

    logs.setup(config.runtime.log_level, config.runtime.log_format)
    workers = args.workers or default_workers()
    try:
        if parent is not None:
            return _worker(config, args.worker_slot, parent)
        if workers > 1:
            from relay.workers import supervise

            passed = ["--config", args.config] if args.config is not None else []
            return event_loop.run(
                supervise(config, workers, passed, instance=_instance_arg(args.instance))
            )
        from relay.app import serve

        event_loop.run(serve(config))
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise RelayError(f"serve failed: {os_reason(exc)}{where}") from None
    return EXIT_OK


def _instance_arg(instance: str | None) -> str | None:
    return instance.strip() if instance is not None else None


def _worker(config: Config, slot: WorkerSlot, parent: ReadyPipe) -> int:
    """One of `serve --workers N`'s processes: tells the parent once it serves."""
    from relay import loop as event_loop
    from relay.app import App, serve

    if not die_with_parent(slot.parent):
        return EXIT_FAILURE

    def ready(app: App) -> None:
        parent.ready(app.port, app.http_port if app.side is not None else 0)

    event_loop.run(serve(config, ready, worker=slot.slot))
    return EXIT_OK


def _with_instance(config: Config, instance: str | None) -> Config:
    if instance is None:
        return config
    if not instance.strip():
        raise UsageError("--instance: needs a non-empty name")
    return replace(config, runtime=replace(config.runtime, instance=instance.strip()))


def _check_config(config: Config, layers: Layers) -> int:
    source = layers.file or "no config file, defaults and environment only"
    print(f"# {source}: valid. Effective config (secrets masked) and where each value came from:")
    print(to_yaml_with_sources(config, layers), end="")
    return EXIT_OK


def _health(config: Config) -> int:
    from relay.healthcheck import check

    healthy, why = check(config)
    print(f"{'healthy' if healthy else 'unhealthy'}: {why}")
    return EXIT_OK if healthy else EXIT_FAILURE


def _backup(config: Config, target: str) -> int:
    import sqlite3

    from relay.store.sqlite import backup

    if config.store.url is not None:
        raise UsageError(
            "backup copies a SQLite store; back up PostgreSQL with pg_dump, pg_basebackup"
            " or your provider's backups"
        )
    store = Path(config.store.path)
    if not store.is_file():
        raise UsageError(_no_store(store))
    destination = Path(target)
    if not destination.parent.is_dir():
        raise UsageError(f"--to: directory {destination.parent} does not exist")
    if destination.exists() and destination.resolve() == store.resolve():
        raise UsageError("--to: that is the store itself")
    started = time.monotonic()
    try:
        result = backup(str(store), str(destination))
    except (sqlite3.Error, OSError) as exc:
        print(f"dedup-relay: error: backup of {store} failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"{store} -> {destination}: {result.size} bytes, {result.pending} message(s) pending,"
        f" one consistent snapshot in {time.monotonic() - started:.1f}s"
    )
    return EXIT_OK


def _no_store(store: Path) -> str:
    return f"no store at {store} (is store.path right, and has the relay run yet?)"


def _with_store(config: Config, job: Callable[[Store], Awaitable[T]]) -> T:
    from relay.store import open_store

    # Opening a SQLite store creates it: at a mistyped path, requeue would say "nothing held"
    # and purge "0 purged" about an empty store they had just made.
    if config.store.url is None and not Path(config.store.path).exists():
        raise UsageError(_no_store(Path(config.store.path)))

    async def run() -> T:
        store = open_store(config.store)
        await store.open()
        try:
            return await job(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _migrate(config: Config) -> int:
    from relay.store import migrate

    result = asyncio.run(migrate(config.store))
    where = config.store.where
    if not result.applied:
        print(f"{where}: schema version {result.after}, up to date")
        return EXIT_OK
    steps = ", ".join(f"{m.version} ({m.name})" for m in result.applied)
    print(f"{where}: schema version {result.before} -> {result.after}; applied {steps}")
    return EXIT_OK


def _purge(config: Config) -> int:
    counts = _with_store(config, lambda store: store.purge(time.time(), config.audit.retention))
    print(", ".join(f"{count} {name}" for name, count in counts.items()) + " purged")
    return EXIT_OK


def _requeue(config: Config, queue_id: str) -> int:
    count = _with_store(config, lambda store: store.requeue(queue_id, time.time()))
    if not count:
        print(f"dedup-relay: nothing held for {queue_id}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{queue_id}: {count} recipient(s) queued again")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A worker of `serve --workers N` tells its parent why it could not start, not stderr.
    slot: WorkerSlot | None = getattr(args, "worker_slot", None)
    parent = ReadyPipe(slot.ready_fd) if slot is not None else None
    try:
        if args.command == "passwd":
            from relay.auth import passwd

            return passwd(args.user, args.users_file)
        layers = read_layers(config_path(args.config), os.environ)
        config = layers.config(check_paths=args.command in ("serve", "check-config"))
        handlers: dict[str, Callable[[], int]] = {
            "serve": lambda: _serve(_with_instance(config, args.instance), args, parent),
            "check-config": lambda: _check_config(config, layers),
            "health": lambda: _health(config),
            "backup": lambda: _backup(config, args.to),
            "migrate": lambda: _migrate(config),
            "requeue": lambda: _requeue(config, args.queue_id),
            "purge": lambda: _purge(config),
        }
        if args.command in handlers:
            return handlers[args.command]()
        return review.run(args, config)
    except RelayError as exc:
        if parent is None or not parent.failed(exc.exit_code, str(exc)):
            print(f"dedup-relay: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if args.command == "serve":
            raise
        # The reader left (`check-config | head -1`): nothing to report but the status.
        # Python flushes stdout again at exit, so point it somewhere that takes the bytes.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
