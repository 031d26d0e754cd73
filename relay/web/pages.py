"""The pages: the dashboard, the log search and its exports, and one message's timeline.

Every page is one read snapshot of the store, rendered on the server with Jinja2. Times are
UTC, the same instants `relay log --utc` prints. Nothing here writes to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import jinja2
from aiohttp import web

from relay.audit import FIELDS, Event, iso_time, to_json
from relay.headers import decoded, fields
from relay.review import (
    csv_row,
    format_seconds,
    format_time,
    info,
    message_state,
    printable,
    reply_text,
)
from relay.store.reader import (
    Bucket,
    Reader,
    ReadError,
    RecipientState,
    RepeatSource,
    Timeline,
)
from relay.web.auth import Gate
from relay.web.query import FIELDS as SEARCH_FIELDS
from relay.web.query import (
    SearchError,
    format_cursor,
    parse_search,
    parse_window,
    search_url,
)

__all__ = ["SERIES", "ReaderFactory", "Site", "message_url"]

ReaderFactory = Callable[[], AbstractAsyncContextManager[Reader]]

# The dashboard's series: (event, label, colour). Colours keep apart for common colour blindness.
SERIES = (
    ("received", "Received", "#4e79a7"),
    ("delivered", "Forwarded", "#59a14f"),
    ("duplicate", "Duplicates", "#f28e2b"),
    ("conflict", "Conflicts", "#b07aa1"),
    ("deferred", "Deferred", "#edc948"),
    ("failed", "Failed", "#e15759"),
)
RANGES = (("24h", "Last 24 hours"), ("7d", "Last 7 days"), ("30d", "Last 30 days"))
BUCKETS = {"hour": 3600.0, "day": 86400.0}
MAX_BUCKETS = 800
TOP = 10
SUPPRESSING = ("drop", "reject")
HEAD_LIMIT = 65536
MAX_TIMELINES = 20  # a key or Message-ID reused for months could name thousands of messages

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Pages name customers and their mail: not for shared caches, nor the browser's disk.
    "Cache-Control": "no-store",
}


def message_url(ident: str) -> str:
    return "/message/" + quote(ident, safe="@")


def _time(ts: float | None) -> str:
    return format_time(ts, utc=True)


# --- view models -------------------------------------------------------------


@dataclass(frozen=True)
class EventRow:
    """One event as the tables show it; `original` set on a duplicate or conflict."""

    event: Event

    @property
    def when(self) -> str:
        return _time(self.event.ts)

    @property
    def iso(self) -> str:
        return iso_time(self.event.ts)

    @property
    def rcpts(self) -> str:
        return ", ".join(printable(r) for r in self.event.rcpts) or "-"

    @property
    def sender(self) -> str:
        return "-" if self.event.sender is None else printable(self.event.sender) or "<>"

    @property
    def original(self) -> str | None:
        return self.event.original if self.event.event in ("duplicate", "conflict") else None

    @property
    def info(self) -> str:
        """The CLI's INFO column, without the "of ORIGINAL" the page shows as a link."""
        e = self.event
        if self.original is not None:
            action = f"action={e.action}" if e.action else ""
            return " ".join(p for p in (e.strategy or "", action, printable(e.detail or "")) if p)
        return info(e)


@dataclass(frozen=True)
class Explained:
    """A recipient's state now, with what it means for the person asking."""

    recipient: RecipientState

    @property
    def reply(self) -> str:
        r = self.recipient
        return reply_text(r.code, r.reply, r.upstream_id) or "-"

    @property
    def when(self) -> str:
        return _time(self.recipient.updated_at)


@dataclass
class TimelineView:
    timeline: Timeline
    summary: list[tuple[str, str, str | None]] = field(default_factory=list)
    repeat_of: Event | None = None
    events: list[EventRow] = field(default_factory=list)
    recipients: list[Explained] = field(default_factory=list)
    headers: list[tuple[str, str]] | None = None

    @property
    def queue_id(self) -> str:
        return self.timeline.queue_id

    @property
    def repeats(self) -> tuple[str, ...]:
        return self.timeline.repeats

    @property
    def held(self) -> list[Explained]:
        return [r for r in self.recipients if r.recipient.state == "held"]

    @property
    def ambiguous(self) -> bool:
        return any(row.event.event == "ambiguous" for row in self.events)

    @property
    def several_messages(self) -> bool:
        return any(r.recipient.queue_id != self.queue_id for r in self.recipients)


def _summary(t: Timeline) -> list[tuple[str, str, str | None]]:
    """Label, text and link for the facts at the top of a timeline."""
    m = t.message
    first = next((e for e in t.events if e.queue_id == t.queue_id), None)
    message_id = m.message_id if m else first.message_id if first else None
    key = m.key if m else first.key if first else None
    strategy = m.strategy if m else first.strategy if first else None
    sender = m.sender if m else first.sender if first else None
    client = m.client if m else first.client if first else None
    user = first.user if first else None
    rows: list[tuple[str, str, str | None]] = [("Queue id", t.queue_id, None)]
    if message_id:
        rows.append(("Message-ID", f"<{printable(message_id)}>", None))
    if key:
        rows.append(("Dedupe key", f"{strategy}: {printable(key)}", None))
    rows.append(("From", printable(sender or "") or "<>", None))
    rows.append(("Client", client or "-", None))
    if user:
        rows.append(("User", printable(user), None))
    if m is not None:
        rows.append(("Received", f"{_time(m.received_at)}, {m.size} bytes", None))
    rows.append(("State", message_state(t, first, utc=True), None))
    if m is not None and m.duplicate_of:
        rows.append(("Tagged", f"duplicate of {m.duplicate_of}", message_url(m.duplicate_of)))
    return rows


def timeline_view(t: Timeline, head: bytes | None) -> TimelineView:
    own = [e for e in t.events if e.queue_id == t.queue_id]
    view = TimelineView(
        timeline=t,
        summary=_summary(t),
        repeat_of=next((e for e in own if e.event in ("duplicate", "conflict")), None),
        events=[EventRow(e) for e in t.events],
        recipients=[Explained(r) for r in t.recipients],
    )
    if head is not None:
        view.headers = [(f.name, printable(decoded(f.value))) for f in fields(head)]
    return view


@dataclass(frozen=True)
class SourceRow:
    name: str
    repeats: int
    suppressed: int
    url: str | None


def _sources(
    found: Sequence[RepeatSource], since: float, until: float
) -> list[tuple[str, str, list[SourceRow]]]:
    """Top clients, users, rules and strategies by suppressed repeats, each a link to the log."""
    window = {"event": "duplicate", "since": iso_time(since), "until": iso_time(until)}
    tables = []
    for title, param, attr in (
        ("Clients", "client", "client"),
        ("Users", "user", "user"),
        ("Rules", "rule", "rule"),
        ("Strategies", "strategy", "strategy"),
    ):
        totals: dict[str | None, list[int]] = {}
        for s in found:
            counts = totals.setdefault(getattr(s, attr), [0, 0])
            counts[0] += s.count
            if s.action in SUPPRESSING:
                counts[1] += s.count
        ranked = sorted(totals.items(), key=lambda kv: (-kv[1][1], -kv[1][0], kv[0] or ""))
        rows = [
            SourceRow(
                name=name if name is not None else f"(no {param})",
                repeats=repeats,
                suppressed=suppressed,
                url=None if name is None else search_url("/log", window, **{param: name}),
            )
            for name, (repeats, suppressed) in ranked[:TOP]
        ]
        tables.append((title, param, rows))
    return tables


def _chart(
    buckets: Iterable[Bucket], since: float, until: float, width: float
) -> tuple[list[float], dict[str, list[int]]]:
    """Every bucket in the window, empty ones as zero, so the time axis has no gaps."""
    first = int(since // width)
    starts = [n * width for n in range(first, int(until // width) + 1)]
    counts = {event: [0] * len(starts) for event, _, _ in SERIES}
    for b in buckets:
        slot = int(b.start // width) - first
        if b.event in counts and 0 <= slot < len(starts):
            counts[b.event][slot] += b.count
    return starts, counts


def _csv(events: Sequence[Event]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)
    writer.writerows(csv_row(e, utc=True) for e in events)
    return out.getvalue()


def _json_array(events: Sequence[Event]) -> str:
    if not events:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(to_json(e), ensure_ascii=False) for e in events) + "\n]\n"


# --- the site ----------------------------------------------------------------


class Site:
    """The page handlers, sharing one template environment, reader factory and gate."""

    def __init__(
        self,
        reader_factory: ReaderFactory,
        gate: Gate,
        *,
        show_headers: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._readers = reader_factory
        self._gate = gate
        self._show_headers = show_headers
        self._clock = clock
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("relay.web", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._env.globals.update(
            message_url=message_url,
            search_url=search_url,
            format_cursor=format_cursor,
            iso_time=iso_time,
            time=_time,
            seconds=format_seconds,
            search_fields=SEARCH_FIELDS,
        )

    # --- plumbing ----------------------------------------------------------

    def render(
        self, request: web.Request, template: str, context: Mapping[str, Any]
    ) -> web.Response:
        page = self._env.get_template(template).render(
            user=Gate.user(request), auth=self._gate.enabled, path=request.path, **context
        )
        return web.Response(text=page, content_type="text/html", headers=SECURITY_HEADERS)

    @contextlib.asynccontextmanager
    async def _snapshot(self, request: web.Request) -> AsyncIterator[Reader]:
        try:
            async with self._readers() as reader, reader.snapshot():
                yield reader
        except ReadError as exc:
            page = self.render(request, "error.html", {"title": "Store unavailable", "error": exc})
            raise web.HTTPServiceUnavailable(
                text=page.text, content_type="text/html", headers=SECURITY_HEADERS
            ) from None

    def _error(
        self, request: web.Request, status: int, template: str, **context: Any
    ) -> web.Response:
        response = self.render(request, template, context)
        response.set_status(status)
        return response

    # --- dashboard ---------------------------------------------------------

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        now = self._clock()
        query = request.query
        since_text = query.get("since", "").strip() or "24h"
        try:
            start, end = parse_window(since_text, query.get("until", "").strip(), now)
        except SearchError as exc:
            return self._error(request, 400, "error.html", title="Dashboard", error=str(exc))
        since = now - 86400.0 if start is None else start
        until = now if end is None else end
        bucket = query.get("bucket") or ("hour" if until - since <= 3 * 86400 else "day")
        if bucket not in BUCKETS:
            return self._error(
                request, 400, "error.html", title="Dashboard", error="bucket: use hour or day"
            )
        if (until - since) / BUCKETS[bucket] > MAX_BUCKETS:
            bucket = "day"
        width = BUCKETS[bucket]
        async with self._snapshot(request) as reader:
            buckets = await reader.activity(since, until, width, [e for e, _, _ in SERIES])
            sources = await reader.repeat_sources(since, until)
            queue = await reader.queue_depth()
        starts, counts = _chart(buckets, since, until, width)
        label_format = "%Y-%m-%d %H:%M" if bucket == "hour" else "%Y-%m-%d"
        labels = [time.strftime(label_format, time.gmtime(s)) for s in starts]
        chart = {
            "labels": labels,
            "series": [
                {"event": e, "label": label, "color": color, "counts": counts[e]}
                for e, label, color in SERIES
            ],
        }
        repeats = sum(s.count for s in sources)
        suppressed = sum(s.count for s in sources if s.action in SUPPRESSING)
        oldest = min((q.oldest for q in queue if q.oldest is not None), default=None)
        window = {"since": iso_time(since), "until": iso_time(until)}
        return self.render(
            request,
            "dashboard.html",
            {
                "title": "Dashboard",
                "since": since,
                "until": until,
                "since_text": since_text,
                "ranges": RANGES,
                "bucket": bucket,
                "chart": chart,
                "rows": [
                    (label, [counts[e][n] for e, _, _ in SERIES]) for n, label in enumerate(labels)
                ],
                "series": SERIES,
                "totals": {e: sum(counts[e]) for e, _, _ in SERIES},
                "repeats": repeats,
                "suppressed": suppressed,
                "sources": _sources(sources, since, until),
                "queue": queue,
                "pending": sum(q.messages for q in queue),
                "oldest": oldest,
                "oldest_age": None if oldest is None else max(now - oldest, 0.0),
                "window": window,
            },
        )

    # --- log ---------------------------------------------------------------

    async def log(self, request: web.Request) -> web.StreamResponse:
        try:
            search = parse_search(request.query, self._clock())
        except SearchError as exc:
            params = {k: v for k, v in request.query.items() if k not in ("before", "after")}
            return self._error(
                request,
                400,
                "log.html",
                title="Log",
                search=None,
                params=params,
                error=exc,
                page=None,
            )
        async with self._snapshot(request) as reader:
            page = await reader.search(search.filter, before=search.before, after=search.after)
        return self.render(
            request,
            "log.html",
            {
                "title": "Log",
                "search": search,
                "params": search.params,
                "error": None,
                "page": page,
                "rows": [EventRow(e) for e in page.events],
                "first_page": search.before is None and search.after is None,
            },
        )

    async def _export_events(self, request: web.Request) -> tuple[Event, ...]:
        try:
            search = parse_search(request.query, self._clock(), export=True)
        except SearchError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        async with self._snapshot(request) as reader:
            page = await reader.search(search.filter)
        return tuple(reversed(page.events))

    async def export_csv(self, request: web.Request) -> web.StreamResponse:
        """The rows `relay log --csv --utc` prints for the same filters, oldest first."""
        events = await self._export_events(request)
        text = await asyncio.to_thread(_csv, events)  # up to 100,000 rows: not on the mail loop
        return self._download(text, "text/csv", "dedup-relay-log.csv")

    async def export_json(self, request: web.Request) -> web.StreamResponse:
        """A JSON array of the objects `relay log --json` prints, one per line, oldest first."""
        events = await self._export_events(request)
        text = await asyncio.to_thread(_json_array, events)
        return self._download(text, "application/json", "dedup-relay-log.json")

    @staticmethod
    def _download(text: str, content_type: str, filename: str) -> web.Response:
        headers = {**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{filename}"'}
        return web.Response(text=text, content_type=content_type, headers=headers)

    # --- one message -------------------------------------------------------

    async def message(self, request: web.Request) -> web.StreamResponse:
        ident = request.match_info["ident"].strip()
        async with self._snapshot(request) as reader:
            found = await reader.find(ident) if ident else []
            views = []
            for queue_id in found[-MAX_TIMELINES:]:
                timeline = await reader.timeline(queue_id)
                head = None
                if self._show_headers and timeline.message is not None:
                    head = await reader.message_head(queue_id, HEAD_LIMIT)
                views.append(timeline_view(timeline, head))
        if not views:
            return self._error(
                request, 404, "not_found.html", title="No such message", ident=printable(ident)
            )
        return self.render(
            request,
            "message.html",
            {
                "title": f"Message {views[0].queue_id}",
                "ident": printable(ident),
                "views": views,
                "left_out": len(found) - len(views),
                "show_headers": self._show_headers,
            },
        )

    # --- login -------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        return await self._gate.login_form(request, self.render)

    async def login(self, request: web.Request) -> web.StreamResponse:
        return await self._gate.login(request, self.render)

    async def logout(self, request: web.Request) -> web.StreamResponse:
        return await self._gate.logout(request)
