"""The review commands: `log`, `show` and `stats`, for the operator after an incident.

They answer "what came in, what was suppressed and from whom, what went
upstream with which reply, and what is still pending" from the store alone.
All SQL lives in relay.store.reader; this module parses filters and renders.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from relay.audit import EVENTS, FIELDS, Event, iso_time, to_json
from relay.config import Config, StoreConfig
from relay.errors import EXIT_FAILURE, EXIT_OK, UnitError, UsageError
from relay.escape import spreadsheet_safe
from relay.store.reader import (
    EventFilter,
    Reader,
    RecipientState,
    Stats,
    Timeline,
    open_reader,
)
from relay.units import parse_duration

__all__ = [
    "ADDRESS_WIDTH",
    "DEFAULT_LIMIT",
    "EVENT_HEADERS",
    "INFO_WIDTH",
    "add_commands",
    "clip",
    "csv_row",
    "event_filter",
    "event_row",
    "format_iso",
    "format_seconds",
    "format_time",
    "info",
    "message_state",
    "parse_events",
    "parse_limit",
    "parse_when",
    "printable",
    "render_stats",
    "render_timeline",
    "reply_text",
    "run",
    "table",
]

DEFAULT_LIMIT = 1000
INFO_WIDTH = 72
ADDRESS_WIDTH = 32


# --- argparse wiring -------------------------------------------------------


def add_commands(commands: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    log = commands.add_parser(
        "log",
        help="list audit events, newest last",
        description="List audit events from the store, oldest first; with --limit, the newest N.",
    )
    _window_args(log, since_default=None)
    log.add_argument(
        "--event",
        action="append",
        default=[],
        metavar="NAME[,NAME]",
        help=f"only these events (repeatable): {', '.join(EVENTS)}",
    )
    log.add_argument("--message-id", metavar="ID", help="Message-ID, with or without <>")
    log.add_argument("--key", help="dedupe key as recorded")
    log.add_argument("--rcpt", metavar="ADDRESS", help="one recipient (case-insensitive)")
    log.add_argument("--from", dest="sender", metavar="ADDRESS", help="envelope sender")
    log.add_argument("--client", metavar="IP", help="SMTP client address")
    log.add_argument("--user", metavar="NAME", help="authenticated (AUTH) user")
    log.add_argument(
        "--queue-id", metavar="ID", help="one message's events, as printed or in lower case"
    )
    log.add_argument(
        "--rule", metavar="NAME", help="what this dedupe rule decided (received, duplicate)"
    )
    log.add_argument(
        "--strategy",
        metavar="NAME",
        help="mail keyed this way: message-id, fingerprint or header:NAME",
    )
    log.add_argument(
        "--limit",
        default=str(DEFAULT_LIMIT),
        metavar="N",
        help=f"show the newest N matches (default {DEFAULT_LIMIT})",
    )
    _output_args(log, csv_too=True)
    config_arg(log)

    show = commands.add_parser(
        "show",
        help="the timeline of one message",
        description="Everything the store knows about one message and the repeats suppressed"
        " against it. ID is a queue id, a Message-ID (with or without <>) or a dedupe key.",
    )
    show.add_argument("ident", metavar="ID")
    _output_args(show, csv_too=False)
    config_arg(show)

    stats = commands.add_parser(
        "stats",
        help="counts, duplicates, queue depth and delivery latency",
        description="Event counts, duplicates by strategy and client and delivery latency within"
        " the window; queue depth as of now.",
    )
    _window_args(stats, since_default="24h")
    _output_args(stats, csv_too=False)
    config_arg(stats)


def _window_args(parser: argparse.ArgumentParser, since_default: str | None) -> None:
    when = "a duration ago (2h, 30m) or a time (2026-11-23T10:00:00Z, 2026-11-23 10:00)"
    default = f" (default {since_default})" if since_default else ""
    parser.add_argument("--since", default=since_default, metavar="WHEN", help=when + default)
    parser.add_argument("--until", metavar="WHEN", help=when + " (default now)")


def _output_args(parser: argparse.ArgumentParser, *, csv_too: bool) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    if csv_too:
        parser.add_argument("--csv", action="store_true", help="CSV with a header row")
    parser.add_argument(
        "--utc", action="store_true", help="show and read times in UTC, not local time"
    )


# --- parsing filters -------------------------------------------------------


def parse_when(value: str, now: float, *, utc: bool, option: str) -> float:
    """A duration means that long ago; a time without a zone is local (UTC with --utc)."""
    text = value.strip()
    if text.lower() == "now":
        return now
    try:
        return now - parse_duration(text)
    except UnitError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{option}: {value!r} is not a time (use 2h, 30m, 2026-11-23T10:00:00Z,"
            " 2026-11-23 10:00 or 2026-11-23)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC) if utc else moment.astimezone()
    return moment.timestamp()


def parse_events(values: Sequence[str]) -> tuple[str, ...]:
    names = [n.strip().lower() for v in values for n in v.split(",") if n.strip()]
    for name in names:
        if name not in EVENTS:
            raise UsageError(f"--event: unknown event {name!r} (known: {', '.join(EVENTS)})")
    return tuple(dict.fromkeys(names))


def parse_limit(value: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise UsageError(f"--limit: {value!r} is not a positive whole number")
    return limit


def _window(args: argparse.Namespace, now: float) -> tuple[float | None, float | None]:
    since = (
        None if args.since is None else parse_when(args.since, now, utc=args.utc, option="--since")
    )
    until = (
        None if args.until is None else parse_when(args.until, now, utc=args.utc, option="--until")
    )
    if since is not None and until is not None and since > until:
        raise UsageError("--since is later than --until")
    return since, until


def event_filter(args: argparse.Namespace, now: float) -> EventFilter:
    if args.json and args.csv:
        raise UsageError("--json and --csv cannot be used together")
    since, until = _window(args, now)
    return EventFilter(
        since=since,
        until=until,
        events=parse_events(args.event),
        message_id=args.message_id,
        key=args.key,
        rcpt=args.rcpt,
        sender=args.sender,
        client=args.client,
        user=args.user,
        limit=parse_limit(args.limit),
        queue_id=args.queue_id,
        strategy=args.strategy,
        rule=args.rule,
    )


# --- formatting ------------------------------------------------------------


def format_time(ts: float | None, *, utc: bool) -> str:
    if ts is None:
        return "-"
    moment = datetime.fromtimestamp(ts, UTC) if utc else datetime.fromtimestamp(ts).astimezone()
    text = moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"
    return text + "Z" if utc else text


def format_seconds(seconds: float | None) -> str:
    """Short and human: 12ms, 3.4s, 5m12s, 2h03m, 3d04h."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{max(seconds, 0) * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def printable(text: str) -> str:
    """Replies and headers come from strangers; an escape sequence must not reach the terminal."""
    return "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))


def clip(text: str, width: int) -> str:
    text = printable(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _rcpts(rcpts: Sequence[str]) -> str:
    if not rcpts:
        return "-"
    first = clip(rcpts[0], ADDRESS_WIDTH)
    return first if len(rcpts) == 1 else f"{first} +{len(rcpts) - 1}"


def reply_text(code: int | None, reply: str | None, upstream_id: str | None) -> str:
    """The upstream reply, clipped so that the upstream's queue id is never the part cut off."""
    text = " ".join(str(p) for p in (code, reply) if p is not None)
    if not upstream_id or upstream_id in clip(text, INFO_WIDTH):
        return clip(text, INFO_WIDTH)
    suffix = f" [{upstream_id}]"
    return clip(text, INFO_WIDTH - len(suffix)) + suffix


def info(e: Event) -> str:
    """The one column that says what this event is about; different per event."""
    if e.event in ("duplicate", "conflict"):
        action = f"action={e.action}" if e.action else ""
        parts = [f"of {e.original or '?'}", e.strategy or "", action, e.detail or ""]
        return clip(" ".join(p for p in parts if p), INFO_WIDTH)
    if e.code is not None or e.reply:
        text = reply_text(e.code, e.reply, e.upstream_id)
        if e.upstream and ":" not in e.upstream:
            # A named upstream (one of several): which provider answered matters.
            text = f"{e.upstream}: {text}"
        return text if not e.detail else f"{text} ({clip(e.detail, 24)})"
    if e.event == "received":
        return clip(f"<{e.message_id}>" if e.message_id else f"size={e.size}", INFO_WIDTH)
    return clip(e.detail or "", INFO_WIDTH)


def table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, right: Iterable[int] = ()
) -> list[str]:
    """Aligned columns, two spaces apart, the last one unpadded (like postqueue -p)."""
    body = [[printable(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    numeric = set(right)

    def line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(widths[i]) if i in numeric else c.ljust(widths[i])
            for i, c in enumerate(cells[:-1])
        ]
        last = len(cells) - 1
        out.append(cells[-1].rjust(widths[last]) if last in numeric else cells[-1])
        return "  ".join(out).rstrip()

    return [line(headers)] + [line(r) for r in body]


EVENT_HEADERS = ("TIME", "EVENT", "QUEUE ID", "CLIENT", "FROM", "RCPTS", "INFO")


def event_row(e: Event, *, utc: bool) -> list[str]:
    return [
        format_time(e.ts, utc=utc),
        e.event,
        e.queue_id or "-",
        e.client or "-",
        clip(e.sender or "<>", ADDRESS_WIDTH) if e.sender is not None else "-",
        _rcpts(e.rcpts),
        info(e),
    ]


def _json_line(out: TextIO, record: object) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")


def csv_row(e: Event, *, utc: bool) -> list[str]:
    record = to_json(e)
    record["ts"] = format_time(e.ts, utc=utc)
    record["rcpts"] = " ".join(e.rcpts)
    return ["" if record[f] is None else spreadsheet_safe(str(record[f])) for f in FIELDS]


# --- log -------------------------------------------------------------------


async def _log(reader: Reader, f: EventFilter, args: argparse.Namespace, out: TextIO) -> int:
    page = await reader.events(f)
    if args.json:
        for e in page.events:
            _json_line(out, to_json(e))
    elif args.csv:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(FIELDS)
        writer.writerows(csv_row(e, utc=args.utc) for e in page.events)
    elif not page.events:
        out.write("-- No entries --\n")
    else:
        rows = (event_row(e, utc=args.utc) for e in page.events)
        out.write("\n".join(table(EVENT_HEADERS, rows)) + "\n")
    if page.more:
        print(
            f"-- showing the newest {f.limit} matches; narrow with --since or raise --limit --",
            file=sys.stderr,
        )
    return EXIT_OK


# --- show ------------------------------------------------------------------


def _timeline_json(t: Timeline) -> dict[str, Any]:
    message = None
    if t.message is not None:
        m = t.message
        message = {
            "queue_id": m.queue_id,
            "state": m.state,
            "received": format_iso(m.received_at),
            "sender": m.sender,
            "size": m.size,
            "message_id": m.message_id,
            "key": m.key,
            "strategy": m.strategy,
            "client": m.client,
            "attempts": m.attempts,
            "next_attempt": format_iso(m.next_attempt),
            "finished": format_iso(m.finished_at),
            "duplicate_of": m.duplicate_of,
        }
    return {
        "queue_id": t.queue_id,
        "message": message,
        "recipients": [
            {
                "queue_id": r.queue_id,
                "rcpt": r.rcpt,
                "state": r.state,
                "code": r.code,
                "reply": r.reply,
                "upstream_id": r.upstream_id,
                "updated": format_iso(r.updated_at),
            }
            for r in t.recipients
        ],
        "repeats": list(t.repeats),
        "events": [to_json(e) for e in t.events],
    }


def format_iso(ts: float | None) -> str | None:
    return None if ts is None else iso_time(ts)


def _first(events: Sequence[Event], queue_id: str) -> Event | None:
    """The event that best describes the message: its `received`, else whatever came first."""
    own = [e for e in events if e.queue_id == queue_id]
    return next((e for e in own if e.event == "received"), own[0] if own else None)


def message_state(t: Timeline, first: Event | None, *, utc: bool) -> str:
    """The message's state in the queue, or, with none there, what `first` says became of it."""
    m = t.message
    if m is not None:
        state = f"{m.state}, {m.attempts} attempt(s)"
        if m.state == "queued" and m.next_attempt is not None:
            state += f", next {format_time(m.next_attempt, utc=utc)}"
        if m.finished_at is not None:
            state += f", finished {format_time(m.finished_at, utc=utc)}"
        return state
    if first is not None and first.event in ("duplicate", "conflict", "rejected"):
        return f"{first.event}, not spooled"
    return "no longer in the queue (purged) or never spooled"


def _summary(t: Timeline, utc: bool) -> list[tuple[str, str]]:
    m, first = t.message, _first(t.events, t.queue_id)
    lines: list[tuple[str, str]] = [("Queue id", t.queue_id)]
    message_id = m.message_id if m else first.message_id if first else None
    if message_id:
        lines.append(("Message-ID", f"<{clip(message_id, INFO_WIDTH)}>"))
    key, strategy = (
        (m.key, m.strategy) if m else (first.key, first.strategy) if first else (None, None)
    )
    if key:
        lines.append(("Key", f"{strategy}: {clip(key, INFO_WIDTH)}"))
    sender = m.sender if m else first.sender if first else None
    client = m.client if m else first.client if first else None
    lines.append(("From", f"{clip(sender or '<>', INFO_WIDTH)} via {client or '-'}"))
    if m is not None:
        lines.append(("Received", f"{format_time(m.received_at, utc=utc)}, {m.size} bytes"))
    lines.append(("State", message_state(t, first, utc=utc)))
    if m is not None and m.duplicate_of:
        lines.append(("Tagged", f"duplicate of {m.duplicate_of}"))
    if t.repeats:
        lines.append(("Repeats", ", ".join(t.repeats)))
    return lines


def _recipient_row(r: RecipientState, utc: bool) -> list[str]:
    return [
        r.rcpt,
        r.state,
        format_time(r.updated_at, utc=utc),
        reply_text(r.code, r.reply, r.upstream_id) or "-",
        r.queue_id,
    ]


def render_timeline(t: Timeline, utc: bool) -> list[str]:
    summary = _summary(t, utc)
    width = max(len(label) for label, _ in summary)
    lines = [f"{label + ':':<{width + 1}} {printable(value)}" for label, value in summary]
    if t.recipients:
        lines += ["", "Recipients:"]
        headers = ["RCPT", "STATE", "UPDATED", "REPLY", "QUEUE ID"]
        rows = [_recipient_row(r, utc) for r in t.recipients]
        if all(r.queue_id == t.queue_id for r in t.recipients):
            headers, rows = headers[:-1], [r[:-1] for r in rows]
        lines += ["  " + line for line in table(headers, rows)]
    lines += ["", "Timeline:"]
    if t.events:
        timeline = (event_row(e, utc=utc) for e in t.events)
        lines += ["  " + line for line in table(EVENT_HEADERS, timeline)]
    else:
        lines.append("  (no events left; they may have been purged)")
    return lines


async def _show(reader: Reader, ident: str, args: argparse.Namespace, out: TextIO) -> int:
    queue_ids = await reader.find(ident)
    if not queue_ids:
        print(
            f"dedup-relay: no message matches {ident!r} (queue id, Message-ID or key)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    timelines = [await reader.timeline(q) for q in queue_ids]
    if args.json:
        for t in timelines:
            _json_line(out, _timeline_json(t))
        return EXIT_OK
    blocks = ["\n".join(render_timeline(t, args.utc)) for t in timelines]
    if len(timelines) > 1:
        out.write(f"-- {printable(ident)} matches {len(timelines)} messages --\n\n")
    out.write("\n\n".join(blocks) + "\n")
    return EXIT_OK


# --- stats -----------------------------------------------------------------


def _stats_json(s: Stats, now: float) -> dict[str, Any]:
    def counts(items: Iterable[Any]) -> dict[str, int]:
        return {c.name: c.count for c in items}

    latency, oldest = s.latency, s.oldest_pending
    return {
        "since": format_iso(s.since),
        "until": format_iso(s.until),
        "events": counts(s.events),
        "duplicates_by_action": counts(s.duplicates_by_action),
        "duplicates_by_strategy": counts(s.duplicates_by_strategy),
        "duplicates_by_client": counts(s.duplicates_by_client),
        "queue": {q.state: q.messages for q in s.queue},
        "pending": s.pending,
        "oldest_pending": format_iso(oldest),
        "oldest_pending_age": _round(None if oldest is None else now - oldest),
        "latency": {
            "count": latency.count,
            "p50": _round(latency.p50),
            "p90": _round(latency.p90),
            "p99": _round(latency.p99),
            "max": _round(latency.max),
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def render_stats(s: Stats, utc: bool, now: float) -> list[str]:
    def section(title: str, items: Sequence[Any]) -> list[str]:
        rows = [[c.name, str(c.count)] for c in items] or [["(none)", "0"]]
        return ["", *table((title, "COUNT"), rows, right=(1,))]

    lines = [
        f"Window: {format_time(s.since, utc=utc)} .. {format_time(s.until, utc=utc)}"
        f" ({format_seconds(s.until - s.since)})"
    ]
    lines += section("EVENT", s.events)
    lines += section("DUPLICATES BY ACTION", s.duplicates_by_action)
    lines += section("DUPLICATES BY STRATEGY", s.duplicates_by_strategy)
    lines += section("DUPLICATES BY CLIENT", s.duplicates_by_client)
    queue_rows = [
        [q.state, str(q.messages), "-" if q.oldest is None else format_seconds(now - q.oldest)]
        for q in s.queue
    ]
    lines += ["", *table(("QUEUE (NOW)", "MESSAGES", "OLDEST AGE"), queue_rows, right=(1, 2))]
    oldest = s.oldest_pending
    lines.append(
        f"Pending: {s.pending}"
        + (f", oldest received {format_time(oldest, utc=utc)}" if oldest is not None else "")
    )
    lat = s.latency
    values = (lat.p50, lat.p90, lat.p99, lat.max)
    lines += [
        "",
        *table(
            ("DELIVERY LATENCY", "COUNT", "P50", "P90", "P99", "MAX"),
            [["received -> delivered", str(lat.count), *(format_seconds(v) for v in values)]],
            right=range(1, 6),
        ),
    ]
    return lines


async def _stats(
    reader: Reader, window: tuple[float, float], args: argparse.Namespace, out: TextIO, now: float
) -> int:
    s = await reader.stats(*window)
    if args.json:
        _json_line(out, _stats_json(s, now))
    else:
        out.write("\n".join(render_stats(s, args.utc, now)) + "\n")
    return EXIT_OK


# --- entry -----------------------------------------------------------------

Job = Callable[[Reader], Awaitable[int]]


def _job(args: argparse.Namespace, now: float) -> Job:
    """Every filter is parsed before the store is opened, so bad input never touches it."""
    out = sys.stdout
    if args.command == "log":
        f = event_filter(args, now)
        return lambda reader: _log(reader, f, args, out)
    if args.command == "show":
        return lambda reader: _show(reader, args.ident, args, out)
    since, until = _window(args, now)
    until = now if until is None else until
    window = (until - 86400.0 if since is None else since, until)
    return lambda reader: _stats(reader, window, args, out, now)


def run(args: argparse.Namespace, config: Config) -> int:
    """Bad filters raise UsageError and an unreadable store ReadError; the CLI prints them."""
    job = _job(args, time.time())
    try:
        return asyncio.run(_with_reader(config.store, job))
    except BrokenPipeError:
        # `log | head`: the reader left; point stdout at /dev/null so the exit flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


async def _with_reader(store: StoreConfig, job: Job) -> int:
    async with open_reader(store) as reader, reader.snapshot():
        return await job(reader)
