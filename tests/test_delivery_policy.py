"""Delivery policy from tables: backoff, each recipient's fate, and what an upstream reply means."""

from __future__ import annotations

import ssl
from dataclasses import replace

import aiosmtplib
import pytest

from relay.config import Config, DedupeConfig, DeliveryConfig, from_mapping
from relay.delivery import backoff, next_attempt, recipient_outcome
from relay.store import Lease, RecipientUpdate
from relay.upstream import RecipientResult
from relay.upstream.replies import Kind, Stage, classify, classify_error, throttled

LOW = lambda a, b: a  # noqa: E731 - the jitter's extremes
HIGH = lambda a, b: b  # noqa: E731
NONE = lambda a, b: 1.0  # noqa: E731


def config(**delivery: object) -> Config:
    base = from_mapping(
        {"upstream": {"url": "smtp://127.0.0.1:2525"}, "store": {"path": "/tmp/unused.db"}},
        check_paths=False,
    )
    return replace(base, delivery=replace(DeliveryConfig(), **delivery))  # type: ignore[arg-type]


# --- backoff -----------------------------------------------------------------

BACKOFF = config(retry_initial=60.0, retry_max=3600.0)


@pytest.mark.parametrize(
    ("attempts", "low", "middle", "high"),
    [
        (0, 48.0, 60.0, 72.0),  # a zeroth attempt never backs off less than the first
        (1, 48.0, 60.0, 72.0),
        (2, 96.0, 120.0, 144.0),
        (3, 192.0, 240.0, 288.0),
        (6, 1536.0, 1920.0, 2304.0),
        (7, 2880.0, 3600.0, 3600.0),  # the jitter never lifts a delay past retry_max
        (30, 2880.0, 3600.0, 3600.0),  # capped before the jitter, so it still spreads
    ],
)
def test_backoff_doubles_from_initial_with_jitter_and_stops_at_max(
    attempts: int, low: float, middle: float, high: float
) -> None:
    assert backoff(BACKOFF, attempts, LOW) == pytest.approx(low)
    assert backoff(BACKOFF, attempts, NONE) == pytest.approx(middle)
    assert backoff(BACKOFF, attempts, HIGH) == pytest.approx(high)


def lease(received_at: float = 1000.0, attempts: int = 1) -> Lease:
    return Lease(
        queue_id="Q1",
        sender="s@x.org",
        recipients=("a@x.org",),
        received_at=received_at,
        attempts=attempts,
        message_id=None,
        key="k",
        strategy="message-id",
        scope="global",
        size=10,
        smtputf8=False,
        body8bit=False,
        duplicate_of=None,
    )


@pytest.mark.parametrize(
    ("now", "attempts", "expected"),
    [
        (1000.0, 1, 1060.0),  # backoff from now
        (1000.0, 3, 1240.0),
        (5000.0, 1, 5000.0),  # the last try is at max_age; never in the past
        (4900.0, 3, 5000.0),  # a backoff past max_age is cut to it
        (4950.0, 1, 5000.0),
    ],
)
def test_next_attempt_is_after_the_backoff_but_never_past_max_age(
    now: float, attempts: int, expected: float
) -> None:
    policy = config(retry_initial=60.0, retry_max=3600.0, max_age=4000.0)
    assert next_attempt(policy, lease(1000.0, attempts), now, NONE) == pytest.approx(expected)


# --- each recipient's fate -----------------------------------------------------

YOUNG, OLD = 1500.0, 6000.0  # received at 1000 with max_age 4000: OLD is past it


@pytest.mark.parametrize(
    ("kind", "now", "on_ambiguous", "release", "state", "event", "released"),
    [
        (Kind.DELIVERED, YOUNG, "retry", True, "delivered", "delivered", False),
        (Kind.DELIVERED, OLD, "retry", True, "delivered", "delivered", False),
        (Kind.PERMANENT, YOUNG, "retry", True, "failed", "failed", True),
        (Kind.PERMANENT, YOUNG, "retry", False, "failed", "failed", False),
        (Kind.TEMPORARY, YOUNG, "retry", True, "queued", "deferred", False),
        (Kind.TEMPORARY, OLD, "retry", True, "expired", "expired", True),
        (Kind.TEMPORARY, OLD, "retry", False, "expired", "expired", False),
        (Kind.AMBIGUOUS, YOUNG, "retry", True, "queued", "ambiguous", False),
        (Kind.AMBIGUOUS, OLD, "retry", True, "expired", "expired", True),
        (Kind.AMBIGUOUS, YOUNG, "hold", True, "held", "ambiguous", False),
        (Kind.AMBIGUOUS, OLD, "hold", True, "held", "ambiguous", False),
        (Kind.TEMPORARY, YOUNG, "hold", True, "queued", "deferred", False),
    ],
)
def test_recipient_outcome(
    kind: Kind,
    now: float,
    on_ambiguous: str,
    release: bool,
    state: str,
    event: str,
    released: bool,
) -> None:
    policy = replace(
        config(max_age=4000.0, on_ambiguous=on_ambiguous),
        dedupe=DedupeConfig(release_on_failure=release),
    )
    result = RecipientResult("a@x.org", kind, 250 if kind is Kind.DELIVERED else 451, "reply")
    update = recipient_outcome(policy, lease(1000.0), result, "UP1", now)
    assert update == RecipientUpdate(
        rcpt="a@x.org",
        state=state,  # type: ignore[arg-type]
        event=event,
        code=result.code,
        reply="reply",
        upstream_id="UP1" if state == "delivered" else None,
        release=released,
    )


def test_an_expiry_exactly_at_max_age_is_final() -> None:
    result = RecipientResult("a@x.org", Kind.TEMPORARY, 451, "later")
    update = recipient_outcome(config(max_age=4000.0), lease(1000.0), result, None, 5000.0)
    assert (update.state, update.event) == ("expired", "expired")


# --- what an upstream reply means ----------------------------------------------


@pytest.mark.parametrize(
    ("code", "stage", "kind"),
    [
        (250, "end-of-data", Kind.DELIVERED),
        # Only the reply to the payload delivers: a 2xx the session refused before it (a 200
        # greeting, a 250 to AUTH) sent nothing. MAIL and RCPT take any 2xx themselves.
        (200, "session", Kind.TEMPORARY),
        (250, "session", Kind.TEMPORARY),
        (251, "mail", Kind.TEMPORARY),
        (252, "rcpt", Kind.TEMPORARY),
        (421, "session", Kind.TEMPORARY),
        (451, "end-of-data", Kind.TEMPORARY),
        (452, "rcpt", Kind.TEMPORARY),
        # Only 354 may answer DATA: a 2xx there is no delivery, the payload was never sent.
        (250, "data", Kind.TEMPORARY),
        (451, "data", Kind.TEMPORARY),
        (554, "data", Kind.PERMANENT),
        (550, "rcpt", Kind.PERMANENT),
        (554, "end-of-data", Kind.PERMANENT),
        (552, "end-of-data", Kind.PERMANENT),
        (552, "rcpt", Kind.TEMPORARY),  # RFC 5321 4.5.3.1.10: too many recipients
        (535, "session", Kind.TEMPORARY),  # a bad password judges the relay, not the mail
        (530, "session", Kind.TEMPORARY),
        (553, "mail", Kind.PERMANENT),
        (599, "end-of-data", Kind.PERMANENT),
        (600, "mail", Kind.TEMPORARY),  # anything unexpected before the payload: try again
        # After the payload only a final reply is clear: anything else may have delivered it.
        (354, "end-of-data", Kind.AMBIGUOUS),
        (600, "end-of-data", Kind.AMBIGUOUS),
        (199, "end-of-data", Kind.AMBIGUOUS),
        (-1, "end-of-data", Kind.AMBIGUOUS),
    ],
)
def test_reply_codes(code: int, stage: Stage, kind: Kind) -> None:
    assert classify(code, stage) is kind


def untrusted() -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "self-signed certificate"
    return error


@pytest.mark.parametrize(
    ("error", "payload_sent", "kind", "text"),
    [
        (aiosmtplib.SMTPResponseException(550, "no such user"), True, Kind.PERMANENT, None),
        (aiosmtplib.SMTPResponseException(451, "later"), False, Kind.TEMPORARY, None),
        (aiosmtplib.SMTPServerDisconnected("gone"), False, Kind.TEMPORARY, "gone"),
        (aiosmtplib.SMTPServerDisconnected("gone"), True, Kind.AMBIGUOUS, "after the message"),
        (ConnectionResetError("reset"), True, Kind.AMBIGUOUS, "after the message"),
        (TimeoutError(), True, Kind.AMBIGUOUS, "timed out"),
        (aiosmtplib.SMTPTimeoutError("slow"), False, Kind.TEMPORARY, "timed out"),
        (ConnectionRefusedError(111, "refused"), False, Kind.TEMPORARY, "refused"),
        (UnicodeEncodeError("ascii", "é", 0, 1, "x"), False, Kind.PERMANENT, "non-ASCII"),
        (ValueError("odd"), False, Kind.TEMPORARY, "odd"),
        # After the payload, anything but a clear final reply leaves the message's fate open.
        (ValueError("odd"), True, Kind.AMBIGUOUS, "odd"),
        (
            aiosmtplib.SMTPResponseException(-1, "Malformed SMTP response line: ???"),
            True,
            Kind.AMBIGUOUS,
            "Malformed",
        ),
        (aiosmtplib.SMTPResponseException(354, "go ahead"), True, Kind.AMBIGUOUS, "354"),
        (untrusted(), False, Kind.TEMPORARY, "TLS certificate not trusted: self-signed"),
    ],
)
def test_failures(error: BaseException, payload_sent: bool, kind: Kind, text: str | None) -> None:
    got, code, reply = classify_error(error, payload_sent=payload_sent, stage="data")
    assert got is kind
    if isinstance(error, aiosmtplib.SMTPResponseException) and kind is not Kind.AMBIGUOUS:
        assert (code, reply) == (error.code, error.message)
    else:
        assert code is None
        assert text is not None and text in reply


def test_a_refusal_before_mail_defers_whatever_its_code() -> None:
    error = aiosmtplib.SMTPResponseException(535, "5.7.8 authentication failed")
    assert classify_error(error, payload_sent=False, stage="session")[0] is Kind.TEMPORARY


def test_jitter_spreads_retries_within_a_fifth_either_way() -> None:
    delays = {backoff(BACKOFF, 2) for _ in range(200)}
    assert len(delays) > 100
    assert all(96.0 <= d <= 144.0 for d in delays)


# --- which replies ask the relay to slow down ------------------------------------


@pytest.mark.parametrize(
    ("code", "text", "slow_down"),
    [
        (421, "4.7.0 Try again later, closing connection", True),
        (450, "4.7.1 Client host rejected: too many connections", True),
        (451, "4.7.1 Please try again later", True),
        (452, "4.5.3 Too many recipients", True),
        (454, "Throttling failure: Maximum sending rate exceeded.", True),  # Amazon SES
        (451, "4.3.0 Rate limit exceeded, try again later", True),
        (421, "4.4.2 Connection dropped", False),
        (451, "4.3.0 Temporary storage failure", False),
        (452, "4.2.2 Mailbox full", False),
        (450, "4.2.0 Greylisted: mailbox busy", False),
        (550, "5.7.1 Rate limit exceeded: daily quota", False),  # a 5xx stays final
        (250, "2.0.0 Ok", False),
        (None, "timed out", False),
    ],
)
def test_throttling_replies(code: int | None, text: str, slow_down: bool) -> None:
    assert throttled(code, text) is slow_down
