"""What `serve` says when it cannot start: what failed, under which key, and exit status 1
(a ConfigError, found before anything is opened, is 2), in one line, for one process and
for `--workers N` alike, never a secret."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Certificates, base_config, deep_merge, relay_cli
from tests.faults import small_disk
from tests.mta import free_port

# One process, and a parent whose workers do the opening.
WORKERS = pytest.mark.parametrize("workers", ["1", "2"])


def serve(tmp_path: Path, workers: str, **settings: Any) -> tuple[int, list[str]]:
    """`serve` on a config of its own; its exit status and what it said on stderr."""
    config = deep_merge(base_config(tmp_path, free_port()), {"listen": {"port": free_port()}})
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(deep_merge(config, settings)))
    done = relay_cli("serve", "--config", str(path), "--workers", workers, cwd=tmp_path)
    return done.returncode, done.stderr.strip().splitlines()


def audit_log_failure(path: Path, reason: str) -> list[str]:
    return [f"dedup-relay: error: cannot open the audit log {path} (audit.output): {reason}"]


@WORKERS
def test_an_audit_output_that_is_a_directory_is_named_at_start(
    tmp_path: Path, workers: str
) -> None:
    folder = tmp_path / "audit"
    folder.mkdir()
    status, said = serve(tmp_path, workers, audit={"output": str(folder)})
    assert (status, said) == (1, audit_log_failure(folder, "Is a directory"))


@WORKERS
def test_an_audit_output_that_cannot_be_opened_is_named_at_start(
    tmp_path: Path, workers: str
) -> None:
    target = tmp_path / "audit.sock"
    with socket.socket(socket.AF_UNIX) as listener:  # a file the kernel will not open
        listener.bind(str(target))
        status, said = serve(tmp_path, workers, audit={"output": str(target)})
    assert (status, said) == (1, audit_log_failure(target, "No such device or address"))


@WORKERS
def test_an_audit_output_on_a_full_disk_is_named_at_start(tmp_path: Path, workers: str) -> None:
    with small_disk(tmp_path / "disk", "1m", files=1) as disk:
        target = disk / "audit.log"
        status, said = serve(tmp_path, workers, audit={"output": str(target)})
    assert (status, said) == (1, audit_log_failure(target, "No space left on device"))


@WORKERS
def test_an_implicit_tls_port_a_worker_cannot_bind_is_named_once(
    tmp_path: Path, workers: str, certificates: Certificates
) -> None:
    with socket.socket() as taken:  # no SO_REUSEPORT: a worker's shared bind must fail too
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        tls = {
            "cert_file": str(certificates.cert_file),
            "key_file": str(certificates.key_file),
            "implicit_port": port,
        }
        status, said = serve(tmp_path, workers, listen={"tls": tls})
    assert status == 1
    assert said == [
        f"dedup-relay: error: cannot listen on 127.0.0.1:{port} (listen.tls.implicit_port):"
        " Address already in use (another process has it: a relay already running on this"
        " config?)"
    ]


def test_a_tls_key_that_cannot_be_read_is_named_as_the_key(
    tmp_path: Path, certificates: Certificates
) -> None:
    unreadable = "/proc/self/mem"  # a regular file that reading from its start fails on
    tls = {"cert_file": str(certificates.cert_file), "key_file": unreadable}
    status, said = serve(tmp_path, "1", listen={"tls": tls})
    assert (status, said) == (
        2,
        [f"dedup-relay: error: listen.tls.key_file: cannot read {unreadable}: Input/output error"],
    )


def test_a_password_file_that_is_not_text_is_named_without_its_content(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_bytes(b"\xffsecret-in-latin1\n")
    upstream = {"username": "relay", "password_file": str(secret)}
    status, said = serve(tmp_path, "1", upstream=upstream)
    assert (status, said) == (
        2,
        [f"dedup-relay: error: upstream.password_file: {secret} is not UTF-8 text"],
    )


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"audit": {"output": "{file}/audit.log"}}, "audit.output"),
        (
            {"listen": {"tls": {"cert_file": "{file}", "key_file": "{file}"}}},
            "listen.tls.cert_file",
        ),
        ({"auth": {"users_file": "{file}"}}, "auth.users_file"),
    ],
)
def test_a_postgresql_store_does_not_skip_the_other_start_checks(
    tmp_path: Path, settings: dict[str, Any], key: str
) -> None:
    file = tmp_path / "not-a-directory"
    file.write_text("x\n")
    raw = yaml.safe_dump(settings).replace("{file}", str(file))
    path = tmp_path / "relay.yaml"
    store = {"store": {"url": "postgresql://relay@127.0.0.1:1/relay"}}
    path.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(raw), store)))
    done = relay_cli("check-config", "--config", str(path), cwd=tmp_path)
    assert done.returncode == 2, done.stdout
    assert done.stderr.startswith(f"dedup-relay: error: {key}: ")


@WORKERS
def test_a_store_path_that_is_a_directory_is_named_as_store_path(
    tmp_path: Path, workers: str
) -> None:
    folder = tmp_path / "relay.db"
    folder.mkdir()
    status, said = serve(tmp_path, workers, store={"path": str(folder)})
    assert (status, said) == (
        1,
        [
            f"dedup-relay: error: cannot open the store {folder} (store.path):"
            " unable to open database file"
        ],
    )
