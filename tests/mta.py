"""Real mail software for tests: smtp-sink, private Postfix instances, swaks and nodemailer.

The relay has to hold up against the clients and MTAs people actually run, with their own
pipelining, retry and MIME habits, so tests start the real programs instead of imitating them.
Every server here listens on 127.0.0.1 only, on a port the OS handed out, can pass mail only to
127.0.0.1 ports the test chose, and is torn down by its context manager even when a test fails.

A missing program skips the test on a developer machine but fails it when ``CI=true``: there
it means ``.ci/system-deps`` is broken, and a silent skip would hide that.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self, TypeVar

import pytest

__all__ = [
    "END_OF_DATA",
    "FAULT_STAGES",
    "LOOPBACK",
    "SINK_COMMANDS",
    "CertificateAuthority",
    "NodemailerError",
    "Postfix",
    "ServerCertificate",
    "SinkMessage",
    "SmtpSink",
    "free_port",
    "is_listening",
    "postfix_factory",
    "require_program",
    "run_nodemailer",
    "sink_factory",
    "swaks",
    "swaks_replies",
    "unavailable",
    "wait_until",
]

LOOPBACK = "127.0.0.1"
POLL_SECONDS = 0.025
NODE_DIR = Path(__file__).resolve().parent / "node"
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/lib/postfix/sbin")
_SETUP_HINT = "(.ci/system-deps installs it)"

_T = TypeVar("_T")


# --- environment -------------------------------------------------------------------------


def unavailable(reason: str) -> NoReturn:
    """Skip on a developer machine, fail under CI=true where a missing tool is a setup bug."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def require_program(program: str, package: str) -> str:
    """Path of `program`; sbin directories count even when they are not on PATH."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN_DIRS])
    found = shutil.which(program, path=search)
    if found is None:
        unavailable(f"{program} not found: install the Debian package {package!r} {_SETUP_HINT}")
    return found


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        unavailable(f"{what} must be started as root (Postfix's master refuses otherwise)")


def _user_ids(name: str, package: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        unavailable(f"system user {name!r} missing: install the Debian package {package!r}")
    return entry.pw_uid, entry.pw_gid


def free_port() -> int:
    """A loopback port nobody listens on right now (servers retry if they lose the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _bindable(port: int) -> bool:
    # SO_REUSEADDR like the servers themselves, so a TIME_WAIT leftover is no conflict.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def wait_until(check: Callable[[], _T | None], timeout: float, what: str) -> _T:
    """Poll instead of sleeping a guessed time; the deadline keeps a hang from stalling CI."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"gave up after {timeout:g}s waiting for {what}")
        time.sleep(POLL_SECONDS)


def _listener_inodes(port: int, host: str) -> set[int] | None:
    """Socket inodes in LISTEN on host:port, or None where /proc/net/tcp is unavailable."""
    try:
        table = Path("/proc/net/tcp").read_text()
    except OSError:
        return None
    wanted = {host, "0.0.0.0"}
    inodes: set[int] = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A":
            continue
        addr_hex, _, port_hex = fields[1].partition(":")
        if int(port_hex, 16) != port:
            continue
        if socket.inet_ntoa(struct.pack("=I", int(addr_hex, 16))) in wanted:
            inodes.add(int(fields[9]))
    return inodes


def is_listening(port: int, host: str = LOOPBACK, *, pid: int | None = None) -> bool:
    """True once `port` is in LISTEN state (held by process `pid`, if given).

    Reads /proc/net/tcp rather than connecting, so readiness probes never show up as sessions
    in smtp-sink counters or Postfix logs. `pid` guards against mistaking somebody else's
    listener on a port we lost the race for as our server being ready.
    """
    inodes = _listener_inodes(port, host)
    if inodes is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            return sock.connect_ex((host, port)) == 0
    if pid is None or not inodes:
        return bool(inodes)
    sockets = {f"socket:[{inode}]" for inode in inodes}
    return any(str(target) in sockets for target in _open_files(pid))


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    # A zombie has exited; it only waits for init to reap it.
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _open_files(pid: int) -> set[Path]:
    fd_dir = Path(f"/proc/{pid}/fd")
    result: set[Path] = set()
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return result
    for entry in entries:
        with contextlib.suppress(OSError):
            result.add(Path(os.readlink(entry)))
    return result


def _make_workdir(prefix: str) -> Path:
    # World-traversable: Postfix daemons and smtp-sink drop root and must still reach it.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def _run(
    argv: Sequence[str], *, timeout: float = 60.0, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        env=None if env is None else dict(env),
        check=False,
    )


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        raise RuntimeError(
            f"{what} failed with exit status {result.returncode}:\n{result.stdout}{result.stderr}"
        )


# --- TLS ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerCertificate:
    """PEM certificate and unencrypted key, as Postfix and aiosmtpd load them."""

    cert_file: Path
    key_file: Path


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")

_OPENSSL_CONF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {cn}
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


class CertificateAuthority:
    """A throwaway CA, so TLS tests verify certificates for real instead of turning checks off.

    Built with the openssl CLI because the `cryptography` package is not guaranteed here.
    """

    def __init__(self, directory: Path, name: str = "dedup-relay test CA") -> None:
        self._openssl = require_program("openssl", "openssl")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.name = name
        self.cert_file = directory / "ca.pem"
        self.key_file = directory / "ca.key"
        conf = self._write_conf("ca", name, "IP:127.0.0.1")
        argv = [self._openssl, "req", "-x509", "-new", "-config", str(conf), *_EC_KEY]
        argv += ["-extensions", "ca_ext", "-keyout", str(self.key_file)]
        argv += ["-out", str(self.cert_file), "-days", "3"]
        _check(_run(argv), "openssl req (CA)")

    def _write_conf(self, stem: str, cn: str, san: str) -> Path:
        conf = self.directory / f"{stem}.cnf"
        conf.write_text(_OPENSSL_CONF.format(cn=cn.replace("/", " "), san=san))
        return conf

    def issue(
        self,
        name: str = "server",
        *,
        ips: Sequence[str] = (LOOPBACK,),
        dns_names: Sequence[str] = ("localhost",),
    ) -> ServerCertificate:
        """A server certificate whose SANs cover `ips` (clients verify 127.0.0.1 by IP)."""
        san = ", ".join([*(f"IP:{ip}" for ip in ips), *(f"DNS:{d}" for d in dns_names)])
        conf = self._write_conf(name, ips[0] if ips else dns_names[0], san)
        key = self.directory / f"{name}.key"
        csr = self.directory / f"{name}.csr"
        cert = self.directory / f"{name}.pem"
        argv = [self._openssl, "req", "-new", "-config", str(conf), *_EC_KEY]
        argv += ["-keyout", str(key), "-out", str(csr)]
        _check(_run(argv), "openssl req (server)")
        argv = [self._openssl, "x509", "-req", "-in", str(csr), "-out", str(cert)]
        argv += ["-CA", str(self.cert_file), "-CAkey", str(self.key_file), "-days", "3"]
        argv += ["-set_serial", str(secrets.randbits(62) + 1)]
        argv += ["-extfile", str(conf), "-extensions", "server_ext"]
        _check(_run(argv), "openssl x509 (sign)")
        return ServerCertificate(cert_file=cert, key_file=key)

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only and checks the hostname/IP."""
        return ssl.create_default_context(cafile=str(self.cert_file))


# --- smtp-sink ---------------------------------------------------------------------------

#: Names smtp-sink accepts for its per-command fault options; "." is end-of-data.
SINK_COMMANDS = frozenset(
    {"CONNECT", "HELO", "EHLO", "MAIL", "RCPT", "DATA", ".", "RSET", "NOOP", "VRFY", "QUIT"}
)
END_OF_DATA = "."

# The commands smtp-sink faults for each SMTP stage; a client refused at EHLO falls back to
# HELO, so that stage faults both.
FAULT_STAGES: dict[str, list[str]] = {
    "connect": ["CONNECT"],
    "helo": ["EHLO", "HELO"],
    "mail": ["MAIL"],
    "rcpt": ["RCPT"],
    "data": ["DATA"],
    "end-of-data": [END_OF_DATA],
}


def _angle_addr(args: str) -> str:
    args = args.strip()
    if args.startswith("<"):
        return args[1 : args.find(">")] if ">" in args else args[1:]
    return args.split(" ", 1)[0]


@dataclass(frozen=True)
class SinkMessage:
    """One transaction smtp-sink saw through to end-of-data, as dumped with ``-d``.

    smtp-sink drops every CR and undoes dot-stuffing, so `data` has LF line endings.
    Its reply to the final "." may still have been a fault (-r/-f/-q/-Q on END_OF_DATA):
    "received" here means the bytes arrived, not that the client was told so.
    """

    path: Path
    client_addr: str
    helo: str | None
    mail_args: str
    rcpt_args: tuple[str, ...]
    data: bytes

    @property
    def mail_from(self) -> str:
        return _angle_addr(self.mail_args)

    @property
    def rcpt_to(self) -> list[str]:
        return [_angle_addr(a) for a in self.rcpt_args]

    def email(self) -> EmailMessage:
        return BytesParser(EmailMessage, policy=policy.default).parsebytes(self.data)

    @property
    def message_id(self) -> str | None:
        value = self.email()["Message-ID"]
        return None if value is None else str(value)


def _parse_dump(path: Path, raw: bytes) -> SinkMessage:
    client_addr, helo, mail_args = "", None, ""
    rcpts: list[str] = []
    pos = 0
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        if end < 0:
            break
        line = raw[pos:end].decode("utf-8", "replace")
        pos = end + 1
        if line.startswith("Received: "):
            while raw.startswith(b"\t", pos):
                nxt = raw.find(b"\n", pos)
                pos = len(raw) if nxt < 0 else nxt + 1
            break
        name, _, value = line.partition(": ")
        if name == "X-Client-Addr":
            client_addr = value
        elif name == "X-Helo-Args":
            helo = value
        elif name == "X-Mail-Args":
            mail_args = value
        elif name == "X-Rcpt-Args":
            rcpts.append(value)
    data = raw[pos:]
    # The LF of the terminating ".\r\n" line is dumped too.
    if data.endswith(b"\n"):
        data = data[:-1]
    return SinkMessage(path, client_addr, helo, mail_args, tuple(rcpts), data)


def _commands(values: Iterable[str], option: str) -> list[str]:
    names = [v.upper() for v in values]
    unknown = [n for n in names if n not in SINK_COMMANDS]
    if unknown:
        raise ValueError(f"smtp-sink {option}: unknown command(s) {unknown}; use {SINK_COMMANDS}")
    return names


class _Server:
    """What a harness server shares: `with` starts and closes it; `log()` reads its log file."""

    log_file: Path

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log(self) -> str:
        """The server's own log (smtp-sink's -v transcript, Postfix's maillog), or ""."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class SmtpSink(_Server):
    """Postfix's smtp-sink on a loopback port: a fast upstream that records what it received.

    Fault options (each takes command names from SINK_COMMANDS, END_OF_DATA for the final "."):

    * ``tempfail`` (-r): reply 4xx to the command (``tempfail_reply`` overrides the text, -b);
    * ``hardfail`` (-f): reply 5xx to the command (``hardfail_reply``, -B);
    * ``drop`` (-q): close the connection without replying; ``drop=[END_OF_DATA]`` is the
      "message arrived but the OK was lost" case: the message is dumped, the client sees EOF;
    * ``close_421`` (-Q): reply "421 4.0.0 Server closing connection" and disconnect;
    * ``abort_after_data`` (-A): N seconds after the 354, send 550 and hang up mid-DATA;
    * ``delay`` (-W): {command: seconds} to hold back that command's reply.

    -r and -f make smtp-sink stop advertising PIPELINING. smtp-sink cannot fail only the
    n-th attempt: faults apply to every session, so "fail once, then accept" means stopping
    the sink and starting a new one on the same port (``stop()``/``start()`` keep the port
    and the messages).
    """

    def __init__(
        self,
        *,
        tempfail: Iterable[str] = (),
        hardfail: Iterable[str] = (),
        drop: Iterable[str] = (),
        close_421: Iterable[str] = (),
        tempfail_reply: str | None = None,
        hardfail_reply: str | None = None,
        abort_after_data: int | None = None,
        delay: Mapping[str, int] | None = None,
        pipelining: bool = True,
        hostname: str = "smtp-sink",
        extra_args: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self._binary = require_program("smtp-sink", "postfix")
        self._fixed_port = port is not None
        self.port: int = port if port is not None else free_port()
        args: list[str] = ["-v", "-h", hostname]
        for option, names in (
            ("-r", tempfail),
            ("-f", hardfail),
            ("-q", drop),
            ("-Q", close_421),
        ):
            cmds = _commands(names, option)
            if cmds:
                args += [option, ",".join(cmds)]
        if tempfail_reply is not None:
            args += ["-b", tempfail_reply]
        if hardfail_reply is not None:
            args += ["-B", hardfail_reply]
        if abort_after_data is not None:
            args += ["-A", str(abort_after_data)]
        for command, seconds in (delay or {}).items():
            (name,) = _commands([command], "-W")
            args += ["-W", f"{name}:{int(seconds)}"]
        if not pipelining:
            args.append("-p")
        args += list(extra_args)
        self._args = args
        self.workdir = _make_workdir("smtp-sink-")
        self.dump_dir = self.workdir / "dump"
        self.dump_dir.mkdir()
        self.log_file = self.workdir / "smtp-sink.log"
        self._run_as: str | None = None
        if os.geteuid() == 0:
            # smtp-sink refuses to run as root without -u; it writes dumps as that user.
            self._run_as = "nobody"
            uid, gid = _user_ids("nobody", "base-passwd")
            os.chown(self.dump_dir, uid, gid)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _argv(self) -> list[str]:
        template = str(self.dump_dir).replace("%", "%%") + "/%Y%m%d%H%M%S."
        argv = [self._binary, *self._args, "-d", template]
        if self._run_as:
            argv += ["-u", self._run_as]
        return [*argv, f"{LOOPBACK}:{self.port}", "64"]

    def start(self) -> Self:
        if self._proc is not None:
            return self
        for _attempt in range(5):
            # Cheap check first: smtp-sink takes a second to give up on a taken port.
            if not self._fixed_port and not _bindable(self.port):
                self.port = free_port()
                continue
            with self.log_file.open("ab") as log:
                log_start = log.tell()
                proc = subprocess.Popen(
                    self._argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

            def settled(proc: subprocess.Popen[bytes] = proc) -> bool | None:
                if proc.poll() is not None or is_listening(self.port, pid=proc.pid):
                    return True
                return None

            try:
                wait_until(settled, 10.0, f"smtp-sink to listen on {LOOPBACK}:{self.port}")
            except TimeoutError:
                proc.kill()
                proc.wait()
                raise
            if proc.poll() is None:
                self._proc = proc
                self._fixed_port = True
                return self
            proc.wait()
            output = self.log_file.read_bytes()[log_start:].decode(errors="replace")
            if not self._fixed_port and "in use" in output:
                self.port = free_port()
                continue
            raise RuntimeError(f"smtp-sink exited at start:\n{output}")
        raise RuntimeError(f"smtp-sink found no free port:\n{self.log()}")

    def stop(self) -> None:
        """Kill smtp-sink and delete dumps of transactions it was still in the middle of."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        partial: set[Path] = set()
        if proc.poll() is None:
            # Freeze it first so the set of half-written dump files cannot change under us.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGSTOP)
            partial = _open_files(proc.pid)
            proc.kill()
        proc.wait(timeout=10)
        for path in partial:
            if path.parent == self.dump_dir:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _complete_dumps(self) -> list[Path]:
        # List first, then look at open files: whatever is still open is mid-transaction.
        paths = [p for p in self.dump_dir.iterdir() if p.is_file()]
        busy = _open_files(self._proc.pid) if self.running and self._proc else set()
        return [p for p in paths if p not in busy]

    def messages(self) -> list[SinkMessage]:
        """Completed transactions in arrival order (aborted ones are deleted by smtp-sink)."""
        found: list[tuple[int, str, SinkMessage]] = []
        for path in self._complete_dumps():
            try:
                raw = path.read_bytes()
                mtime = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            found.append((mtime, path.name, _parse_dump(path, raw)))
        found.sort(key=lambda item: (item[0], item[1]))
        return [message for _, _, message in found]

    def count(self) -> int:
        return len(self.messages())

    def wait_for(self, count: int, timeout: float = 10.0) -> list[SinkMessage]:
        """All messages once at least `count` have arrived."""

        def enough() -> list[SinkMessage] | None:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"smtp-sink died:\n{self.log()}")
            messages = self.messages()
            return messages if len(messages) >= count else None

        return wait_until(enough, timeout, f"{count} message(s) at smtp-sink :{self.port}")

    def clear(self) -> None:
        """Forget the messages received so far, e.g. between the phases of one test."""
        for path in self._complete_dumps():
            path.unlink(missing_ok=True)


# --- Postfix -----------------------------------------------------------------------------

_MASTER_CF = """\
# service   type  private unpriv  chroot  wakeup  maxproc command
{listen}    inet  n       -       n       -       -       smtpd
pickup      unix  n       -       n       60      1       pickup
cleanup     unix  n       -       n       -       0       cleanup
qmgr        unix  n       -       n       300     1       qmgr
tlsmgr      unix  -       -       n       1000?   1       tlsmgr
rewrite     unix  -       -       n       -       -       trivial-rewrite
bounce      unix  -       -       n       -       0       bounce
defer       unix  -       -       n       -       0       bounce
trace       unix  -       -       n       -       0       bounce
verify      unix  -       -       n       -       1       verify
flush       unix  n       -       n       1000?   0       flush
proxymap    unix  -       -       n       -       -       proxymap
proxywrite  unix  -       -       n       -       1       proxymap
smtp        unix  -       -       n       -       -       smtp
relay       unix  -       -       n       -       -       smtp
showq       unix  n       -       n       -       -       showq
error       unix  -       -       n       -       -       error
retry       unix  -       -       n       -       -       error
discard     unix  -       -       n       -       -       discard
virtual     unix  -       n       n       -       -       virtual
anvil       unix  -       -       n       -       1       anvil
scache      unix  -       -       n       -       1       scache
postlog     unix-dgram n  -       n       -       1       postlogd
"""

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")


class Postfix(_Server):
    """A private Postfix instance (own config, queue, data dir, log and port) on 127.0.0.1.

    Modes, by constructor argument:

    * ``relayhost=PORT``: everything it accepts goes to ``[127.0.0.1]:PORT``. Pointed at an
      SmtpSink it is an upstream MTA; pointed at the relay under test it is a client MTA that
      an app submits to, so Postfix's own queueing and retries meet the relay.
    * ``maildir=True``: an upstream MTA that delivers every recipient into one Maildir
      (see ``maildir_messages``), for tests that want no second server.

    Retries are quick (queue_run_delay 1s, backoff 1-2s). ``settings`` overrides or adds
    main.cf parameters. There is no syslog in a container, so Postfix logs to ``log_file``
    through its postlogd service. Must run as root, like any Postfix master.
    """

    def __init__(
        self,
        *,
        relayhost: int | None = None,
        maildir: bool = False,
        tls: bool = False,
        ca: CertificateAuthority | None = None,
        name: str = "test",
        settings: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        if (relayhost is None) == (not maildir):
            raise ValueError("Postfix needs exactly one of relayhost=PORT or maildir=True")
        if not _NAME_RE.match(name):
            raise ValueError(f"Postfix name {name!r}: use lowercase letters, digits and '-'")
        _require_root("A private Postfix instance")
        self._postfix = require_program("postfix", "postfix")
        self._postqueue = require_program("postqueue", "postfix")
        self._owner = _user_ids("postfix", "postfix")
        self.name = name
        self.relayhost = relayhost
        self.hostname = f"pf-{name}.localdomain"
        self._fixed_port = port is not None
        self.port: int = port if port is not None else free_port()
        self.settings = dict(settings or {})
        self.base_dir = _make_workdir(f"postfix-{name}-")
        try:
            self._prepare_dirs(maildir, tls, ca)
        except BaseException:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            raise
        self._master_pid: int | None = None

    def _prepare_dirs(self, maildir: bool, tls: bool, ca: CertificateAuthority | None) -> None:
        self.config_dir = self.base_dir / "etc"
        self.queue_dir = self.base_dir / "spool"
        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "maillog"
        for path in (self.config_dir, self.queue_dir, self.data_dir):
            path.mkdir()
        os.chown(self.data_dir, *self._owner)
        self.mail_dir: Path | None = None
        if maildir:
            mail_base = self.base_dir / "mail"
            mail_base.mkdir()
            os.chown(mail_base, *self._owner)
            self.mail_dir = mail_base / "inbox"
        self.ca: CertificateAuthority | None = None
        self.certificate: ServerCertificate | None = None
        if tls:
            self.ca = ca or CertificateAuthority(self.base_dir / "tls", f"{self.hostname} CA")
            self.certificate = self.ca.issue(
                f"smtpd-{self.name}", ips=(LOOPBACK,), dns_names=(self.hostname, "localhost")
            )

    @property
    def ca_file(self) -> Path | None:
        """The CA certificate a client should verify this instance's STARTTLS against."""
        return None if self.ca is None else self.ca.cert_file

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    @property
    def running(self) -> bool:
        return self._master_pid is not None and _pid_alive(self._master_pid)

    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters this instance runs with."""
        uid, gid = self._owner
        cf: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": pwd.getpwuid(uid).pw_name,
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": "localdomain",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_banner": "$myhostname ESMTP Postfix",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.base_dir),
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "10s",
            "in_flow_delay": "0s",
            "biff": "no",
        }
        if self.relayhost is not None:
            cf["relayhost"] = f"[{LOOPBACK}]:{self.relayhost}"
            cf["default_transport"] = "smtp"
        else:
            cf["relayhost"] = ""
            cf["default_transport"] = "virtual"
            cf["virtual_mailbox_base"] = str(self.base_dir / "mail")
            cf["virtual_mailbox_maps"] = "static:inbox/"
            cf["virtual_uid_maps"] = f"static:{uid}"
            cf["virtual_gid_maps"] = f"static:{gid}"
            cf["virtual_minimum_uid"] = "1"
        if self.certificate is not None:
            cf["smtpd_tls_security_level"] = "may"
            cf["smtpd_tls_chain_files"] = (
                f"{self.certificate.key_file}, {self.certificate.cert_file}"
            )
            cf["smtpd_tls_loglevel"] = "1"
        cf.update(self.settings)
        return cf

    def _write_config(self) -> None:
        lines = [f"{key} = {value}" for key, value in self.main_cf().items()]
        main_cf = self.config_dir / "main.cf"
        master_cf = self.config_dir / "master.cf"
        main_cf.write_text("\n".join(lines) + "\n")
        master_cf.write_text(_MASTER_CF.format(listen=f"{LOOPBACK}:{self.port}"))
        # Postfix re-reads a config file until its mtime is in the past (2s on a fresh file).
        settled = time.time() - 60
        for path in (main_cf, master_cf):
            os.utime(path, (settled, settled))

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}

    def _postfix_cmd(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return _run(
            [self._postfix, "-c", str(self.config_dir), *args], timeout=timeout, env=self._env()
        )

    def start(self) -> Self:
        if self._master_pid is not None:
            return self
        for _attempt in range(5):
            # Cheap check first: a failed `postfix start` takes seconds to report.
            if not self._fixed_port and not _bindable(self.port):
                self.port = free_port()
                continue
            self._write_config()
            log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
            result = self._postfix_cmd("start")
            if result.returncode == 0:
                break
            log = self.log_file.read_bytes()[log_start:] if self.log_file.exists() else b""
            output = result.stdout + result.stderr + log.decode(errors="replace")
            if not self._fixed_port and "in use" in output:
                self.port = free_port()
                continue
            raise RuntimeError(f"postfix start failed ({result.returncode}):\n{output}")
        else:
            raise RuntimeError(f"postfix found no free port:\n{self.log()}")
        pid_file = self.queue_dir / "pid" / "master.pid"
        pid = int(pid_file.read_text().split()[0])
        self._master_pid = pid
        self._fixed_port = True

        def ready() -> bool | None:
            if not _pid_alive(pid):
                raise RuntimeError(f"postfix master exited:\n{self.log()}")
            return True if is_listening(self.port, pid=pid) else None

        try:
            wait_until(ready, 15.0, f"postfix {self.name} to listen on :{self.port}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the master and its children; the queue is kept, so start() resumes it."""
        pid, self._master_pid = self._master_pid, None
        if pid is None:
            return
        self._postfix_cmd("stop", timeout=30)
        try:
            wait_until(lambda: True if not _pid_alive(pid) else None, 10.0, "postfix stop")
        except TimeoutError:
            self._postfix_cmd("abort", timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: True if not _pid_alive(pid) else None, 5.0, "postfix abort")
        # Children inherit the listening socket; wait for them so a restart can rebind.
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: True if not is_listening(self.port) else None, 5.0, "port release")

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- observation ----------------------------------------------------------------------

    def wait_for_log(
        self, pattern: str | re.Pattern[str], *, count: int = 1, timeout: float = 20.0
    ) -> list[re.Match[str]]:
        """Matches of `pattern` in the log once there are at least `count` of them.

        E.g. ``wait_for_log(r"status=sent", count=2)`` or ``wait_for_log(r"status=deferred")``.
        """
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern

        def enough() -> list[re.Match[str]] | None:
            matches = list(regex.finditer(self.log()))
            return matches if len(matches) >= count else None

        return wait_until(enough, timeout, f"{count}x {regex.pattern!r} in {self.log_file}")

    def queue(self) -> list[dict[str, Any]]:
        """Messages still queued (``postqueue -j``), e.g. deferred ones awaiting a retry."""
        result = _run(
            [self._postqueue, "-c", str(self.config_dir), "-j"], timeout=30, env=self._env()
        )
        _check(result, "postqueue -j")
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def flush(self) -> None:
        """Retry deferred mail now instead of at the next queue run."""
        _check(
            _run([self._postqueue, "-c", str(self.config_dir), "-f"], env=self._env()),
            "postqueue -f",
        )

    def wait_for_empty_queue(self, timeout: float = 20.0) -> None:
        wait_until(lambda: True if not self.queue() else None, timeout, "an empty mail queue")

    def maildir_messages(self) -> list[bytes]:
        """Messages delivered in maildir mode, oldest first, exactly as stored."""
        if self.mail_dir is None:
            raise ValueError("this Postfix instance relays; it has no Maildir")
        found: list[tuple[int, str, bytes]] = []
        for sub in ("new", "cur"):
            directory = self.mail_dir / sub
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    found.append((path.stat().st_mtime_ns, path.name, path.read_bytes()))
        found.sort(key=lambda item: (item[0], item[1]))
        return [data for _, _, data in found]

    def wait_for_maildir(self, count: int, timeout: float = 20.0) -> list[bytes]:
        def enough() -> list[bytes] | None:
            messages = self.maildir_messages()
            return messages if len(messages) >= count else None

        return wait_until(enough, timeout, f"{count} message(s) in {self.mail_dir}")


# --- clients -----------------------------------------------------------------------------


def swaks(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run swaks; exit status 0 means the server accepted, 2x means a 4xx/5xx at some stage.

    ``--server`` is mandatory: without it swaks looks up MX records and sends mail out.
    """
    if not any(a in ("--server", "-s") or a.startswith("--server=") for a in args):
        raise ValueError("swaks needs --server 127.0.0.1:PORT")
    binary = require_program("swaks", "swaks")
    return _run([binary, *args], timeout=timeout)


_SWAKS_REPLY = re.compile(r"^<(?:-|\*\*|~\*?) +(\d{3}[ -].*)$", re.MULTILINE)


def swaks_replies(result: subprocess.CompletedProcess[str]) -> list[str]:
    """Server reply lines from a swaks transcript (``<-`` ok, ``<**`` error), in order."""
    return [m.group(1) for m in _SWAKS_REPLY.finditer(result.stdout + result.stderr)]


class NodemailerError(RuntimeError):
    """nodemailer reported a failed send; `result["error"]` has its code and SMTP response."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(f"nodemailer send failed: {result.get('error')}")
        self.result = result


def run_nodemailer(
    port: int,
    *,
    host: str = LOOPBACK,
    transport: Mapping[str, Any] | None = None,
    check: bool = True,
    timeout: float = 60.0,
    transcript: bool = False,
    **message: Any,
) -> dict[str, Any]:
    """Send one message with nodemailer (tests/node/send.js), as a Node app would.

    `message` goes to ``sendMail()``: to, subject, text, html, attachments, headers
    (e.g. ``headers={"Idempotency-Key": "k1"}``); ``from_`` stands in for the reserved word
    ``from``. `transport` overrides SMTP options (plaintext with ignoreTLS by default;
    ``{"ignoreTLS": False, "requireTLS": True, "tls": {"caFile": path}}`` for STARTTLS).
    Returns nodemailer's info (messageId, response, envelope, accepted, ...) with "ok";
    with `transcript`, also the SMTP dialog as nodemailer logged it ("transcript").
    """
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"tests send mail to loopback only, not {host!r}")
    node = require_program("node", "nodejs")
    if not (NODE_DIR / "node_modules" / "nodemailer" / "package.json").is_file():
        unavailable(
            f"nodemailer not installed: run `npm ci` in {NODE_DIR} with the Debian package 'npm' "
            f"{_SETUP_HINT}"
        )
    if "from_" in message:
        message["from"] = message.pop("from_")
    message.setdefault("from", "sender@example.com")
    message.setdefault("to", "recipient@example.com")
    message.setdefault("subject", "nodemailer test message")
    if not any(k in message for k in ("text", "html", "raw")):
        message["text"] = "Hello from nodemailer."
    request = {
        "host": host,
        "port": port,
        "transport": dict(transport or {}),
        "message": message,
        "transcript": transcript,
    }
    proc = subprocess.run(
        [node, str(NODE_DIR / "send.js"), "-"],
        input=json.dumps(request, default=str),
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        cwd=NODE_DIR,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(
            f"send.js printed no result (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
        ) from None
    if check and not result.get("ok"):
        raise NodemailerError(result)
    return result


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def sink_factory() -> Iterator[Callable[..., SmtpSink]]:
    """Start SmtpSinks with any options; all are closed at teardown, pass or fail."""
    with contextlib.ExitStack() as stack:

        def make(**options: Any) -> SmtpSink:
            sink = SmtpSink(**options)
            stack.callback(sink.close)
            return sink.start()

        yield make


@pytest.fixture
def postfix_factory() -> Iterator[Callable[..., Postfix]]:
    """Start Postfix instances with any options; all are closed at teardown, pass or fail."""
    with contextlib.ExitStack() as stack:

        def make(**options: Any) -> Postfix:
            instance = Postfix(**options)
            stack.callback(instance.close)
            return instance.start()

        yield make


# What the `postfix_factory` fixture gives a test.
PostfixFactory = Callable[..., Postfix]
