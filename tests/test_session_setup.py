"""Setting up an SMTP session: what the relay does in place of aiosmtpd's per-connection
introspection (relay/server.py, RelaySMTP._set_up) leaves exactly what aiosmtpd's own
constructor leaves, and the releases it was checked against are the ones installed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import weakref
from types import MethodType
from typing import Any

import aiosmtpd
import aiosmtpd.smtp
import pytest
from aiosmtpd.smtp import SMTP, auth_mechanism

from relay.server import AIOSMTPD_CHECKED, REPLACES_AIOSMTPD, Handler, RelaySMTP
from tests.conftest import Dialog, Relay, make_message, plain, send


def test_the_installed_aiosmtpd_is_one_the_replacements_were_checked_against() -> None:
    # A new aiosmtpd runs its own constructor and DATA loop (correct, slower) until its
    # SMTP.__init__, smtp_DATA and sanitized_log are compared with relay/server.py and
    # relay/dataread.py again, this file and tests/test_data_reading.py pass, and its
    # version is added to AIOSMTPD_CHECKED.
    assert aiosmtpd.__version__ in AIOSMTPD_CHECKED, aiosmtpd.__version__
    assert REPLACES_AIOSMTPD


def same(x: Any, y: Any, pairs: dict[int, Any], seen: set[tuple[int, int]]) -> bool:
    """x (built by _set_up) and y (by aiosmtpd) are alike, object for object.

    `pairs` maps objects that stand for each other (the two protocols, their handlers);
    anything else must be equal, or of the same type with alike attributes.
    """
    if id(x) in pairs:
        return pairs[id(x)] is y
    if x is y:
        return True
    if type(x) is not type(y):
        return False
    if (id(x), id(y)) in seen:
        return True
    seen.add((id(x), id(y)))
    if isinstance(x, MethodType):
        return x.__func__ is y.__func__ and same(x.__self__, y.__self__, pairs, seen)
    if isinstance(x, dict):
        return list(x) == list(y) and all(same(x[k], y[k], pairs, seen) for k in x)
    if isinstance(x, list | tuple | collections.deque):
        return len(x) == len(y) and all(same(a, b, pairs, seen) for a, b in zip(x, y, strict=True))
    if isinstance(x, weakref.ref):
        return same(x(), y(), pairs, seen)
    if isinstance(x, asyncio.Future):
        return x.get_loop() is y.get_loop() and x.done() == y.done()
    if hasattr(x, "__dict__") and not isinstance(x, type):
        return same(vars(x), vars(y), pairs, seen)
    return bool(x == y)


def built(
    front: Any, handler: type[Handler] = Handler, **kwargs: Any
) -> tuple[RelaySMTP, RelaySMTP]:
    """One protocol from _set_up and one from aiosmtpd's SMTP.__init__, same arguments."""
    ours: RelaySMTP = RelaySMTP.__new__(RelaySMTP)
    assert ours._set_up(handler(front), **kwargs)
    theirs: RelaySMTP = RelaySMTP.__new__(RelaySMTP)
    SMTP.__init__(theirs, handler(front), **kwargs)
    return ours, theirs


class AuthHandler(Handler):
    """Mechanisms of the handler's own: one that overrides the protocol's, two new ones."""

    async def auth_PLAIN(self, server: Any, args: list[str]) -> Any:
        return None

    async def auth_CRAM__MD5(self, server: Any, args: list[str]) -> Any:
        return None

    @auth_mechanism("X-NAMED")
    async def auth_whatever(self, server: Any, args: list[str]) -> Any:
        return None


class Front:
    """What Handler keeps of the FrontDoor; set-up never looks at it."""


def context() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


@pytest.mark.parametrize("handler", [Handler, AuthHandler])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {
            "data_size_limit": 25_000_000,
            "enable_SMTPUTF8": True,
            "hostname": "relay.test",
            "ident": "dedup-relay ESMTP",
            "timeout": 300.0,
        },
        {"data_size_limit": None, "hostname": "", "tls_context": "plain"},
        {"data_size_limit": 0, "ident": "", "timeout": 1, "tls_context": "verifying"},
        {"hostname": "h", "tls_context": "checking"},
    ],
)
async def test_set_up_leaves_what_aiosmtpds_constructor_leaves(
    handler: type[Handler], kwargs: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    kwargs = dict(kwargs, loop=asyncio.get_running_loop())
    tls = kwargs.pop("tls_context", None)
    if tls is not None:
        kwargs["tls_context"] = context()
        if tls in ("verifying", "checking"):
            kwargs["tls_context"].verify_mode = ssl.CERT_REQUIRED
        if tls == "checking":
            kwargs["tls_context"].check_hostname = True
            kwargs["tls_context"].verify_mode = ssl.CERT_OPTIONAL
    caplog.set_level(logging.INFO, "mail.log")
    front = Front()
    ours, theirs = built(front, handler, **kwargs)
    pairs = {id(ours): theirs, id(ours.event_handler): theirs.event_handler}
    assert vars(ours).keys() == vars(theirs).keys()
    for name, value in vars(ours).items():
        assert same(value, vars(theirs)[name], pairs, set()), name
    # The log lines each wrote (AUTH mechanisms, TLS warnings), in the same order.
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[: len(lines) // 2] == lines[len(lines) // 2 :]
    offered = {
        Handler: "LOGIN(builtin) PLAIN(builtin)",
        AuthHandler: "CRAM-MD5 LOGIN(builtin) PLAIN X-NAMED",
    }[handler]
    assert ("INFO", f"Available AUTH mechanisms: {offered}") in lines


async def test_the_hooks_and_mechanisms_found_are_the_relays() -> None:
    ours, _ = built(Front(), loop=asyncio.get_running_loop())
    assert {m: a.is_builtin for m, a in ours._auth_methods.items()} == {
        "LOGIN": True,
        "PLAIN": True,
    }
    assert set(ours._handle_hooks) == {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "exception"}
    assert ours._ehlo_hook_ver == "new"
    assert {"AUTH", "DATA", "EHLO", "MAIL", "QUIT", "RCPT", "STARTTLS", "VRFY"} <= set(
        ours._smtp_methods
    )
    assert ours._smtp_methods["DATA"].__func__ is RelaySMTP.smtp_DATA


async def test_arguments_set_up_does_not_know_go_to_aiosmtpd(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # auth_exclude_mechanism is aiosmtpd's to apply; the relay never passes it.
    protocol = RelaySMTP(
        Front(),
        auth_exclude_mechanism=["LOGIN"],
        loop=asyncio.get_running_loop(),
    )
    assert list(protocol._auth_methods) == ["PLAIN"]


def test_a_handler_with_the_old_ehlo_hook_is_set_up_by_aiosmtpd() -> None:
    class OldHandler(Handler):
        async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
            return "250 old"

    class OldSMTP(RelaySMTP):
        pass

    protocol: OldSMTP = OldSMTP.__new__(OldSMTP)
    loop = asyncio.new_event_loop()
    try:
        assert not protocol._set_up(OldHandler(Front()), loop=loop)
        assert vars(protocol) == {}
        with pytest.warns(DeprecationWarning, match="5-argument handle_EHLO"):
            SMTP.__init__(protocol, OldHandler(Front()), loop=loop)
    finally:
        loop.close()


# --- aiosmtpd's command log ---------------------------------------------------------------------


def test_aiosmtpd_logs_each_command_through_sanitized_log() -> None:
    # What the relay replaces is what aiosmtpd calls, by its module-level name.
    assert "sanitized_log" in SMTP._handle_client.__code__.co_names
    assert aiosmtpd.smtp.sanitized_log.__module__ == "relay.server"
    assert aiosmtpd.smtp.sanitized_log.__wrapped__.__module__ == "aiosmtpd.smtp"


async def test_commands_are_logged_masked_when_aiosmtpds_logger_is_on_and_not_when_off(
    make_relay: Any, caplog: pytest.LogCaptureFixture
) -> None:
    relay: Relay = await make_relay()
    mail_log = logging.getLogger("mail.log")
    caplog.set_level(logging.WARNING, "mail.log")
    assert (await send(relay.port, make_message())).code == 250
    assert not [r for r in caplog.records if r.name == "mail.log" and ">>" in r.getMessage()]

    caplog.set_level(logging.INFO, "mail.log")
    assert mail_log.isEnabledFor(logging.INFO) and not mail_log.isEnabledFor(logging.DEBUG)
    talk, _ = await Dialog.open(relay.port)
    await talk.command("EHLO client.test")
    await talk.command(f"AUTH PLAIN {plain()}")
    await talk.command("QUIT")
    await talk.close()
    said = [
        r.getMessage() for r in caplog.records if r.name == "mail.log" and ">>" in r.getMessage()
    ]
    assert any("EHLO client.test" in line for line in said), said
    assert any("AUTH PLAIN ********" in line for line in said), said
    assert not any(plain() in line for line in said)
    assert not [r for r in caplog.records if "readline" in r.getMessage()]  # debug stays off
