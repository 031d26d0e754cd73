"""Shared fixtures: a scriptable upstream, relays in-process and as subprocesses, SMTP clients.

Everything speaks real SMTP over 127.0.0.0/8. Waiting is always for an event
(a message arriving, the queue draining, a log line) with a deadline, never
for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import aiosmtplib
import pytest
import yaml
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.app import App, StoreFactory
from relay.clock import SYSTEM, Clock
from relay.config import from_mapping
from relay.decision import Claim
from relay.store import Submission, open_store
from tests.mta import free_port

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 20.0
# Tasks of an idle relay that wait on its clock: the dispatcher, housekeeping, lease
# renewal and the instance heartbeat. A test on a ManualClock waits for all of them.
CLOCK_SLEEPERS = 4


# --- waiting ---------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = DEADLINE,
    what: str = "condition",
) -> None:
    """Wait until `check` holds; fail with `what` when the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def settled(clock: Any, what: str = "the relay to settle on its clock") -> None:
    """Until every task of the relay that waits on `clock` (a ManualClock) is waiting."""
    await eventually(lambda: clock.sleepers >= CLOCK_SLEEPERS, what=what)


# --- messages --------------------------------------------------------------


def make_message(
    subject: str = "Your receipt",
    body: str = "Thank you for your order.\n",
    *,
    sender: str = "shop@example.com",
    to: str = "alice@example.org",
    message_id: str | None = "auto",
    extra: dict[str, str] | None = None,
    attachment: bytes | None = None,
) -> bytes:
    """A message as a mail library would build it: fresh Date, Message-ID and boundary each call."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    if message_id == "auto":
        msg["Message-ID"] = make_msgid(domain="example.com")
    elif message_id is not None:
        msg["Message-ID"] = message_id
    for name, value in (extra or {}).items():
        msg[name] = value
    msg.set_content(body)
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="pdf", filename="doc.pdf")
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass
class Reply:
    code: int
    text: str


async def send(
    port: int,
    data: bytes,
    *,
    sender: str = "shop@example.com",
    rcpts: tuple[str, ...] = ("alice@example.org",),
    host: str = "127.0.0.1",
    source: str | None = None,
) -> Reply:
    """One SMTP transaction; returns the reply to the end of DATA (or the first refusal)."""
    client = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        start_tls=False,
        timeout=DEADLINE,
        source_address=(source, 0) if source else None,
    )
    await client.connect()
    try:
        await client.ehlo()
        return await transact(client, data, sender, rcpts)
    finally:
        with contextlib.suppress(Exception):
            await client.quit()


async def transact(
    client: aiosmtplib.SMTP, data: bytes, sender: str, rcpts: tuple[str, ...]
) -> Reply:
    """MAIL, RCPTs and DATA on a connected client; the last reply, or the first refusal."""
    try:
        await client.mail(sender)
        for rcpt in rcpts:
            await client.rcpt(rcpt)
        response = await client.data(data)
    except aiosmtplib.SMTPResponseException as exc:
        return Reply(exc.code, exc.message)
    return Reply(response.code, response.message)


def queued_id(reply: Reply) -> str:
    """The relay's queue id from its 250 to a message it will forward."""
    match = re.search(r"queued as (\w+)", reply.text)
    assert reply.code == 250 and match, reply
    return match.group(1)


def repeat_id(reply: Reply) -> str:
    """The queue id the relay gave a repeat it did not forward."""
    match = re.search(r"\(id (\w+)\)", reply.text)
    assert reply.code == 250 and match, reply
    return match.group(1)


# --- the upstream ----------------------------------------------------------


@dataclass
class Delivered:
    sender: str
    rcpts: list[str]
    data: bytes
    tls: bool
    login: str | None


@dataclass
class Script:
    """How the upstream misbehaves; tests change it while the relay runs.

    `stall` makes the upstream stop answering at one stage ("rcpt": before the payload,
    "data": with the whole payload received) and set `stalled`, so a test can act on the
    relay while its worker waits there; `go_on()` lets it answer again.
    """

    rcpt: dict[str, str] = field(default_factory=dict)
    mail: str | None = None
    data: list[str] = field(default_factory=list)
    drop_after_data: int = 0
    data_delay: float = 0.0
    stall: str | None = None
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    _go_on: asyncio.Event = field(default_factory=asyncio.Event)

    async def stall_at(self, stage: str) -> None:
        if self.stall == stage:
            self.stalled.set()
            await self._go_on.wait()

    def go_on(self) -> None:
        """End the stall: sessions waiting in it carry on, later ones do not stop."""
        self.stall = None
        self._go_on.set()


class Upstream:
    """An aiosmtpd server in this process standing in for the real upstream."""

    def __init__(
        self,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        auth: tuple[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.messages: list[Delivered] = []
        self.dropped: list[Delivered] = []
        self.script = Script()
        self.connections = 0
        self.auth_attempts = 0
        self.port = 0
        self._tls = tls_context
        self._implicit = implicit_tls
        self._auth = auth
        self._server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()

    # aiosmtpd hooks
    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.script.mail:
            return self.script.mail
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        await self.script.stall_at("rcpt")
        reply = self.script.rcpt.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        login = None
        if session.authenticated:
            login = session.auth_data.login.decode()
        item = Delivered(
            envelope.mail_from or "",
            list(envelope.rcpt_tos),
            bytes(envelope.original_content or b""),
            session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None,
            login,
        )
        await self.script.stall_at("data")
        if self.script.data_delay:
            await asyncio.sleep(self.script.data_delay)
        if self.script.drop_after_data > 0:
            self.script.drop_after_data -= 1
            self.dropped.append(item)
            server.transport.abort()
            await asyncio.Event().wait()
        if self.script.data:
            reply = self.script.data.pop(0)
            if not reply.startswith("2"):
                return reply
        self.messages.append(item)
        return f"250 2.0.0 Ok: queued as UP{len(self.messages):04d}"

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> Any:
        from aiosmtpd.smtp import AuthResult

        assert self._auth is not None
        self.auth_attempts += 1
        ok = (auth_data.login.decode(), auth_data.password.decode()) == self._auth
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    def _factory(self) -> SMTP:
        upstream = self

        class Counting(SMTP):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if self.transport is None:
                    upstream.connections += 1
                    upstream._sessions.add(self)
                super().connection_made(transport)

            def connection_lost(self, error: Exception | None) -> None:
                upstream._sessions.discard(self)
                super().connection_lost(error)

        kwargs: dict[str, Any] = {
            "hostname": "upstream.test",
            "enable_SMTPUTF8": True,
            "loop": asyncio.get_running_loop(),
        }
        if self._tls is not None and not self._implicit:
            kwargs["tls_context"] = self._tls
        if self._auth is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_require_tls"] = False
            kwargs["auth_required"] = True
        return Counting(self, **kwargs)

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            self._factory,
            host=self.host,
            port=port or self.port,
            ssl=self._tls if self._implicit else None,
            reuse_address=True,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Go down hard, as a crashed upstream would: listener and open sessions."""
        if self._server is not None:
            self._server.close()
            for session in list(self._sessions):
                if session.transport is not None:
                    session.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def wait_for(self, count: int, timeout: float = DEADLINE) -> list[Delivered]:
        await eventually(
            lambda: len(self.messages) >= count,
            timeout,
            f"{count} message(s) upstream (have {len(self.messages)})",
        )
        return self.messages


class LoopbackServer:
    """A TCP server on 127.0.0.1 whose SMTP side a test writes by hand, in `_session`."""

    port = 0
    _server: asyncio.Server | None = None

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


_Server = TypeVar("_Server", Upstream, LoopbackServer)


@contextlib.asynccontextmanager
async def running(server: _Server) -> AsyncIterator[_Server]:
    """An extra server for one test (TLS, AUTH, hand-written), stopped however it ends."""
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with running(Upstream()) as server:
        yield server


# --- relays ----------------------------------------------------------------


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


async def primary_and_backup(
    make_relay: RelayFactory, primary: int, backup: int, **overrides: Any
) -> Relay:
    """A relay whose one route fails over from the upstream on port `primary` to `backup`."""
    return await make_relay(
        upstreams=[
            {"name": "primary", "url": f"smtp://127.0.0.1:{primary}"},
            {"name": "backup", "url": f"smtp://127.0.0.1:{backup}"},
        ],
        routes=[{"upstreams": ["primary", "backup"]}],
        **overrides,
    )


def base_config(tmp: Path, upstream_port: int) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0, "hostname": "relay.test"},
        "upstream": {"url": f"smtp://127.0.0.1:{upstream_port}", "timeout": "5s"},
        "store": {"path": str(tmp / "relay.db")},
        "delivery": {"retry_initial": "100ms", "retry_max": "500ms", "concurrency": 4},
        "audit": {"output": "none"},
        "runtime": {"instance": "test", "shutdown_grace": "3s"},
    }


# --- store submissions -------------------------------------------------------


def submission(
    queue_id: str,
    *rcpts: str,
    at: float = 1_800_000_000.0,
    key: Claim | None = None,
    data: bytes | None = None,
    sender: str = "shop@example.com",
    user: str | None = None,
) -> Submission:
    """What the intake hands the store, for tests that drive a store directly."""
    return Submission(
        queue_id=queue_id,
        received_at=at,
        sender=sender,
        recipients=rcpts or ("alice@example.org",),
        data=data if data is not None else make_message(subject=queue_id),
        message_id=f"{queue_id}@example.com",
        client="127.0.0.1",
        user=user,
        helo="app.test",
        smtputf8=False,
        body8bit=False,
        claim=key,
    )


# --- the command line as an operator runs it -----------------------------------


@dataclass
class Run:
    code: int
    out: str
    err: str

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines()]

    def events(self) -> list[str]:
        return [r["event"] for r in self.records()]


async def cli(
    config: Path, *args: str, tz: str | None = None, env: dict[str, str] | None = None
) -> Run:
    """`python -m relay ARGS --config FILE` without blocking the loop the relay runs on."""
    environ = {**os.environ, **(env or {})}
    if tz is not None:
        environ["TZ"] = tz
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        *args,
        "--config",
        str(config),
        cwd=config.parent,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE * 2)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


# --- store backends ----------------------------------------------------------

PG_PASSWORD_ENV = "DEDUP_TEST_PG_PASSWORD"
# For `pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)`.
BACKENDS = ("sqlite", "postgres")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """One private PostgreSQL cluster for the whole run, started the first time a test asks."""
    from tests.pg import private_cluster

    with private_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh database in the private cluster, owned by the relay's role; its password is in
    the environment variable PG_PASSWORD_ENV names (subprocess relays inherit it)."""
    from tests.pg import PASSWORD

    cluster = request.getfixturevalue("pg_cluster")
    monkeypatch.setenv(PG_PASSWORD_ENV, PASSWORD)
    name = cluster.create_database()
    yield cluster.url(name)
    cluster.drop_database(name)


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> str:
    """Which store backend `make_relay` and `store_config` use: "sqlite" unless a module
    parametrises it (indirectly) to run its tests on both, as the store's contract tests do."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def store_config(
    store_backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> dict[str, Any]:
    """The `store` section for the backend under test."""
    if store_backend == "postgres":
        return {"url": request.getfixturevalue("pg_url"), "password_env": PG_PASSWORD_ENV}
    return {"path": str(tmp_path / "relay.db")}


def pg_params(sql: str) -> str:
    """A test's `?` placeholders as PostgreSQL's `$n`."""
    from relay.store.reader import numbered

    return numbered(sql)


class Relay:
    """A relay running in this process, with helpers to look inside its store (either backend;
    queries use `?` placeholders and SQL both backends speak)."""

    def __init__(self, app: App) -> None:
        self.app = app

    @property
    def port(self) -> int:
        return self.app.port

    @property
    def store(self) -> Any:
        return self.app.store

    @property
    def postgres(self) -> bool:
        return self.app.config.store.url is not None

    async def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        if self.postgres:
            async with self.app.store.connection() as db:
                return [tuple(row) for row in await db.fetch(pg_params(sql), *params)]
        async with self.app.store.reader.execute(sql, params) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]

    async def events(self, name: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM events" + (" WHERE event = ?" if name else "") + " ORDER BY id"
        params = (name,) if name else ()
        if self.postgres:
            async with self.app.store.connection() as db:
                return [dict(row) for row in await db.fetch(pg_params(sql), *params)]
        async with self.app.store.reader.execute(sql, params) as cursor:
            columns = [c[0] for c in cursor.description]
            return [dict(zip(columns, row, strict=True)) for row in await cursor.fetchall()]

    async def wait_for_events(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        """Every `name` event, once at least `count` of them are in the store."""

        async def enough() -> bool:
            return len(await self.events(name)) >= count

        await eventually(enough, what=f"{count} {name!r} event(s)")
        return await self.events(name)

    async def idle(self, timeout: float = DEADLINE) -> None:
        """Wait until nothing is queued or being sent (held messages do not count)."""

        async def drained() -> bool:
            rows = await self.rows(
                "SELECT count(*) FROM messages WHERE state IN ('queued', 'sending')"
            )
            return rows[0][0] == 0

        await eventually(drained, timeout, "the relay's queue to drain")

    async def stop(self) -> None:
        await self.app.stop()


# What the `make_relay` fixture gives a test.
RelayFactory = Callable[..., Awaitable[Relay]]


async def left_mid_attempt(path: Path, owner: str, now: float, lease_for: float = 600.0) -> str:
    """A store as a relay that died during an attempt leaves it: one message, leased by `owner`
    at `now`, no outcome recorded. Returns its queue id."""
    from relay.decision import Claim
    from relay.store import Submission
    from relay.store.sqlite import SqliteStore

    store = SqliteStore(str(path))
    await store.open()
    try:
        sub = Submission(
            queue_id="LEFT1",
            received_at=now,
            sender="shop@example.com",
            recipients=("alice@example.org",),
            data=make_message(message_id="<left@example.com>"),
            message_id="left@example.com",
            client="127.0.0.1",
            user=None,
            helo="test",
            smtputf8=False,
            body8bit=False,
            claim=Claim(
                "global", "left@example.com", "message-id", "f" * 64, 86400.0, "drop", "reject"
            ),
        )
        assert (await store.accept(sub)).forward == sub.recipients
        batch = await store.lease(owner, 10, now, lease_for)
        assert [lease.queue_id for lease in batch.leases] == [sub.queue_id]
    finally:
        await store.close()
    return sub.queue_id


@pytest.fixture
async def make_relay(
    tmp_path: Path, upstream: Upstream, store_config: dict[str, Any]
) -> AsyncIterator[RelayFactory]:
    running: list[Relay] = []

    async def make(
        *, clock: Clock = SYSTEM, store_factory: StoreFactory = open_store, **overrides: Any
    ) -> Relay:
        raw = base_config(tmp_path, upstream.port)
        raw["store"] = dict(store_config)
        raw = deep_merge(raw, overrides)
        app = App(from_mapping(raw), clock=clock, store_factory=store_factory)
        await app.start()
        relay = Relay(app)
        running.append(relay)
        return relay

    yield make
    for relay in running:
        if relay.app.store.running:
            await relay.stop()


@pytest.fixture
async def relay(make_relay: Callable[..., Awaitable[Relay]]) -> Relay:
    return await make_relay()


class RelayProcess:
    """`python -m relay serve` as a child process, as a user would run it.

    Without a config path it runs on defaults and `env` alone, as in a container.
    """

    def __init__(
        self, config_path: Path | None, cwd: Path, env: dict[str, str] | None = None
    ) -> None:
        self.config_path = config_path
        self.cwd = cwd
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.instance: str | None = None
        self.args: list[str] = []  # more `serve` flags, such as --workers
        self.port = 0
        self.stderr_lines: list[str] = []

    def start(self, timeout: float = DEADLINE) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        extra = ["--instance", self.instance] if self.instance else []
        extra += self.args
        if self.config_path is not None:
            extra += ["--config", str(self.config_path)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", *extra],
            cwd=self.cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline().decode()
            if not line:
                raise AssertionError("relay exited during start:\n" + "".join(self.stderr_lines))
            self.stderr_lines.append(line)
            match = re.search(r"listening on [\d.]+:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                return
        raise AssertionError("relay did not start:\n" + "".join(self.stderr_lines))

    def drain_stderr(self) -> None:
        """Keep reading stderr into `stderr_lines`: a full pipe would block the relay's logging."""
        import threading

        assert self.proc is not None and self.proc.stderr is not None
        stream = self.proc.stderr

        def read() -> None:
            for line in iter(stream.readline, b""):
                self.stderr_lines.append(line.decode("utf-8", "replace"))

        threading.Thread(target=read, name="relay-stderr", daemon=True).start()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = DEADLINE) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.kill()
            if self.proc.stderr is not None:
                self.proc.stderr.close()


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    started: list[RelayProcess] = []

    def make(config: dict[str, Any] | None, env: dict[str, str] | None = None) -> RelayProcess:
        path = None
        if config is not None:
            path = tmp_path / f"relay-{len(started)}.yaml"
            path.write_text(yaml.safe_dump(config))
        process = RelayProcess(path, tmp_path, env)
        started.append(process)
        return process

    yield make
    for process in started:
        process.close()


def relay_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m relay ARGS` with only the RELAY_* variables given here, none inherited."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        cwd=cwd,
        timeout=timeout,
    )


def process_config(tmp_path: Path, upstream: Upstream, **extra: Any) -> dict[str, Any]:
    """A config for `relay_process`: the test's upstream, a port of its own, then `extra`."""
    config = base_config(tmp_path, upstream.port)
    config["listen"]["port"] = free_port()
    return deep_merge(config, extra)


# --- the HTTP side port -----------------------------------------------------


@dataclass
class HttpReply:
    status: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


async def http_get(port: int, path: str, host: str = "127.0.0.1") -> HttpReply:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session,
        session.get(f"http://{host}:{port}{path}") as response,
    ):
        return HttpReply(response.status, await response.text())


# --- TLS material ----------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throwaway CA and a certificate for 127.0.0.1 signed by it."""
    if not any((Path(p) / "openssl").exists() for p in os.environ["PATH"].split(":")):
        message = "openssl is missing: apt-get install -y openssl"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("tls")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=dedup-relay test CA",
        cwd=folder,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
        cwd=folder,
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        cwd=folder,
    )
    return Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key")


# --- the front door: a raw SMTP dialog, users, TLS and AUTH ----------------

PASSWORD = "correct horse battery staple"


class Dialog:
    """One SMTP session spoken line by line, for tests that must see every reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls,
        port: int,
        *,
        source: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> tuple[Dialog, str]:
        """Connect (with TLS from the first byte when `tls` is given); returns the greeting."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            local_addr=(source, 0) if source else None,
            ssl=tls,
            server_hostname="127.0.0.1" if tls else None,
        )
        dialog = cls(reader, writer)
        return dialog, await dialog.reply()

    async def reply(self, timeout: float = DEADLINE) -> str:
        """One whole reply, its lines joined with newlines ('' when the server hung up)."""
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return "\n".join(lines)
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    async def send(self, line: str | bytes) -> None:
        raw = line.encode() if isinstance(line, str) else line
        self.writer.write(raw if raw.endswith(b"\n") else raw + b"\r\n")
        await self.writer.drain()

    async def command(self, line: str | bytes) -> str:
        await self.send(line)
        return await self.reply()

    async def starttls(self, context: ssl.SSLContext) -> str:
        reply = await self.command("STARTTLS")
        if reply.startswith("220"):
            await self.writer.start_tls(context, server_hostname="127.0.0.1")
        return reply

    async def closed(self, timeout: float = DEADLINE) -> bytes:
        """Everything the server still sends until it hangs up."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def write_users(path: Path, users: dict[str, str]) -> Path:
    """A users file of argon2id hashes (cheap parameters: the tests check logic, not cost)."""
    import argon2

    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    path.write_text("".join(f"{name}:{hasher.hash(pw)}\n" for name, pw in users.items()))
    return path


def break_users_file(path: Path, how: str) -> None:
    """What a reload may meet: a path it cannot read, or a file that is not UTF-8."""
    if how == "unreadable":  # a directory: root reads any file, whatever its mode
        path.unlink()
        path.mkdir()
    else:  # an editor saved it in Latin-1
        write_users(path, {"alice": "changed", "carol": PASSWORD})
        path.write_bytes(path.read_bytes() + b"# caf\xe9\n")


def client_context(certificates: Certificates) -> ssl.SSLContext:
    """What a careful client does: trust the test CA only and check the name."""
    return ssl.create_default_context(cafile=str(certificates.ca_file))


def secure_config(tmp: Path, certificates: Certificates, **auth: Any) -> dict[str, Any]:
    """Overrides for make_relay: only 127.0.0.1 is trusted; STARTTLS, implicit TLS and AUTH."""
    users = write_users(tmp / "users", {"alice": PASSWORD, "bob": PASSWORD})
    return {
        "listen": {
            "networks": ["127.0.0.1/32"],
            "tls": {
                "cert_file": str(certificates.cert_file),
                "key_file": str(certificates.key_file),
                "implicit_port": 0,
            },
        },
        "auth": {"users_file": str(users), "failure_delay": "10ms", **auth},
    }


OUTSIDER = "127.0.0.2"  # not on listen.networks in secure_config


def plain(user: str = "alice", password: str = PASSWORD) -> str:
    """An AUTH PLAIN command line with its initial response."""
    import base64

    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.fixture
async def secure(
    make_relay: Callable[..., Awaitable[Relay]], tmp_path: Path, certificates: Certificates
) -> Relay:
    """A relay on secure_config: STARTTLS, implicit TLS and AUTH for alice and bob."""
    return await make_relay(**secure_config(tmp_path, certificates))


@contextlib.asynccontextmanager
async def _logged_in(
    port: int, certificates: Certificates, user: str, password: str, source: str
) -> AsyncIterator[tuple[aiosmtplib.SMTP, Reply]]:
    """An aiosmtplib client after STARTTLS and AUTH, with the reply to AUTH; QUIT at the end."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        start_tls=True,
        tls_context=client_context(certificates),
        timeout=DEADLINE,
        source_address=(source, 0),
    )
    await client.connect()
    try:
        try:
            answer = await client.login(user, password)
            reply = Reply(answer.code, answer.message)
        except aiosmtplib.SMTPResponseException as exc:
            reply = Reply(exc.code, exc.message)
        yield client, reply
    finally:
        with contextlib.suppress(Exception):
            await client.quit()


async def send_authenticated(
    port: int,
    data: bytes,
    certificates: Certificates,
    *,
    user: str = "alice",
    password: str = PASSWORD,
    sender: str = "shop@example.com",
    rcpts: tuple[str, ...] = ("alice@example.org",),
    source: str = "127.0.0.2",
) -> Reply:
    """STARTTLS, AUTH, one transaction, as an app outside listen.networks would send."""
    async with _logged_in(port, certificates, user, password, source) as (client, reply):
        if reply.code != 235:
            return reply
        return await transact(client, data, sender, rcpts)


async def smtp_login(port: int, certificates: Certificates, user: str, password: str) -> int:
    """The reply code to AUTH from an app outside listen.networks, over STARTTLS (aiosmtplib)."""
    async with _logged_in(port, certificates, user, password, OUTSIDER) as (_, reply):
        return reply.code


# --- the log as the review commands and pages search it -------------------------

# (event, queue id) of each event a search should find; a multiset, since the order of events
# from concurrent deliveries is not what these searches promise.
Found = Counter[tuple[str, str]]


def found_in(records: list[dict[str, Any]]) -> Found:
    return Counter((r["event"], r["queue_id"]) for r in records)


@pytest.fixture
def review_config(tmp_path: Path, store_config: dict[str, Any]) -> Path:
    """The operator's config for `relay log` and `show`: the store the relay under test writes,
    on whichever backend it runs (a PostgreSQL password stays in the environment)."""
    path = tmp_path / "review.yaml"
    path.write_text(yaml.safe_dump({"store": store_config}))
    return path


async def mail_from_two_users_and_a_trusted_client(
    relay: Relay, certificates: Certificates
) -> dict[str | None, Found]:
    """On a `secure` relay: alice sends two messages, bob one plus a repeat of alice's first,
    and a client on listen.networks one without AUTH plus a repeat of alice's first too.

    Returns, per user (None: no AUTH), the events that user's mail left once delivered, so a
    search by user has the others' mail, repeats of the same message included, to leave out.
    """
    first = make_message("Order 1", message_id="<order-1@shop.example>")

    async def by(user: str, data: bytes) -> Reply:
        return await send_authenticated(relay.port, data, certificates, user=user)

    a1 = queued_id(await by("alice", first))
    a2 = queued_id(await by("alice", make_message("Order 2")))
    b1 = queued_id(await by("bob", make_message("Order 3")))
    b_repeat = repeat_id(await by("bob", first))
    u1 = queued_id(await send(relay.port, make_message("Order 4")))
    u_repeat = repeat_id(await send(relay.port, first))
    await relay.idle()
    return {
        "alice": Counter(
            [("received", a1), ("delivered", a1), ("received", a2), ("delivered", a2)]
        ),
        "bob": Counter([("received", b1), ("delivered", b1), ("duplicate", b_repeat)]),
        None: Counter([("received", u1), ("delivered", u1), ("duplicate", u_repeat)]),
    }


@dataclass(frozen=True)
class OneTimeline:
    """Queue ids of `one_message_and_its_neighbours`."""

    message: str  # received, deferred once, then delivered
    repeat: str  # a repeat of it from another client, suppressed
    other: str  # an unrelated message, delivered


async def one_message_and_its_neighbours(relay: Relay, upstream: Upstream) -> OneTimeline:
    """A message whose timeline has more than one outcome, with events of other queue ids
    that name it (a repeat) or sit next to it in time (another message) around it."""
    upstream.script.data = ["451 4.3.0 try later"]
    data = make_message(message_id="<timeline-1@shop.example>")
    message = queued_id(
        await send(relay.port, data, rcpts=("alice@example.org", "bob@example.org"))
    )
    await upstream.wait_for(1)
    repeat = repeat_id(await send(relay.port, data, source="127.0.0.2"))
    other = queued_id(await send(relay.port, make_message("Another order")))
    await relay.idle()
    return OneTimeline(message, repeat, other)


# --- the web pages -----------------------------------------------------------


@dataclass
class WebServer:
    """The review pages of `relay.web` on their own loopback port, reading the relay's store."""

    runner: Any
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


MakeRelay = Callable[..., Awaitable[Relay]]
MakeWeb = Callable[..., Awaitable[WebServer]]


@pytest.fixture
async def make_web() -> AsyncIterator[MakeWeb]:
    """Start `relay.web.create_app` for a relay with aiohttp's AppRunner on 127.0.0.1, port 0."""
    from aiohttp import web

    from relay.web import create_app

    started: list[WebServer] = []

    async def make(relay: Relay, **options: Any) -> WebServer:
        runner = web.AppRunner(create_app(relay.app.config, **options))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = WebServer(runner, runner.addresses[0][1])
        started.append(server)
        return server

    yield make
    for server in started:
        await server.runner.cleanup()


WEB_USERS = {"ops": "correct horse battery", "support": "staple-42-Σ"}


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    """`http.users_file` as an operator writes it: an argon2id user and a bcrypt one ($2y$,
    as `htpasswd -B` writes it); the passwords are in WEB_USERS."""
    import argon2
    import bcrypt

    ops = argon2.PasswordHasher().hash(WEB_USERS["ops"])
    support = bcrypt.hashpw(WEB_USERS["support"].encode(), bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "web-users"
    path.write_text(
        f"# review page users\nops:{ops}\n\nsupport:{support.replace('$2b$', '$2y$', 1)}\n"
    )
    return path


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """One headless Chromium for the whole run; each test gets a clean tab state."""
    from tests.browser import launch_chromium

    driver = launch_chromium()
    yield driver
    driver.quit()


@pytest.fixture
def browse(chromium: Any) -> Callable[[WebServer], Any]:
    """A Page on a server, with no cookies or console messages left from an earlier test."""
    from tests.browser import Page

    def make(server: WebServer) -> Page:
        chromium.execute_cdp_cmd("Network.clearBrowserCookies", {})
        chromium.get_log("browser")
        return Page(chromium, server.url)

    return make
