"""What the front door checks in a message's bytes before the intake sees them.

SMTP smuggling (CVE-2023-51764 and relatives) lives in the gap between where
one server sees a line end and where the next one does. aiosmtpd ends DATA only
at CRLF "." CRLF, and this module closes the rest of the gap, in the spirit of
Postfix's `smtpd_forbid_bare_newline = normalize`:

- a bare CR in the header block is refused (550 5.6.0): a downstream server may
  read it as a line end and see a header the relay never saw (an injected Reply-To);
- every other bare CR or bare LF becomes CRLF before anything reads the message,
  so the relay parses, fingerprints, stores and forwards the same lines, and a
  "." after a bare line end is ordinary content that is dot-stuffed on the way out.

Header limits follow Postfix's `header_size_limit`, except that an oversized
field is refused (552 5.3.4) instead of truncated: the relay never rewrites
what it forwards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay import headers

__all__ = ["Checked", "bare_cr_in_header", "check", "normalise_line_endings"]

_LINE_ENDING = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Checked:
    """The bytes to hand on (line endings normalised), or the reply that refuses them."""

    data: bytes
    refusal: str | None = None


def normalise_line_endings(data: bytes) -> bytes:
    """Bare CR and bare LF become CRLF; the bytes are copied only when there is one.

    Every CR and every LF belongs to a CRLF exactly when the three counts agree: three
    scans in C, about ten times faster than a regex search with lookarounds (which cost
    about 70 us on a 2 KB message, on every accept and every delivery).
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data
    return _LINE_ENDING.sub(b"\r\n", data)


def bare_cr_in_header(data: bytes, start: int, end: int) -> bool:
    """A CR inside [start, end) that is not the one of the line's final CRLF."""
    stop = end - 2 if data.startswith(b"\r\n", end - 2) else end
    return data.find(b"\r", start, stop) >= 0


def check(data: bytes, max_header_size: int, max_header_fields: int) -> Checked:
    """One linear pass over the header block, stopping at the first limit passed."""
    count = 0
    name = ""
    size = 0
    for line_name, start, end, _ in headers.lines(data):
        if bare_cr_in_header(data, start, end):
            return Checked(
                data,
                "550 5.6.0 Message header contains a bare CR (a carriage return without a line"
                " feed); not accepted",
            )
        if line_name is not None:
            count += 1
            name, size = line_name, 0
            if count > max_header_fields:
                return Checked(
                    data, f"552 5.3.4 More than {max_header_fields} header fields; not accepted"
                )
        size += end - start
        if size > max_header_size:
            return Checked(
                data,
                f"552 5.3.4 Header field {name[:64]} is longer than {max_header_size} bytes;"
                " not accepted",
            )
    return Checked(normalise_line_endings(data))
