"""The one place that decides what an upstream reply or failure means for a recipient.

Temporary means try again later, permanent means never, ambiguous means the
upstream may have the message: the connection was lost after the payload was
sent and before its reply arrived (RFC 1047).
"""

from __future__ import annotations

import re
import ssl
from enum import StrEnum

import aiosmtplib

__all__ = ["Kind", "classify", "classify_error", "upstream_queue_id"]


class Kind(StrEnum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"
    AMBIGUOUS = "ambiguous"


def classify(code: int, stage: str = "data") -> Kind:
    """`stage` is session (greeting, EHLO, STARTTLS, AUTH), mail, rcpt or data."""
    if 200 <= code < 300:
        return Kind.DELIVERED
    if 500 <= code < 600:
        # A refusal before MAIL judges the relay (a bad password, a blocked IP), not the
        # message: failing every queued message for it would lose mail that got a 250.
        if stage == "session":
            return Kind.TEMPORARY
        # RFC 5321 4.5.3.1.10: 552 to RCPT means "too many recipients", a temporary condition.
        if code == 552 and stage == "rcpt":
            return Kind.TEMPORARY
        return Kind.PERMANENT
    return Kind.TEMPORARY


def classify_error(
    error: BaseException, *, payload_sent: bool, stage: str = "data"
) -> tuple[Kind, int | None, str]:
    """A failure as an exception: a refusal, a timeout, a lost connection, TLS trouble."""
    if isinstance(error, aiosmtplib.SMTPResponseException):
        return classify(error.code, stage), error.code, error.message
    text = _describe(error)
    if payload_sent and isinstance(error, aiosmtplib.SMTPException | OSError | TimeoutError):
        return Kind.AMBIGUOUS, None, f"connection lost after the message was sent: {text}"
    if isinstance(error, UnicodeEncodeError):
        return Kind.PERMANENT, None, "a non-ASCII address in a message not sent with SMTPUTF8"
    return Kind.TEMPORARY, None, text


def _describe(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {error.verify_message}"
    if isinstance(error, TimeoutError | aiosmtplib.SMTPTimeoutError):
        return "timed out waiting for the upstream"
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


_QUEUE_ID_PATTERNS = (
    re.compile(r"queued as\s+([A-Za-z0-9._\-]+)", re.IGNORECASE),  # Postfix, SendGrid
    re.compile(r"\bid=([A-Za-z0-9._\-]+)"),  # Exim
    re.compile(r"\bOK\s+\d+\s+(\S+)\s+-\s+gsmtp", re.IGNORECASE),  # Gmail
    re.compile(r"^(?:2\.\d\.\d\s+)?Ok\s+([0-9a-f]{16,}-[0-9a-f-]+)", re.IGNORECASE),  # SES
    re.compile(r"<([^<>\s]+)>\s+(?:Message\s+)?accepted", re.IGNORECASE),
)


def upstream_queue_id(reply: str) -> str | None:
    """The upstream's own id for the message, so its logs can be matched to ours."""
    for pattern in _QUEUE_ID_PATTERNS:
        match = pattern.search(reply)
        if match:
            return match.group(1).rstrip(".")
    return None
