"""Reading and editing a message's header block at the byte level.

The relay promises to forward bytes as it got them: it may prepend a header or
drop a whole header field, never re-serialise the message. The stdlib `email`
package rewrites what it parses, so edits happen here on raw lines instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.utils import parseaddr

__all__ = [
    "Field",
    "address_domain",
    "decoded",
    "fields",
    "fold",
    "get",
    "get_all",
    "lines",
    "prepend",
    "remove",
]

# No "^": match() anchors at its `pos`, where "^" would only match at the very start.
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Field:
    """One header field: its name, raw value (still folded) and byte span in the message."""

    name: str
    raw: bytes
    start: int
    end: int

    @property
    def value(self) -> str:
        """Unfolded value, undecoded; UTF-8 where valid (RFC 6532), else Latin-1."""
        text = re.sub(rb"\r?\n(?=[ \t])", b"", self.raw).strip(b" \t\r\n")
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError:
            return text.decode("latin-1")


def lines(data: bytes) -> Iterator[tuple[str | None, int, int, int]]:
    """The header block line by line: field name (None on a folded line), start, end, value start.

    The block ends at the first empty line or the first line that is neither a field nor a
    folded continuation of one. One pass, no copies: a header folded over a million lines
    costs what a million short fields cost.
    """
    pos = 0
    size = len(data)
    started = False
    while pos < size:
        line_end = data.find(b"\n", pos)
        next_pos = size if line_end < 0 else line_end + 1
        if data.startswith((b"\r\n", b"\n"), pos) and next_pos - pos <= 2:
            return
        if started and data.startswith((b" ", b"\t"), pos):
            yield None, pos, next_pos, pos
        else:
            match = _FIELD_NAME.match(data, pos, next_pos)
            if not match:
                return
            started = True
            yield match.group(1).decode("ascii"), pos, next_pos, match.end()
        pos = next_pos


def fields(data: bytes) -> list[Field]:
    """The header fields before the first empty line (or the first line that is not a header)."""
    out: list[Field] = []
    name: str | None = None
    start = value_start = end = 0
    for line_name, line_start, line_end, line_value in lines(data):
        if line_name is not None:
            if name is not None:
                out.append(Field(name, data[value_start:end], start, end))
            name, start, value_start = line_name, line_start, line_value
        end = line_end
    if name is not None:
        out.append(Field(name, data[value_start:end], start, end))
    return out


def get_all(found: list[Field], name: str) -> list[str]:
    wanted = name.lower()
    return [f.value for f in found if f.name.lower() == wanted]


def get(found: list[Field], name: str) -> str | None:
    values = get_all(found, name)
    return values[0] if values else None


def remove(data: bytes, found: list[Field], name: str) -> bytes:
    """Drop every field called `name`, leaving every other byte where it was."""
    wanted = name.lower()
    spans = [(f.start, f.end) for f in found if f.name.lower() == wanted]
    if not spans:
        return data
    parts: list[bytes] = []
    pos = 0
    for start, end in spans:
        parts.append(data[pos:start])
        pos = end
    parts.append(data[pos:])
    return b"".join(parts)


def prepend(data: bytes, lines: list[str]) -> bytes:
    """Put header lines in front; a line already carrying CRLF folds is kept as is."""
    if not lines:
        return data
    head = "".join(line.rstrip("\r\n") + "\r\n" for line in lines)
    return head.encode("utf-8") + data


def decoded(value: str) -> str:
    """RFC 2047 decoded and whitespace-normalised: what a person reads in the subject line."""
    try:
        text = str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        text = value
    return _WHITESPACE.sub(" ", text).strip()


def address_domain(value: str) -> str:
    """The lowercase domain of an address or header address, '' when there is none."""
    address = parseaddr(value)[1] or value
    return address.rpartition("@")[2].strip().strip(">").lower() if "@" in address else ""


def fold(name: str, value: str) -> str:
    """A header line folded under 78 columns at spaces, for the lines the relay writes."""
    words = value.split(" ")
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        if len(current) + 1 + len(word) > 78 and current.strip():
            lines.append(current)
            current = "\t" + word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\r\n".join(lines)
