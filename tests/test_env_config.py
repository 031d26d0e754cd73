"""Configuration without a file: RELAY_<SECTION>__<KEY> variables, on top of a file or alone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import ConfigError, load, read_layers
from tests.conftest import Upstream, free_port, make_message, relay_cli, send


def test_environment_sets_keys_of_every_kind_and_beats_the_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"listen": {"port": 2600, "max_recipients": 7}}))
    config = load(
        path,
        check_paths=False,
        environ={
            "RELAY_LISTEN__PORT": "2601",
            "RELAY_UPSTREAM__URL": "smtps://smtp.example.com:465",
            "RELAY_DEDUPE__WINDOW": "2h",
            "RELAY_DEDUPE__KEYS": "[fingerprint, header:X-Key]",
            "RELAY_DEDUPE__FINGERPRINT__HEADERS": "[From, Subject]",
            "RELAY_LISTEN__NETWORKS": '[127.0.0.0/8, "::1/128"]',
            "RELAY_RULES": "[{name: otp, match: {header: {Subject: '*code*'}}, window: 15m}]",
            "RELAY_HTTP__LISTEN": "127.0.0.1:9025",
        },
    )
    assert config.listen.port == 2601
    assert config.listen.max_recipients == 7  # the file still counts where env says nothing
    assert (config.upstream.scheme, config.upstream.host, config.upstream.port) == (
        "smtps",
        "smtp.example.com",
        465,
    )
    assert config.dedupe.window == 7200
    assert [k.name for k in config.dedupe.keys] == ["fingerprint", "header:X-Key"]
    assert config.dedupe.fingerprint_headers == ("From", "Subject")
    assert [str(n) for n in config.listen.networks] == ["127.0.0.0/8", "::1/128"]
    assert [(r.name, r.window) for r in config.rules] == [("otp", 900)]
    assert (config.http.host, config.http.port) == ("127.0.0.1", 9025)


def test_a_value_yaml_reads_as_a_number_stays_text_where_the_key_wants_text() -> None:
    environ = {
        "RELAY_UPSTREAM__URL": "smtp://127.0.0.1:2526",
        "RELAY_UPSTREAM__USERNAME": "12345",
        "RELAY_RUNTIME__INSTANCE": "1",
    }
    config = load(None, check_paths=False, environ=environ)
    assert config.upstream.username == "12345"
    assert config.runtime.instance == "1"


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"RELAY_LISTEN__PROT": "1"}, "RELAY_LISTEN__PROT: listen.prot: unknown key"),
        ({"RELAY_FOO__BAR": "1"}, "RELAY_FOO__BAR: foo: unknown key"),
        ({"RELAY_PORT": "tcp://10.0.0.1:2525"}, "RELAY_PORT: port: unknown key"),
        ({"RELAY_LISTEN__": "1"}, "RELAY_LISTEN__: not a config variable"),
        ({"RELAY_LISTEN__PORT": "x"}, "RELAY_LISTEN__PORT: listen.port: expected a whole number"),
        ({"RELAY_DEDUPE__WINDOW": "2 days"}, "RELAY_DEDUPE__WINDOW: dedupe.window: '2 days'"),
        (
            {"RELAY_LISTEN__NETWORKS": "[127.0.0.0/8, ::1/128]"},
            "RELAY_LISTEN__NETWORKS: listen.networks: expected a non-empty list",
        ),
        (
            {"RELAY_DELIVERY__RETRY_INITIAL": "2h"},
            "RELAY_DELIVERY__RETRY_INITIAL: delivery.retry_max: must not be shorter",
        ),
        ({"RELAY_LISTEN": "oops", "RELAY_LISTEN__PORT": "1"}, "RELAY_LISTEN__PORT: listen is"),
    ],
)
def test_unknown_or_bad_variable_is_one_error_naming_it(env: dict[str, str], line: str) -> None:
    with pytest.raises(ConfigError) as error:
        load(None, check_paths=False, environ=env)
    assert str(error.value).startswith(line), error.value
    assert "\n" not in str(error.value)


def test_bad_variable_stops_every_command_with_exit_2_and_one_line(tmp_path: Path) -> None:
    for command in ("serve", "check-config", "stats"):
        result = relay_cli(command, env={"RELAY_LISTEN__PROT": "1"}, cwd=tmp_path)
        assert result.returncode == 2, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "dedup-relay: error: RELAY_LISTEN__PROT: listen.prot: unknown key"
        ), result.stderr


def test_secret_in_a_variable_is_refused_without_echoing_it(tmp_path: Path) -> None:
    result = relay_cli("check-config", env={"RELAY_UPSTREAM__PASSWORD": "hunter2"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "RELAY_UPSTREAM__PASSWORD: upstream.password: secrets do not belong" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_check_config_shows_each_value_and_where_it_came_from(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"listen": {"port": 2600}, "store": {"path": "db/x.db"}}))
    result = relay_cli(
        "check-config",
        "--config",
        str(path),
        env={"RELAY_DEDUPE__WINDOW": "2h", "RELAY_STORE__PATH": "db/relay.db"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    notes = {}
    for line in result.stdout.splitlines():
        text, _, note = line.partition("  # ")
        if note and ":" in text:
            notes[text.strip().split(":")[0]] = (text.strip(), note)
    assert notes["port"] == ("port: 2600", "file")
    assert notes["window"] == ("window: 2h", "env RELAY_DEDUPE__WINDOW")
    assert notes["path"] == ("path: db/relay.db", "env RELAY_STORE__PATH")
    assert notes["host"] == ("host: 127.0.0.1", "default")
    effective = yaml.safe_load(result.stdout)  # still YAML: the sources are comments
    assert effective["listen"]["port"] == 2600 and effective["dedupe"]["window"] == "2h"


def test_check_config_without_a_file_lists_defaults_and_environment(tmp_path: Path) -> None:
    result = relay_cli("check-config", env={"RELAY_LISTEN__PORT": "2601"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no config file" in result.stdout.splitlines()[0]
    sources = {line.rsplit("# ", 1)[1] for line in result.stdout.splitlines()[1:] if "# " in line}
    assert sources == {"default", "env RELAY_LISTEN__PORT"}


def test_sources_follow_a_whole_section_set_from_the_environment() -> None:
    layers = read_layers(None, {"RELAY_DEDUPE": "{window: 1h}", "RELAY_DEDUPE__MODE": "shadow"})
    assert layers.source("dedupe.window") == "env RELAY_DEDUPE"
    assert layers.source("dedupe.mode") == "env RELAY_DEDUPE__MODE"
    assert layers.source("listen.port") == "default"
    assert layers.config(check_paths=False).dedupe.mode == "shadow"


def test_relay_config_names_the_file_and_is_not_a_key(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere.yaml"
    path.write_text(yaml.safe_dump({"listen": {"port": 2700}}))
    result = relay_cli("check-config", env={"RELAY_CONFIG": str(path)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "port: 2700" in result.stdout
    missing = relay_cli(
        "check-config", env={"RELAY_CONFIG": str(tmp_path / "no.yaml")}, cwd=tmp_path
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_env_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"RELAY_HTTP__LISTEN: http\.listen: '9025' is not HOST"):
        load(None, check_paths=False, environ={"RELAY_HTTP__LISTEN": "9025"})


async def test_serve_runs_on_defaults_and_environment_without_any_config_file(
    tmp_path: Path, upstream: Upstream, relay_process: Any
) -> None:
    assert not (tmp_path / "config").exists()
    relay = relay_process(
        None,
        env={
            "RELAY_LISTEN__PORT": str(free_port()),
            "RELAY_UPSTREAM__URL": f"smtp://127.0.0.1:{upstream.port}",
            "RELAY_AUDIT__OUTPUT": "none",
        },
    )
    await asyncio.to_thread(relay.start)
    reply = await send(relay.port, make_message("no file at all"))
    assert reply.code == 250, reply.text
    await upstream.wait_for(1)
    assert (tmp_path / "data" / "relay.db").is_file()  # the default store, under the cwd
    assert await asyncio.to_thread(relay.terminate) == 0


def test_a_store_url_from_the_environment_replaces_the_files_store_path(tmp_path: Path) -> None:
    """The shipped config/relay.yaml names store.path, so RELAY_STORE__URL on top of it was
    refused as "not both" although the environment beats the file for every key."""
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"store": {"path": "data/relay.db", "keep_bodies": "1h"}}))
    url = "postgresql://relay@127.0.0.1:5432/relay"
    layers = read_layers(path, {"RELAY_STORE__URL": url})
    config = layers.config(check_paths=False)
    assert config.store.url is not None and config.store.url.startswith("postgresql://")
    assert config.store.keep_bodies == 3600  # the rest of the file's section still counts
    assert (layers.source("store.url"), layers.source("store.path")) == (
        "env RELAY_STORE__URL",
        "default",
    )
    # And the other way round; both from one layer are still a mistake.
    path.write_text(yaml.safe_dump({"store": {"url": url}}))
    config = load(path, check_paths=False, environ={"RELAY_STORE__PATH": "other.db"})
    assert (config.store.url, config.store.path) == (None, "other.db")
    both = {"RELAY_STORE__URL": url, "RELAY_STORE__PATH": "other.db"}
    with pytest.raises(ConfigError, match="not both"):
        load(None, check_paths=False, environ=both)
    # The image sets RELAY_STORE__PATH; an empty one makes way for the URL.
    image = {"RELAY_STORE__URL": url, "RELAY_STORE__PATH": ""}
    assert load(None, check_paths=False, environ=image).store.url is not None


def test_a_secret_read_through_nothing_is_not_credited_to_the_file(tmp_path: Path) -> None:
    """The shipped file writes `password_env: null`; check-config said the empty password came
    from the file "via password_env", although no password is read at all."""
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"upstream": {"password_env": None, "password_file": None}}))
    result = relay_cli("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    upstream = result.stdout.split("\nupstream:\n", 1)[1].split("\nstore:\n")[0]
    [password] = [line for line in upstream.splitlines() if line.strip().startswith("password:")]
    assert password.split("  # ")[1] == "default"
    result = relay_cli(
        "check-config",
        "--config",
        str(path),
        env={"RELAY_UPSTREAM__PASSWORD_ENV": "PW", "PW": "x", "RELAY_UPSTREAM__USERNAME": "u"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    upstream = result.stdout.split("\nupstream:\n", 1)[1].split("\nstore:\n")[0]
    [password] = [line for line in upstream.splitlines() if line.strip().startswith("password:")]
    assert password.split("  # ")[1] == "env RELAY_UPSTREAM__PASSWORD_ENV (via password_env)"
