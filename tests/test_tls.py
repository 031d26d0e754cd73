"""TLS at the front door: STARTTLS, the implicit-TLS port, the RFC 3207 reset, reloads.

Certificates come from the throwaway CA in conftest and every client verifies them.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    OUTSIDER,
    PASSWORD,
    Certificates,
    Dialog,
    Relay,
    RelayFactory,
    RelayProcess,
    Upstream,
    base_config,
    client_context,
    deep_merge,
    free_port,
    make_message,
    plain,
    secure_config,
    write_users,
)
from tests.mta import CertificateAuthority


async def test_starttls_is_offered_and_auth_only_once_tls_is_up(
    secure: Relay, certificates: Certificates
) -> None:
    dialog, greeting = await Dialog.open(secure.port, source=OUTSIDER)
    assert greeting.startswith("220 ")
    before = (await dialog.command("EHLO client.test")).upper()
    assert "STARTTLS" in before and "AUTH" not in before
    assert (await dialog.command(plain())).startswith("538 5.7.11")
    assert (await dialog.starttls(client_context(certificates))).startswith("220")
    after = (await dialog.command("EHLO client.test")).upper()
    assert "AUTH LOGIN PLAIN" in after and "STARTTLS" not in after
    assert (await dialog.command(plain())).startswith("235")
    assert (await dialog.command("MAIL FROM:<app@example.com>")).startswith("250")
    await dialog.close()


async def test_implicit_tls_port_speaks_tls_from_the_first_byte_under_the_same_policy(
    secure: Relay, certificates: Certificates
) -> None:
    port = secure.app.front.implicit_port
    assert port is not None and port != secure.port
    dialog, greeting = await Dialog.open(port, source=OUTSIDER, tls=client_context(certificates))
    assert greeting.startswith("220 ")
    ehlo = (await dialog.command("EHLO client.test")).upper()
    assert "AUTH LOGIN PLAIN" in ehlo and "STARTTLS" not in ehlo
    assert (await dialog.command("MAIL FROM:<app@example.com>")).startswith("530 5.7.0")
    assert (await dialog.command(plain(password="wrong"))).startswith("535 5.7.8")
    assert (await dialog.command(plain())).startswith("235")
    for line in ("MAIL FROM:<app@example.com>", "RCPT TO:<alice@example.org>", "DATA"):
        assert (await dialog.command(line))[:1] in ("2", "3"), line
    reply = await dialog.command(make_message() + b".")
    assert reply.startswith("250 2.0.0 Ok: queued as")
    await dialog.close()
    [received] = await secure.events("received")
    assert (received["user"], received["client"]) == ("alice", OUTSIDER)


def _old_client(maximum: ssl.TLSVersion, ciphers: str = "DEFAULT:@SECLEVEL=0") -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = maximum
        context.set_ciphers(ciphers)
    return context


async def test_tls_below_1_2_and_ciphers_without_forward_secrecy_are_refused(
    secure: Relay, certificates: Certificates
) -> None:
    port = secure.app.front.implicit_port
    assert port is not None
    old = _old_client(ssl.TLSVersion.TLSv1_1)
    static_rsa = _old_client(ssl.TLSVersion.TLSv1_2, "AES128-SHA:AES256-GCM-SHA384:@SECLEVEL=0")
    for context in (old, static_rsa):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await Dialog.open(port, tls=context)
    modern, _ = await Dialog.open(port, tls=client_context(certificates))
    version = modern.writer.get_extra_info("ssl_object").version()
    assert version in ("TLSv1.2", "TLSv1.3")
    await modern.close()


async def test_a_command_pipelined_after_starttls_is_discarded_not_executed(
    secure: Relay, certificates: Certificates
) -> None:
    # CVE-2011-0411: plaintext sent with STARTTLS must not run inside the TLS session.
    dialog, _ = await Dialog.open(secure.port)
    await dialog.command("EHLO client.test")
    await dialog.send(b"STARTTLS\r\nEHLO injected\r\nMAIL FROM:<injected@example.com>\r\n")
    assert (await dialog.reply()).startswith("220")
    await dialog.writer.start_tls(client_context(certificates), server_hostname="127.0.0.1")
    # Had the injected EHLO and MAIL run, their replies would come first, and MAIL
    # below would be "nested"; instead the session is new and wants an EHLO.
    assert (await dialog.command("MAIL FROM:<app@example.com>")).startswith("503")
    assert (await dialog.command("EHLO client.test")).startswith("250")
    assert (await dialog.command("MAIL FROM:<app@example.com>")).startswith("250")
    await dialog.close()


async def test_starttls_forgets_everything_said_before_as_rfc_3207_requires(
    secure: Relay, certificates: Certificates
) -> None:
    # A trusted client may AUTH without TLS; STARTTLS then resets EHLO, AUTH and MAIL.
    dialog, _ = await Dialog.open(secure.port)
    assert "AUTH" in (await dialog.command("EHLO client.test")).upper()
    assert (await dialog.command(plain())).startswith("235")
    assert (await dialog.command("MAIL FROM:<app@example.com>")).startswith("250")
    assert (await dialog.starttls(client_context(certificates))).startswith("220")
    assert (await dialog.command("RCPT TO:<alice@example.org>")).startswith("503")
    await dialog.command("EHLO client.test")
    assert (await dialog.command("RCPT TO:<alice@example.org>")).startswith("503")
    assert (await dialog.command(plain("bob"))).startswith("235")  # not "already authenticated"
    await dialog.close()


async def test_tls_required_refuses_mail_before_starttls_except_from_listen_networks(
    make_relay: RelayFactory, tmp_path: Path, certificates: Certificates
) -> None:
    overrides = secure_config(tmp_path, certificates, allow_plaintext=True)
    overrides["listen"]["tls"]["required"] = True
    relay = await make_relay(**overrides)
    outsider, _ = await Dialog.open(relay.port, source=OUTSIDER)
    await outsider.command("EHLO client.test")
    assert (await outsider.command(plain())).startswith("235")  # lab mode: AUTH in clear
    assert (await outsider.command("MAIL FROM:<app@example.com>")).startswith(
        "530 5.7.0 Must issue a STARTTLS command first"
    )
    assert (await outsider.starttls(client_context(certificates))).startswith("220")
    await outsider.command("EHLO client.test")
    await outsider.command(plain())
    assert (await outsider.command("MAIL FROM:<app@example.com>")).startswith("250")
    await outsider.close()
    insider, _ = await Dialog.open(relay.port)
    await insider.command("EHLO client.test")
    assert (await insider.command("MAIL FROM:<app@example.com>")).startswith("250")
    await insider.close()


def test_tls_keys_are_checked_when_the_config_is_loaded(
    tmp_path: Path, certificates: Certificates
) -> None:
    from relay.config import ConfigError, from_mapping

    def load(tls: dict[str, Any]) -> None:
        from_mapping({"store": {"path": str(tmp_path / "r.db")}, "listen": {"tls": tls}})

    cases = [
        ({"cert_file": str(certificates.cert_file)}, "listen.tls.key_file: cert_file and key_file"),
        ({"required": True}, "listen.tls.required: needs listen.tls.cert_file"),
        (
            {"cert_file": str(tmp_path / "missing.pem"), "key_file": str(certificates.key_file)},
            "listen.tls.cert_file: ",
        ),
        (
            {"cert_file": str(certificates.ca_file), "key_file": str(certificates.key_file)},
            "listen.tls.cert_file: cannot use",
        ),
    ]
    for tls, message in cases:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            load(tls)


# --- SIGHUP ------------------------------------------------------------------


def _wait_for_line(process: RelayProcess, text: str) -> str:
    assert process.proc is not None and process.proc.stderr is not None
    while True:
        line = process.proc.stderr.readline().decode()
        if not line:
            raise AssertionError("relay exited:\n" + "".join(process.stderr_lines))
        process.stderr_lines.append(line)
        if text in line:
            return line


async def _peer_certificate(port: int, ca: CertificateAuthority) -> bytes:
    dialog, _ = await Dialog.open(port)
    await dialog.command("EHLO client.test")
    assert (await dialog.starttls(ca.client_context())).startswith("220")
    der = dialog.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    await dialog.close()
    return bytes(der)


def _der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


async def test_sighup_reloads_certificate_and_users_file_without_dropping_a_session(
    tmp_path: Path,
    upstream: Upstream,
    relay_process: Callable[[dict[str, Any]], RelayProcess],
) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    first, second = ca.issue("first"), ca.issue("second")
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(first.cert_file, live_cert)
    shutil.copy(first.key_file, live_key)
    users = write_users(tmp_path / "users", {"alice": PASSWORD})
    config = deep_merge(
        base_config(tmp_path, upstream.port),
        {
            "listen": {
                "port": free_port(),
                "tls": {"cert_file": str(live_cert), "key_file": str(live_key)},
            },
            "auth": {"users_file": str(users), "failure_delay": "10ms"},
        },
    )
    relay = relay_process(config)
    await asyncio.to_thread(relay.start)
    assert relay.proc is not None
    assert await _peer_certificate(relay.port, ca) == _der(first.cert_file)

    # A session in the middle of a transaction when the reload happens.
    open_session, _ = await Dialog.open(relay.port)
    await open_session.command("EHLO client.test")
    assert (await open_session.starttls(ca.client_context())).startswith("220")
    for line in ("EHLO client.test", "MAIL FROM:<app@example.com>", "RCPT TO:<a@example.org>"):
        assert (await open_session.command(line)).startswith("250")

    shutil.copy(second.cert_file, live_cert)
    shutil.copy(second.key_file, live_key)
    write_users(users, {"alice": PASSWORD, "carol": "carol's new password"})
    relay.proc.send_signal(signal.SIGHUP)
    await asyncio.to_thread(_wait_for_line, relay, "users file reloaded")

    assert await _peer_certificate(relay.port, ca) == _der(second.cert_file)
    newcomer, _ = await Dialog.open(relay.port)
    await newcomer.command("EHLO client.test")
    assert (await newcomer.command(plain("carol", "carol's new password"))).startswith("235")
    await newcomer.close()
    assert (await open_session.command("DATA")).startswith("354")
    assert (await open_session.command(make_message() + b".")).startswith("250")
    await open_session.close()

    # A broken certificate on disk is refused; the running one stays.
    live_cert.write_text("not a certificate\n")
    relay.proc.send_signal(signal.SIGHUP)
    await asyncio.to_thread(_wait_for_line, relay, "kept the old TLS certificate")
    assert await _peer_certificate(relay.port, ca) == _der(second.cert_file)
    await upstream.wait_for(1)
    await asyncio.to_thread(relay.terminate)
