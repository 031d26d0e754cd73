"""Prometheus metrics: counters derived from committed audit events, gauges read from the store.

The counters are fed by the store's `on_commit` hook with the very events the store has just
committed, the same rows `relay stats` counts, so the two cannot disagree. Nothing on the mail
path increments a counter of its own. Queue depth is read from the store when scraped (cached
briefly), so every process sharing a store reports the same store-wide figure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from relay import __version__
from relay.audit import EVENTS, Event
from relay.ids import queue_id_time
from relay.store import QueueDepth

__all__ = ["OUTCOMES", "QUEUE_CACHE_SECONDS", "REPLY_CLASSES", "Metrics"]

log = logging.getLogger(__name__)

# The audit events that report a recipient's outcome after an attempt (or a crash).
OUTCOMES = ("delivered", "deferred", "failed", "expired", "ambiguous")
REPLY_CLASSES = ("2xx", "4xx", "5xx", "none")
QUEUE_CACHE_SECONDS = 2.0

# Seconds: an SMTP transaction to a provider takes tens of milliseconds to a timeout's minutes.
_ATTEMPT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Seconds from 250 to delivered: includes retries, so up to the days of delivery.max_age.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# `*_created` series double the output and Prometheus's text format has no use for them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def _label(value: str | None) -> str:
    return value if value else "none"


def _rule(event: Event) -> str:
    """The store writes the matching rule into the event's detail as `rule=NAME`."""
    detail = event.detail or ""
    return detail[len("rule=") :] if detail.startswith("rule=") else "none"


def _reply_class(code: int | None) -> str:
    return f"{code // 100}xx" if code is not None and 200 <= code < 600 else "none"


class Metrics:
    """One registry per relay process (not the library's global one, so tests can run many)."""

    def __init__(self, instance: str, *, queue_cache: float = QUEUE_CACHE_SECONDS) -> None:
        self.registry = CollectorRegistry()
        self.queue_cache = queue_cache
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Gauge(
            "dedup_relay_build_info",
            "Always 1; the labels say which version runs under which instance name",
            ["version", "instance"],
            registry=r,
        ).labels(__version__, instance).set(1)
        self.events = Counter(
            "dedup_relay_events",
            "Audit events committed by this process, by event (what `relay stats` counts)",
            ["event"],
            registry=r,
        )
        self.received = Counter(
            "dedup_relay_messages_received",
            "Messages spooled for delivery (audit event `received`), by dedupe strategy and rule",
            ["strategy", "rule"],
            registry=r,
        )
        self.duplicates = Counter(
            "dedup_relay_duplicates",
            "Repeats caught (audit event `duplicate`), by strategy and the action taken",
            ["strategy", "action"],
            registry=r,
        )
        self.conflicts = Counter(
            "dedup_relay_conflicts",
            "Same key with different content (audit event `conflict`), by strategy and action",
            ["strategy", "action"],
            registry=r,
        )
        self.auth_failures = Counter(
            "dedup_relay_auth_failures",
            "Failed SMTP AUTH attempts at the front door (audit event `auth_failed`)",
            registry=r,
        )
        self.recipients = Counter(
            "dedup_relay_recipients",
            "Recipients per outcome of a delivery attempt",
            ["outcome"],
            registry=r,
        )
        self.replies = Counter(
            "dedup_relay_upstream_replies",
            "Distinct upstream replies per attempt, by code class (none: no reply at all)",
            ["class"],
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "dedup_relay_delivery_attempt_seconds",
            "Duration of one delivery attempt to the upstream",
            buckets=_ATTEMPT_BUCKETS,
            registry=r,
        )
        self.delivered_seconds = Histogram(
            "dedup_relay_accept_to_delivered_seconds",
            "From the relay's 250 to the upstream's acceptance, retries included",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_jobs = Histogram(
            "dedup_relay_store_batch_jobs",
            "Jobs (accepts, updates, leases) committed together in one store transaction",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "dedup_relay_store_commit_seconds",
            "Time to run and durably commit one store batch",
            buckets=_COMMIT_BUCKETS,
            registry=r,
        )
        self.sessions = Gauge(
            "dedup_relay_smtp_sessions_open", "SMTP client sessions open now", registry=r
        )
        self.queue = Gauge(
            "dedup_relay_queue_messages",
            "Messages in the store not yet finished, by state (store-wide)",
            ["state"],
            registry=r,
        )
        self.oldest = Gauge(
            "dedup_relay_queue_oldest_age_seconds",
            "Age of the oldest message not yet finished (0 when none; store-wide)",
            registry=r,
        )
        # Every label value known up front is exported as 0, so rate() and alerts see a start.
        for event in EVENTS:
            self.events.labels(event)
        for outcome in OUTCOMES:
            self.recipients.labels(outcome)
        for reply_class in REPLY_CLASSES:
            self.replies.labels(reply_class)
        self._queue_read_at: float | None = None

    # --- fed by the store --------------------------------------------------

    def observe(self, events: Sequence[Event]) -> None:
        """Count one committed batch of audit events. Never raises: the writer calls it."""
        try:
            self._observe(events)
        except Exception:
            log.exception("metrics: could not count %d committed event(s)", len(events))

    def _observe(self, events: Iterable[Event]) -> None:
        attempts: dict[tuple[str | None, float], float] = {}
        for e in events:
            self.events.labels(e.event).inc()
            if e.event == "received":
                self.received.labels(_label(e.strategy), _rule(e)).inc()
            elif e.event == "duplicate":
                self.duplicates.labels(_label(e.strategy), _label(e.action)).inc()
            elif e.event == "conflict":
                self.conflicts.labels(_label(e.strategy), _label(e.action)).inc()
            elif e.event == "auth_failed":
                self.auth_failures.inc()
            if e.event not in OUTCOMES:
                continue
            self.recipients.labels(e.event).inc(len(e.rcpts))
            if e.upstream is not None:  # None: no attempt was made (recovery after a crash)
                self.replies.labels(_reply_class(e.code)).inc()
                if e.duration is not None:
                    attempts[(e.queue_id, e.ts)] = e.duration
            if e.event == "delivered" and e.queue_id:
                received = queue_id_time(e.queue_id)
                if received is not None:
                    self.delivered_seconds.observe(max(e.ts - received, 0.0))
        # One attempt with several outcomes is several events sharing the attempt's duration.
        for duration in attempts.values():
            self.attempt_seconds.observe(duration)

    def observe_batch(self, jobs: int, seconds: float) -> None:
        self.batch_jobs.observe(jobs)
        self.commit_seconds.observe(seconds)

    # --- read when scraped -------------------------------------------------

    def watch_sessions(self, count: Callable[[], int]) -> None:
        self.sessions.set_function(count)

    async def refresh(self, read_queue: Callable[[], Awaitable[Sequence[QueueDepth]]]) -> None:
        """Re-read the queue gauges unless they were read within `queue_cache` seconds."""
        now = time.monotonic()
        if self._queue_read_at is not None and now - self._queue_read_at < self.queue_cache:
            return
        self._queue_read_at = now
        try:
            depth = await read_queue()
        except Exception as exc:
            log.warning("metrics: could not read the queue depth: %s", exc)
            return
        for q in depth:
            self.queue.labels(q.state).set(q.messages)
        oldest = min((q.oldest for q in depth if q.oldest is not None), default=None)
        self.oldest.set(0.0 if oldest is None else max(time.time() - oldest, 0.0))
