"""The command line: `serve`, `check-config`, `requeue`, and the review commands.

Every usage or config mistake ends with one line on stderr and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import yaml

from relay import __version__
from relay.config import Config, ConfigError, load, to_mapping
from relay.escape import LogEscaper

__all__ = ["DEFAULT_CONFIG", "EXIT_USAGE", "UsageError", "build_parser", "main"]

DEFAULT_CONFIG = "config/relay.yaml"
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input on the command line; printed as one line, exit status 2."""


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=os.environ.get("RELAY_CONFIG", DEFAULT_CONFIG),
        help=f"YAML config (default: $RELAY_CONFIG or {DEFAULT_CONFIG})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dedup-relay",
        description="An SMTP relay that forwards every unique message once.",
    )
    parser.add_argument("--version", action="version", version=f"dedup-relay {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the relay in the foreground")
    _config_arg(serve)
    serve.add_argument(
        "--instance",
        metavar="NAME",
        help="this process's name in delivery leases (overrides runtime.instance); give each"
        " process sharing a store its own",
    )

    check = commands.add_parser("check-config", help="validate and print the effective config")
    _config_arg(check)

    requeue = commands.add_parser("requeue", help="send held (ambiguous) recipients again")
    requeue.add_argument("queue_id", metavar="QUEUE_ID")
    _config_arg(requeue)

    passwd = commands.add_parser(
        "passwd",
        help="add a user to the AUTH users file or change their password (argon2id)",
        description="Reads the password from a prompt, or from the first line of stdin when it is"
        " not a terminal; never from the command line.",
    )
    passwd.add_argument("user", metavar="USER")
    passwd.add_argument("--users-file", required=True, metavar="FILE", help="the auth.users_file")

    from relay import review

    review.add_commands(commands, _config_arg)
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(LogEscaper())
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)


def _serve(config: Config) -> int:
    from relay.app import serve

    _setup_logging(config.runtime.log_level)
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(
            f"dedup-relay: error: cannot listen on {config.listen.host}:"
            f"{config.listen.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    return 0


def _with_instance(config: Config, instance: str | None) -> Config:
    if instance is None:
        return config
    if not instance.strip():
        raise UsageError("--instance: needs a non-empty name")
    return replace(config, runtime=replace(config.runtime, instance=instance.strip()))


def _check_config(config: Config, path: str) -> int:
    print(f"# {path}: valid. Effective config (secrets masked):")
    print(yaml.safe_dump(to_mapping(config), sort_keys=False, allow_unicode=True), end="")
    return 0


def _requeue(config: Config, queue_id: str) -> int:
    from relay.store.sqlite import SqliteStore

    async def run() -> int:
        store = SqliteStore(config.store.path)
        await store.open()
        try:
            return await store.requeue(queue_id, time.time())
        finally:
            await store.close()

    count = asyncio.run(run())
    if not count:
        print(f"dedup-relay: nothing held for {queue_id}", file=sys.stderr)
        return 1
    print(f"{queue_id}: {count} recipient(s) queued again")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "passwd":
            from relay.auth import passwd

            return passwd(args.user, args.users_file)
        config = load(args.config, check_paths=args.command in ("serve", "check-config"))
        handlers: dict[str, Callable[[], int]] = {
            "serve": lambda: _serve(_with_instance(config, args.instance)),
            "check-config": lambda: _check_config(config, args.config),
            "requeue": lambda: _requeue(config, args.queue_id),
        }
        if args.command in handlers:
            return handlers[args.command]()
        from relay import review

        return review.run(args, config)
    except (ConfigError, UsageError) as exc:
        print(f"dedup-relay: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
