"""A private PostgreSQL cluster for tests: initdb and pg_ctl in a temporary directory.

No system service is used or touched: the cluster has its own data directory under /tmp,
listens on a free 127.0.0.1 port only (no Unix socket), and runs as an unprivileged user
(`postgres`, which Debian's package creates, when the tests run as root; PostgreSQL refuses
to run as root). A missing PostgreSQL skips the test on a developer machine and fails it
under CI=true, like the Postfix tests.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.mta import free_port, unavailable

__all__ = ["PASSWORD", "USER", "Cluster", "find_bindir", "private_cluster"]

PACKAGE = "postgresql"
# The role the relay connects as; it owns the test databases and signs in with a password.
USER = "relay"
PASSWORD = "pg-" + secrets.token_hex(8)
_SERVICE_USER = "postgres"


def find_bindir() -> Path:
    """Debian keeps initdb and pg_ctl in /usr/lib/postgresql/VERSION/bin, off PATH."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not versions:
        unavailable(
            f"PostgreSQL (initdb, pg_ctl) not found: install the Debian package {PACKAGE!r}"
        )
    return versions[-1].parent


class Cluster:
    """One private server; `restart()` and `stop()` act on it as an operator would."""

    def __init__(self, bindir: Path, root: Path, port: int, run_as: str | None) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = port
        self._run_as = run_as
        self._databases = 0

    def _command(self, program: str, *args: str) -> list[str]:
        command = [str(self.bindir / program), *args]
        if self._run_as is None:
            return command
        return ["runuser", "-u", self._run_as, "--", *command]

    def _run(self, program: str, *args: str, timeout: float = 120.0) -> str:
        done = subprocess.run(
            self._command(program, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{done.stderr}\n{log}")
        return done.stdout

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        # The superuser only without a password and only for set-up; the relay signs in.
        (self.data / "pg_hba.conf").write_text(
            "host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                "unix_socket_directories = ''\n"
                # A test cluster: a machine crash is not what the tests are about.
                "fsync = off\nfull_page_writes = off\n"
                "max_connections = 300\nshared_buffers = 64MB\n"
            )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-m",
            mode,
            "-w",
            "-t",
            "60",
            "restart",
        )

    def sql(self, statement: str, database: str = "postgres") -> str:
        return self._run(
            "psql",
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            database,
            "-c",
            statement,
        )

    def create_role(self) -> None:
        self.sql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")

    def create_database(self) -> str:
        self._databases += 1
        name = f"relay_{self._databases}"
        self.sql(f"CREATE DATABASE {name} OWNER {USER}")
        return name

    def drop_database(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def url(self, database: str, user: str = USER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"


def _service_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_SERVICE_USER)
    except KeyError:
        unavailable(
            f"system user {_SERVICE_USER!r} missing (PostgreSQL will not run as root):"
            f" install the Debian package {PACKAGE!r}"
        )
    if shutil.which("runuser") is None:
        unavailable("runuser not found: install the Debian package 'util-linux'")
    return _SERVICE_USER


@contextlib.contextmanager
def private_cluster() -> Iterator[Cluster]:
    """A running cluster with the `relay` role; stopped and removed however the caller ends."""
    bindir = find_bindir()
    run_as = _service_user()
    root = Path(tempfile.mkdtemp(prefix="dedup-relay-pg-"))
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    cluster = Cluster(bindir, root, free_port(), run_as)
    try:
        cluster.init()
        cluster.start()
        try:
            cluster.create_role()
            yield cluster
        finally:
            with contextlib.suppress(Exception):
                cluster.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)
