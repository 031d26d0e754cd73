"""DATA read a buffer at a time, with the outcome aiosmtpd's line-at-a-time loop gives.

aiosmtpd's `SMTP.smtp_DATA` awaits one `readuntil(b"\\r\\n")` per line, logs every line at
debug level and rebuilds each from a list of fragments: for a small message that loop
costs more than the rest of the session's commands together. `DataPhase.smtp_DATA` takes
every complete line already received in one call and reaches the same verdict on the
same bytes, whatever the packets:

- a line (with its CRLF) longer than `line_length_limit` makes the reply, once the final
  "." has come, "500 Line too long (see RFC5321 4.5.3.1.6)";
- more than `data_size_limit` bytes of lines (with their CRLFs, without the final ".")
  make it "552 Error: Too much mail data";
- whichever of the two comes first wins, and from then on nothing more is kept. A line
  longer than the StreamReader's limit counts as too long before its bytes are counted
  (aiosmtpd's reader refuses it at its first fragment), a line just over
  `line_length_limit` only after them;
- otherwise a line's leading "." is removed and the handler's `handle_DATA` sees the rest.

The StreamReader's public calls are all it uses: `readuntil` of the shortest suffix of
CRLF "." CRLF that the bytes already taken do not complete, and `read` of what its
`LimitOverrunError` says can be taken.
"""

from __future__ import annotations

import asyncio
import enum
import logging

from aiosmtpd.smtp import MISSING, SMTP, syntax

__all__ = ["Body", "DataPhase", "Verdict"]

# aiosmtpd's own logger, so its DATA messages stay where they were.
log = logging.getLogger("mail.log")

CRLF = b"\r\n"
# The end of DATA is a line holding only "." after a CRLF; what is sought next depends on
# how much of that CRLF the bytes already taken end with.
_AFTER_CRLF = b".\r\n"
_AFTER_CR = b"\n.\r\n"
_ANYWHERE = b"\r\n.\r\n"


class Verdict(enum.Enum):
    NOMINAL = enum.auto()
    TOO_LONG = enum.auto()
    TOO_MUCH = enum.auto()


class Body:
    """The message so far: complete lines kept, the line still open, and the verdict."""

    def __init__(self, line_limit: int, size_limit: int | None) -> None:
        self.line_limit = line_limit
        self.size_limit = size_limit
        self.verdict = Verdict.NOMINAL
        self.size = 0
        self.kept: list[bytes] = []
        self.open = b""

    def take(self, data: bytes) -> None:
        """The next bytes of the body, cut anywhere."""
        if self.verdict is not Verdict.NOMINAL or not data:
            return
        if self.open:
            data = self.open + data
        end = data.rfind(CRLF)
        if end < 0:
            lines, rest = b"", data
        else:
            cut = end + 2
            lines, rest = (data, b"") if cut == len(data) else (data[:cut], data[cut:])
        if lines:
            size = self.size + len(lines)
            limit = self.size_limit
            if (limit and size > limit) or (
                len(lines) > self.line_limit
                and max(map(len, lines.split(CRLF))) + 2 > self.line_limit
            ):
                self._first_fault(lines)
                return
            self.kept.append(lines)
            self.size = size
        if len(rest) > self.line_limit + 1:
            # Past the reader's limit however it ends: only its last byte can be half a CRLF.
            self._fail(Verdict.TOO_LONG)
        else:
            self.open = rest

    def _first_fault(self, lines: bytes) -> None:
        """Which limit the first offending line breaks, in aiosmtpd's order of checks."""
        size = self.size
        limit = self.size_limit
        for line in lines.split(CRLF)[:-1]:
            if len(line) > self.line_limit:
                verdict = Verdict.TOO_LONG
                break
            size += len(line) + 2
            if limit and size > limit:
                verdict = Verdict.TOO_MUCH
                break
            if len(line) + 2 > self.line_limit:
                verdict = Verdict.TOO_LONG
                break
        else:
            raise AssertionError("no line breaks a limit")
        self._fail(verdict)

    def _fail(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.kept = []
        self.open = b""

    def content(self) -> bytes:
        """The lines kept, without the dot each line starting with one was sent with."""
        data = b"".join(self.kept)
        self.kept = []
        if data[:1] == b".":
            data = data[1:]
        return data.replace(b"\r\n.", CRLF)


class DataPhase(SMTP):
    """aiosmtpd's SMTP whose DATA reads the body a buffer at a time (see the module)."""

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if "DATA" not in self._handle_hooks:
            # The deprecated process_message() API: aiosmtpd's own loop serves it.
            await super().smtp_DATA(arg)
            return
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return

        await self.push("354 End data with <CR><LF>.<CR><LF>")
        body = Body(self.line_length_limit, self.data_size_limit)
        try:
            await self._read_body(body)
        except asyncio.CancelledError:
            log.info("Connection lost during DATA")
            self._writer.close()
            raise

        if body.verdict is Verdict.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        if body.verdict is Verdict.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return

        original_content = body.content()
        content: str | bytes
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original_content.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original_content.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.push("500 Error: strict ASCII mode")
                    return
        else:
            content = original_content
        self.envelope.content = content
        self.envelope.original_content = original_content

        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_body(self, body: Body) -> None:
        """Feed `body` from the session's reader up to the lone "." line, as it arrives."""
        reader = self._reader
        taken = CRLF  # the last two bytes taken; DATA's own CRLF to begin with
        while self.transport is not None:
            if taken == CRLF:
                wanted = _AFTER_CRLF
            elif taken[-1:] == b"\r":
                wanted = _AFTER_CR
            else:
                wanted = _ANYWHERE
            try:
                chunk = await reader.readuntil(wanted)
            except asyncio.LimitOverrunError as overrun:
                chunk = await reader.read(overrun.consumed)
                ended = False
            else:
                # The end when what was taken before supplies the rest of the CRLF, or when
                # a CRLF comes just ahead of the dot.
                ended = chunk == wanted or chunk.endswith(CRLF, 0, len(chunk) - 3)
            body.take(chunk[:-3] if ended else chunk)
            if ended:
                return
            taken = chunk[-2:] if len(chunk) >= 2 else (taken + chunk)[-2:]
