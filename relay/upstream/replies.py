"""The one place that decides what an upstream reply or failure means for a recipient.

Temporary means try again later, permanent means never, ambiguous means the
upstream may have the message: the payload was sent and no clear reply to it
arrived (RFC 1047). Whether a reply asks the relay to slow down (`throttled`) and
whether a failure makes the upstream itself unusable (`unusable`) are decided
here too.
"""

from __future__ import annotations

import re
import ssl
from enum import StrEnum
from typing import Literal

import aiosmtplib

__all__ = [
    "Kind",
    "Stage",
    "classify",
    "classify_error",
    "throttled",
    "unsendable",
    "unusable",
    "upstream_queue_id",
]

# session: greeting, EHLO, STARTTLS, AUTH; data: the reply to the DATA command;
# end-of-data: the reply to the payload itself.
Stage = Literal["session", "mail", "rcpt", "data", "end-of-data"]


class Kind(StrEnum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"
    AMBIGUOUS = "ambiguous"


def classify(code: int, stage: Stage) -> Kind:
    """A reply code at one stage of the transaction.

    Only a final reply to the payload (2xx, 4xx, 5xx) says what became of a message that
    was sent; anything else there is ambiguous. Only that reply can deliver: a 2xx before
    it that reaches this function is one the session did not accept (a 200 greeting, a
    250 to AUTH, a 250 to DATA instead of 354), and no payload went: temporary.
    """
    if stage == "end-of-data":
        if 200 <= code < 300:
            return Kind.DELIVERED
        if 400 <= code < 500:
            return Kind.TEMPORARY
        if 500 <= code < 600:
            return Kind.PERMANENT
        return Kind.AMBIGUOUS
    if 200 <= code < 300:
        return Kind.TEMPORARY
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


_NETWORK = (aiosmtplib.SMTPException, OSError, TimeoutError)


def classify_error(
    error: BaseException, *, payload_sent: bool, stage: Stage
) -> tuple[Kind, int | None, str]:
    """A failure as an exception: a refusal, a timeout, a lost connection, TLS trouble.

    Once the payload is out, only a well-formed final reply is clear; a garbled line,
    an odd code, a timeout or a lost connection leave the message's fate unknown.
    """
    if isinstance(error, aiosmtplib.SMTPResponseException):
        if payload_sent:
            kind = classify(error.code, "end-of-data")
            if kind is not Kind.AMBIGUOUS:
                return kind, error.code, error.message
            text = f"{error.code} {error.message}".strip()[:300]
            return Kind.AMBIGUOUS, None, f"no clear reply after the message was sent: {text}"
        return classify(error.code, stage), error.code, error.message
    text = _describe(error)
    if payload_sent:
        if isinstance(error, _NETWORK):
            return Kind.AMBIGUOUS, None, f"connection lost after the message was sent: {text}"
        return Kind.AMBIGUOUS, None, f"no clear reply after the message was sent: {text}"
    if isinstance(error, UnicodeEncodeError):
        return Kind.PERMANENT, None, unsendable(error)
    return Kind.TEMPORARY, None, text


def unsendable(error: ValueError) -> str:
    """Why the client library refused to write an address on a command line."""
    if isinstance(error, UnicodeEncodeError):
        return "a non-ASCII address in a message not sent with SMTPUTF8"
    return "the address cannot be written on an SMTP command line"


def unusable(error: BaseException, stage: Stage, code: int | None) -> bool:
    """The upstream itself failed before the payload: another upstream may take the message.

    Anything before MAIL (connect, TLS, greeting, EHLO, AUTH), a 421 at any stage, and a
    connection that died or timed out mid-transaction. A refusal of this message (a 4xx
    or 5xx to MAIL, RCPT or DATA) is not: it would be the same elsewhere.
    """
    if stage == "session" or code == 421:
        return True
    if isinstance(error, aiosmtplib.SMTPResponseException):
        return False
    return isinstance(error, _NETWORK)


_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_THROTTLE_TEXT = re.compile(
    r"rate.?limit|throttl|too many (?:messages|mails|e-?mails|connections|requests|recipients)"
    r"|(?:sending|send|message) (?:rate|quota)|quota exceeded|exceeded .*(?:rate|quota)"
    r"|slow down|too fast",
    re.IGNORECASE,
)


def throttled(code: int | None, text: str) -> bool:
    """A temporary refusal that means "you are sending too fast" rather than "not now".

    421/450/451 with an enhanced status 4.7.x, 452 4.5.3, or provider wording such as
    "rate limit exceeded", "throttled", "too many messages". A 5xx is final whatever its
    text, as it always is.
    """
    if code is None or not 400 <= code < 500:
        return False
    status = _ENHANCED.match(text)
    if status is not None:
        detail = (int(status.group(2)), int(status.group(3)))
        if code in (421, 450, 451) and detail[0] == 7:
            return True
        if code == 452 and detail == (5, 3):
            return True
    return _THROTTLE_TEXT.search(text) is not None


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
