"""Text from strangers made safe for the places people read it: the stderr log and CSV.

Clients choose EHLO names, addresses, AUTH user names and command lines; an
ESC sequence among them would rewrite an operator's terminal, a newline would
forge a log line, and a cell starting with `=` runs as a spreadsheet formula.
(The review commands clip and clean their own text columns: relay.review.)
"""

from __future__ import annotations

import logging
import re

__all__ = ["FORMULA_PREFIXES", "LogEscaper", "escape", "spreadsheet_safe"]

# C0 and C1 controls, DEL, and the invisible format characters that reorder text (bidi).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
# OWASP's list: a spreadsheet treats a cell starting with these as a formula.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """Every control or reordering character as a visible escape (ESC becomes `\\x1b`)."""
    return _UNSAFE.sub(_visible, text)


def spreadsheet_safe(cell: str) -> str:
    """A leading quote makes a formula-looking cell plain text in Excel and LibreOffice."""
    return "'" + cell if cell.startswith(FORMULA_PREFIXES) else cell


class LogEscaper(logging.Filter):
    """Escapes each record's message; a traceback's own newlines are added later, untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = escape(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True
