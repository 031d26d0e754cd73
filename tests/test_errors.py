"""One error vocabulary: every deliberate error is a RelayError, printed as one line, exit status
from one table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relay import cli, config, errors, keys, units
from relay.store import reader
from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.UsageError, errors.EXIT_USAGE),
        (errors.ConfigError, errors.EXIT_USAGE),
        (errors.UnitError, errors.EXIT_USAGE),
        (errors.ReadError, errors.EXIT_USAGE),
        (errors.StoreError, errors.EXIT_FAILURE),
        (errors.BadKey, errors.EXIT_FAILURE),
    ],
)
def test_each_error_is_a_relay_error_with_its_exit_status(
    error: type[errors.RelayError], status: int
) -> None:
    assert issubclass(error, errors.RelayError)
    assert error("x").exit_code == status


def test_the_old_import_paths_name_the_same_classes() -> None:
    assert config.ConfigError is errors.ConfigError
    assert cli.UsageError is errors.UsageError
    assert units.UnitError is errors.UnitError
    assert keys.BadKey is errors.BadKey
    assert reader.ReadError is errors.ReadError
    assert cli.EXIT_USAGE == errors.EXIT_USAGE == 2


def test_the_review_commands_do_not_import_the_cli() -> None:
    code = "import sys, relay.review; print('relay.cli' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.strip() == "False"


def test_a_store_that_cannot_be_opened_ends_a_command_with_one_line_and_status_1(
    tmp_path: Path,
) -> None:
    not_a_file = tmp_path / "relay.db"
    not_a_file.mkdir()
    config_path = tmp_path / "relay.yaml"
    config_path.write_text(yaml.safe_dump({"store": {"path": str(not_a_file)}}))
    result = subprocess.run(
        [sys.executable, "-m", "relay", "requeue", "ABC123", "--config", str(config_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"dedup-relay: error: cannot open the store {not_a_file}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [("requeue", "ABC123"), ("purge",)])
def test_requeue_and_purge_do_not_create_a_store_at_a_wrong_path(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """They answered "nothing held" and "0 purged" about the empty store they had just made;
    like backup and the reviews, they now say there is none and leave no file."""
    store = tmp_path / "data" / "relay.db"
    config_path = tmp_path / "relay.yaml"
    config_path.write_text(yaml.safe_dump({"store": {"path": str(store)}}))
    result = subprocess.run(
        [sys.executable, "-m", "relay", *command, "--config", str(config_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2
    hint = "(is store.path right, and has the relay run yet?)"
    assert result.stderr.strip().splitlines() == [f"dedup-relay: error: no store at {store} {hint}"]
    assert not (tmp_path / "data").exists()
