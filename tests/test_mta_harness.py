"""The MTA harness itself works, with no relay involved.

Later tests put the relay between these clients and servers and draw conclusions from what
arrives where; those conclusions are only as good as the harness, so it is checked on its own.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import mta
from tests.mta import (
    END_OF_DATA,
    CertificateAuthority,
    Postfix,
    SmtpSink,
    free_port,
    is_listening,
    require_program,
    run_nodemailer,
    swaks,
    swaks_replies,
)

# The harness's own factory fixtures, made visible to this module.
sink_factory = mta.sink_factory
postfix_factory = mta.postfix_factory

SENDER = "sender@example.com"
RECIPIENT = "recipient@example.com"


def send_with_swaks(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return swaks(
        "--server", f"127.0.0.1:{port}", "--from", SENDER, "--to", RECIPIENT,
        "--timeout", "15", *extra,
    )  # fmt: skip


def error_replies(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [r for r in swaks_replies(result) if r[0] in "45"]


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


# --- smtp-sink -----------------------------------------------------------------------------


def test_swaks_message_reaches_sink_with_envelope_and_body(sink: SmtpSink, tmp_path: Path) -> None:
    attachment = tmp_path / "report.csv"
    attachment.write_text("a,b\n1,2\n")
    result = send_with_swaks(
        sink.port,
        "--pipeline",
        "--header", "Subject: harness check",
        "--body", "grüße aus swaks",
        "--attach", f"@{attachment}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    (message,) = sink.wait_for(1)
    assert message.mail_from == SENDER
    assert message.rcpt_to == [RECIPIENT]
    assert "grüße aus swaks".encode() in message.data
    assert message.client_addr == "127.0.0.1"
    parsed = message.email()
    assert parsed["Subject"] == "harness check"
    assert [p.get_filename() for p in parsed.iter_attachments()] == ["report.csv"]
    assert sink.count() == 1


def test_sink_hardfail_at_rcpt_gives_swaks_5xx_and_records_nothing() -> None:
    with SmtpSink(hardfail=["RCPT"]) as sink:
        result = send_with_swaks(sink.port)
        assert result.returncode != 0
        assert error_replies(result)[0].startswith("5")
        assert sink.messages() == []


def test_sink_tempfail_at_rcpt_gives_swaks_4xx_and_records_nothing() -> None:
    with SmtpSink(tempfail=["RCPT"], tempfail_reply="451 4.3.2 Try again later") as sink:
        result = send_with_swaks(sink.port)
        assert result.returncode != 0
        assert error_replies(result)[0] == "451 4.3.2 Try again later"
        assert sink.messages() == []


STAGES = mta.FAULT_STAGES


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("mode", "digit"), [("tempfail", "4"), ("hardfail", "5")])
def test_sink_fault_at_each_stage_reaches_the_client(stage: str, mode: str, digit: str) -> None:
    commands = STAGES[stage]
    faulty = SmtpSink(tempfail=commands) if mode == "tempfail" else SmtpSink(hardfail=commands)
    with faulty as sink:
        result = send_with_swaks(sink.port)
        assert result.returncode != 0
        assert error_replies(result)[0].startswith(digit), result.stdout
        # smtp-sink dumps the content before it answers the final dot, whatever the answer.
        assert sink.count() == (1 if stage == "end-of-data" else 0)


def test_sink_drop_after_end_of_data_keeps_message_but_client_gets_no_reply() -> None:
    with SmtpSink(drop=[END_OF_DATA]) as sink:
        result = send_with_swaks(sink.port)
        assert result.returncode != 0
        assert "closed connection unexpectedly" in result.stdout + result.stderr
        assert swaks_replies(result)[-1].startswith("354")
        assert len(sink.wait_for(1)) == 1


def test_sink_close_421_at_mail_says_421_and_hangs_up() -> None:
    with SmtpSink(close_421=["MAIL"]) as sink:
        result = send_with_swaks(sink.port)
        assert error_replies(result)[-1].startswith("421")
        assert sink.count() == 0


def test_sink_abort_after_data_sends_550_mid_data_and_keeps_nothing() -> None:
    with SmtpSink(abort_after_data=0) as sink:
        result = send_with_swaks(sink.port)
        assert error_replies(result)[-1].startswith("550")
        with pytest.raises(TimeoutError):
            sink.wait_for(1, timeout=0.2)


def test_sink_counts_no_transaction_still_in_data_and_drops_it_on_stop(sink: SmtpSink) -> None:
    with socket.create_connection(sink.address, timeout=10) as conn:
        reader = conn.makefile("rb")
        assert reader.readline().startswith(b"220")
        for command in (b"HELO cut.example", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@x>"):
            conn.sendall(command + b"\r\n")
            assert reader.readline().startswith(b"250")
        conn.sendall(b"DATA\r\n")
        assert reader.readline().startswith(b"354")
        conn.sendall(b"Subject: never finished\r\n\r\nhalf a message\r\n")
        assert send_with_swaks(sink.port).returncode == 0
        (complete,) = sink.wait_for(1)
        assert b"never finished" not in complete.data
        sink.stop()
    assert [m.path for m in sink.messages()] == [complete.path]
    assert len(list(sink.dump_dir.iterdir())) == 1


def test_sink_restart_keeps_port_and_messages(sink: SmtpSink) -> None:
    port = sink.port
    assert send_with_swaks(port).returncode == 0
    sink.stop()
    assert not sink.running
    assert send_with_swaks(port).returncode != 0
    sink.start()
    assert sink.port == port
    assert send_with_swaks(port).returncode == 0
    assert len(sink.wait_for(2)) == 2


def test_sink_close_frees_port_and_workdir() -> None:
    sink = SmtpSink().start()
    assert is_listening(sink.port)
    sink.close()
    assert not is_listening(sink.port)
    assert not sink.workdir.exists()


# --- nodemailer ----------------------------------------------------------------------------


def test_nodemailer_message_reaches_sink_with_headers_and_attachment(sink: SmtpSink) -> None:
    info = run_nodemailer(
        sink.port,
        from_=SENDER,
        to=RECIPIENT,
        subject="nodemailer check",
        text="plain part",
        html="<p>html part</p>",
        attachments=[{"filename": "note.txt", "content": "attached text"}],
        headers={"Idempotency-Key": "key-123"},
    )
    assert info["ok"] is True
    assert info["response"].startswith("250")
    (message,) = sink.wait_for(1)
    parsed = message.email()
    assert message.mail_from == SENDER
    assert parsed["Idempotency-Key"] == "key-123"
    assert parsed["Message-ID"] == info["messageId"]
    assert parsed.get_content_type() == "multipart/mixed"
    assert [p.get_filename() for p in parsed.iter_attachments()] == ["note.txt"]


def test_nodemailer_twice_gives_different_message_ids_and_boundaries(sink: SmtpSink) -> None:
    message: dict[str, Any] = {"subject": "same", "text": "same", "html": "<b>same</b>"}
    first = run_nodemailer(sink.port, **message)
    second = run_nodemailer(sink.port, **message)
    assert first["messageId"] != second["messageId"]
    one, two = (m.email() for m in sink.wait_for(2))
    assert one["Message-ID"] != two["Message-ID"]
    assert one.get_boundary() and two.get_boundary()
    assert one.get_boundary() != two.get_boundary()


def test_nodemailer_reports_smtp_rejection() -> None:
    with SmtpSink(hardfail=["RCPT"]) as sink:
        result = run_nodemailer(sink.port, check=False)
    assert result["ok"] is False
    assert result["error"]["responseCode"] == 500


# --- Postfix -------------------------------------------------------------------------------


def test_swaks_through_postfix_upstream_reaches_sink_and_logs_sent(sink: SmtpSink) -> None:
    with Postfix(relayhost=sink.port, name="upstream") as postfix:
        result = send_with_swaks(postfix.port, "--header", "Subject: via postfix")
        assert result.returncode == 0, result.stdout
        (message,) = sink.wait_for(1)
        assert message.rcpt_to == [RECIPIENT]
        assert message.email()["Subject"] == "via postfix"
        assert message.helo == postfix.hostname
        (sent,) = postfix.wait_for_log(r"to=<recipient@example\.com>, relay=.*status=sent")
        assert f"relay=127.0.0.1[127.0.0.1]:{sink.port}," in sent.group(0)
        postfix.wait_for_empty_queue()


def test_postfix_maildir_upstream_delivers_locally() -> None:
    with Postfix(maildir=True, name="maildir") as postfix:
        assert send_with_swaks(postfix.port, "--header", "Subject: to maildir").returncode == 0
        (stored,) = postfix.wait_for_maildir(1)
        assert b"Subject: to maildir" in stored
        assert b"Delivered-To: recipient@example.com" in stored
        postfix.wait_for_log(r"status=sent \(delivered to maildir\)")


def test_postfix_starttls_verifies_against_its_ca() -> None:
    with Postfix(maildir=True, name="tls", tls=True) as postfix:
        assert postfix.ca is not None and postfix.ca_file is not None
        result = send_with_swaks(
            postfix.port, "--tls", "--tls-verify", "--tls-ca-path", str(postfix.ca_file)
        )
        assert result.returncode == 0, result.stdout
        assert "TLS started" in result.stdout
        with smtplib.SMTP("127.0.0.1", postfix.port, timeout=10) as client:
            client.starttls(context=postfix.ca.client_context())
            client.sendmail(SENDER, [RECIPIENT], b"Subject: over tls\r\n\r\nhello\r\n")
        messages = postfix.wait_for_maildir(2)
        assert any(b"Subject: over tls" in m for m in messages)
        postfix.wait_for_log(r"TLS connection established from")


def test_postfix_starttls_fails_against_another_ca(tmp_path: Path) -> None:
    other = CertificateAuthority(tmp_path / "other-ca", "some other CA")
    with Postfix(maildir=True, name="tls-other", tls=True) as postfix:
        client = smtplib.SMTP("127.0.0.1", postfix.port, timeout=10)
        with client, pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=other.client_context())
        result = send_with_swaks(
            postfix.port, "--tls", "--tls-verify", "--tls-ca-path", str(other.cert_file)
        )
        assert result.returncode != 0
        assert "certificate verify failed" in result.stdout + result.stderr
        assert postfix.maildir_messages() == []


def test_postfix_client_mode_retries_until_relayhost_accepts() -> None:
    relay_port = free_port()
    with Postfix(relayhost=relay_port, name="client") as postfix:
        assert send_with_swaks(postfix.port, "--header", "Subject: queued").returncode == 0
        postfix.wait_for_log(r"status=deferred")
        assert len(postfix.queue()) == 1
        with SmtpSink(port=relay_port) as sink:
            (message,) = sink.wait_for(1, timeout=20)
            assert message.email()["Subject"] == "queued"
            postfix.wait_for_log(r"status=sent")
            postfix.wait_for_empty_queue()


def test_postfix_instances_run_side_by_side_isolated(
    sink_factory: Callable[..., SmtpSink], postfix_factory: Callable[..., Postfix]
) -> None:
    sink_a, sink_b = sink_factory(), sink_factory()
    a = postfix_factory(relayhost=sink_a.port, name="side-a")
    b = postfix_factory(relayhost=sink_b.port, name="side-b")
    assert len({a.port, b.port, sink_a.port, sink_b.port}) == 4
    assert a.queue_dir != b.queue_dir and a.log_file != b.log_file
    assert send_with_swaks(a.port).returncode == 0
    assert send_with_swaks(b.port).returncode == 0
    assert send_with_swaks(b.port).returncode == 0
    assert len(sink_a.wait_for(1)) == 1
    assert len(sink_b.wait_for(2)) == 2
    b.wait_for_log("status=sent", count=2)
    assert "pf-side-b" not in a.log()


def test_postfix_close_stops_every_process_and_removes_its_dir(sink: SmtpSink) -> None:
    postfix = Postfix(relayhost=sink.port, name="teardown").start()
    pid = int((postfix.queue_dir / "pid" / "master.pid").read_text())
    base = postfix.base_dir
    postfix.close()
    assert not postfix.running
    assert not is_listening(postfix.port)
    assert not base.exists()
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rpartition(")")[2].split()[0] == "Z"


def test_servers_move_to_another_port_when_theirs_was_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_free_port = mta.free_port

    def taken_first(port: int) -> Callable[[], int]:
        handed_out = iter([port])
        return lambda: next(handed_out, None) or real_free_port()

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        monkeypatch.setattr(mta, "free_port", taken_first(taken))
        with SmtpSink() as sink:
            monkeypatch.setattr(mta, "free_port", taken_first(taken))
            with Postfix(relayhost=sink.port, name="moved") as postfix:
                assert taken not in (sink.port, postfix.port)
                assert send_with_swaks(postfix.port).returncode == 0
                assert len(sink.wait_for(1)) == 1


# --- environment rules -----------------------------------------------------------------------


def test_missing_program_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Debian package 'no-such-pkg'"):
        require_program("no-such-mail-tool", "no-such-pkg")


def test_missing_program_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="Debian package 'no-such-pkg'"):
        require_program("no-such-mail-tool", "no-such-pkg")


def test_swaks_refuses_to_run_without_a_server() -> None:
    with pytest.raises(ValueError, match="--server"):
        swaks("--to", RECIPIENT)


def test_free_port_is_loopback_and_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert not is_listening(port)
