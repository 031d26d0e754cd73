"""Review commands (log, show, stats): being written."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from relay.config import Config


def add_commands(commands: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    return None


def run(args: argparse.Namespace, config: Config) -> int:
    raise NotImplementedError(args.command)
