"""Config and command line: every mistake is one clear line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import ConfigError, from_mapping, load, nameserver, to_mapping
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
        ({"upstreams": [{"url": "smtp://a"}]}, "upstreams[0].name: every upstream needs a name"),
        ({"upstreams": [{"name": "a"}]}, "upstreams[0].url: missing"),
        ({"upstreams": [{"name": "a b", "url": "smtp://a"}]}, "upstreams[0].name: 'a b' is not"),
        (
            {"upstreams": [{"name": "a", "url": "smtp://a"}, {"name": "a", "url": "smtp://b"}]},
            "upstreams[1].name: the name 'a' is used twice",
        ),
        ({"upstreams": {"name": "a"}}, "upstreams: expected a list"),
        ({"upstream": {"rate": "14 per second"}}, "upstream.rate: '14 per second' is not a rate"),
        ({"upstream": {"rate": "0/s"}}, "upstream.rate: '0/s' must allow at least some mail"),
        ({"upstream": {"max_connections": 0}}, "upstream.max_connections: 0 is out of range"),
        ({"upstream": {"allow_plaintext_auth": "yes"}}, "upstream.allow_plaintext_auth"),
        ({"upstream": {"dns_servers": ["dns.example"]}}, "upstream.dns_servers[0]: 'dns.example'"),
        ({"upstream": {"dns_servers": "10.0.0.53"}}, "upstream.dns_servers: expected a list"),
        ({"upstream": {"url": "mx://mx.example.com"}}, "upstream.url: 'mx://mx.example.com': mx:"),
        (
            {"upstream": {"url": "mx:", "username": "u", "password_env": "HOME"}},
            "upstream.username: mx: delivers to each recipient's own mail servers",
        ),
        (
            {"upstreams": [{"name": "a", "url": "smtp://a", "password": "x"}]},
            "upstreams[0].password: secrets do not belong in the YAML",
        ),
        ({"routes": [{"upstreams": ["a"]}]}, "routes: routes choose among named upstreams"),
        (
            {"upstreams": [{"name": "a", "url": "smtp://a"}], "routes": [{"match": {}}]},
            "routes[0].upstreams: missing",
        ),
        (
            {"upstreams": [{"name": "a", "url": "smtp://a"}], "routes": [{"upstreams": ["b"]}]},
            "routes[0].upstreams[0]: no upstream named 'b' (upstreams: a)",
        ),
        (
            {
                "upstreams": [{"name": "a", "url": "smtp://a"}],
                "routes": [{"upstreams": ["a"]}, {"match": {"user": "x"}, "upstreams": ["a"]}],
            },
            "routes[0]: a route without match takes every message",
        ),
        (
            {
                "upstreams": [{"name": "a", "url": "smtp://a"}],
                "routes": [{"match": {"recipient": "*"}, "upstreams": ["a"]}],
            },
            "routes[0].match.recipient: unknown key",
        ),
        (
            {
                "upstreams": [{"name": "a", "url": "smtp://a"}],
                "routes": [{"match": {"rule": "otp"}, "upstreams": ["a"]}],
            },
            "routes[0].match.rule: 'otp' names no rule (rules: none)",
        ),
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


def test_shipped_config_names_every_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README sends readers to config/relay.yaml for every key; a key missing there is one
    a new user cannot find (the PostgreSQL store's keys were)."""
    monkeypatch.chdir(tmp_path)
    shipped = yaml.safe_load((ROOT / "config" / "relay.yaml").read_text())

    def missing(defaults: dict[str, Any], written: dict[str, Any], where: str) -> list[str]:
        gaps = []
        for key, value in defaults.items():
            if key == "password":  # the resolved secret, never a key of the file
                continue
            if key not in written:
                gaps.append(where + key)
            elif isinstance(value, dict) and value and isinstance(written[key], dict):
                gaps += missing(value, written[key], f"{where}{key}.")
        return gaps

    assert missing(to_mapping(from_mapping({})), shipped, "") == []


def test_upstreams_and_routes_as_the_issue_writes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = from_mapping(
        yaml.safe_load(
            """
            upstream:
              timeout: 20s            # inherited by every entry
              dns_servers: [127.0.0.1:5353]
            upstreams:
              - name: primary
                url: smtp://smtp.provider-a.example:587
                rate: 14/s            # or 600/m
                max_connections: 4
              - name: backup
                url: smtps://smtp.provider-b.example:465
                allow_plaintext_auth: true
              - name: brand-b
                url: smtp://smtp.provider-c.example:587
                rate: 600/m
              - name: direct
                url: "mx:"
            routes:                   # first match wins; a route without match is the default
              - match: {sender: "*@brand-b.example"}
                upstreams: [brand-b]
              - upstreams: [primary, backup]   # failover order
            """
        )
    )
    primary, backup, brand_b, direct = config.upstreams
    assert (primary.name, primary.host, primary.port, primary.max_connections) == (
        "primary",
        "smtp.provider-a.example",
        587,
        4,
    )
    assert primary.rate is not None and primary.rate.interval == pytest.approx(1 / 14)
    assert brand_b.rate is not None and brand_b.rate.interval == pytest.approx(0.1)
    assert (backup.scheme, backup.port, backup.allow_plaintext_auth) == ("smtps", 465, True)
    assert not primary.allow_plaintext_auth
    assert (direct.scheme, direct.port, direct.label) == ("mx", 25, "direct")
    assert all(u.timeout == 20.0 for u in config.upstreams)
    assert all(u.dns_servers == ("127.0.0.1:5353",) for u in config.upstreams)
    assert [(r.match is None, r.upstreams) for r in config.routes] == [
        (False, ("brand-b",)),
        (True, ("primary", "backup")),
    ]
    assert config.routes[0].match is not None
    assert config.routes[0].match.sender == ("*@brand-b.example",)
    # check-config prints it back in the same shape.
    shown = to_mapping(config)
    assert [u["name"] for u in shown["upstreams"]] == ["primary", "backup", "brand-b", "direct"]
    assert shown["upstreams"][0]["rate"] == "14/s"
    assert shown["routes"] == [
        {"match": {"sender": ["*@brand-b.example"]}, "upstreams": ["brand-b"]},
        {"upstreams": ["primary", "backup"]},
    ]


def test_the_single_upstream_keeps_working_as_one_unnamed_upstream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = from_mapping({"upstream": {"url": "smtp://smarthost.example:2525", "rate": "5/s"}})
    [only] = config.delivery_upstreams
    assert (only.name, only.label) == ("", "smtp://smarthost.example:2525")
    assert config.upstreams == () and config.routes == ()
    assert "name" not in to_mapping(config)["upstream"]


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("serve", "--bogus"), "unrecognized arguments: --bogus"),
        (("serve", "--workers", "0"), "argument --workers: must be at least 1"),
        (("backup",), "the following arguments are required: --to"),
        (("nosuch",), "argument COMMAND: invalid choice: 'nosuch'"),
        ((), "the following arguments are required: COMMAND"),
    ],
)
def test_a_flag_mistake_is_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    """As a config mistake is: the README promises one line for either, not argparse's usage
    block above a differently prefixed line."""
    result = run_cli(*args)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"dedup-relay: error: {message}")
    assert "--help" in line


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`check-config | head -1` or `log | head`: the reader leaving is no reason for a
    traceback. The pipe's read end is closed before the command runs, so every write fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "relay", "check-config"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert result.stderr == ""


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


# Each input as http.listen and as a resolver in upstream.dns_servers take it: (host, port), or
# None when refused. Both split HOST:PORT and [IPv6]:PORT alike; then a listener takes any host
# and port 0 (any free port), a resolver only an IP address, port 53 when none is given.
HOST_PORTS = [
    ("127.0.0.1:9025", ("127.0.0.1", 9025), ("127.0.0.1", 9025)),
    ("[::1]:9025", ("::1", 9025), ("::1", 9025)),
    ("[127.0.0.1]:53", ("127.0.0.1", 53), ("127.0.0.1", 53)),
    ("localhost:9025", ("localhost", 9025), None),
    ("127.0.0.1:0", ("127.0.0.1", 0), None),
    ("127.0.0.1:65535", ("127.0.0.1", 65535), ("127.0.0.1", 65535)),
    ("127.0.0.1:65536", None, None),
    ("127.0.0.1:123456", None, None),
    ("127.0.0.1", None, ("127.0.0.1", 53)),
    ("::1", None, ("::1", 53)),
    ("fd00::53:53", None, ("fd00::53:53", 53)),
    ("[::1]", None, None),
    ("::1:53", None, ("::1:53", 53)),
    ("[::zz]:53", None, None),
    (" 127.0.0.1:53", ("127.0.0.1", 53), ("127.0.0.1", 53)),
    ("127.0.0.1 :53", None, None),
    ("127.0.0.1:", None, None),
    (":53", None, None),
    ("host:port", None, None),
]


@pytest.mark.parametrize(("text", "listener", "resolver"), HOST_PORTS)
def test_http_listen_and_dns_servers_split_host_and_port_alike(
    text: str,
    listener: tuple[str, int] | None,
    resolver: tuple[str, int] | None,
) -> None:
    def http(value: str) -> tuple[str, int] | None:
        try:
            config = from_mapping({"http": {"listen": value}}, check_paths=False)
        except ConfigError as exc:
            assert str(exc).startswith("http.listen: ")
            return None
        return config.http.host, config.http.port

    def dns(value: str) -> tuple[str, int] | None:
        upstream = {"url": "mx:", "dns_servers": [value]}
        try:
            config = from_mapping({"upstream": upstream}, check_paths=False)
        except ConfigError as exc:
            assert str(exc).startswith("upstream.dns_servers[0]: ")
            return None
        return nameserver(config.upstream.dns_servers[0])  # as the resolver is given it

    assert (http(text), dns(text)) == (listener, resolver)
