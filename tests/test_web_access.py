"""Who may read the review pages, and what the pages never show.

The pages are read-only and, with `http.users_file`, behind a login; the health and metrics
paths of the side port that mounts them stay open. No body, password, hash or upstream secret
reaches a page or its HTML source; headers appear only when the operator keeps bodies.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import aiohttp
import argon2
import pytest

from relay.config import ConfigError
from relay.web import create_app, load_users, users_file_option
from tests.conftest import (
    PASSWORD,
    WEB_USERS,
    Certificates,
    MakeRelay,
    MakeWeb,
    Relay,
    Upstream,
    WebServer,
    break_users_file,
    make_message,
    queued_id,
    running,
    secure_config,
    send,
    smtp_login,
    write_users,
)

BODY = "BODY-CANARY-7731: the order total is 99 EUR\n"
UPSTREAM_SECRET = "s3cret-upstream-pass"


def basic(user: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{WEB_USERS[user]}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def same_url(a: str, b: str) -> bool:
    """Equal once decoded: `%40` and `@` name the same query value."""
    return (urlsplit(a).path, parse_qs(urlsplit(a).query)) == (
        urlsplit(b).path,
        parse_qs(urlsplit(b).query),
    )


async def get(
    server: WebServer, path: str, headers: dict[str, str] | None = None, **kwargs: str
) -> tuple[int, dict[str, str], str]:
    async with (
        aiohttp.ClientSession(cookies=kwargs or None) as session,
        session.get(server.url + path, headers=headers, allow_redirects=False) as response,
    ):
        return response.status, dict(response.headers), await response.text()


async def test_no_page_shows_a_body_or_secret_and_headers_only_when_bodies_are_kept(
    make_relay: MakeRelay,
    make_web: MakeWeb,
    users_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WEB_TEST_UPSTREAM_PASSWORD", UPSTREAM_SECRET)
    async with running(Upstream(auth=("relayuser", UPSTREAM_SECRET))) as upstream:
        login = {
            "url": f"smtp://127.0.0.1:{upstream.port}",
            "username": "relayuser",
            "password_env": "WEB_TEST_UPSTREAM_PASSWORD",
            # The test upstream speaks no TLS; the secret must still never reach a page.
            "allow_plaintext_auth": True,
        }
        kept = await make_relay(
            upstream=login, store={"path": str(tmp_path / "kept.db"), "keep_bodies": "1h"}
        )
        gone = await make_relay(upstream=login, store={"path": str(tmp_path / "gone.db")})
        data = make_message("Subject-Canary", BODY, message_id="<canary@shop.example>")
        ids = {}
        for relay in (kept, gone):
            ids[relay] = queued_id(await send(relay.port, data))
            await send(relay.port, data, source="127.0.0.2")
            await relay.idle()
        assert len(upstream.messages) == 2 and all(m.login for m in upstream.messages)

        pages = {}
        for relay in (kept, gone):
            server = await make_web(relay, users_file=str(users_file))
            for path in (
                "/",
                "/log",
                "/log?rcpt=alice%40example.org",
                f"/message/{ids[relay]}",
                "/message/canary@shop.example",
                "/log.csv",
                "/log.json",
                "/login",
            ):
                status, _, text = await get(server, path, basic("ops"))
                assert status == 200, path
                pages[relay, path] = text

    for text in pages.values():
        for secret in (
            "BODY-CANARY",
            "order total",
            UPSTREAM_SECRET,
            *WEB_USERS.values(),
            "$argon2id$",
            "$2y$",
            "$2b$",
        ):
            assert secret not in text
    kept_page = pages[kept, f"/message/{ids[kept]}"]
    assert "<h3>Headers</h3>" in kept_page
    assert '<th scope="row">Subject</th><td>Subject-Canary</td>' in kept_page
    assert '<th scope="row">Message-ID</th><td>&lt;canary@shop.example&gt;</td>' in kept_page
    for path in (f"/message/{ids[gone]}", "/message/canary@shop.example"):
        assert "Headers" not in pages[gone, path] and "Subject-Canary" not in pages[gone, path]


async def test_pages_need_a_login_that_scripts_may_give_as_basic_auth(
    relay: Relay, upstream: Upstream, make_web: MakeWeb, users_file: Path
) -> None:
    queued_id(await send(relay.port, make_message()))
    await relay.idle()
    server = await make_web(relay, users_file=str(users_file), login_failure_delay=0.0)

    status, headers, _ = await get(server, "/log.csv?rcpt=alice%40example.org&event=received")
    assert status == 303
    login, _, target = headers["Location"].partition("?next=")
    assert login == "/login"
    assert same_url(unquote(target), "/log.csv?rcpt=alice%40example.org&event=received")
    for path in ("/", "/log", "/log.json", "/message/anything"):
        assert (await get(server, path))[0] == 303
    status, headers, css = await get(server, "/static/relay.css")
    assert status == 200 and "--accent" in css

    wrong = {"Authorization": "Basic " + base64.b64encode(b"support:guess").decode()}
    status, headers, _ = await get(server, "/log.csv", wrong)
    assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="dedup-relay"'
    status, _, text = await get(server, "/log.csv?event=received", basic("support"))
    assert status == 200 and text.count("\n") == 2  # header and one event


async def test_a_session_ends_when_the_password_changes_and_login_redirects_only_here(
    relay: Relay, make_web: MakeWeb, users_file: Path
) -> None:
    server = await make_web(relay, users_file=str(users_file), login_failure_delay=0.0)

    async def log_in(password: str, next_path: str) -> tuple[int, str, str | None]:
        form = {"user": "ops", "password": password, "next": next_path}
        async with (
            aiohttp.ClientSession() as session,
            session.post(server.url + "/login", data=form, allow_redirects=False) as response,
        ):
            cookie = response.cookies.get("relay_session")
            if cookie is not None:
                assert cookie["httponly"] and cookie["samesite"] == "Strict"
            return response.status, response.headers.get("Location", ""), cookie and cookie.value

    status, location, cookie = await log_in(WEB_USERS["ops"], "/log?rcpt=x%40y")
    assert status == 303 and same_url(location, "/log?rcpt=x%40y") and cookie
    assert (await get(server, "/", relay_session=cookie))[0] == 200
    forged = cookie[:-4] + ("0000" if not cookie.endswith("0000") else "1111")
    assert (await get(server, "/", relay_session=forged))[0] == 303

    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        status, location, _ = await log_in(WEB_USERS["ops"], target)
        assert (status, location) == (303, "/")
    assert (await log_in("not the password", "/"))[:2] == (401, "")

    # The operator changes the password: the old session is over.
    new_hash = argon2.PasswordHasher().hash("a brand new passphrase")
    replacement = users_file.with_suffix(".new")
    replacement.write_text(f"ops:{new_hash}\n")
    os.replace(replacement, users_file)
    assert (await get(server, "/", relay_session=cookie))[0] == 303
    assert (await log_in("a brand new passphrase", "/"))[0] == 303


async def test_a_broken_edit_of_the_users_file_keeps_the_users_it_had(
    relay: Relay, make_web: MakeWeb, users_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_web(relay, users_file=str(users_file), login_failure_delay=0.0)
    assert (await get(server, "/", basic("ops")))[0] == 200
    replacement = users_file.with_suffix(".new")
    replacement.write_text("ops:plain-text-password\n")
    os.replace(replacement, users_file)

    assert (await get(server, "/", basic("ops")))[0] == 200
    assert "keeping the users it had" in caplog.text and "line 1" in caplog.text
    assert "plain-text-password" not in caplog.text


@pytest.mark.parametrize("how", ["unreadable", "not UTF-8"])
async def test_a_users_file_that_cannot_be_read_keeps_the_web_users_and_warns_once(
    relay: Relay,
    make_web: MakeWeb,
    users_file: Path,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    server = await make_web(relay, users_file=str(users_file), login_failure_delay=0.0)
    assert (await get(server, "/", basic("ops")))[0] == 200
    break_users_file(users_file, how)
    caplog.clear()
    for _ in range(3):  # each request looks at the file; the warning comes once per change
        assert (await get(server, "/", basic("ops")))[0] == 200
        assert (await get(server, "/", basic("support")))[0] == 200
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    message = warning.getMessage()
    assert "keeping the users it had: http.users_file:" in message and str(users_file) in message
    assert "codec" not in message and "caf" not in message


async def test_one_users_file_serves_smtp_auth_and_the_web_login_and_a_new_password_reaches_both(
    make_relay: MakeRelay, tmp_path: Path, certificates: Certificates
) -> None:
    overrides = secure_config(tmp_path, certificates)
    users = Path(overrides["auth"]["users_file"])
    overrides["http"] = {"listen": "127.0.0.1:0", "users_file": str(users)}
    relay = await make_relay(**overrides)
    server = WebServer(None, relay.app.http_port)
    form = {"user": "alice", "password": PASSWORD, "next": "/"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + "/login", data=form, allow_redirects=False) as response,
    ):
        assert response.status == 303
        cookie = response.cookies["relay_session"].value
    assert (await get(server, "/", relay_session=cookie))[0] == 200
    assert await smtp_login(relay.port, certificates, "alice", PASSWORD) == 235

    replacement = users.with_suffix(".new")
    write_users(replacement, {"alice": "a new password", "bob": PASSWORD})
    os.replace(replacement, users)
    relay.app.reload()  # what SIGHUP runs; the web login reads the file when it changes

    assert (await get(server, "/", relay_session=cookie))[0] == 303
    new = {"Authorization": "Basic " + base64.b64encode(b"alice:a new password").decode()}
    assert (await get(server, "/", new))[0] == 200
    assert await smtp_login(relay.port, certificates, "alice", "a new password") == 235
    assert await smtp_login(relay.port, certificates, "alice", PASSWORD) == 535


async def test_the_side_port_keeps_health_and_metrics_open_when_pages_are_behind_login(
    make_relay: MakeRelay, users_file: Path
) -> None:
    """The relay's own side port, as `serve` builds it: probes and metrics open, pages not."""
    relay = await make_relay(http={"listen": "127.0.0.1:0", "users_file": str(users_file)})
    reply = await send(
        relay.port, make_message(to="carol@example.org"), rcpts=("carol@example.org",)
    )
    server = WebServer(None, relay.app.http_port)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await get(server, path))[:1] == (200,)
    for path in ("/", "/log", "/log.csv", f"/message/{queued_id(reply)}"):
        assert (await get(server, path))[0] == 303
    status, _, page = await get(server, f"/message/{queued_id(reply)}", basic("ops"))
    assert status == 200 and "carol@example.org" in page
    status, _, page = await get(server, "/log?rcpt=carol@example.org", basic("support"))
    assert status == 200 and queued_id(reply) in page


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("# users\nops:hunter2-plain\n", "line 2: the password of 'ops' is not an argon2id"),
        ("ops:$argon2i$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA\n", "line 1: the password of 'ops'"),
        ("ops:$2a$12$abcdefghijklmnopqrstuuhunter2hunter2hunter2hunter2hunter\n", "line 1"),
        ("just-a-name\n", "line 1: expected user:hash"),
        ("\n# nobody yet\n", "lists no users"),
    ],
)
def test_a_bad_users_file_is_refused_naming_the_line_and_never_the_password(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "users"
    path.write_text(content)
    with pytest.raises(ConfigError) as refused:
        load_users(str(path))
    message = str(refused.value)
    assert message.startswith(f"http.users_file: {path}") and expected in message
    assert "hunter2" not in message


def test_the_config_converter_checks_the_users_file_before_the_relay_starts(
    tmp_path: Path, users_file: Path
) -> None:
    assert users_file_option(f" {users_file} ") == str(users_file)
    for value in (None, "", 7):
        with pytest.raises(ConfigError, match=r"^http\.users_file: expected the path"):
            users_file_option(value)
    plain = tmp_path / "plain"
    plain.write_text("ops:letmein\n")
    with pytest.raises(ConfigError, match=r"^auth.users_file: .* line 1"):
        users_file_option(str(plain), "auth.users_file")


def test_a_users_file_is_checked_when_the_pages_are_built(tmp_path: Path) -> None:
    from relay.config import from_mapping

    config = from_mapping({"store": {"path": str(tmp_path / "relay.db")}})
    with pytest.raises(ConfigError, match="does not exist"):
        create_app(config, users_file=str(tmp_path / "missing"))
    duplicate = tmp_path / "twice"
    hashed = argon2.PasswordHasher().hash("x")
    duplicate.write_text(f"ops:{hashed}\nops:{hashed}\n")
    with pytest.raises(ConfigError, match="line 2: 'ops' is listed twice"):
        create_app(config, users_file=str(duplicate))
