"""Content fingerprint that recognises a regenerated retry of the same email.

A mail library that retries a failed send usually rebuilds the message: new
Message-ID, Date and MIME boundaries, perhaps different header folding, header
order, line endings or transfer encoding. Hashing raw bytes would call every retry
new mail, so the hash covers a canonical form holding only what the author of the
email chose: envelope sender, a few identity headers and the decoded MIME leaves.

The form errs towards "different": anything that cannot be decoded cleanly is
hashed as raw bytes rather than lossily, so two different emails never meet in a
replacement character. A message whose structure cannot be parsed at all (MIME
parts nested deeper than Python can recurse) is hashed whole, and `compute` says
why, so the audit trail can name the form that was used.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.feedparser import (  # type: ignore[attr-defined]  # not in typeshed
    BufferedSubFile,
    FeedParser,
    NeedMoreData,
)
from email.message import Message
from email.policy import Compat32
from typing import TYPE_CHECKING

__all__ = [
    "ALWAYS_VOLATILE",
    "DEFAULT_HEADERS",
    "MAX_DEPTH",
    "Fingerprint",
    "compute",
    "fingerprint",
]

DEFAULT_HEADERS: tuple[str, ...] = ("From", "Reply-To", "Subject")

# A trailing "*" makes an entry a prefix pattern.
ALWAYS_VOLATILE: tuple[str, ...] = (
    "Date",
    "Message-ID",
    "Received",
    "X-Received",
    "Return-Path",
    "Delivered-To",
    "Resent-Date",
    "Resent-Message-ID",
    "X-Mailer",
    "User-Agent",
    "DKIM-Signature",
    "X-Google-DKIM-Signature",
    "ARC-Seal",
    "ARC-Message-Signature",
    "ARC-Authentication-Results",
    "Authentication-Results",
    "Received-SPF",
    "X-Originating-IP",
    "Thread-Index",
    "X-Google-*",
    "X-Gm-*",
    "X-MS-Exchange-*",
)

_VERSION = b"dedup-relay fingerprint v1"
_WHITESPACE = re.compile(r"[ \t\r\n]+")
_ENCODED_WORD = re.compile(r"=\?([^?\s]*)\?([bBqQ])\?([^?\s]*)\?=")
_BASE64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")
_BASE64_CHUNK = re.compile(rb"[A-Za-z0-9+/]+=*")
_TRAILING_SPACE = " \t\r\n\f\v"
_TRAILING_SPACE_BYTES = _TRAILING_SPACE.encode()
_UUENCODE = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})
# How the stdlib's feedparser builds the matcher for a multipart's boundary lines.
_BOUNDARY_MATCHER = re.compile(
    r"\(\?P<sep>(?P<escaped>.*)\)"
    + re.escape(r"(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"),
    re.DOTALL,
)
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)
# A field's first line as the feed parser's `headerRE` takes it, less its "From " and
# empty-name cases (which the parser treats apart).
_FIELD_LINE = re.compile(r"[\041-\071\073-\176]+:")
# Parser.parse feeds the parser this much at a time; feeding alike keeps the result alike.
_CHUNK = 8192
# Parts within parts, of any kind. Real mail nests a handful; the parser recurses once per
# level, and a fixed limit well inside Python's own keeps the result the same on any stack.
MAX_DEPTH = 200
# Regenerated on every build (boundary) or a free choice of the generator.
_EMBEDDED_SKIP = frozenset({"content-type", "content-transfer-encoding"})


class _RawHeaders(Compat32):
    """Compat32 turns 8-bit header values into Header objects whose str() is lossy."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value


_POLICY = _RawHeaders()


def _split_patterns(names: Sequence[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    exact: set[str] = set()
    prefixes: list[str] = []
    for raw in names:
        name = str(raw).strip().lower()
        if name.endswith("*"):
            prefixes.append(name[:-1])
        elif name:
            exact.add(name)
    return frozenset(exact), tuple(prefixes)


_ALWAYS_EXACT, _ALWAYS_PREFIXES = _split_patterns(ALWAYS_VOLATILE)


def _selected_headers(headers: Sequence[str], volatile: Sequence[str]) -> tuple[str, ...]:
    """Sorted, so the order of names in the configuration does not matter."""
    if isinstance(headers, str):
        headers = (headers,)
    if isinstance(volatile, str):
        volatile = (volatile,)
    return _select(tuple(headers), tuple(volatile))


@functools.lru_cache(maxsize=64)
def _select(headers: tuple[str, ...], volatile: tuple[str, ...]) -> tuple[str, ...]:
    """Kept per configuration: the same names give the same selection on every message."""
    exact, prefixes = _split_patterns(volatile)
    exact |= _ALWAYS_EXACT
    prefixes += _ALWAYS_PREFIXES
    wanted = {str(name).strip().lower() for name in headers}
    return tuple(sorted(n for n in wanted if n and n not in exact and not n.startswith(prefixes)))


def _to_bytes(text: str) -> bytes:
    """The parser keeps undecodable input bytes as surrogates; give them back."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _field(tag: bytes, data: bytes) -> bytes:
    return tag + len(data).to_bytes(8, "big") + data


def _text_field(tag: bytes, text: str) -> bytes:
    return _field(tag, text.encode("utf-8", "surrogatepass"))


def _decode_charset(data: bytes, charset: str) -> str:
    try:
        return data.decode(charset.partition("*")[0].strip(), "surrogateescape")
    except Exception:
        return data.decode("latin-1")


def _decode_word(encoding: str, encoded: str) -> bytes | None:
    data = encoded.encode("utf-8", "surrogatepass")
    if encoding in "qQ":
        return binascii.a2b_qp(data, header=True)
    data = data.rstrip(b"=")
    if _BASE64_JUNK.search(data) or len(data) % 4 == 1:
        return None
    return binascii.a2b_base64(data + b"=" * (-len(data) % 4))


def _canonical_header(value: object) -> str:
    """RFC 2047 decoded, unfolded, whitespace runs collapsed.

    Whitespace between encoded words is dropped as RFC 2047 says, and adjacent
    words in one charset are joined before decoding, because encoders split long
    text, even inside a multi-byte character, into several words.
    """
    raw = value if isinstance(value, str) else str(value)
    text = _to_bytes(raw).decode("utf-8", "surrogateescape")
    out: list[str] = []
    pending: list[bytes] = []
    pending_charset: str | None = None
    pos = 0
    after_word = False
    for match in _ENCODED_WORD.finditer(text):
        data = _decode_word(match.group(2), match.group(3))
        if data is None:
            continue
        gap = text[pos : match.start()]
        if after_word and not gap.strip(" \t\r\n"):
            gap = ""
        if gap:
            if pending_charset is not None:
                out.append(_decode_charset(b"".join(pending), pending_charset))
                pending, pending_charset = [], None
            out.append(gap)
        charset = match.group(1).lower()
        if pending_charset is not None and charset != pending_charset:
            out.append(_decode_charset(b"".join(pending), pending_charset))
            pending = []
        pending.append(data)
        pending_charset = charset
        pos = match.end()
        after_word = True
    if pending_charset is not None:
        out.append(_decode_charset(b"".join(pending), pending_charset))
    out.append(text[pos:])
    return _WHITESPACE.sub(" ", "".join(out)).strip(" ")


def _normalise_eol(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _decode_base64(data: bytes) -> bytes:
    """Lenient about padding, strict about content: dropping stray characters would
    let two different bodies mislabelled as base64 decode alike."""
    data = data.translate(None, b" \t\r\n")
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        pass
    chunks = _BASE64_CHUNK.findall(data)
    if sum(map(len, chunks)) != len(data):
        raise ValueError("not base64")
    out: list[bytes] = []
    for chunk in chunks:
        chunk = chunk.rstrip(b"=")
        if len(chunk) % 4 == 1:
            raise ValueError("truncated base64")
        out.append(binascii.a2b_base64(chunk + b"=" * (-len(chunk) % 4)))
    return b"".join(out)


def _raw_payload(part: Message) -> bytes:
    """get_payload() replaces undecodable bytes; the stored payload keeps them as surrogates."""
    payload = getattr(part, "_payload", None)
    if isinstance(payload, bytes):
        return payload
    return _to_bytes(payload if isinstance(payload, str) else str(part.get_payload()))


def _transfer_decoded(part: Message) -> bytes:
    """Line breaks outside base64 are transport, not content: SMTP sends them all as CRLF."""
    data = _raw_payload(part)
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    if cte == "base64":
        return _decode_base64(data)
    if cte in _UUENCODE:
        decoded = part.get_payload(decode=True)
        return decoded if isinstance(decoded, bytes) else data
    data = _normalise_eol(data)
    if cte == "quoted-printable":
        return binascii.a2b_qp(data)
    return data


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        return None
    return None if name is None else _canonical_header(name)


def _leaf_fields(part: Message) -> list[bytes]:
    ctype = part.get_content_type()
    out = [_text_field(b"P", ctype)]
    name = _filename(part)
    if name is not None:
        out.append(_text_field(b"N", name))
    try:
        data = _transfer_decoded(part)
    except Exception:
        out.append(_field(b"R", _normalise_eol(_raw_payload(part))))
        return out
    if not ctype.startswith("text/"):
        out.append(_field(b"B", data))
        return out
    try:
        text = data.decode(part.get_content_charset() or "us-ascii")
    except Exception:
        out.append(_field(b"U", _normalise_eol(data).rstrip(_TRAILING_SPACE_BYTES)))
        return out
    text = text.replace("\r\n", "\n").replace("\r", "\n").rstrip(_TRAILING_SPACE)
    out.append(_text_field(b"T", text))
    return out


def _embedded_fields(part: Message, inner: list[Message]) -> list[bytes]:
    """An attached message's own Date, Message-ID and so on are content, not send noise."""
    out = [_text_field(b"M", part.get_content_type())]
    name = _filename(part)
    if name is not None:
        out.append(_text_field(b"N", name))
    for sub in inner:
        out.append(_field(b"m", b""))
        items = [(str(k).strip().lower(), v) for k, v in sub.items()]
        items.sort(key=lambda item: item[0])
        for key, value in items:
            if key not in _EMBEDDED_SKIP:
                out.append(_text_field(b"e", key))
                out.append(_text_field(b"f", _canonical_header(value)))
    return out


def _body_fields(message: Message) -> list[bytes]:
    out: list[bytes] = []
    stack = [message]
    while stack:
        part = stack.pop()
        payload = part.get_payload()
        if not isinstance(payload, list):
            out.extend(_leaf_fields(part))
            continue
        inner = [sub for sub in payload if isinstance(sub, Message)]
        if part.get_content_maintype() != "multipart":
            out.extend(_embedded_fields(part, inner))
        stack.extend(reversed(inner))
    return out


def _normalise_sender(sender: str) -> str:
    sender = str(sender).strip()
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1].strip()
    return sender.lower()


Matcher = Callable[[str], object]


class _LinearInput(BufferedSubFile):  # type: ignore[misc]
    """The feedparser's input, with boundary lines found by one look-up per line.

    The stdlib tries every line against every open multipart's boundary pattern:
    quadratic in the nesting depth, minutes for a hostile message. A boundary line
    is `--BOUNDARY`, maybe `--`, blanks and a line end, so the line itself says
    which boundary it could be; only that one is tried. A matcher of any other
    shape is tried on every line, as before. Which line ends a part is unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self._separators: dict[str, list[Matcher]] = {}
        self._others: list[Matcher] = []

    def push_eof_matcher(self, pred: Matcher) -> None:
        super().push_eof_matcher(pred)
        separator = _separator(pred)
        if separator is None:
            self._others.append(pred)
        else:
            self._separators.setdefault(separator.rstrip(" \t"), []).append(pred)

    def pop_eof_matcher(self) -> Matcher:
        pred: Matcher = super().pop_eof_matcher()
        separator = _separator(pred)
        if separator is None:
            self._others.remove(pred)
        else:
            key = separator.rstrip(" \t")
            self._separators[key].remove(pred)
            if not self._separators[key]:
                del self._separators[key]
        return pred

    def readline(self) -> object:
        if not self._lines:
            return "" if self._closed else NeedMoreData
        line: str = self._lines.popleft()
        if (self._separators and line.startswith("--") and self._ends_a_part(line)) or (
            self._others and any(pred(line) for pred in self._others)
        ):
            self._lines.appendleft(line)
            return ""
        return line

    def _ends_a_part(self, line: str) -> bool:
        # A line holds one line end at most, so this strips it and the blanks before it.
        core = line.rstrip(" \t\r\n")
        found = self._separators.get(core, ())
        if core.endswith("--"):
            found = (*found, *self._separators.get(core[:-2].rstrip(" \t"), ()))
        return any(pred(line) for pred in found)


def _separator(pred: Matcher) -> str | None:
    """`--BOUNDARY` when `pred` is a boundary pattern's `match`, else None."""
    pattern = getattr(pred, "__self__", None)
    if not isinstance(pattern, re.Pattern) or not isinstance(pattern.pattern, str):
        return None
    found = _BOUNDARY_MATCHER.fullmatch(pattern.pattern)
    if found is None:
        return None
    separator = _UNESCAPE.sub(r"\1", found.group("escaped"))
    return separator if re.escape(separator) == found.group("escaped") else None


class _TooDeep(Exception):
    pass


if TYPE_CHECKING:
    _FeedParser = FeedParser[Message]
else:  # generic in typeshed only
    _FeedParser = FeedParser


class _Parser(_FeedParser):
    """The stdlib's feed parser on `_LinearInput`, refusing parts nested past MAX_DEPTH."""

    def __init__(self) -> None:
        super().__init__(policy=_POLICY)
        self._input = _LinearInput()

    def _new_message(self) -> None:
        if len(self._msgstack) >= MAX_DEPTH:  # type: ignore[attr-defined]
            raise _TooDeep
        super()._new_message()  # type: ignore[misc]


def _parse(data: bytes) -> Message:
    """`email.message_from_bytes`, with boundary lines found in linear time."""
    return _feed(data.decode("ascii", "surrogateescape"))


def _feed(text: str) -> Message:
    parser = _Parser()
    for start in range(0, len(text), _CHUNK):
        parser.feed(text[start : start + _CHUNK])
    message: Message = parser.close()
    return message


def _read(data: bytes) -> Message:
    """What `_parse` returns, by the short way when the message is one plain part."""
    text = data.decode("ascii", "surrogateescape")
    message = _parse_single_part(text)
    return _feed(text) if message is None else message


def _parse_single_part(text: str) -> Message | None:
    """The feed parser's message for a plain one-part email, or None when not sure.

    For a type other than multipart/* and message/*, the feed parser takes lines until the
    first one that is not a header line (a blank one is dropped), gives each field's lines
    to the policy's `header_source_parse` and the result to `set_raw`, and keeps the rest of
    the text as the payload. This takes those steps on the whole text, only when every line
    before the first blank one ends in CRLF (then its line breaks, at CR, LF or CRLF, even
    across its 8,192-character feeds, are these), is a field or a fold of one, and is not a
    "From " line: when the parser has nothing else to do and no defect to note.
    """
    end = text.find("\r\n\r\n")
    if end <= 0:
        return None
    head = text[:end]
    lowered = head.lower()
    if "multipart/" in lowered or "message/" in lowered:  # spares building a multipart's head
        return None
    crlf = head.count("\r\n")
    if head.count("\r") != crlf or head.count("\n") != crlf:
        return None
    message = Message(policy=_POLICY)
    source: list[str] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t"):
            if not source:
                return None
        elif _FIELD_LINE.match(line) is None:
            return None
        elif source:
            message.set_raw(*_POLICY.header_source_parse(source))
            source = []
        source.append(line + "\r\n")
    message.set_raw(*_POLICY.header_source_parse(source))
    if message.get_content_maintype() in ("multipart", "message"):  # the parser's own test
        return None
    message.set_payload(text[end + 4 :])
    return message


def _canonical_fields(
    sender: str, message: bytes, headers: Sequence[str], volatile: Sequence[str]
) -> list[bytes]:
    data = bytes(message)
    out = [_field(b"V", _VERSION), _text_field(b"S", _normalise_sender(sender))]
    out.extend(_message_fields(_read(data), headers, volatile))
    return out


def _message_fields(
    parsed: Message, headers: Sequence[str], volatile: Sequence[str]
) -> list[bytes]:
    out: list[bytes] = []
    for name in _selected_headers(headers, volatile):
        out.append(_text_field(b"H", name))
        for value in parsed.get_all(name) or ():
            out.append(_text_field(b"h", _canonical_header(value)))
    out.extend(_body_fields(parsed))
    return out


@dataclass(frozen=True)
class Fingerprint:
    """The hash, and why it covers the raw bytes instead of the canonical form (or None)."""

    value: str
    raw: str | None = None


def compute(
    sender: str,
    message: bytes,
    headers: Sequence[str] = DEFAULT_HEADERS,
    volatile: Sequence[str] = (),
) -> Fingerprint:
    """A lowercase hex SHA-256 over the canonical form, or over the raw bytes and why.

    Every field is tagged and length-prefixed, so no shift of text between fields
    can make two different emails hash alike. Never raises: a dedupe key is always
    better than a dropped email, so a message that cannot be parsed is hashed whole.
    """
    raw_reason = None
    try:
        fields = _canonical_fields(sender, message, headers, volatile)
    except (_TooDeep, RecursionError):
        raw_reason = f"its MIME parts are nested more than {MAX_DEPTH} deep"
    except Exception as exc:
        raw_reason = f"it could not be parsed ({type(exc).__name__})"
    if raw_reason is not None:
        try:
            raw = bytes(message)
        except Exception:
            raw = repr(message).encode()
        fields = [
            _field(b"V", _VERSION),
            _text_field(b"X", _normalise_sender(sender)),
            _field(b"Z", raw),
        ]
    return Fingerprint(hashlib.sha256(b"".join(fields)).hexdigest(), raw_reason)


def fingerprint(
    sender: str,
    message: bytes,
    headers: Sequence[str] = DEFAULT_HEADERS,
    volatile: Sequence[str] = (),
) -> str:
    """The hash alone (see `compute`)."""
    return compute(sender, message, headers, volatile).value
