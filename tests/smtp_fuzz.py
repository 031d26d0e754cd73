"""Fuzzing the front door: random command lines, random DATA bytes, random MIME.

Shared by tests/test_fuzz.py (a short run in the suite) and bench/fuzz.py (a long
run that reports how many inputs it tried). The relay runs as its own process, so
a crash is a dead process, not a test exception.

The checks, for every input: each command gets exactly one well-formed reply in
time (no hang); no reply is "451 4.3.0 Internal error" (an exception inside the
relay); every 250 to a message names a queue id the store holds; and a second
session, opened before the input and used after it, still gets its mail taken.
"""

from __future__ import annotations

import contextlib
import re
import socket
import sqlite3
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

__all__ = ["Outcome", "Session", "check_stored", "control_message", "sessions"]

TIMEOUT = 20.0
_QUEUE_ID = re.compile(r"queued as ([0-9A-Z]+)|\(id ([0-9A-Z]+)\)")

VERBS = [
    b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"RSET", b"NOOP", b"VRFY", b"HELP",
    b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH", b"STARTTLS", b"EXPN", b"BDAT", b"ehlo", b"mail from:",
]  # fmt: skip

_line_bytes = st.binary(max_size=120).map(lambda b: b.replace(b"\n", b""))
_garbage_line = st.binary(max_size=1200).map(lambda b: b.replace(b"\n", b""))


@st.composite
def command_line(draw: st.DrawFn) -> bytes:
    """A command with random arguments, or a line of random bytes (never DATA or QUIT)."""
    if draw(st.booleans()):
        line = draw(st.sampled_from(VERBS)) + draw(st.sampled_from([b"", b" ", b"<"]))
        line += draw(_line_bytes)
    else:
        line = draw(_garbage_line)
    if line.split(b" ", 1)[0].strip().upper() in (b"DATA", b"QUIT"):
        line = b"NOOP " + line
    return line


_atom = st.text(alphabet="abcxyz0189.-_+=", min_size=1, max_size=12)
_valid_address = st.builds(lambda a, d: f"{a}@{d}.example", _atom, _atom)
_odd_address = st.one_of(
    st.builds(lambda a: f'"{a}"@example.org', st.text(max_size=12)),
    st.text(max_size=30),
    st.just(""),
)
# Mostly addresses that pass, so that most transactions reach DATA.
_address = st.integers(0, 9).flatmap(lambda n: _valid_address if n < 8 else _odd_address)

_header_name = st.sampled_from(
    ["Subject", "From", "To", "Message-ID", "Idempotency-Key", "Content-Type", "X-Random", "Date"]
)


def _mime_leaf() -> st.SearchStrategy[Message]:
    def build(maintype: str, subtype: str, payload: bytes, cte: str, name: str | None) -> Any:
        part = Message()
        name = name and name.replace("\r", "").replace("\n", "")
        part["Content-Type"] = f"{maintype}/{subtype}" + (f'; name="{name}"' if name else "")
        part["Content-Transfer-Encoding"] = cte
        part.set_payload(payload.decode("latin-1"))
        return part

    return st.builds(
        build,
        st.sampled_from(["text", "application", "image", "message", "x-weird"]),
        st.sampled_from(["plain", "html", "pdf", "octet-stream", "rfc822", ""]),
        st.binary(max_size=400),
        st.sampled_from(["7bit", "8bit", "base64", "quoted-printable", "x-uuencode", "bogus"]),
        st.one_of(st.none(), st.text(max_size=20)),
    )


def _multipart(children: st.SearchStrategy[Message]) -> st.SearchStrategy[Message]:
    def build(parts: list[Message], boundary: str, subtype: str) -> Message:
        message = Message()
        message["Content-Type"] = f'multipart/{subtype}; boundary="{boundary}"'
        message.set_payload(parts)
        return message

    return st.builds(
        build,
        st.lists(children, max_size=4),
        st.text(alphabet="abcXYZ0123-_=.", min_size=1, max_size=40),
        st.sampled_from(["mixed", "alternative", "related", "digest"]),
    )


_mime = st.recursive(_mime_leaf(), lambda children: _multipart(children), max_leaves=8)


@st.composite
def message_bytes(draw: st.DrawFn) -> bytes:
    """Random MIME with random headers, or plain random bytes (bare CR/LF, NUL, 8-bit)."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=3000))
    message = draw(_mime)
    for name in draw(st.lists(_header_name, max_size=4)):
        value = draw(st.text(max_size=60)).replace("\r", " ").replace("\n", " ")
        with contextlib.suppress(ValueError, TypeError):
            message[name] = value
    try:
        data = message.as_bytes()
    except Exception:  # the stdlib cannot render every random tree; use its string form
        data = str(message).encode("utf-8", "surrogateescape")
    if draw(st.booleans()):
        data = data.replace(b"\n", b"\r\n")
    return data


@dataclass(frozen=True)
class Transaction:
    sender: str
    rcpts: tuple[str, ...]
    data: bytes


_transaction = st.builds(
    Transaction, _address, st.lists(_address, min_size=1, max_size=3).map(tuple), message_bytes()
)

Step = bytes | Transaction
sessions = st.lists(st.one_of(command_line(), _transaction), min_size=1, max_size=12)


def dot_stuff(data: bytes) -> bytes:
    """What a client must do: a line starting with "." gets a second one; then CRLF "." CRLF."""
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + (b"" if stuffed.endswith(b"\r\n") else b"\r\n") + b".\r\n"


@dataclass
class Outcome:
    replies: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)  # queue ids promised with a 250


class Session:
    """A blocking SMTP session over a plain socket, one reply read per line sent."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> str:
        lines: list[bytes] = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("the relay closed the session: " + repr(lines))
            lines.append(line)
            if line[3:4] != b"-":
                text = b"".join(lines).decode("utf-8", "replace")
                assert re.match(r"^\d{3}[ -]", text), f"malformed reply {text!r}"
                return text

    def command(self, line: bytes) -> str:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    @staticmethod
    def ends_session(reply: str) -> bool:
        """421, or aiosmtpd's goodbye after too many unknown commands: the server hung up."""
        return reply.startswith(("421", "221")) or "goodbye" in reply

    def run(self, steps: list[Step]) -> Outcome:
        """EHLO, then the steps; a transaction is MAIL, RCPTs, and DATA when it gets a 354."""
        outcome = Outcome()
        outcome.replies.append(self.command(b"EHLO fuzz.test"))
        for step in steps:
            if outcome.replies and self.ends_session(outcome.replies[-1]):
                break
            if isinstance(step, bytes):
                outcome.replies.append(self.command(step))
                continue
            outcome.replies.append(self.command(b"MAIL FROM:<" + _enc(step.sender) + b">"))
            for rcpt in step.rcpts:
                if self.ends_session(outcome.replies[-1]):
                    break
                outcome.replies.append(self.command(b"RCPT TO:<" + _enc(rcpt) + b">"))
            if self.ends_session(outcome.replies[-1]):
                break
            go = self.command(b"DATA")
            outcome.replies.append(go)
            if not go.startswith("354"):
                continue
            self.sock.sendall(dot_stuff(step.data))
            final = self.reply()
            outcome.replies.append(final)
            match = _QUEUE_ID.search(final)
            if final.startswith("250"):
                assert match, f"250 without a queue id: {final!r}"
                outcome.stored.append(match.group(1) or match.group(2))
        for reply in outcome.replies:
            assert not reply.startswith("451 4.3.0"), f"an exception inside the relay: {reply!r}"
        return outcome

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"QUIT\r\n")
        self.file.close()
        self.sock.close()


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape").replace(b"\n", b"").replace(b"\r", b"")


def control_message(n: int) -> bytes:
    return (
        f"From: control@example.com\r\nTo: c@example.org\r\nSubject: control {n}\r\n"
        f"Message-ID: <control-{n}@example.com>\r\n\r\nstill serving\r\n"
    ).encode()


def send_control(session: Session, n: int) -> str:
    """A valid transaction on a session opened before the fuzz input: it must get its 250."""
    session.command(b"EHLO control.test")
    for line in (b"MAIL FROM:<control@example.com>", b"RCPT TO:<c@example.org>"):
        reply = session.command(line)
        assert reply.startswith("250"), reply
    assert session.command(b"DATA").startswith("354")
    session.sock.sendall(dot_stuff(control_message(n)))
    reply = session.reply()
    assert reply.startswith("250"), f"the control session was refused: {reply!r}"
    return reply


def check_stored(store: Path, queue_ids: list[str]) -> None:
    """Every 250 promised a message on disk: the store knows each queue id."""
    if not queue_ids:
        return
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        known = {
            row[0]
            for row in db.execute(
                f"SELECT queue_id FROM events WHERE queue_id IN ({','.join('?' * len(queue_ids))})",
                queue_ids,
            )
        }
    missing = sorted(set(queue_ids) - known)
    assert not missing, f"250 for message(s) the store does not hold: {missing}"
