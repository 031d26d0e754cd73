"""The fingerprint reads a one-part message without the feed parser, and must read it alike.

`relay.fingerprint._parse_single_part` builds the message a plain one-part email parses to
straight from its text, and gives up (None) on anything else, which the stdlib's feed parser
then reads as before. Whenever it does not give up, the message it builds must be the feed
parser's in every attribute, and the hash the one the feed parser's message gives. Random
header blocks (odd names, folding, stray line ends, 8-bit bytes, encoded words, "From "
lines, missing blank lines) over random bodies, most of them plain enough to be taken.
"""

from __future__ import annotations

import base64
import hashlib
import os
import quopri
import string
from email.message import EmailMessage, Message
from email.policy import SMTP

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from relay import fingerprint as fp
from relay.fingerprint import compute

SENDER = "bounces@example.com"

# Cheap examples (two parses of a few KB each); FINGERPRINT_PARSE_EXAMPLES raises it locally.
examples = settings(
    max_examples=int(os.environ.get("FINGERPRINT_PARSE_EXAMPLES", "400")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Line ends: CRLF mostly, as the relay hands them on; the rest must go to the feed parser.
_eols = st.sampled_from(["\r\n", "\r\n", "\r\n", "\r\n", "\n", "\r", "\r\r\n", "\n\r"])
# Characters stand for bytes (encoded as Latin-1): controls, 8-bit, ":" and blanks included.
_odd = "\x00\x0b\x0c\x1c\x1d\x1e\x7f\x80\x85\xa0\xc3\xa9\xe9\xff"
_value_chars = st.sampled_from(string.printable.replace("\r", "").replace("\n", "") + _odd)
_encoded_words = st.sampled_from(
    [
        "=?utf-8?b?w6k=?=",
        "=?UTF-8?Q?caf=C3=A9?=",
        "=?iso-8859-1?q?caf=E9?=",
        "=?utf-8?b?4pyT?= =?utf-8?b?4pyT?=",
        "=?bogus?q?x?=",
        "=?utf-8?b?!!!?=",
    ]
)
_values = st.lists(st.text(_value_chars, max_size=20) | _encoded_words, max_size=4).map(" ".join)
_content_types = st.sampled_from(
    [
        "text/plain",
        "text/plain; charset=utf-8",
        'text/plain; charset="iso-8859-1"',
        "TEXT/HTML; charset=us-ascii",
        "text/plain; charset=bogus",
        "text/plain; charset*=utf-8''x",
        "text",
        "application/octet-stream; name=a.bin",
        "image/png",
        "multipart/mixed; boundary=b",
        'Multipart/Alternative; boundary="b"',
        "multipart",
        "multipart/mixed",
        " multipart/mixed; boundary=b",
        "message/rfc822",
        "MESSAGE/rfc822",
        "message/delivery-status",
        "message/partial; id=x",
        "message /rfc822",
        "message",
    ]
)
_encodings = st.sampled_from(
    ["7bit", "8bit", "binary", "base64", "BASE64", "quoted-printable", "x-uuencode", "bogus"]
)
_names = st.sampled_from(
    ["From", "To", "Subject", "Reply-To", "Message-ID", "MIME-Version", "X-Mailer", "subject"]
) | st.text(st.sampled_from(string.ascii_letters + "-_.!#~0123456789"), min_size=1, max_size=8)
_odd_names = st.text(st.sampled_from(string.printable + _odd), min_size=1, max_size=6)


@st.composite
def header_lines(draw: st.DrawFn, plain: bool) -> str:
    """One line of a header block with its line end; a plain one is a field or its fold."""
    kind = draw(st.integers(0, 7 if plain else 9))
    eol = "\r\n" if plain else draw(_eols)
    if kind <= 3:
        name = draw(_names)
        separator = draw(st.sampled_from([": ", ":", ":\t", ":  "]))
        return name + separator + draw(_values) + eol
    if kind == 4:
        name = draw(st.sampled_from(["Content-Type", "content-type", "CONTENT-TYPE"]))
        return f"{name}: {draw(_content_types)}{eol}"
    if kind == 5:
        return f"Content-Transfer-Encoding: {draw(_encodings)}{eol}"
    if kind == 6:
        return draw(st.sampled_from([" ", "\t", "  ", " \t"])) + draw(_values) + eol
    if kind == 7:  # past the parser's 8,192-character feed, near where a line end may fall
        return "X-Pad: " + "a" * draw(st.integers(8150, 8250)) + eol
    if kind == 8:
        start = draw(st.sampled_from(["From ", ":", "From:", " ", "From  ", ""]))
        return start + draw(_values) + eol
    return draw(_odd_names) + draw(st.sampled_from([":", " :", ""])) + draw(_values) + eol


@st.composite
def bodies(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 4))
    eol = draw(_eols)
    if kind == 0:
        raw = draw(st.binary(max_size=300))
        return eol.join(
            base64.b64encode(raw).decode()[i : i + 76] for i in range(0, len(raw) * 2, 76)
        )
    if kind == 1:
        text = draw(st.lists(_value_chars | _eols, max_size=200).map("".join))
        return quopri.encodestring(text.encode("latin-1")).decode("latin-1").replace("\n", eol)
    if kind == 2:
        return eol.join(["--b", "Content-Type: text/plain", "", "part", "--b--", ""])
    if kind == 3:
        return eol.join(["Subject: inner", "Date: today", "", "inner body", ""])
    return draw(st.lists(_value_chars | _eols | st.just("\r\n\r\n"), max_size=300).map("".join))


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    plain = draw(st.integers(0, 2)) > 0
    head = "".join(draw(st.lists(header_lines(plain), max_size=12)))
    separator = "\r\n" if plain else draw(st.sampled_from(["\r\n", "", "\n", "\r", " \r\n"]))
    return (head + separator + draw(bodies())).encode("latin-1")


def fields_or_error(parsed: Message, names: list[str]) -> list[bytes] | str:
    """Some messages the parser reads cannot be put in canonical form (`compute` hashes them
    raw); then the error's name."""
    try:
        return fp._message_fields(parsed, names, ())
    except Exception as exc:
        return type(exc).__name__


def compute_by_the_feed_parser(data: bytes, names: list[str]) -> tuple[str, str | None]:
    """What `compute` gave before the short way: everything through the feed parser."""
    fields = fields_or_error(fp._parse(data), names)
    sender = fp._normalise_sender(SENDER)
    if isinstance(fields, str):
        raw = [fp._field(b"V", fp._VERSION), fp._text_field(b"X", sender), fp._field(b"Z", data)]
        return hashlib.sha256(b"".join(raw)).hexdigest(), f"it could not be parsed ({fields})"
    head = [fp._field(b"V", fp._VERSION), fp._text_field(b"S", sender)]
    return hashlib.sha256(b"".join(head + fields)).hexdigest(), None


PLAIN = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?= and\r\n"
    b"\tmore \xc3\xa9\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Bob,\r\nFrom here on\r\n\r\nbody.\r\n"
)


@examples
@given(data=messages())
@example(data=PLAIN)
@example(data=b"Subject: x\r\n\r\n")
# Hashed raw either way: get_payload() fails on 8-bit bytes under an RFC 2231 charset.
@example(data=b"Content-Type: text/plain; charset*=utf-8''x\r\n\r\n\x80")
@example(data=b"Subject: x\r\n \r\n\r\nbody")
@example(data=b"Subject: \r\n\r\n\r\n")
@example(data=b"Subject:\r\n\tfolded\r\n \r\n\r\nbody\r")
@example(data=b"X-Pad: " + b"a" * 8184 + b"\r\nSubject: s\r\n\r\nbody")  # CRLF split between feeds
def test_a_message_read_the_short_way_is_the_one_the_feed_parser_builds(data: bytes) -> None:
    full = fp._parse(data)
    short = fp._parse_single_part(data.decode("ascii", "surrogateescape"))
    event("short way" if short is not None else "feed parser")
    if short is None:
        return
    assert vars(short) == vars(full)
    names = sorted({name.lower() for name in full} | {"from", "subject"})
    assert fields_or_error(short, names) == fields_or_error(full, names)
    found = compute(SENDER, data, names)
    assert (found.value, found.raw) == compute_by_the_feed_parser(data, names)


def _library_message(charset: str, cte: str) -> bytes:
    """As a mail library sends it: folded, encoded words, base64 or quoted-printable."""
    message = EmailMessage()
    message["From"] = "Jürgen <j@example.com>"
    message["Subject"] = "Ein sehr langer Betreff, " * 5
    message.set_content("Grüße aus Köln\n" * 40, charset=charset, cte=cte)
    return message.as_bytes(policy=SMTP)


@pytest.mark.parametrize(
    "data",
    [
        PLAIN,
        _library_message("utf-8", "base64"),
        _library_message("iso-8859-1", "quoted-printable"),
        _library_message("utf-8", "8bit"),
        b"Subject: no body\r\n\r\n",
    ],
)
def test_plain_single_part_messages_take_the_short_way(data: bytes) -> None:
    short = fp._parse_single_part(data.decode("ascii", "surrogateescape"))
    assert isinstance(short, Message)
    assert vars(short) == vars(fp._parse(data))


@pytest.mark.parametrize(
    "data",
    [
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n',
        b"Content-Type: Multipart/Alternative\r\n\r\nx",
        b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nx",
        b"Content-Type: message/delivery-status\r\n\r\nStatus: 5.0.0\r\n",
        b"From alice@example.com Mon Jun  3 10:15:00 2024\r\nSubject: x\r\n\r\nbody",
        b"Subject: x\nTo: y\n\nbody",
        b"Subject: x\rTo: y\r\n\r\nbody",
        b"Subject: x\r\nTo: y\r\n",
        b"Subject: x\r\nnot a header\r\n\r\nbody",
        b" Subject: x\r\n\r\nbody",
        b": no name\r\nSubject: x\r\n\r\nbody",
        b"\r\nSubject: x\r\n\r\nbody",
        b"Subject: x\r\r\n\r\nbody",
    ],
)
def test_anything_else_is_left_to_the_feed_parser(data: bytes) -> None:
    assert fp._parse_single_part(data.decode("ascii", "surrogateescape")) is None
