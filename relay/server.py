"""The SMTP front door: who may connect, what the session may send, and when it must stop.

All protocol state lives here; once DATA is complete the bytes go to the intake,
and the reply the intake returns is the reply the client gets.

The policy is Postfix's `permit_mynetworks, permit_sasl_authenticated, reject`:
a client on `listen.networks` may send; any other client is refused at connect
unless `auth` is configured, and then must authenticate before MAIL. STARTTLS,
AUTH (PLAIN, LOGIN) and the RFC 3207 session reset are aiosmtpd's own; this
module decides when they are offered and checks passwords off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from ssl import SSLContext
from typing import Any, NamedTuple, TypeVar, cast

import aiosmtpd
import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from aiosmtplib.email import parse_address

from relay import content, logs, rules
from relay.audit import Event
from relay.auth import Authenticator, Guard
from relay.config import AuthConfig, ConfigError, ListenConfig, Network
from relay.dataread import DataPhase
from relay.errors import ListenError
from relay.intake import THREAD_THRESHOLD, Intake, Transaction, unique_recipients
from relay.limits import Budget, Events, Tally
from relay.tls import ServerTls

__all__ = [
    "AIOSMTPD_CHECKED",
    "NEEDS_SMTPUTF8",
    "REPLACES_AIOSMTPD",
    "SHUTDOWN_REPLY",
    "FrontDoor",
    "Handler",
    "RelaySMTP",
    "address_problem",
    "allowed",
]

log = logging.getLogger(__name__)

SHUTDOWN_REPLY = b"421 4.3.2 Service shutting down, try again later\r\n"
# RFC 6531 3.4: a non-ASCII mailbox is only accepted in a transaction that declared SMTPUTF8.
NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address needs MAIL FROM with the SMTPUTF8 parameter"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
TLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"
LOCKED_OUT = "421 4.7.0 Too many failed logins from your address, try again later"
BUSY_MEMORY = "4.3.1 Too much mail in flight on this relay, try again later"
TOO_SLOW = b"421 4.4.2 DATA too slow or too long, closing connection\r\n"
# The store can never be written again by this process (its file was deleted or replaced).
STORE_LOST = "4.3.0 Mail store unavailable, not accepting mail; try again later"
LINGER = 5.0  # seconds a cut-off client gets to stop sending before the socket closes
# Unicode's Cc (C0, DEL, C1) and Cs (lone surrogates, which stand for invalid UTF-8): both
# categories are fixed by the standard, so the class is exact in every Unicode version.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# Answers that depend on an address's text alone, kept because an app's sender and
# recipients repeat on every message: MAIL FROM / RCPT TO arguments parsed, and why an
# address cannot be taken. Each holds at most this many (each key at most 512 bytes).
_KEPT = 4096
_PATHS: dict[str, tuple[str | None, str | None]] = {}
_PROBLEMS: dict[str, str | None] = {}
_K = TypeVar("_K")
_T = TypeVar("_T")
# The aiosmtpd releases whose SMTP.__init__, smtp_DATA and sanitized_log the fast
# replacements below (and relay/dataread.py) were checked against, line by line and by
# tests/test_session_setup.py. Any other release gets aiosmtpd's own code.
AIOSMTPD_CHECKED = frozenset({"1.4.6"})
REPLACES_AIOSMTPD = aiosmtpd.__version__ in AIOSMTPD_CHECKED


def allowed(peer: object, networks: tuple[Network, ...]) -> bool:
    """Only configured networks may relay; anything unparseable is refused."""
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _keep(cache: dict[_K, _T], key: _K, value: _T) -> _T:
    """Remember `value` for `key`, forgetting everything once the cache is full."""
    if len(cache) >= _KEPT:
        cache.clear()
    cache[key] = value
    return value


def address_problem(address: str) -> str | None:
    """Why an envelope address cannot be taken, or None.

    Control characters (CR, LF, TAB, ESC, NUL, ...) are refused outright, and so is a
    comma, which the audit trail uses between recipients. Then the address must
    survive the upstream client's own parser unchanged, so that what the audit log
    names is exactly what the upstream is sent.
    """
    try:
        return _PROBLEMS[address]
    except KeyError:
        return _keep(_PROBLEMS, address, _address_problem(address))


def _address_problem(address: str) -> str | None:
    if _has_control(address):
        return "control character or invalid UTF-8 in the address"
    if "," in address:
        return "a comma in the address"
    try:
        if parse_address(address) != address:
            return "the address would not reach the upstream as written"
    except ValueError:
        return "the address cannot be written on an SMTP command line"
    return None


def _options_size(options: list[str]) -> int:
    for option in options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _quiet(sanitized_log: Callable[..., None]) -> Callable[..., None]:
    """aiosmtpd's sanitized_log, skipped when the logger would drop the line anyway.

    aiosmtpd calls it twice per command, at debug and info level, and it masks AUTH
    arguments (a regex per line) before the logger looks at its level; the relay keeps
    aiosmtpd's logger at WARNING, so that work was always thrown away.
    """

    def quiet_sanitized_log(func: Callable[..., None], msg: Any, *args: Any, **kwargs: Any) -> None:
        logger = getattr(func, "__self__", None)
        if isinstance(logger, logging.Logger):
            level = _LEVELS.get(getattr(func, "__name__", ""))
            if level is not None and not logger.isEnabledFor(level):
                return
        sanitized_log(func, msg, *args, **kwargs)

    quiet_sanitized_log.__wrapped__ = sanitized_log  # type: ignore[attr-defined]
    return quiet_sanitized_log


if REPLACES_AIOSMTPD and not hasattr(aiosmtpd.smtp.sanitized_log, "__wrapped__"):
    aiosmtpd.smtp.sanitized_log = _quiet(aiosmtpd.smtp.sanitized_log)


_HOOK_NAMES: dict[type, tuple[str, ...]] = {}


class _Hooks:
    """`dir()` that lists only aiosmtpd's hook names, computed once per class.

    aiosmtpd's SMTP constructor finds its hooks with `dir()` and `inspect.getmembers()`
    on the protocol and the handler, which evaluates every attribute of both: a fresh
    scan for every connection, and the largest single cost of accepting one. The names
    a class has do not change, so the scan is done once; what aiosmtpd builds from
    them (bound methods of this instance) is unchanged.
    """

    def __dir__(self) -> tuple[str, ...]:
        cls = type(self)
        names = _HOOK_NAMES.get(cls)
        if names is None:
            names = tuple(n for n in dir(cls) if n.startswith(("auth_", "handle_", "smtp_")))
            _HOOK_NAMES[cls] = names
        return names


class Handler(_Hooks):
    """aiosmtpd's hooks: policy per command, and the hand-off to the intake at end of DATA."""

    def __init__(self, front: FrontDoor) -> None:
        self.front = front

    async def handle_EHLO(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        if _has_control(hostname):
            session.host_name = None
            return ["501 5.5.2 Invalid EHLO name"]
        session.host_name = hostname
        if not server.offers_auth():
            responses = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        return [responses[0], "250-PIPELINING", *responses[1:]]

    async def handle_HELO(
        self, server: RelaySMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        if _has_control(hostname):
            session.host_name = None
            return "501 5.5.2 Invalid HELO name"
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        front = self.front
        if front.closing:
            return "421 4.3.2 Service shutting down, try again later"
        if front.intake.store.lost:
            return f"451 {STORE_LOST}"
        if front.config.tls.required and session.ssl is None and not server.trusted:
            return TLS_REQUIRED
        user = _login(session)
        if not server.trusted and user is None:
            return AUTH_REQUIRED
        problem = address_problem(address) if address not in ("", "<>") else None
        if problem:
            return f"553 5.1.7 Bad sender address: {problem}"
        if not envelope.smtp_utf8 and not address.isascii():
            return NEEDS_SMTPUTF8
        if user is not None:
            refusal = await front.user_policy(server, user, address)
            if refusal:
                return refusal
        if not front.budget.fits(_options_size(options)):
            return f"452 {BUSY_MEMORY}"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        problem = address_problem(address)
        if problem:
            return f"553 5.1.3 Bad recipient address: {problem}"
        if not envelope.smtp_utf8 and not address.isascii():
            return NEEDS_SMTPUTF8
        if len(envelope.rcpt_tos) >= self.front.config.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.front.config.max_recipients})"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content
        if not isinstance(data, bytes):
            return "554 5.6.0 No message data"
        # The session's copy goes now; only the checked bytes live on.
        envelope.original_content = envelope.content = None
        sender = envelope.mail_from or ""
        sender = "" if sender == "<>" else sender
        checked = await self.front.check_content(data)
        del data
        tx = Transaction(
            sender=sender,
            recipients=unique_recipients(envelope.rcpt_tos),
            data=checked.data,
            client=server.client,
            helo=session.host_name or "",
            esmtp=bool(session.extended_smtp),
            tls=session.ssl is not None,
            user=_login(session),
            smtputf8=bool(envelope.smtp_utf8),
            body8bit="BODY=8BITMIME" in envelope.mail_options,
        )
        if checked.refusal is not None:
            await self.front.record_refusal(tx, checked.refusal)
            return checked.refusal
        return await self.front.intake.submit(tx)

    async def handle_exception(self, error: Exception) -> str:
        log.exception("SMTP session error", exc_info=error)
        return "451 4.3.0 Internal error, try again later"


# aiosmtpd reads handle_EHLO's signature on every connection (to tell its old 4-argument
# form from the 5-argument one); a function's own `__signature__` is what inspect returns.
setattr(Handler.handle_EHLO, "__signature__", inspect.signature(Handler.handle_EHLO))  # noqa: B010


def _has_control(text: str) -> bool:
    """A control character, or invalid UTF-8 (kept by the decoder as lone surrogates)."""
    return _CONTROL.search(text) is not None


def _login(session: Session) -> str | None:
    if not getattr(session, "authenticated", False):
        return None
    login = getattr(session.auth_data, "login", session.auth_data)
    if isinstance(login, bytes):
        return login.decode("utf-8", "replace")
    return login if isinstance(login, str) else None


class RelaySession(Session):
    """aiosmtpd's session, minus the deprecation warning it logs on every successful AUTH."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _Plan(NamedTuple):
    """What aiosmtpd's SMTP constructor finds by introspection, as attribute names."""

    auth: tuple[tuple[str, bool, str], ...]  # mechanism, built into the protocol, attribute
    hooks: tuple[tuple[str, str], ...]  # hook, handler attribute
    commands: tuple[tuple[str, str], ...]  # command, protocol attribute
    ehlo_hook_ver: str | None

    @classmethod
    def of(cls, protocol: SMTP, handler: Any) -> _Plan | None:
        """aiosmtpd 1.4.6's own expressions, kept as names; None when it would warn or fail."""
        auth: dict[str, tuple[bool, str]] = {}
        for obj in (protocol, handler):
            for name, member in inspect.getmembers(obj):
                if name.startswith("auth_"):
                    mechanism = getattr(
                        member,
                        "__auth_mechanism_name__",
                        name.replace("auth_", "").replace("__", "-"),
                    )
                    auth[mechanism] = (obj is protocol, name)
        hooks = {n.replace("handle_", ""): n for n in dir(handler) if n.startswith("handle_")}
        ehlo_hook_ver = None
        if "EHLO" in hooks:
            if len(inspect.signature(getattr(handler, hooks["EHLO"])).parameters) != 5:
                return None  # the deprecated 4-argument hook, or an error: aiosmtpd's to say
            ehlo_hook_ver = "new"
        return cls(
            auth=tuple((m, builtin, name) for m, (builtin, name) in auth.items()),
            hooks=tuple(hooks.items()),
            commands=tuple(
                (n.replace("smtp_", ""), n) for n in dir(protocol) if n.startswith("smtp_")
            ),
            ehlo_hook_ver=ehlo_hook_ver,
        )


_PLANS: dict[tuple[type, type], _Plan | None] = {}
# The keyword arguments _set_up takes; any other goes to aiosmtpd's own constructor.
_SET_UP_KWARGS = frozenset(
    {"data_size_limit", "enable_SMTPUTF8", "hostname", "ident", "timeout", "tls_context", "loop"}
)


class RelaySMTP(_Hooks, DataPhase):
    """aiosmtpd's SMTP with network policy, AUTH off the loop, DATA deadlines and shutdown."""

    # What RFC 4954 clients expect (aiosmtpd's default is "User Name\x00").
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, front: FrontDoor, *, implicit_tls: bool = False, **kwargs: Any) -> None:
        handler = Handler(front)
        if not (
            REPLACES_AIOSMTPD
            and kwargs.keys() <= _SET_UP_KWARGS
            and self._set_up(handler, **kwargs)
        ):
            super().__init__(handler, **kwargs)
        self.front = front
        self.implicit_tls = implicit_tls
        self.in_data = False
        self.client = "unknown"
        self.trusted = False
        self._counted = False
        # Bytes of the current DATA, held against the budget and paced by min_data_rate;
        # zero outside DATA, as every way out of it gives them back.
        self._charged = 0
        self._data_started = 0.0
        self._last_data = 0.0
        self._discarding = False
        self._continued = b""
        self._due = 0.0

    def _set_up(
        self,
        handler: Handler,
        *,
        data_size_limit: int | None = 2**25,  # aiosmtpd's DATA_SIZE_DEFAULT
        enable_SMTPUTF8: bool = False,
        hostname: str | None = None,
        ident: str | None = None,
        tls_context: SSLContext | None = None,
        timeout: float = 300,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> bool:
        """aiosmtpd 1.4.6's SMTP.__init__ for these arguments (the others at their defaults),
        with its introspection of both classes done once per pair of classes.

        aiosmtpd scans the protocol and the handler with `inspect.getmembers` and `dir`,
        reads handle_EHLO's signature and formats a log line, for every connection: most
        of the cost of accepting one. False, having set nothing, when aiosmtpd's own
        constructor must run instead.
        """
        key = (type(self), type(handler))
        try:
            plan = _PLANS[key]
        except KeyError:
            plan = _PLANS[key] = _Plan.of(self, handler)
        if plan is None:
            return False
        smtp = aiosmtpd.smtp  # its private names are only looked up on a checked release
        self.__ident__ = ident or smtp.__ident__
        self.loop = loop if loop else smtp.make_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )
        self.event_handler = handler
        assert data_size_limit is None or isinstance(data_size_limit, int)
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = False
        self.command_size_limits.clear()
        self.hostname = hostname if hostname else socket.getfqdn()
        self.tls_context = tls_context
        if tls_context:
            if tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
                smtp.log.warning(
                    "tls_context.verify_mode not in {CERT_NONE, CERT_OPTIONAL};"
                    " this might cause client connection problems"
                )
            elif tls_context.check_hostname:
                smtp.log.warning(
                    "tls_context.check_hostname == True;"
                    " this might cause client connection problems"
                )
        self.require_starttls = tls_context and False
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._auth_callback = smtp.login_always_fail
        self._authenticator = None
        self._auth_required = False
        self._auth_methods = {
            mechanism: smtp._AuthMechAttr(getattr(self if builtin else handler, name), builtin)
            for mechanism, builtin, name in plan.auth
        }
        if smtp.log.isEnabledFor(logging.INFO):
            smtp.log.info(
                "Available AUTH mechanisms: "
                + " ".join(
                    m + "(builtin)" if impl.is_builtin else m
                    for m, impl in sorted(self._auth_methods.items())
                )
            )
        self._handle_hooks = {hook: getattr(handler, name) for hook, name in plan.hooks}
        self._ehlo_hook_ver = plan.ehlo_hook_ver
        self._smtp_methods = {command: getattr(self, name) for command, name in plan.commands}
        self._enforce_call_limit = False
        return True

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    async def push(self, status: str | bytes) -> None:
        # aiosmtpd echoes some arguments; one with invalid UTF-8 (kept as surrogates)
        # must not turn a reply into an internal error.
        if isinstance(status, str):
            status = status.encode("utf-8", "replace")
        # aiosmtpd pushes a multi-line reply (EHLO's) line by line, each line a send() and
        # a drain; the same bytes go out in one write with the reply's last line.
        if status[3:4] == b"-":
            self._continued += status + b"\r\n"
            return
        if self._continued:
            status, self._continued = self._continued + status, b""
        await super().push(status)

    async def smtp_VRFY(self, arg: str | None) -> None:
        # A relay knows no mailboxes; Postfix's answer, without echoing the argument.
        if not arg:
            await self.push("501 5.5.4 Syntax: VRFY <address>")
            return
        await self.push("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses with the stdlib's header parser (and defines a class on every
        # call); the answer depends on the text alone, and senders repeat, so it is kept.
        known = _PATHS.get(arg)
        if known is not None:
            return known
        # That parser raises IndexError on "MAIL FROM:<" (found by fuzzing): a malformed
        # address (553), not an internal error (451, retried forever).
        try:
            found: tuple[str | None, str | None] = super()._getaddr(arg)
        except (IndexError, ValueError):
            found = (None, None)
        return _keep(_PATHS, arg, found)

    def offers_auth(self) -> bool:
        """AUTH is offered when configured, and only over TLS unless the client is trusted."""
        return self.front.authenticator is not None and not (
            self._auth_require_tls and self._tls_protocol is None
        )

    async def _handle_client(self) -> None:
        front = self.front
        assert self.session is not None and self.transport is not None
        logs.bind(client=str(self.session.peer[0]) if self.session.peer else None)
        self.trusted = front.trusts(self.session.peer)
        self._auth_require_tls = not (
            self.implicit_tls or self.trusted or front.auth_config.allow_plaintext
        )
        refusal = None
        if not self.trusted and front.authenticator is None:
            log.warning("refused connection from %s: not in listen.networks", self.session.peer)
            refusal = "554 5.7.1 Relay access denied: client not in the relay's listen.networks"
        elif front.closing:
            refusal = SHUTDOWN_REPLY.decode().strip()
        elif front.intake.store.lost:
            refusal = f"421 {STORE_LOST}"
        elif front.guard.locked(self.client):
            log.warning("refused connection from %s: locked out after failed logins", self.client)
            refusal = LOCKED_OUT
        elif len(front.sessions) > front.config.max_connections:
            refusal = "421 4.7.0 Too many connections, try again later"
        elif front.per_client[self.client] > front.config.max_connections_per_client:
            log.warning(
                "refused connection from %s: over listen.max_connections_per_client (%d)",
                self.client,
                front.config.max_connections_per_client,
            )
            refusal = "421 4.7.0 Too many connections from your address, try again later"
        if refusal is not None:
            await self.push(refusal)
            self.transport.close()
            return
        await super()._handle_client()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            assert self.session is not None
            peer = self.session.peer
            self.client = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
            self.front.sessions.add(self)
            self.front.per_client.add(self.client)
            self._counted = True
            if self.implicit_tls:
                self.session.ssl = {"cipher": transport.get_extra_info("cipher")}

    def connection_lost(self, error: Exception | None) -> None:
        self.front.sessions.discard(self)
        if self._counted:
            self.front.per_client.remove(self.client)
            self._counted = False
        self.in_data = False
        self._give_back()
        self.front.wake()
        super().connection_lost(error)

    # --- DATA: memory budget, idle timeout, minimum rate and total deadline ----

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        super().data_received(data)
        if not self.in_data or self.transport is None:
            return
        if not self.front.budget.take(len(data)):
            log.warning("%s: DATA cut off: listen.max_bytes_in_flight is spent", self.client)
            self._hang_up(f"421 {BUSY_MEMORY}\r\n".encode())
            return
        self._charged += len(data)
        self._last_data = self.loop.time()
        self._arm_data_timer()

    def _data_deadline(self) -> float:
        """When DATA must be over: total time, and a minimum rate after one data_timeout."""
        config = self.front.config
        deadline = self._data_started + config.max_data_time
        if config.min_data_rate > 0:
            paced = self._charged / config.min_data_rate
            deadline = min(deadline, self._data_started + config.data_timeout + paced)
        return deadline

    def _arm_data_timer(self) -> None:
        now = self.loop.time()
        due = min(self._last_data + self.front.config.data_timeout, self._data_deadline())
        self._reset_timeout(max(due - now, 0.001))

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels and recreates a timer for every command. One timer per session
        # moves only when the new deadline is earlier; when it fires early it re-arms for
        # the deadline, so the session times out when it did before.
        due = self.loop.time() + (duration or self._timeout_duration)
        self._due = due
        handle = self._timeout_handle
        if handle is not None:
            if not handle.cancelled() and handle.when() <= due:
                return
            handle.cancel()
        self._timeout_handle = self.loop.call_at(due, self._timer_fired)

    def _timer_fired(self) -> None:
        if self.loop.time() < self._due:
            self._timeout_handle = self.loop.call_at(self._due, self._timer_fired)
            return
        assert self._timeout_handle is not None
        self._timeout_handle.cancel()  # spent: the next reset arms a new one
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        if not self.in_data:
            super()._timeout_cb()  # type: ignore[no-untyped-call]
            return
        now = self.loop.time()
        if now < self._last_data + self.front.config.data_timeout:
            log.warning("%s: DATA too slow or too long, disconnected", self.client)
            self._hang_up(TOO_SLOW)
        else:
            super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _hang_up(self, reply: bytes) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance here.
        transport = cast(asyncio.Transport | None, self.transport)
        if transport is None or transport.is_closing():
            return
        transport.write(reply)
        if not (self.in_data and transport.can_write_eof()):
            transport.close()
            return
        # Mid-DATA the client is still sending, and closing on unread bytes sends a reset
        # that can destroy the reply on its way. Half-close instead, drop what still
        # arrives, and close when the client does or after a few seconds.
        transport.write_eof()
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._discarding = True
        self.in_data = False
        self._give_back()
        if not transport.is_reading():
            transport.resume_reading()
        self.loop.call_later(LINGER, transport.close)

    def _give_back(self) -> None:
        self.front.budget.give_back(self._charged)
        self._charged = 0

    async def smtp_DATA(self, arg: str) -> None:
        self.in_data = True
        self._data_started = self._last_data = self.loop.time()
        self._arm_data_timer()
        try:
            if REPLACES_AIOSMTPD:
                await super().smtp_DATA(arg)
            else:
                await SMTP.smtp_DATA(self, arg)
        finally:
            self.in_data = False
            self._give_back()
            self.front.wake()
            if self.transport is not None:
                self._reset_timeout()
                if self.front.closing:
                    self.close_now()

    def close_now(self) -> None:
        """Say 421 and hang up; only called between commands, never mid-reply."""
        self._hang_up(SHUTDOWN_REPLY)

    # --- AUTH: aiosmtpd parses PLAIN and LOGIN; the hash is checked off the loop ----

    async def smtp_AUTH(self, arg: str) -> None:
        if self.front.authenticator is None:
            await self.push("502 5.5.1 AUTH not available")
            return
        if self.front.guard.locked(self.client):
            await self.push(LOCKED_OUT)
            self._hang_up(b"")
            return
        await super().smtp_AUTH(arg)

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        # Called synchronously by aiosmtpd once it has the credentials; checking them
        # is slow hashing, done in auth_PLAIN/auth_LOGIN below.
        return AuthResult(success=False, handled=False, auth_data=auth_data)

    async def auth_PLAIN(self, server: Any, args: list[str]) -> AuthResult:
        return await self._verify("PLAIN", await super().auth_PLAIN(server, args))

    async def auth_LOGIN(self, server: Any, args: list[str]) -> AuthResult:
        return await self._verify("LOGIN", await super().auth_LOGIN(server, args))

    async def _verify(self, mechanism: str, parsed: AuthResult) -> AuthResult:
        credentials = parsed.auth_data
        authenticator = self.front.authenticator
        if not isinstance(credentials, LoginPassword) or authenticator is None:
            return AuthResult(success=False, handled=True)  # aiosmtpd has answered already
        user = credentials.login.decode("utf-8", "replace")
        if await authenticator.verify(user, credentials.password):
            log.info("%s: authenticated as %s (%s)", self.client, user, mechanism)
            return AuthResult(success=True, auth_data=user)
        locked = await self.front.auth_failed(self.client, user, mechanism, count=not self.trusted)
        await asyncio.sleep(self.front.auth_config.failure_delay)
        if locked:
            await self.push(LOCKED_OUT)
            self._hang_up(b"")
            return AuthResult(success=False, handled=True)
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Authentication credentials invalid"
        )


class FrontDoor:
    """Owns the listening sockets, every open session, and what they share."""

    def __init__(
        self,
        config: ListenConfig,
        intake: Intake,
        *,
        auth: AuthConfig | None = None,
        record: Callable[[Event], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.auth_config = auth or AuthConfig()
        self.intake = intake
        self.sessions: set[RelaySMTP] = set()
        self.per_client = Tally()
        self.budget = Budget(config.max_bytes_in_flight)
        self.tls = ServerTls(config.tls) if config.tls.enabled else None
        self.authenticator = Authenticator(self.auth_config) if self.auth_config.enabled else None
        self.guard = Guard(self.auth_config, clock)
        self.sent = Events(60.0, clock)
        self.closing = False
        self._record = record
        self._servers: list[asyncio.Server] = []
        self._changed = asyncio.Event()
        self._trusted: dict[str, bool] = {}

    def wake(self) -> None:
        self._changed.set()

    def trusts(self, peer: object) -> bool:
        """`allowed` on listen.networks, kept per client address: the same for each connection."""
        if not isinstance(peer, tuple) or not peer:
            return False
        host = str(peer[0])
        known = self._trusted.get(host)
        if known is None:
            known = _keep(self._trusted, host, allowed(peer, self.config.networks))
        return known

    @property
    def listening(self) -> bool:
        return (
            bool(self._servers) and all(s.is_serving() for s in self._servers) and not self.closing
        )

    @property
    def port(self) -> int:
        return self._bound_port(0)

    @property
    def implicit_port(self) -> int | None:
        """The implicit-TLS listener's port, when there is one."""
        return self._bound_port(1) if len(self._servers) > 1 else None

    def _bound_port(self, index: int) -> int:
        return int(self._servers[index].sockets[0].getsockname()[1])

    def _protocol(self, implicit_tls: bool = False) -> RelaySMTP:
        tls = None if implicit_tls or self.tls is None else self.tls.context
        return RelaySMTP(
            self,
            implicit_tls=implicit_tls,
            data_size_limit=self.config.max_message_size,
            enable_SMTPUTF8=True,
            hostname=self.config.hostname,
            ident="dedup-relay ESMTP",
            timeout=self.config.command_timeout,
            tls_context=tls,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        await self.bind()
        await self.serve()

    async def bind(self) -> None:
        """Take the ports without answering on them yet: a busy port fails here, early."""
        self._servers.append(await self._bind(self._protocol, self.config.port, "listen.port"))
        implicit = self.config.tls.implicit_port
        if self.tls is not None and implicit is not None:
            tls = self.tls.context
            self._servers.append(
                await self._bind(
                    lambda: self._protocol(implicit_tls=True),
                    implicit,
                    "listen.tls.implicit_port",
                    tls,
                )
            )

    async def _bind(
        self,
        factory: Callable[[], RelaySMTP],
        port: int,
        key: str,
        ssl: SSLContext | None = None,
    ) -> asyncio.Server:
        try:
            return await asyncio.get_running_loop().create_server(
                factory,
                host=self.config.host,
                port=port,
                ssl=ssl,
                reuse_address=True,
                reuse_port=self.config.reuse_port,
                start_serving=False,
            )
        except OSError as exc:
            self.close()
            raise ListenError.bind_failed(self.config.host, port, key, exc) from None

    async def serve(self) -> None:
        """Answer on the bound ports."""
        for server in self._servers:
            await server.start_serving()
        if len(self._servers) > 1:
            log.info("implicit TLS on %s:%d", self.config.host, self.implicit_port)
        self._warn_about_settings()

    def close(self) -> None:
        """Let go of the ports of a start that failed."""
        for server in self._servers:
            server.close()
        self._servers.clear()

    def _warn_about_settings(self) -> None:
        if self.authenticator is None:
            return
        if self.auth_config.allow_plaintext:
            log.warning(
                "auth.allow_plaintext is true: passwords may cross the network in clear text;"
                " use it only in a lab"
            )
        elif self.tls is None:
            log.warning(
                "auth.users_file is set but listen.tls is not: clients outside listen.networks"
                " cannot authenticate, because AUTH is offered only over TLS"
            )

    def reload(self) -> None:
        """SIGHUP: certificate and users file again; open sessions keep what they have."""
        for what, part in (("TLS certificate", self.tls), ("users file", self.authenticator)):
            if part is None:
                continue
            try:
                part.reload()
            except ConfigError as exc:
                log.error("reload: kept the old %s: %s", what, exc)
            else:
                log.info("reload: %s reloaded", what)

    # --- policy the sessions share -------------------------------------------

    async def record(self, event: Event) -> None:
        if self._record is None:
            return
        try:
            await self._record(event)
        except Exception as exc:  # an audit write must never end a session
            log.error("could not record a %s event: %s", event.event, exc)

    async def auth_failed(self, client: str, user: str, mechanism: str, *, count: bool) -> bool:
        """Record one failed AUTH and count it; True when it locks the client out.

        Clients on listen.networks are recorded but not counted, as Postfix exempts
        mynetworks from its anvil limits: they may send without AUTH anyway, and locking
        out a sidecar's loopback for a wrong password would stop all of its mail.
        """
        failures = self.guard.failed(client) if count else 0
        locked = count and self.guard.locked(client)
        detail = f"AUTH {mechanism} failed"
        if count:
            detail += f"; {failures} failure(s) from this address in the window"
        if locked:
            detail += f"; locked out for {self.auth_config.lockout:g}s"
        log.warning("%s: %s, user %s", client, detail, user)
        await self.record(
            Event(
                ts=time.time(),
                event="auth_failed",
                client=client,
                user=user[:256],
                code=535,
                detail=detail,
            )
        )
        return locked

    async def user_policy(self, server: RelaySMTP, user: str, sender: str) -> str | None:
        """auth.users limits at MAIL: allowed senders, then messages per minute."""
        limits = self.auth_config.users.get(user)
        if limits is None:
            return None
        shown = sender or "<>"

        async def refuse(event: str, reply: str, detail: str) -> str:
            await self.record(
                Event(
                    ts=time.time(),
                    event=event,
                    sender=sender,
                    client=server.client,
                    user=user,
                    code=int(reply[:3]),
                    detail=detail,
                )
            )
            return reply

        if limits.senders and not rules.any_glob(limits.senders, [shown]):
            return await refuse(
                "rejected",
                f"553 5.7.1 Sender address not allowed for user {user}",
                "sender not in auth.users senders",
            )
        if limits.rate is not None:
            if self.sent.count(user) >= limits.rate:
                return await refuse(
                    "rate_limited",
                    f"451 4.7.1 Rate limit: at most {limits.rate} messages per minute, try later",
                    f"more than {limits.rate} messages per minute",
                )
            self.sent.add(user, keep=limits.rate)
        return None

    async def check_content(self, data: bytes) -> content.Checked:
        """Line endings and header limits; a big message is checked off the event loop."""
        args = (data, self.config.max_header_size, self.config.max_header_fields)
        if len(data) > THREAD_THRESHOLD:
            return await asyncio.to_thread(content.check, *args)
        return content.check(*args)

    async def record_refusal(self, tx: Transaction, reply: str) -> None:
        await self.record(
            Event(
                ts=time.time(),
                event="rejected",
                sender=tx.sender,
                rcpts=tx.recipients,
                size=len(tx.data),
                client=tx.client,
                user=tx.user,
                code=int(reply[:3]),
                detail=reply[4:],
            )
        )

    async def stop(self, grace: float) -> None:
        """Stop listening, hang up idle sessions, give sessions mid-DATA `grace` seconds."""
        self.closing = True
        for server in self._servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            for session in list(self.sessions):
                if not session.in_data:
                    session.close_now()
            busy = [s for s in self.sessions if s.in_data]
            remaining = deadline - loop.time()
            if not busy or remaining <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        for server in self._servers:
            await server.wait_closed()
