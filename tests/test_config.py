"""Config and command line: every mistake is one clear line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import ConfigError, from_mapping, load
from tests.conftest import ROOT


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd or ROOT,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"listen": {"port": "x"}}, "listen.port: expected a whole number"),
        ({"listen": {"port": 70000}}, "listen.port: 70000 is out of range"),
        ({"listen": {"prot": 1}}, "listen.prot: unknown key"),
        ({"dedupe": {"window": "2 days"}}, "dedupe.window: '2 days' is not a duration"),
        ({"dedupe": {"keys": ["header:"]}}, "dedupe.keys[0]: 'header:' needs a header name"),
        ({"dedupe": {"keys": ["sha1"]}}, "dedupe.keys[0]: 'sha1' is not a strategy"),
        ({"dedupe": {"on_duplicate": "bounce"}}, "dedupe.on_duplicate: 'bounce' is not one of"),
        ({"delivery": {"concurrency": 0}}, "delivery.concurrency: 0 is out of range"),
        ({"delivery": {"retry_initial": "1h", "retry_max": "1m"}}, "delivery.retry_max"),
        ({"listen": {"networks": ["10.0.0.300/8"]}}, "listen.networks[0]: '10.0.0.300/8'"),
        ({"listen": {"max_message_size": "lots"}}, "listen.max_message_size: 'lots' is not a size"),
        ({"upstream": {"url": "http://x"}}, "upstream.url: 'http://x' must start with smtp://"),
        ({"upstream": {"url": "smtp://u:p@host"}}, "upstream.url: credentials in the URL"),
        ({"upstream": {"password": "hunter2"}}, "upstream.password: secrets do not belong"),
        ({"upstream": {"password_env": "NOPE_NOT_SET"}}, "NOPE_NOT_SET is not set"),
        ({"upstream": {"ca_file": "/nonexistent/ca.pem"}}, "upstream.ca_file"),
        ({"rules": [{"name": "r", "match": {}}]}, "rules[0].match: needs at least one"),
        ({"rules": [{"match": {"sender": "*"}}]}, "rules[0].name: every rule needs a name"),
        ({"rules": [{"name": "r", "match": {"sendr": "*"}}]}, "rules[0].match.sendr: unknown key"),
        ({"store": {"path": "/proc/forbidden/relay.db"}}, "store.path: cannot create directory"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_config_names_the_key(
    raw: Any, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        from_mapping(raw)
    assert message in str(error.value)


def test_defaults_need_no_config_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = from_mapping({})
    assert config.listen.port == 2525
    assert config.upstream.scheme == "maildir"
    assert [k.name for k in config.dedupe.keys] == [
        "header:Idempotency-Key",
        "message-id",
        "fingerprint",
    ]


def test_shipped_config_is_valid_and_matches_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load(ROOT / "config" / "relay.yaml") == from_mapping({})


def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("dedupe:\n  window: 2 days\n")
    for command in ("serve", "check-config"):
        result = run_cli(command, "--config", str(path), cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "dedup-relay: error: dedupe.window: '2 days' is not a duration (use 30s, 5m, 24h, 5d)"
        ]


def test_unreadable_or_invalid_yaml_exits_2(tmp_path: Path) -> None:
    missing = run_cli("check-config", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("listen: {port: [\n")
    result = run_cli("check-config", "--config", str(broken))
    assert result.returncode == 2
    assert "is not valid YAML at line" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_flag_exits_2() -> None:
    result = run_cli("serve", "--bogus")
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr


def test_check_config_masks_secrets_from_env_and_files(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text("file-secret-123\n")
    path = tmp_path / "relay.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "upstream": {
                    "url": "smtp://127.0.0.1:2526",
                    "username": "relay",
                    "password_file": str(secret_file),
                },
                "store": {"path": str(tmp_path / "relay.db")},
            }
        )
    )
    result = run_cli("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "file-secret-123" not in result.stdout
    assert "password: '***'" in result.stdout
    effective = yaml.safe_load(result.stdout)
    assert effective["upstream"]["url"] == "smtp://127.0.0.1:2526"


def test_console_script_and_module_both_run() -> None:
    module = run_cli("--version")
    assert module.returncode == 0 and "dedup-relay" in module.stdout
    script = Path(sys.executable).with_name("dedup-relay")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == module.stdout


def test_empty_instance_name_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"store": {"path": str(tmp_path / "relay.db")}}))
    result = run_cli("serve", "--config", str(path), "--instance", " ", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "dedup-relay: error: --instance: needs a non-empty name"
