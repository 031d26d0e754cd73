"""Real clients submitting with TLS and AUTH from outside listen.networks, as apps configured
with a host, a port, a user name and a password do: swaks, smtplib, nodemailer, Postfix.

Every client verifies the relay's certificate against the test CA and binds to 127.0.0.2,
which is not on listen.networks here, so nothing is sent without a login.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests import mta
from tests.conftest import (
    OUTSIDER,
    PASSWORD,
    Certificates,
    Relay,
    RelayFactory,
    Upstream,
    client_context,
    secure_config,
    write_users,
)
from tests.mta import Postfix, run_nodemailer, swaks, swaks_replies

postfix_factory = mta.postfix_factory


async def received_by(relay: Relay, upstream: Upstream, count: int) -> list[dict[str, object]]:
    await upstream.wait_for(count)
    await relay.idle()
    return await relay.events("received")


# --- swaks ----------------------------------------------------------------------------------


def run_swaks(port: int, certificates: Certificates, *args: str) -> str:
    result = swaks(
        "--server", f"127.0.0.1:{port}",
        "--local-interface", OUTSIDER,
        "--from", "app@example.com",
        "--to", "alice@example.org",
        "--tls", "--tls-verify", "--tls-ca-path", str(certificates.ca_file),
        "--timeout", "15",
        *args,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks_with_starttls_and_auth_is_accepted(
    secure: Relay, upstream: Upstream, certificates: Certificates, mechanism: str
) -> None:
    transcript = await asyncio.to_thread(
        run_swaks,
        secure.port,
        certificates,
        "--auth", mechanism, "--auth-user", "alice", "--auth-password", PASSWORD,
        "--header", f"Subject: swaks {mechanism}",
    )  # fmt: skip
    assert "STARTTLS" in transcript
    assert any(r.startswith("235 ") for r in swaks_replies_of(transcript))
    [received] = await received_by(secure, upstream, 1)
    assert (received["user"], received["client"]) == ("alice", OUTSIDER)
    assert upstream.messages[0].data.startswith(b"Received: from ")
    assert b"with ESMTPSA id" in upstream.messages[0].data.replace(b"\r\n\t", b" ")


def swaks_replies_of(transcript: str) -> list[str]:
    import subprocess

    return swaks_replies(subprocess.CompletedProcess([], 0, transcript, ""))


async def test_swaks_with_a_wrong_password_is_refused_and_nothing_is_relayed(
    secure: Relay, upstream: Upstream, certificates: Certificates
) -> None:
    result = await asyncio.to_thread(
        swaks,
        "--server", f"127.0.0.1:{secure.port}",
        "--local-interface", OUTSIDER,
        "--from", "app@example.com",
        "--to", "victim@example.net",
        "--tls", "--tls-verify", "--tls-ca-path", str(certificates.ca_file),
        "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "wrong",
    )  # fmt: skip
    assert result.returncode != 0
    assert any(r.startswith("535 5.7.8") for r in swaks_replies(result))
    assert await secure.rows("SELECT count(*) FROM messages") == [(0,)]


# --- smtplib --------------------------------------------------------------------------------


async def test_smtplib_starttls_then_login_sends(
    secure: Relay, upstream: Upstream, certificates: Certificates
) -> None:
    message = EmailMessage()
    message["From"] = "app@example.com"
    message["To"] = "alice@example.org"
    message["Subject"] = "Django-style send"
    message.set_content("Sent the way Django's SMTP backend sends with EMAIL_USE_TLS.\n")

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", secure.port, source_address=(OUTSIDER, 0)) as client:
            client.starttls(context=client_context(certificates))
            client.login("bob", PASSWORD)
            return client.send_message(message)

    assert await asyncio.to_thread(send) == {}
    [received] = await received_by(secure, upstream, 1)
    assert received["user"] == "bob"


async def test_smtplib_login_without_tls_fails_as_the_server_offers_no_auth(
    secure: Relay,
) -> None:
    def login() -> None:
        with smtplib.SMTP("127.0.0.1", secure.port, source_address=(OUTSIDER, 0)) as client:
            client.login("bob", PASSWORD)

    with pytest.raises(smtplib.SMTPNotSupportedError):
        await asyncio.to_thread(login)


# --- nodemailer -----------------------------------------------------------------------------


def nodemailer_auth(certificates: Certificates, **transport: object) -> dict[str, object]:
    return {
        "auth": {"user": "alice", "pass": PASSWORD},
        "tls": {"caFile": str(certificates.ca_file)},
        "localAddress": OUTSIDER,
        **transport,
    }


async def test_nodemailer_secure_true_on_the_implicit_tls_port(
    secure: Relay, upstream: Upstream, certificates: Certificates
) -> None:
    port = secure.app.front.implicit_port
    assert port is not None
    info = await asyncio.to_thread(
        run_nodemailer,
        port,
        transport=nodemailer_auth(certificates, secure=True, ignoreTLS=False),
        transcript=True,
        subject="implicit TLS",
    )
    assert "queued as" in str(info["response"])
    transcript = "\n".join(info["transcript"])
    assert "STARTTLS" not in transcript and "AUTH PLAIN" in transcript
    assert PASSWORD not in transcript
    [received] = await received_by(secure, upstream, 1)
    assert (received["user"], received["client"]) == ("alice", OUTSIDER)


async def test_nodemailer_require_tls_on_the_starttls_port(
    secure: Relay, upstream: Upstream, certificates: Certificates
) -> None:
    info = await asyncio.to_thread(
        run_nodemailer,
        secure.port,
        transport=nodemailer_auth(certificates, secure=False, ignoreTLS=False, requireTLS=True),
        transcript=True,
        subject="STARTTLS",
    )
    transcript = "\n".join(info["transcript"])
    assert "STARTTLS" in transcript and "AUTH PLAIN" in transcript
    [received] = await received_by(secure, upstream, 1)
    assert received["user"] == "alice"


async def test_nodemailer_with_a_wrong_password_gets_535(
    secure: Relay, certificates: Certificates
) -> None:
    transport = nodemailer_auth(certificates, secure=False, ignoreTLS=False, requireTLS=True)
    transport["auth"] = {"user": "alice", "pass": "wrong"}
    result = await asyncio.to_thread(run_nodemailer, secure.port, transport=transport, check=False)
    assert not result["ok"] and result["error"]["responseCode"] == 535


# --- Postfix relaying through the relay with SASL -------------------------------------------


async def test_postfix_relays_through_the_relay_with_sasl_auth_over_tls(
    make_relay: RelayFactory,
    upstream: Upstream,
    tmp_path: Path,
    certificates: Certificates,
    postfix_factory: Callable[..., Postfix],
) -> None:
    overrides = secure_config(tmp_path, certificates)
    users = write_users(tmp_path / "postfix-users", {"postfix-out": "Postfix-S3cret"})
    overrides["auth"]["users_file"] = str(users)
    relay = await make_relay(**overrides)
    postfix = await asyncio.to_thread(
        postfix_factory,
        relayhost=relay.port,
        name="sasl-client",
        settings={
            "smtp_sasl_auth_enable": "yes",
            "smtp_sasl_password_maps": "static:postfix-out:Postfix-S3cret",
            "smtp_sasl_security_options": "noanonymous",
            "smtp_sasl_tls_security_options": "noanonymous",
            "smtp_tls_security_level": "secure",
            "smtp_tls_CAfile": str(certificates.ca_file),
            # Postfix matches names, not IP SANs; the certificate also names localhost.
            "smtp_tls_secure_cert_match": "localhost",
            "smtp_tls_loglevel": "1",
            "smtp_bind_address": OUTSIDER,
        },
    )
    result = await asyncio.to_thread(
        swaks,
        "--server", f"127.0.0.1:{postfix.port}",
        "--from", "app@example.com",
        "--to", "alice@example.org",
        "--header", "Subject: through Postfix with SASL",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    [sent] = await asyncio.to_thread(postfix.wait_for_log, r"status=sent \(250 .*queued as (\S+)\)")
    [received] = await received_by(relay, upstream, 1)
    assert sent.group(1) == received["queue_id"]
    assert (received["user"], received["client"]) == ("postfix-out", OUTSIDER)
    assert "Verified TLS connection established" in postfix.log()
    await asyncio.to_thread(postfix.wait_for_empty_queue)
