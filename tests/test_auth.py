"""SMTP AUTH at the front door: users file, `passwd`, policy, brute force, per-user limits."""

from __future__ import annotations

import json
import logging
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest

from relay.auth import Guard
from relay.config import AuthConfig, ConfigError
from relay.limits import Events
from relay.users import Users, parse_users
from tests.conftest import (
    OUTSIDER,
    PASSWORD,
    ROOT,
    Certificates,
    Dialog,
    Relay,
    RelayFactory,
    Upstream,
    break_users_file,
    client_context,
    make_message,
    plain,
    secure_config,
    send_authenticated,
    smtp_login,
    write_users,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_relay(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        timeout=60,
    )


# --- the users file and passwd -------------------------------------------------


def test_plain_text_password_is_refused_naming_the_line_but_not_the_password(
    tmp_path: Path,
) -> None:
    users = write_users(tmp_path / "users", {"alice": PASSWORD})
    users.write_text(users.read_text() + "# comment\n\nbob:hunter2\n")
    with pytest.raises(ConfigError) as refused:
        Users.load(AuthConfig(users_file=str(users)))
    message = str(refused.value)
    assert f"{users} line 4" in message and "'bob'" in message and "passwd bob" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("nobody", "expected user:hash"),
        ("a b:$2y$x", "expected user:hash"),
        (":x", "expected user:hash"),
        ("dave:", "the password of 'dave' is not an argon2id or bcrypt hash"),
        ("erin:$argon2id$broken", "the password of 'erin' is not an argon2id"),
    ],
)
def test_malformed_users_file_lines_are_named(line: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"line 1: {problem}"):
        parse_users(line + "\n", "users")


def test_limits_for_a_user_missing_from_the_file_are_a_config_error(tmp_path: Path) -> None:
    from relay.config import UserLimits

    users = write_users(tmp_path / "users", {"alice": PASSWORD})
    config = AuthConfig(users_file=str(users), users={"alcie": UserLimits(rate=5)})
    with pytest.raises(ConfigError, match=r"auth\.users\.alcie: no such user"):
        Users.load(config)


def test_htpasswd_bcrypt_and_argon2id_hashes_both_verify(tmp_path: Path) -> None:
    # htpasswd -B writes $2y$; the bcrypt package reads it.
    htpasswd = bcrypt.hashpw(b"bcrypt pw", bcrypt.gensalt(rounds=4)).decode()
    htpasswd = "$2y$" + htpasswd.removeprefix("$2b$")
    users = write_users(tmp_path / "users", {"alice": PASSWORD})
    users.write_text(users.read_text() + f"carol:{htpasswd}\n")
    loaded = Users.load(AuthConfig(users_file=str(users)))
    assert loaded.verify("alice", PASSWORD.encode())
    assert loaded.verify("carol", b"bcrypt pw")
    assert not loaded.verify("carol", b"wrong")
    assert not loaded.verify("alice", b"bcrypt pw")
    assert not loaded.verify("nobody", PASSWORD.encode())


def test_passwd_adds_and_changes_users_from_stdin_keeping_other_lines(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("# relay users\n")
    users.chmod(0o640)
    added = run_relay("passwd", "alice", "--users-file", str(users), stdin="first secret\n")
    assert added.returncode == 0, added.stderr
    again = run_relay("passwd", "bob", "--users-file", str(users), stdin="bob secret\n")
    changed = run_relay("passwd", "alice", "--users-file", str(users), stdin="second secret\n")
    assert again.returncode == changed.returncode == 0
    lines = users.read_text().splitlines()
    assert lines[0] == "# relay users"
    assert [line.split(":")[0] for line in lines[1:]] == ["alice", "bob"]
    assert all(":$argon2id$" in line for line in lines[1:])
    assert "secret" not in users.read_text()
    loaded = Users.load(AuthConfig(users_file=str(users)))
    assert loaded.verify("alice", b"second secret") and not loaded.verify("alice", b"first secret")
    assert loaded.verify("bob", b"bob secret")
    assert users.stat().st_mode & 0o777 == 0o640  # an existing file keeps its mode


def test_passwd_at_a_terminal_that_ends_input_says_so_in_one_line(tmp_path: Path) -> None:
    """Ctrl-D at the prompt was an EOFError traceback. The terminal is a real pseudo-terminal
    (the process's stdin, in a new session so that it has no other /dev/tty); each answer is
    typed once its prompt is shown, as getpass discards what was typed ahead."""
    users = tmp_path / "users"
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "passwd", "alice", "--users-file", str(users)],
        stdin=terminal,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        start_new_session=True,
    )
    assert process.stderr is not None
    shown = b""

    def type_after(prompt: bytes, keys: bytes) -> None:
        nonlocal shown
        deadline = time.monotonic() + 30
        while prompt not in shown:
            ready, _, _ = select.select([process.stderr], [], [], deadline - time.monotonic())
            assert ready, f"no {prompt!r} prompt, only {shown!r}"
            shown += os.read(process.stderr.fileno(), 4096)
        shown = shown.split(prompt, 1)[1]
        os.write(controller, keys)

    try:
        type_after(b"Password for alice: ", b"first\n")
        type_after(b"Again: ", b"\x04")  # end of input
        rest = process.stderr.read()
        assert process.wait(timeout=30) == 2
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
        os.close(terminal)
        os.close(controller)
    stderr = (shown + rest).decode()
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "dedup-relay: error: passwd: no password given (end of input at the prompt)"
    )
    assert not users.exists()


def test_passwd_never_takes_the_password_from_argv(tmp_path: Path) -> None:
    users = tmp_path / "users"
    result = run_relay("passwd", "alice", "--users-file", str(users), "--password", "x")
    assert result.returncode == 2 and not users.exists()
    empty = run_relay("passwd", "alice", "--users-file", str(users), stdin="\n")
    assert empty.returncode == 2 and "empty" in empty.stderr
    bad = run_relay("passwd", "al:ice", "--users-file", str(users), stdin="pw\n")
    assert bad.returncode == 2 and "not a user name" in bad.stderr
    created = run_relay("passwd", "alice", "--users-file", str(users), stdin="pw\n")
    assert created.returncode == 0 and oct(users.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("section", ["auth", "http"])
def test_a_bad_users_file_stops_serve_and_check_config_with_exit_2_naming_file_and_line(
    tmp_path: Path, section: str
) -> None:
    # SMTP AUTH and the web login read their file with one reader: the same refusal at start.
    users = write_users(tmp_path / "users", {"alice": PASSWORD})
    users.write_text(users.read_text() + "bob:hunter2\n")
    config = tmp_path / "relay.yaml"
    config.write_text(
        f"store: {{path: {tmp_path / 'relay.db'}}}\n{section}: {{users_file: {users}}}\n"
    )
    for command in ("check-config", "serve"):
        result = run_relay(command, "--config", str(config))
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"dedup-relay: error: {section}.users_file: {users} line 2: ")
        assert "hunter2" not in line and "$argon2id$" not in line


def test_passwd_refuses_a_users_file_it_cannot_read_and_leaves_it_alone(tmp_path: Path) -> None:
    # The same reader as at start: the same message, naming the file and never its content.
    users = tmp_path / "users"
    users.write_bytes(b"alice:caf\xe9-secret\n")
    result = run_relay("passwd", "bob", "--users-file", str(users), stdin="bob secret\n")
    assert result.returncode == 2
    assert f"--users-file: {users} is not UTF-8 text" in result.stderr
    assert "secret" not in result.stderr and "xe9" not in result.stderr
    assert users.read_bytes() == b"alice:caf\xe9-secret\n"


# --- reloading the users file (SIGHUP) -------------------------------------------


@pytest.mark.parametrize("how", ["unreadable", "not UTF-8"])
async def test_a_reload_that_cannot_read_the_users_file_keeps_the_old_users_and_logs_once(
    make_relay: RelayFactory,
    tmp_path: Path,
    certificates: Certificates,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    relay = await make_relay(**secure_config(tmp_path, certificates))
    users = tmp_path / "users"
    break_users_file(users, how)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        relay.app.reload()  # what SIGHUP runs
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    message = warning.getMessage()
    assert "kept the old users file: auth.users_file:" in message and str(users) in message
    assert "codec" not in message and "caf" not in message
    port = relay.port
    assert await smtp_login(port, certificates, "alice", PASSWORD) == 235
    assert await smtp_login(port, certificates, "carol", PASSWORD) == 535

    # Mended, the next reload takes it.
    if how == "unreadable":
        users.rmdir()
    write_users(users, {"alice": PASSWORD, "carol": PASSWORD})
    relay.app.reload()
    assert await smtp_login(port, certificates, "carol", PASSWORD) == 235


# --- who is offered AUTH, and who must use it ----------------------------------------


async def test_a_trusted_client_is_offered_auth_without_tls_and_need_not_use_it(
    make_relay: RelayFactory, tmp_path: Path, certificates: Certificates
) -> None:
    relay = await make_relay(**secure_config(tmp_path, certificates))
    dialog, _ = await Dialog.open(relay.port)
    assert "AUTH LOGIN PLAIN" in (await dialog.command("EHLO client.test")).upper()
    assert (await dialog.command("MAIL FROM:<app@example.com>")).startswith("250")
    await dialog.close()


async def test_without_auth_configured_auth_is_never_offered(relay: Relay) -> None:
    dialog, _ = await Dialog.open(relay.port)
    assert "AUTH" not in (await dialog.command("EHLO client.test")).upper()
    assert (await dialog.command(plain())).startswith("502")
    await dialog.close()


async def test_allow_plaintext_offers_auth_in_clear_and_warns_at_start(
    make_relay: RelayFactory,
    tmp_path: Path,
    certificates: Certificates,
    caplog: pytest.LogCaptureFixture,
) -> None:
    overrides = secure_config(tmp_path, certificates, allow_plaintext=True)
    del overrides["listen"]["tls"]
    with caplog.at_level(logging.WARNING, logger="relay.server"):
        relay = await make_relay(**overrides)
    assert "auth.allow_plaintext is true" in caplog.text
    dialog, _ = await Dialog.open(relay.port, source=OUTSIDER)
    assert "AUTH LOGIN PLAIN" in (await dialog.command("EHLO client.test")).upper()
    assert (await dialog.command(plain())).startswith("235")
    assert (await dialog.command("MAIL FROM:<app@example.com>")).startswith("250")
    await dialog.close()


# --- failures and brute force -------------------------------------------------------


async def test_failed_auth_gets_535_and_an_audit_event_without_the_password(
    make_relay: RelayFactory,
    tmp_path: Path,
    certificates: Certificates,
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = await make_relay(**secure_config(tmp_path, certificates))
    dialog, _ = await Dialog.open(
        relay.app.front.implicit_port or 0, source=OUTSIDER, tls=client_context(certificates)
    )
    await dialog.command("EHLO client.test")
    assert (await dialog.command(plain(password="Tr0ub4dor&3"))).startswith("535 5.7.8")
    await dialog.send("AUTH LOGIN")
    assert (await dialog.reply()).startswith("334 VXNlcm5hbWU6")  # "Username:"
    import base64

    await dialog.send(base64.b64encode(b"mallory").decode())
    assert (await dialog.reply()).startswith("334 UGFzc3dvcmQ6")  # "Password:"
    assert (await dialog.command(base64.b64encode(b"guess").decode())).startswith("535")
    await dialog.close()
    events = await relay.events("auth_failed")
    assert [(e["user"], e["client"], e["code"]) for e in events] == [
        ("alice", OUTSIDER, 535),
        ("mallory", OUTSIDER, 535),
    ]
    everything = json.dumps(await relay.events()) + caplog.text
    assert "Tr0ub4dor" not in everything and "guess" not in everything


async def test_too_many_failures_lock_the_address_out_until_the_lockout_ends(
    make_relay: RelayFactory, tmp_path: Path, certificates: Certificates
) -> None:
    relay = await make_relay(**secure_config(tmp_path, certificates, max_failures=2, lockout="10m"))
    front = relay.app.front
    clock = FakeClock()
    front.guard = Guard(front.auth_config, clock)
    port = front.implicit_port or 0
    context = client_context(certificates)

    dialog, _ = await Dialog.open(port, source=OUTSIDER, tls=context)
    await dialog.command("EHLO client.test")
    assert (await dialog.command(plain(password="one"))).startswith("535")
    assert (await dialog.command(plain(password="two"))).startswith("535")
    assert (await dialog.command(plain(password="three"))).startswith("421 4.7.0")
    assert await dialog.closed() == b""
    [locked] = [e for e in await relay.events("auth_failed") if "locked out" in e["detail"]]
    assert locked["client"] == OUTSIDER

    refused, greeting = await Dialog.open(port, source=OUTSIDER, tls=context)
    assert greeting.startswith("421 4.7.0")
    await refused.close()
    other, greeting = await Dialog.open(port, source="127.0.0.3", tls=context)
    assert greeting.startswith("220")
    await other.close()

    clock.now += 601
    back, greeting = await Dialog.open(port, source=OUTSIDER, tls=context)
    assert greeting.startswith("220")
    await back.command("EHLO client.test")
    assert (await back.command(plain())).startswith("235")
    await back.close()


async def test_a_trusted_client_is_never_locked_out_but_its_failures_are_recorded(
    make_relay: RelayFactory, tmp_path: Path, certificates: Certificates
) -> None:
    # As Postfix exempts mynetworks from anvil: a sidecar with a wrong password keeps sending.
    relay = await make_relay(**secure_config(tmp_path, certificates, max_failures=1))
    dialog, _ = await Dialog.open(relay.port)
    await dialog.command("EHLO client.test")
    for attempt in range(3):
        assert (await dialog.command(plain(password=f"wrong{attempt}"))).startswith("535")
    assert (await dialog.command("MAIL FROM:<app@example.com>")).startswith("250")
    await dialog.close()
    again, greeting = await Dialog.open(relay.port)
    assert greeting.startswith("220")
    await again.close()
    assert len(await relay.events("auth_failed")) == 3


def test_failures_older_than_the_window_do_not_count() -> None:
    clock = FakeClock()
    guard = Guard(AuthConfig(max_failures=2, failure_window=300.0, lockout=60.0), clock)
    assert guard.failed("10.0.0.1") == 1
    clock.now += 200
    assert guard.failed("10.0.0.1") == 2
    clock.now += 101  # the first failure has left the window
    assert guard.failed("10.0.0.1") == 2
    assert not guard.locked("10.0.0.1")
    assert guard.failed("10.0.0.1") == 3
    assert guard.locked("10.0.0.1") and not guard.locked("10.0.0.2")
    clock.now += 60
    assert not guard.locked("10.0.0.1")


# --- per-user limits ------------------------------------------------------------------


async def test_a_user_may_only_use_their_sender_addresses(
    make_relay: RelayFactory, upstream: Upstream, tmp_path: Path, certificates: Certificates
) -> None:
    overrides = secure_config(tmp_path, certificates)
    overrides["auth"]["users"] = {"alice": {"senders": ["*@shop.example.com", "<>"]}}
    relay = await make_relay(**overrides)
    ok = await send_authenticated(
        relay.port, make_message(), certificates, sender="a@shop.example.com"
    )
    bounce = await send_authenticated(relay.port, make_message(), certificates, sender="")
    other = await send_authenticated(
        relay.port, make_message(), certificates, sender="ceo@bank.example"
    )
    unlimited = await send_authenticated(
        relay.port, make_message(), certificates, user="bob", sender="ceo@bank.example"
    )
    assert (ok.code, bounce.code, unlimited.code) == (250, 250, 250)
    assert other.code == 553 and other.text.startswith("5.7.1")
    await upstream.wait_for(3)
    [rejected] = await relay.events("rejected")
    assert (rejected["user"], rejected["sender"]) == ("alice", "ceo@bank.example")


async def test_a_user_over_their_rate_gets_451_and_a_rate_limited_event(
    make_relay: RelayFactory, upstream: Upstream, tmp_path: Path, certificates: Certificates
) -> None:
    overrides = secure_config(tmp_path, certificates)
    overrides["auth"]["users"] = {"alice": {"rate": 2}}
    relay = await make_relay(**overrides)
    clock = FakeClock()
    relay.app.front.sent = Events(60.0, clock)

    async def send(user: str = "alice") -> int:
        return (await send_authenticated(relay.port, make_message(), certificates, user=user)).code

    assert [await send(), await send()] == [250, 250]
    over = await send_authenticated(relay.port, make_message(), certificates)
    assert over.code == 451 and over.text.startswith("4.7.1")
    assert await send("bob") == 250  # one user's limit is theirs alone
    clock.now += 61
    assert await send() == 250
    [limited] = await relay.events("rate_limited")
    assert (limited["user"], limited["code"], limited["client"]) == ("alice", 451, OUTSIDER)


# --- the authenticated user in the log and as a dedupe scope ------------------------------


async def test_the_user_is_in_every_audit_event_and_log_user_finds_them(
    make_relay: RelayFactory, upstream: Upstream, tmp_path: Path, certificates: Certificates
) -> None:
    relay = await make_relay(**secure_config(tmp_path, certificates))
    assert (await send_authenticated(relay.port, make_message(), certificates)).code == 250
    await upstream.wait_for(1)
    await relay.idle()
    events = await relay.events()
    assert {e["event"] for e in events} == {"received", "delivered"}
    assert {e["user"] for e in events} == {"alice"}
    config = tmp_path / "review.yaml"
    config.write_text(f"store: {{path: {tmp_path / 'relay.db'}}}\n")
    mine = run_relay("log", "--user", "alice", "--json", "--config", str(config))
    theirs = run_relay("log", "--user", "bob", "--json", "--config", str(config))
    assert [json.loads(line)["event"] for line in mine.stdout.splitlines()] == [
        "received",
        "delivered",
    ]
    assert theirs.returncode == 0 and theirs.stdout == ""


async def test_dedupe_scope_user_keeps_two_users_apart(
    make_relay: RelayFactory, upstream: Upstream, tmp_path: Path, certificates: Certificates
) -> None:
    overrides = secure_config(tmp_path, certificates)
    relay = await make_relay(dedupe={"scope": "user", "keys": ["fingerprint"]}, **overrides)
    message = make_message(subject="Your code is 1234")
    replies = [
        await send_authenticated(relay.port, message, certificates, user=user)
        for user in ("alice", "bob", "alice")
    ]
    assert ["not forwarded" in r.text for r in replies] == [False, False, True]
    await upstream.wait_for(2)
    await relay.idle()
    assert len(upstream.messages) == 2
