"""The YAML config turned into typed, frozen dataclasses.

Every mistake is reported as one `ConfigError` line naming the key, because the
person reading it is an operator at a terminal, not a Python developer.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml

from relay.errors import ConfigError
from relay.units import UnitError, format_duration, format_size, parse_duration, parse_size

__all__ = [
    "DEFAULT_KEYS",
    "DEFAULT_WINDOWS",
    "ENV_PREFIX",
    "AuditConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "DedupeConfig",
    "DeliveryConfig",
    "HttpConfig",
    "KeySpec",
    "Layers",
    "ListenConfig",
    "Rate",
    "RouteConfig",
    "RouteMatch",
    "RuleConfig",
    "RuleMatch",
    "RuntimeConfig",
    "Secret",
    "StoreConfig",
    "TlsConfig",
    "UpstreamConfig",
    "UserLimits",
    "from_mapping",
    "load",
    "nameserver",
    "read_layers",
    "to_mapping",
    "to_yaml_with_sources",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DuplicateAction = Literal["drop", "reject", "tag"]
ConflictAction = Literal["reject", "drop", "forward"]
Scope = Literal["global", "user", "sender_domain"]

DEFAULT_WINDOWS: Mapping[str, float] = {
    "header": 24 * 3600.0,
    "message-id": 24 * 3600.0,
    "fingerprint": 3600.0,
}


@dataclass(frozen=True)
class Secret:
    """A credential that prints as *** so it cannot leak into logs or check-config."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret(***)"

    def __str__(self) -> str:
        return "***"


@dataclass(frozen=True)
class TlsConfig:
    """STARTTLS on the listening port, and optionally a second port with TLS from the first byte."""

    cert_file: str | None = None
    key_file: str | None = None
    implicit_port: int | None = None
    required: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 2525
    hostname: str = ""
    networks: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    max_message_size: int = 25_000_000
    max_recipients: int = 100
    max_connections: int = 200
    reuse_port: bool = False
    command_timeout: float = 300.0
    data_timeout: float = 300.0
    max_connections_per_client: int = 50
    max_data_time: float = 600.0
    min_data_rate: int = 500
    max_bytes_in_flight: int = 256_000_000
    max_header_size: int = 100_000
    max_header_fields: int = 1000
    tls: TlsConfig = TlsConfig()


@dataclass(frozen=True)
class UserLimits:
    """What one authenticated user may do: envelope sender globs, messages per minute."""

    senders: tuple[str, ...] = ()
    rate: int | None = None


@dataclass(frozen=True)
class AuthConfig:
    """SMTP AUTH for clients outside listen.networks (Postfix's permit_sasl_authenticated)."""

    users_file: str | None = None
    allow_plaintext: bool = False
    max_failures: int = 5
    failure_window: float = 300.0
    lockout: float = 300.0
    failure_delay: float = 1.0
    users: Mapping[str, UserLimits] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.users_file is not None


@dataclass(frozen=True)
class Rate:
    """A provider's send limit, `count` messages per `per` seconds: `14/s`, `600/m`.

    The relay spaces transactions evenly, one every `interval` seconds, so no window of
    any length ever holds more than the limit allows.
    """

    count: float
    per: float

    @property
    def interval(self) -> float:
        return self.per / self.count

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}[self.per]
        return f"{self.count:g}/{unit}"


@dataclass(frozen=True)
class UpstreamConfig:
    """Where mail goes: one provider's SMTP endpoint, a Maildir, or `mx:` (direct delivery).

    `name` is "" for the single `upstream:`; entries of `upstreams:` are named, and routes
    and the audit log refer to them by that name.
    """

    name: str = ""
    url: str = "maildir:data/maildir"
    scheme: Literal["smtp", "smtps", "maildir", "mx"] = "maildir"
    host: str = ""
    port: int = 0
    path: str = "data/maildir"
    username: str | None = None
    password: Secret | None = None
    username_env: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    tls_verify: bool = True
    ca_file: str | None = None
    require_tls: bool = False
    timeout: float = 60.0
    helo_name: str = ""
    idempotency_header: str | None = None
    idle_timeout: float = 30.0
    max_messages_per_connection: int = 100
    max_connections: int | None = None
    rate: Rate | None = None
    allow_plaintext_auth: bool = False
    dns_servers: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How the audit log names it: its name, or for the unnamed upstream its URL."""
        if self.name:
            return self.name
        if self.scheme == "maildir":
            return f"maildir:{self.path}"
        if self.scheme == "mx":
            return "mx:" if self.port == 25 else f"mx://:{self.port}"
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True)
class RouteMatch:
    """What a route looks at; every condition given must hold (globs, case-insensitive)."""

    sender: tuple[str, ...] = ()
    headers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    rule: tuple[str, ...] = ()
    user: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouteConfig:
    """The upstreams a message goes to, in failover order; no `match` makes the default."""

    upstreams: tuple[str, ...]
    match: RouteMatch | None = None


@dataclass(frozen=True)
class StoreConfig:
    """SQLite at `path` (the default), or PostgreSQL when `url` is set.

    The password for `url` comes from `password_env` or `password_file`, else from libpq's
    own PGPASSWORD or ~/.pgpass; TLS and the rest from the URL's query (`sslmode`,
    `sslrootcert`, ... as libpq names them) or the PG* environment variables.
    """

    path: str = "data/relay.db"
    keep_bodies: float = 0.0
    url: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    password: Secret | None = None
    connect_timeout: float = 10.0
    statement_timeout: float = 30.0
    pool_size: int | None = None

    @property
    def backend(self) -> Literal["sqlite", "postgresql"]:
        return "sqlite" if self.url is None else "postgresql"

    @property
    def where(self) -> str:
        """The store for a person to read: the file, or the URL (which never holds a password)."""
        return self.path if self.url is None else self.url


@dataclass(frozen=True)
class DeliveryConfig:
    concurrency: int = 8
    retry_initial: float = 60.0
    retry_max: float = 3600.0
    max_age: float = 5 * 86400.0
    on_ambiguous: Literal["retry", "hold"] = "retry"
    # How long a lease outlives its owner's last renewal; renewed every third of it.
    lease_timeout: float = 300.0


@dataclass(frozen=True)
class KeySpec:
    """One dedupe strategy: `header:NAME`, `message-id` or `fingerprint`."""

    strategy: Literal["header", "message-id", "fingerprint"]
    header: str | None = None
    window: float | None = None

    @property
    def name(self) -> str:
        return f"header:{self.header}" if self.strategy == "header" else self.strategy


DEFAULT_KEYS = (
    KeySpec("header", "Idempotency-Key"),
    KeySpec("message-id"),
    KeySpec("fingerprint"),
)


@dataclass(frozen=True)
class DedupeConfig:
    mode: Literal["enforce", "shadow", "off"] = "enforce"
    keys: tuple[KeySpec, ...] = DEFAULT_KEYS
    window: float | None = None
    scope: Scope = "global"
    on_duplicate: DuplicateAction = "drop"
    on_conflict: ConflictAction = "reject"
    strip_key_header: bool = True
    release_on_failure: bool = True
    fingerprint_headers: tuple[str, ...] = ("From", "Reply-To", "Subject")
    volatile_headers: tuple[str, ...] = ()

    def window_for(self, spec: KeySpec, rule_window: float | None = None) -> float:
        """Own window first, then the rule's, then dedupe.window, then the strategy default."""
        for candidate in (spec.window, rule_window, self.window):
            if candidate is not None:
                return candidate
        return DEFAULT_WINDOWS[spec.strategy]


@dataclass(frozen=True)
class RuleMatch:
    headers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    sender: tuple[str, ...] = ()
    recipient: tuple[str, ...] = ()
    user: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuleConfig:
    name: str
    match: RuleMatch
    bypass: bool = False
    keys: tuple[KeySpec, ...] | None = None
    window: float | None = None
    scope: Scope | None = None
    on_duplicate: DuplicateAction | None = None


@dataclass(frozen=True)
class AuditConfig:
    output: str = "stdout"
    retention: float = 90 * 86400.0


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP side port (probes, metrics, review pages); `listen` is None when it is off."""

    listen: str | None = None
    host: str = ""
    port: int = 0
    users_file: str | None = None


@dataclass(frozen=True)
class RuntimeConfig:
    instance: str = ""
    shutdown_grace: float = 5.0
    drain_delay: float = 0.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class Config:
    listen: ListenConfig = ListenConfig()
    auth: AuthConfig = AuthConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    store: StoreConfig = StoreConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    dedupe: DedupeConfig = DedupeConfig()
    rules: tuple[RuleConfig, ...] = ()
    audit: AuditConfig = AuditConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    http: HttpConfig = HttpConfig()
    upstreams: tuple[UpstreamConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()

    @property
    def delivery_upstreams(self) -> tuple[UpstreamConfig, ...]:
        """The upstreams delivery uses: the named list, or the single `upstream:`."""
        return self.upstreams or (self.upstream,)


# --- reading ---------------------------------------------------------------

T = TypeVar("T")


class _Section:
    """Reads one YAML mapping, converting each key and remembering which were known."""

    def __init__(self, raw: object, path: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of keys, got {_kind(raw)}")
        self.raw: dict[Any, Any] = raw
        self.path = path
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, convert: Callable[[object, str], T], default: T) -> T:
        self.seen.add(name)
        if name not in self.raw or (self.raw[name] is None and default is None):
            return default
        return convert(self.raw[name], self.key(name))

    def finish(self) -> None:
        for name in self.raw:
            if name not in self.seen:
                known = ", ".join(sorted(self.seen))
                raise ConfigError(f"{self.key(str(name))}: unknown key (known keys: {known})")


def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false"}.get(
        type(value), type(value).__name__
    )


def _str(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value.strip()


def _text(value: object, key: str) -> str:
    """A string where "" means "work it out"."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value.strip()


def _opt_str(value: object, key: str) -> str | None:
    return None if value is None else _str(value, key)


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _int_at_least(low: int, high: int | None = None) -> Callable[[object, str], int]:
    def convert(value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{key}: {value} is out of range (must be {bounds})")
        return value

    return convert


def _duration(value: object, key: str) -> float:
    try:
        return parse_duration(value)
    except UnitError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _opt_duration(value: object, key: str) -> float | None:
    return None if value is None else _duration(value, key)


def _size(value: object, key: str) -> int:
    try:
        return parse_size(value)
    except UnitError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _opt_int_at_least(low: int, high: int | None = None) -> Callable[[object, str], int | None]:
    convert = _int_at_least(low, high)
    return lambda value, key: None if value is None else convert(value, key)


def _choice(*options: str) -> Callable[[object, str], Any]:
    def convert(value: object, key: str) -> str:
        if value not in options:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}")
        return str(value)

    return convert


def _patterns(value: object, key: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    return tuple(_str(item, key) for item in items)


def _str_list(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {_kind(value)}")
    return tuple(_str(item, f"{key}[{i}]") for i, item in enumerate(value))


def _networks(value: object, key: str) -> tuple[Network, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of networks like 127.0.0.0/8")
    out: list[Network] = []
    for i, item in enumerate(value):
        try:
            out.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ConfigError(f"{key}[{i}]: {item!r} is not a network (use 10.0.0.0/8)") from None
    return tuple(out)


def _key_spec(value: object, key: str) -> KeySpec:
    window: float | None = None
    if isinstance(value, dict):
        section = _Section(value, key)
        name = section.get("strategy", _str, "")
        window = section.get("window", _opt_duration, None)
        section.finish()
        if not name:
            raise ConfigError(f"{key}.strategy: missing (header:NAME, message-id or fingerprint)")
    elif isinstance(value, str):
        name = value.strip()
    else:
        raise ConfigError(f"{key}: expected a strategy name or a mapping, got {_kind(value)}")
    if name in ("message-id", "fingerprint"):
        return KeySpec(name, None, window)  # type: ignore[arg-type]
    if name.lower().startswith("header:"):
        header = name.split(":", 1)[1].strip()
        if not header or not all(33 <= ord(c) <= 126 and c != ":" for c in header):
            raise ConfigError(f"{key}: {name!r} needs a header name after 'header:'")
        return KeySpec("header", header, window)
    raise ConfigError(f"{key}: {name!r} is not a strategy (header:NAME, message-id, fingerprint)")


def _key_specs(value: object, key: str) -> tuple[KeySpec, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of strategies")
    return tuple(_key_spec(item, f"{key}[{i}]") for i, item in enumerate(value))


# Keys of `upstream:` that every entry of `upstreams:` inherits unless it sets its own. The URL,
# credentials, limits and `allow_plaintext_auth` belong to one provider and are never inherited.
_INHERITED = (
    "tls_verify",
    "ca_file",
    "require_tls",
    "timeout",
    "helo_name",
    "idempotency_header",
    "idle_timeout",
    "max_messages_per_connection",
    "dns_servers",
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(s|m|h)")


def _upstream(raw: object, key: str = "upstream", *, named: bool = False) -> UpstreamConfig:
    s = _Section(raw, key)
    name = s.get("name", _str, "") if named else ""
    if named and not name:
        raise ConfigError(f"{key}.name: every upstream needs a name (routes and the log use it)")
    if name and not _NAME.fullmatch(name):
        raise ConfigError(
            f"{key}.name: {name!r} is not a name (letters, digits, '.', '_', '-'; 64 at most)"
        )
    url = s.get("url", _str, UpstreamConfig.url)
    if named and "url" not in s.raw:
        raise ConfigError(f"{key}.url: missing (smtp://, smtps://, maildir: or mx:)")
    username = s.get("username", _opt_str, None)
    username_env = s.get("username_env", _opt_str, None)
    password_env = s.get("password_env", _opt_str, None)
    password_file = s.get("password_file", _opt_str, None)
    if "password" in s.raw:
        raise ConfigError(
            f"{key}.password: secrets do not belong in the YAML; "
            f"use {key}.password_env or {key}.password_file"
        )
    config = UpstreamConfig(
        url=url,
        username_env=username_env,
        password_env=password_env,
        password_file=password_file,
        tls_verify=s.get("tls_verify", _bool, True),
        ca_file=s.get("ca_file", _opt_str, None),
        require_tls=s.get("require_tls", _bool, False),
        timeout=s.get("timeout", _duration, UpstreamConfig.timeout),
        helo_name=s.get("helo_name", _text, ""),
        idempotency_header=s.get("idempotency_header", _opt_str, None),
        idle_timeout=s.get("idle_timeout", _duration, UpstreamConfig.idle_timeout),
        max_messages_per_connection=s.get("max_messages_per_connection", _int_at_least(1), 100),
        name=name,
        max_connections=s.get("max_connections", _int_at_least(1, 1000), None),
        rate=s.get("rate", _rate, None),
        allow_plaintext_auth=s.get("allow_plaintext_auth", _bool, False),
        dns_servers=s.get("dns_servers", _dns_servers, ()),
    )
    s.finish()
    scheme, host, port, path = _parse_url(url, f"{key}.url")
    if username_env:
        username = _env(username_env, f"{key}.username_env")
    password: Secret | None = None
    if password_env:
        password = Secret(_env(password_env, f"{key}.password_env"))
    elif password_file:
        password = Secret(_read_secret(password_file, f"{key}.password_file"))
    if password and not username:
        raise ConfigError(f"{key}.username: a password is configured but no username")
    if scheme == "mx" and username:
        raise ConfigError(
            f"{key}.username: mx: delivers to each recipient's own mail servers,"
            " which take no login; credentials belong to a provider's smtp:// upstream"
        )
    if config.ca_file and not Path(config.ca_file).is_file():
        raise ConfigError(f"{key}.ca_file: {config.ca_file} is not a readable file")
    return _replace(
        config, scheme=scheme, host=host, port=port, path=path, username=username, password=password
    )


def _rate(value: object, key: str) -> Rate:
    hint = "use messages per second, minute or hour: 14/s, 600/m, 10000/h"
    match = _RATE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{key}: {value!r} is not a rate ({hint})")
    count = float(match.group(1))
    if count <= 0:
        raise ConfigError(f"{key}: {value!r} must allow at least some mail ({hint})")
    return Rate(count, {"s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2)])


def _dns_servers(value: object, key: str) -> tuple[str, ...]:
    """Resolver addresses: `IP` (port 53), `IP:PORT` or `[IPv6]:PORT`."""
    items = _str_list(value, key)
    for i, item in enumerate(items):
        try:
            nameserver(item)
        except ValueError:
            raise ConfigError(
                f"{key}[{i}]: {item!r} is not a resolver address (use 10.0.0.53, 10.0.0.53:5353"
                " or [fd00::53]:53)"
            ) from None
    return items


# HOST:PORT, with an IPv6 host in brackets; a host without them has no colon, so a bare IPv6
# address never matches (it is a host without a port).
_HOST_PORT = re.compile(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\s\[\]]+):(\d{1,5})")


def split_host_port(text: str) -> tuple[str, int] | None:
    """`HOST:PORT` or `[IPv6]:PORT` as (host, port), None when `text` is neither.

    The callers check what they need of the host (an IP address for a resolver) and of the
    port (0 means "any free one" for a listener, and no resolver listens there).
    """
    match = _HOST_PORT.fullmatch(text)
    if match is None:
        return None
    return match.group(1) or match.group(3), int(match.group(2) or match.group(4))


def nameserver(text: str) -> tuple[str, int]:
    """`IP`, `IP:PORT` or `[IPv6]:PORT` as (address, port); ValueError when it is none."""
    address, port = split_host_port(text) or (text, 53)
    ipaddress.ip_address(address)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return address, port


def _upstreams(raw: object, base: object) -> tuple[UpstreamConfig, ...]:
    if raw is None or raw == []:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("upstreams: expected a list of upstreams, each with a name and a url")
    defaults = {k: v for k, v in base.items() if k in _INHERITED} if isinstance(base, dict) else {}
    entries: list[UpstreamConfig] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"upstreams[{i}]: expected a mapping (name, url, ...)")
        entries.append(_upstream({**defaults, **item}, f"upstreams[{i}]", named=True))
    names = [u.name for u in entries]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"upstreams[{i}].name: the name {name!r} is used twice")
    return tuple(entries)


def _route(raw: object, key: str, names: tuple[str, ...], rules: tuple[str, ...]) -> RouteConfig:
    s = _Section(raw, key)
    none: tuple[str, ...] = ()
    upstreams = s.get("upstreams", _str_list, none)
    if not upstreams:
        raise ConfigError(f"{key}.upstreams: missing (the upstreams to try, in order)")
    for i, name in enumerate(upstreams):
        if name not in names:
            raise ConfigError(
                f"{key}.upstreams[{i}]: no upstream named {name!r} (upstreams: {', '.join(names)})"
            )
        if name in upstreams[:i]:
            raise ConfigError(f"{key}.upstreams[{i}]: {name!r} is listed twice")
    match: RouteMatch | None = None
    if "match" in s.raw:
        m = _Section(s.raw.get("match"), f"{key}.match")
        s.seen.add("match")
        headers_raw = m.get("header", lambda v, k: _Section(v, k), _Section({}, ""))
        headers_raw.seen.update(str(h) for h in headers_raw.raw)
        match = RouteMatch(
            sender=m.get("sender", _patterns, ()),
            headers=tuple(
                (str(h), _patterns(v, headers_raw.key(str(h)))) for h, v in headers_raw.raw.items()
            ),
            rule=m.get("rule", _patterns, ()),
            user=m.get("user", _patterns, ()),
        )
        m.finish()
        if match == RouteMatch():
            raise ConfigError(
                f"{key}.match: needs at least one of sender, header, rule, user"
                " (leave match out for the default route)"
            )
        for pattern in match.rule:
            if not any(fnmatchcase(r.lower(), pattern.lower()) for r in rules):
                known = ", ".join(rules) or "none"
                raise ConfigError(f"{key}.match.rule: {pattern!r} names no rule (rules: {known})")
    s.finish()
    return RouteConfig(upstreams=upstreams, match=match)


def _routes(
    raw: object, upstreams: tuple[UpstreamConfig, ...], rules: tuple[str, ...]
) -> tuple[RouteConfig, ...]:
    if raw is None or raw == []:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"routes: expected a list of routes, got {_kind(raw)}")
    if not upstreams:
        raise ConfigError("routes: routes choose among named upstreams; define upstreams: first")
    names = tuple(u.name for u in upstreams)
    routes = tuple(_route(item, f"routes[{i}]", names, rules) for i, item in enumerate(raw))
    for i, route in enumerate(routes[:-1]):
        if route.match is None:
            raise ConfigError(
                f"routes[{i}]: a route without match takes every message, so the routes after"
                " it are never used; put the default route last"
            )
    return routes


def _parse_url(
    url: str, key: str = "upstream.url"
) -> tuple[Literal["smtp", "smtps", "maildir", "mx"], str, int, str]:
    if url.startswith("maildir:"):
        path = url[len("maildir:") :].removeprefix("//")
        if not path:
            raise ConfigError(f"{key}: maildir: needs a directory, e.g. maildir:data/maildir")
        return "maildir", "", 0, path
    parts = urlsplit(url)
    if parts.scheme == "mx" and parts.path in ("", "/") and not parts.query:
        if parts.hostname or parts.username or parts.password:
            raise ConfigError(
                f"{key}: {url!r}: mx: takes no host (each recipient domain's MX records choose"
                " the servers); write mx: (port 25) or mx://:PORT"
            )
        try:
            return "mx", "", parts.port or 25, ""
        except ValueError:
            raise ConfigError(f"{key}: {url!r} has an invalid port") from None
    if parts.scheme not in ("smtp", "smtps"):
        raise ConfigError(f"{key}: {url!r} must start with smtp://, smtps://, maildir: or mx:")
    if parts.username or parts.password:
        prefix = key.rsplit(".", 1)[0]
        raise ConfigError(
            f"{key}: credentials in the URL are not allowed; "
            f"use {prefix}.username with {prefix}.password_env or {prefix}.password_file"
        )
    try:
        port = parts.port or (465 if parts.scheme == "smtps" else 25)
    except ValueError:
        raise ConfigError(f"{key}: {url!r} has an invalid port") from None
    if not parts.hostname:
        raise ConfigError(f"{key}: {url!r} has no host")
    return parts.scheme, parts.hostname, port, ""  # type: ignore[return-value]


def _env(name: str, key: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"{key}: environment variable {name} is not set")
    return value


def _read_secret(path: str, key: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:  # its message quotes no byte, but it would end in a traceback
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{key}: {path} is empty")
    return value


def _listen(raw: object) -> ListenConfig:
    s = _Section(raw, "listen")
    d = ListenConfig()
    config = ListenConfig(
        host=s.get("host", _str, d.host),
        port=s.get("port", _int_at_least(0, 65535), d.port),
        hostname=s.get("hostname", _text, "") or socket.getfqdn(),
        networks=s.get("networks", _networks, d.networks),
        max_message_size=s.get("max_message_size", _size, d.max_message_size),
        max_recipients=s.get("max_recipients", _int_at_least(1), d.max_recipients),
        max_connections=s.get("max_connections", _int_at_least(1), d.max_connections),
        reuse_port=s.get("reuse_port", _bool, False),
        command_timeout=s.get("command_timeout", _duration, d.command_timeout),
        data_timeout=s.get("data_timeout", _duration, d.data_timeout),
        max_connections_per_client=s.get(
            "max_connections_per_client", _int_at_least(1), d.max_connections_per_client
        ),
        max_data_time=s.get("max_data_time", _duration, d.max_data_time),
        min_data_rate=s.get("min_data_rate", _size, d.min_data_rate),
        max_bytes_in_flight=s.get("max_bytes_in_flight", _size, d.max_bytes_in_flight),
        max_header_size=s.get("max_header_size", _size, d.max_header_size),
        max_header_fields=s.get("max_header_fields", _int_at_least(1), d.max_header_fields),
        tls=s.get("tls", _tls, d.tls),
    )
    s.finish()
    if config.max_message_size < 1024:
        raise ConfigError("listen.max_message_size: must be at least 1KB")
    for name in ("command_timeout", "data_timeout", "max_data_time"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"listen.{name}: must be more than 0s")
    if config.max_bytes_in_flight < config.max_message_size:
        raise ConfigError(
            "listen.max_bytes_in_flight: must be at least listen.max_message_size"
            f" ({format_size(config.max_message_size)}), or no message could ever be taken"
        )
    if config.max_header_size < 1024:
        raise ConfigError("listen.max_header_size: must be at least 1KB")
    for i, network in enumerate(config.networks):
        # Wider than 10.0.0.0/8 (IPv4) or fc00::/7 (IPv6) is no private network.
        if network.prefixlen < (8 if network.version == 4 else 7):
            raise ConfigError(
                f"listen.networks[{i}]: {network} would let most of the internet relay through"
                " this server; list only your own networks (clients elsewhere can use auth)"
            )
    return config


def _tls(raw: object, key: str) -> TlsConfig:
    s = _Section(raw, key)
    config = TlsConfig(
        cert_file=s.get("cert_file", _opt_str, None),
        key_file=s.get("key_file", _opt_str, None),
        implicit_port=s.get("implicit_port", _opt_int_at_least(0, 65535), None),
        required=s.get("required", _bool, False),
    )
    s.finish()
    if (config.cert_file is None) != (config.key_file is None):
        missing = "key_file" if config.key_file is None else "cert_file"
        raise ConfigError(f"{key}.{missing}: cert_file and key_file go together (PEM files)")
    if not config.enabled:
        for name in ("implicit_port", "required"):
            if getattr(config, name):
                raise ConfigError(f"{key}.{name}: needs {key}.cert_file and {key}.key_file")
    return config


def _user_limits(raw: object, key: str) -> UserLimits:
    s = _Section(raw, key)
    limits = UserLimits(
        senders=s.get("senders", _patterns, ()),
        rate=s.get("rate", _int_at_least(1), None),
    )
    s.finish()
    return limits


def _users(raw: object, key: str) -> Mapping[str, UserLimits]:
    s = _Section(raw, key)
    s.seen.update(str(name) for name in s.raw)
    return {str(name): _user_limits(value, s.key(str(name))) for name, value in s.raw.items()}


def _auth(raw: object) -> AuthConfig:
    s = _Section(raw, "auth")
    d = AuthConfig()
    config = AuthConfig(
        users_file=s.get("users_file", _opt_str, None),
        allow_plaintext=s.get("allow_plaintext", _bool, False),
        max_failures=s.get("max_failures", _int_at_least(1), d.max_failures),
        failure_window=s.get("failure_window", _duration, d.failure_window),
        lockout=s.get("lockout", _duration, d.lockout),
        failure_delay=s.get("failure_delay", _duration, d.failure_delay),
        users=s.get("users", _users, {}),
    )
    s.finish()
    if config.users and not config.enabled:
        raise ConfigError("auth.users: limits for users need auth.users_file")
    return config


def _store(raw: object) -> StoreConfig:
    s = _Section(raw, "store")
    d = StoreConfig()
    url = s.get("url", _opt_str, None)
    if url is not None and "path" in s.raw:
        raise ConfigError("store.url: set store.url (PostgreSQL) or store.path (SQLite), not both")
    if "password" in s.raw:
        raise ConfigError(
            "store.password: secrets do not belong in the YAML; "
            "use store.password_env or store.password_file"
        )
    config = StoreConfig(
        path=s.get("path", _str, d.path),
        keep_bodies=s.get("keep_bodies", _duration, 0.0),
        url=None if url is None else _postgres_url(url),
        password_env=s.get("password_env", _opt_str, None),
        password_file=s.get("password_file", _opt_str, None),
        connect_timeout=s.get("connect_timeout", _duration, d.connect_timeout),
        statement_timeout=s.get("statement_timeout", _duration, d.statement_timeout),
        pool_size=s.get("pool_size", _opt_int_at_least(2, 1000), None),
    )
    s.finish()
    for key in ("password_env", "password_file", "pool_size"):
        if getattr(config, key) is not None and url is None:
            raise ConfigError(f"store.{key}: only applies to a PostgreSQL store (store.url)")
    for key in ("connect_timeout", "statement_timeout"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"store.{key}: must be more than 0s")
    password: Secret | None = None
    if config.password_env:
        password = Secret(_env(config.password_env, "store.password_env"))
    elif config.password_file:
        password = Secret(_read_secret(config.password_file, "store.password_file"))
    return _replace(config, password=password)


def _postgres_url(url: str) -> str:
    """`postgresql://USER@HOST:PORT/DB?sslmode=...`: libpq's URL form, without a password."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"store.url: {url!r} must start with postgresql:// (store.path is for SQLite)"
        )
    try:
        has_password = parts.password is not None
    except ValueError:
        raise ConfigError(f"store.url: {url!r} is not a valid URL") from None
    if has_password:
        raise ConfigError(
            "store.url: a password in the URL is not allowed; "
            "use store.password_env or store.password_file (or PGPASSWORD, ~/.pgpass)"
        )
    return url


def _delivery(raw: object) -> DeliveryConfig:
    s = _Section(raw, "delivery")
    d = DeliveryConfig()
    config = DeliveryConfig(
        concurrency=s.get("concurrency", _int_at_least(1, 1000), d.concurrency),
        retry_initial=s.get("retry_initial", _duration, d.retry_initial),
        retry_max=s.get("retry_max", _duration, d.retry_max),
        max_age=s.get("max_age", _duration, d.max_age),
        on_ambiguous=s.get("on_ambiguous", _choice("retry", "hold"), d.on_ambiguous),
        lease_timeout=s.get("lease_timeout", _duration, d.lease_timeout),
    )
    s.finish()
    if config.lease_timeout < 3:
        raise ConfigError("delivery.lease_timeout: must be at least 3s (it is renewed every third)")
    if config.retry_initial <= 0:
        raise ConfigError("delivery.retry_initial: must be more than 0s")
    if config.retry_max < config.retry_initial:
        raise ConfigError("delivery.retry_max: must not be shorter than delivery.retry_initial")
    return config


def _dedupe(raw: object) -> DedupeConfig:
    s = _Section(raw, "dedupe")
    d = DedupeConfig()
    fp = _Section(s.raw.get("fingerprint"), "dedupe.fingerprint")
    s.seen.add("fingerprint")
    config = DedupeConfig(
        mode=s.get("mode", _choice("enforce", "shadow", "off"), d.mode),
        keys=s.get("keys", _key_specs, d.keys),
        window=s.get("window", _opt_duration, None),
        scope=s.get("scope", _choice("global", "user", "sender_domain"), d.scope),
        on_duplicate=s.get("on_duplicate", _choice("drop", "reject", "tag"), d.on_duplicate),
        on_conflict=s.get("on_conflict", _choice("reject", "drop", "forward"), d.on_conflict),
        strip_key_header=s.get("strip_key_header", _bool, True),
        release_on_failure=s.get("release_on_failure", _bool, True),
        fingerprint_headers=fp.get("headers", _str_list, d.fingerprint_headers),
        volatile_headers=fp.get("volatile_headers", _str_list, ()),
    )
    fp.finish()
    s.finish()
    return config


def _rule(raw: object, key: str) -> RuleConfig:
    s = _Section(raw, key)
    name = s.get("name", _str, "")
    if not name:
        raise ConfigError(f"{key}.name: every rule needs a name (it appears in the audit log)")
    m = _Section(s.raw.get("match"), f"{key}.match")
    s.seen.add("match")
    headers_raw = m.get("header", lambda v, k: _Section(v, k), _Section({}, ""))
    headers_raw.seen.update(str(h) for h in headers_raw.raw)
    match = RuleMatch(
        headers=tuple(
            (str(h), _patterns(v, headers_raw.key(str(h)))) for h, v in headers_raw.raw.items()
        ),
        sender=m.get("sender", _patterns, ()),
        recipient=m.get("recipient", _patterns, ()),
        user=m.get("user", _patterns, ()),
    )
    m.finish()
    if match == RuleMatch():
        raise ConfigError(f"{key}.match: needs at least one of header, sender, recipient, user")
    rule = RuleConfig(
        name=name,
        match=match,
        bypass=s.get("bypass", _bool, False),
        keys=s.get("keys", _key_specs, None),
        window=s.get("window", _opt_duration, None),
        scope=s.get("scope", _choice("global", "user", "sender_domain"), None),
        on_duplicate=s.get("on_duplicate", _choice("drop", "reject", "tag"), None),
    )
    s.finish()
    return rule


def _rules(raw: object) -> tuple[RuleConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"rules: expected a list of rules, got {_kind(raw)}")
    rules = tuple(_rule(item, f"rules[{i}]") for i, item in enumerate(raw))
    names = [r.name for r in rules]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"rules: the name {name!r} is used twice")
    return rules


def _audit(raw: object) -> AuditConfig:
    s = _Section(raw, "audit")
    config = AuditConfig(
        output=s.get("output", _str, "stdout"),
        retention=s.get("retention", _duration, AuditConfig.retention),
    )
    s.finish()
    return config


def _runtime(raw: object, listen: ListenConfig) -> RuntimeConfig:
    s = _Section(raw, "runtime")
    config = RuntimeConfig(
        instance=s.get("instance", _text, "") or f"{socket.gethostname()}:{listen.port}",
        shutdown_grace=s.get("shutdown_grace", _duration, RuntimeConfig.shutdown_grace),
        drain_delay=s.get("drain_delay", _duration, 0.0),
        log_level=s.get(
            "log_level", _choice("debug", "info", "warning", "error"), RuntimeConfig.log_level
        ),
        log_format=s.get("log_format", _choice("text", "json"), RuntimeConfig.log_format),
    )
    s.finish()
    if config.drain_delay and config.drain_delay >= config.shutdown_grace:
        raise ConfigError("runtime.drain_delay: must be shorter than runtime.shutdown_grace")
    return config


def _http(raw: object) -> HttpConfig:
    s = _Section(raw, "http")
    listen = s.get("listen", _opt_listen, None)
    users_file = s.get("users_file", _users_file, None)
    s.finish()
    if listen is None:
        return HttpConfig(users_file=users_file)
    host, port = listen
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return HttpConfig(listen=shown, host=host, port=port, users_file=users_file)


def _users_file(value: object, key: str) -> str:
    from relay.web.users import users_file_option

    return users_file_option(value, key)


def _opt_listen(value: object, key: str) -> tuple[str, int] | None:
    """HOST:PORT, with IPv6 hosts in brackets; empty or null turns the listener off."""
    if value is None or value == "":
        return None
    hint = "use HOST:PORT, e.g. 127.0.0.1:9025"
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r} ({hint})")
    split = split_host_port(value.strip())
    if split is None:
        raise ConfigError(f"{key}: {value!r} is not HOST:PORT ({hint})")
    host, port = split
    if port > 65535:
        raise ConfigError(f"{key}: port {port} is out of range (must be between 0 and 65535)")
    return host, port


def _check_writable_dir(path: Path, key: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot create directory {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: directory {path} is not writable")


def from_mapping(raw: object, *, check_paths: bool = True) -> Config:
    """Validate a parsed YAML document; `check_paths` creates and checks directories."""
    top = _Section(raw, "")
    listen = _listen(top.raw.get("listen"))
    rules = _rules(top.raw.get("rules"))
    upstreams = _upstreams(top.raw.get("upstreams"), top.raw.get("upstream"))
    config = Config(
        listen=listen,
        auth=_auth(top.raw.get("auth")),
        upstream=_upstream(top.raw.get("upstream")),
        store=_store(top.raw.get("store")),
        delivery=_delivery(top.raw.get("delivery")),
        dedupe=_dedupe(top.raw.get("dedupe")),
        rules=rules,
        audit=_audit(top.raw.get("audit")),
        runtime=_runtime(top.raw.get("runtime"), listen),
        http=_http(top.raw.get("http")),
        upstreams=upstreams,
        routes=_routes(top.raw.get("routes"), upstreams, tuple(r.name for r in rules)),
    )
    top.seen.update(f.name for f in fields(Config))
    top.finish()
    config = _with_derived(config)
    if check_paths:
        if config.store.url is None:
            _check_writable_dir(Path(config.store.path).parent, "store.path")
        for i, up in enumerate(config.delivery_upstreams):
            if up.scheme == "maildir":
                _check_writable_dir(
                    Path(up.path), f"upstreams[{i}].url" if up.name else "upstream.url"
                )
        if config.audit.output not in ("stdout", "none"):
            _check_writable_dir(Path(config.audit.output).parent, "audit.output")
        _check_front_door(config)
    return config


def _with_derived(config: Config) -> Config:
    """Settings whose default depends on another section's."""
    if config.store.url is not None and config.store.pool_size is None:
        # The writer, and readers for large bodies (up to one per delivery worker) and gauges.
        pool = 2 + config.delivery.concurrency // 2
        config = _replace(config, store=_replace(config.store, pool_size=pool))
    return config


def _check_front_door(config: Config) -> None:
    """Certificates and the users file are read now, so check-config finds what serve would."""
    if config.listen.tls.enabled:
        from relay.tls import server_context

        server_context(config.listen.tls)
    if config.auth.enabled:
        from relay.users import Users

        Users.load(config.auth)


def load(
    path: str | Path | None,
    *,
    check_paths: bool = True,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """The file (if any) with `RELAY_*` variables on top, validated.

    `check_paths=False` for commands that only read: they must not create directories.
    """
    return read_layers(path, os.environ if environ is None else environ).config(
        check_paths=check_paths
    )


# --- layers: the file, then the environment ---------------------------------

ENV_PREFIX = "RELAY_"
# Variables with the prefix that are not config keys.
_ENV_RESERVED = frozenset({"RELAY_CONFIG"})
_ENV_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class _Setting:
    """One `RELAY_<SECTION>__<KEY>` variable: the key path it sets and its value."""

    var: str
    path: tuple[str, ...]
    text: str
    value: object
    yaml_problem: str | None = None

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True)
class Layers:
    """The raw config as read, and where each key came from.

    The environment is applied to the raw mapping before validation, key by key, so a
    section added to the config later is settable from the environment with no extra code.
    """

    file: str | None
    raw: dict[str, Any]
    settings: tuple[_Setting, ...]
    sources: Mapping[str, str]

    def source(self, dotted: str) -> str:
        """`default`, `file` or `env NAME` for a dotted key (a value set whole covers its keys)."""
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            found = self.sources.get(".".join(parts[:n]))
            if found is not None:
                return found
        return "default"

    def config(self, *, check_paths: bool = True) -> Config:
        raw = self.raw
        retried: set[str] = set()
        while True:
            try:
                return from_mapping(copy.deepcopy(raw), check_paths=check_paths)
            except ConfigError as exc:
                setting = self._blame(str(exc))
                if setting is None:
                    raise
                if setting.var not in retried and _plain_scalar(setting.value):
                    # YAML read it as a number, boolean or null; the key may want the text.
                    retried.add(setting.var)
                    raw = copy.deepcopy(raw)
                    _set(raw, setting.path, setting.text, setting.var)
                    continue
                message = f"{setting.var}: {exc}"
                if ": unknown key" in message:
                    message += "; the form is RELAY_<SECTION>__<KEY>, e.g. RELAY_LISTEN__PORT"
                if setting.yaml_problem:
                    message += (
                        f" (read as text: it is not valid YAML, {setting.yaml_problem};"
                        " quote list items that contain ':' or start with '*')"
                    )
                raise ConfigError(message) from None

    def _blame(self, message: str) -> _Setting | None:
        """The variable a validation error is about: by the key it names, else any it mentions."""
        key = message.split(": ", 1)[0]
        by_depth = sorted(self.settings, key=lambda s: -len(s.path))
        for setting in by_depth:
            path = setting.dotted
            inside = key.startswith((path + ".", path + "["))
            if key == path or inside or path.startswith(key + "."):
                return setting
        for setting in by_depth:
            if re.search(rf"(?<![\w.]){re.escape(setting.dotted)}(?![\w])", message):
                return setting
        return None


def read_layers(path: str | Path | None, environ: Mapping[str, str]) -> Layers:
    """Read the file (None: there is none, defaults only) and apply the environment on top."""
    raw: dict[str, Any] = {}
    if path is not None:
        document = _read_yaml(path)
        if document is not None and not isinstance(document, dict):
            raise ConfigError(f"expected a mapping of keys, got {_kind(document)}")
        raw = document or {}
    sources = dict.fromkeys(_leaf_keys(raw), "file")
    settings = tuple(sorted(_env_settings(environ), key=lambda s: (len(s.path), s.var)))
    for setting in settings:
        _set(raw, setting.path, setting.value, setting.var)
        inside = setting.dotted + "."
        for key in [k for k in sources if k.startswith(inside)]:
            del sources[key]
        sources[setting.dotted] = f"env {setting.var}"
    for setting in settings:
        _resolve_alternative(raw, sources, setting)
    return Layers(None if path is None else str(path), raw, settings, sources)


# Keys that exclude each other: setting one from the environment replaces the other's value
# from the file, as the environment beats the file for any one key.
_ALTERNATIVES = {"store.url": "store.path", "store.path": "store.url"}


def _resolve_alternative(raw: dict[str, Any], sources: dict[str, str], setting: _Setting) -> None:
    """RELAY_STORE__URL over a file that names store.path (the shipped config/relay.yaml does)
    would otherwise be refused as "not both"; two that the environment sets still are. An empty
    one unsets its key: the container image sets RELAY_STORE__PATH, which an orchestrator can
    override but not remove, so `RELAY_STORE__PATH=` is how the image takes a PostgreSQL URL."""
    other = _ALTERNATIVES.get(setting.dotted)
    if other is None:
        return
    if setting.value is None:
        _unset(raw, sources, setting.dotted)
    elif sources.get(other) == "file":
        _unset(raw, sources, other)


def _unset(raw: dict[str, Any], sources: dict[str, str], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: object = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)
    sources.pop(dotted, None)


def _read_yaml(path: str | Path) -> object:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config: {path} is not valid YAML{where}") from None


def _leaf_keys(raw: Mapping[Any, Any], prefix: str = "") -> Iterator[str]:
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaf_keys(value, dotted + ".")
        else:
            yield dotted


def _env_settings(environ: Mapping[str, str]) -> Iterator[_Setting]:
    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX) or var in _ENV_RESERVED:
            continue
        parts = var[len(ENV_PREFIX) :].split("__")
        if not all(parts) or not all(_ENV_NAME.fullmatch(p) for p in parts):
            raise ConfigError(
                f"{var}: not a config variable (the form is RELAY_<SECTION>__<KEY>,"
                " e.g. RELAY_LISTEN__PORT)"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "unreadable"
            yield _Setting(var, tuple(p.lower() for p in parts), text, text, problem)
            continue
        yield _Setting(var, tuple(p.lower() for p in parts), text, value)


def _set(raw: dict[str, Any], path: tuple[str, ...], value: object, var: str) -> None:
    node = raw
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise ConfigError(f"{var}: {where} is {_kind(child)}, not a section with keys")
        node = child
    node[path[-1]] = value


def _plain_scalar(value: object) -> bool:
    return value is None or isinstance(value, bool | int | float)


def _replace(obj: T, **changes: Any) -> T:
    from dataclasses import replace

    return replace(obj, **changes)  # type: ignore[type-var]


# --- printing --------------------------------------------------------------

_DURATION_FIELDS = {
    "connect_timeout",
    "statement_timeout",
    "command_timeout",
    "data_timeout",
    "timeout",
    "idle_timeout",
    "keep_bodies",
    "retry_initial",
    "retry_max",
    "max_age",
    "lease_timeout",
    "window",
    "retention",
    "shutdown_grace",
    "drain_delay",
    "max_data_time",
    "failure_window",
    "lockout",
    "failure_delay",
}
_SIZE_FIELDS = {"max_message_size", "max_bytes_in_flight", "max_header_size"}
_INTERNAL_FIELDS = {"scheme", "host", "port", "path"}


def to_mapping(config: Config) -> dict[str, Any]:
    """The effective config as plain YAML-able data, secrets masked."""
    return {f.name: _plain(getattr(config, f.name), f.name) for f in fields(config)}


def _plain(value: object, name: str, section: str = "") -> Any:
    if isinstance(value, Secret):
        return "***"
    if isinstance(value, KeySpec):
        return (
            value.name
            if value.window is None
            else {
                "strategy": value.name,
                "window": format_duration(value.window),
            }
        )
    if isinstance(value, Rate):
        return str(value)
    if isinstance(value, RuleMatch | RouteMatch):
        out: dict[str, Any] = {}
        if value.headers:
            out["header"] = {h: list(p) for h, p in value.headers}
        for key in ("sender", "recipient", "rule", "user"):
            if getattr(value, key, ()):
                out[key] = list(getattr(value, key))
        return out
    if isinstance(value, RouteConfig):
        route: dict[str, Any] = {} if value.match is None else {"match": _plain(value.match, "")}
        route["upstreams"] = list(value.upstreams)
        return route
    if is_dataclass(value) and not isinstance(value, type):
        result: dict[str, Any] = {}
        for f in fields(value):
            if isinstance(value, UpstreamConfig | HttpConfig) and f.name in _INTERNAL_FIELDS:
                continue
            if isinstance(value, UpstreamConfig) and f.name == "name" and not value.name:
                continue
            if isinstance(value, DedupeConfig) and f.name in (
                "fingerprint_headers",
                "volatile_headers",
            ):
                continue
            result[f.name] = _plain(getattr(value, f.name), f.name)
        if isinstance(value, DedupeConfig):
            result["fingerprint"] = {
                "headers": list(value.fingerprint_headers),
                "volatile_headers": list(value.volatile_headers),
            }
        return result
    if isinstance(value, tuple):
        return [_plain(v, name) for v in value]
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, float) and name in _DURATION_FIELDS:
        return format_duration(value)
    if isinstance(value, int) and name in _SIZE_FIELDS:
        return format_size(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, str(k)) for k, v in value.items()}
    return value


def to_yaml_with_sources(config: Config, layers: Layers) -> str:
    """The effective config as YAML, each key followed by where its value came from.

    A key that is not set but read through `KEY_env` or `KEY_file` (a username, a password)
    is credited to that key, when it yielded a value: the shipped file's `password_env: null`
    read no password.
    """
    lines: list[tuple[str, str]] = []

    def source(dotted: str, *, credit: bool = True) -> str:
        found = layers.source(dotted)
        if found != "default" or not credit:
            return found
        for suffix in ("_env", "_file"):
            via = layers.source(dotted + suffix)
            if via != "default":
                return f"{via} (via {dotted.rsplit('.', 1)[-1]}{suffix})"
        return found

    def walk(mapping: Mapping[str, Any], prefix: str, indent: str) -> None:
        for key, value in mapping.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                lines.append((f"{indent}{key}:", ""))
                walk(value, dotted + ".", indent + "  ")
            elif isinstance(value, list) and any(isinstance(v, dict) for v in value) and not prefix:
                block = yaml.safe_dump({key: value}, sort_keys=False, allow_unicode=True)
                head, _, rest = block.partition("\n")
                lines.append((head, source(dotted)))
                lines.extend((line, "") for line in rest.rstrip("\n").split("\n"))
            else:
                note = source(dotted, credit=value is not None)
                lines.append((f"{indent}{key}: {_flow(value)}", note))

    walk(to_mapping(config), "", "")
    width = max(len(text) for text, note in lines if note)
    return "".join(
        f"{text.ljust(width)}  # {note}\n" if note else f"{text}\n" for text, note in lines
    )


def _flow(value: object) -> str:
    text = yaml.safe_dump(
        value, default_flow_style=True, width=1 << 30, allow_unicode=True, sort_keys=False
    ).strip()
    return text.removesuffix("...").strip()
