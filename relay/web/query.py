"""A search as the URL carries it: the filters of `relay log`, a page size and a keyset cursor.

The parameter names are the CLI's option names (`rcpt`, `from`, `message-id`, `key`, `client`,
`event`, `since`, `until`, `limit`), plus `queue-id`, `user`, `rule` and `strategy`. Times are
read as the CLI reads them with `--utc`: `2h` is two hours ago, a time without a zone is UTC.
So a search can be shared as a link, and its export matches `relay log --utc` with the same
options.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from multidict import MultiMapping

from relay.errors import UsageError
from relay.review import parse_events, parse_limit, parse_when
from relay.store.reader import Cursor, EventFilter

__all__ = [
    "FIELDS",
    "PAGE_LIMIT",
    "Search",
    "SearchError",
    "format_cursor",
    "parse_cursor",
    "parse_search",
    "parse_window",
    "search_url",
]

# (URL parameter, label) in the order the form shows them.
FIELDS = (
    ("rcpt", "Recipient"),
    ("from", "Sender"),
    ("message-id", "Message-ID"),
    ("key", "Dedupe key"),
    ("queue-id", "Queue id"),
    ("client", "Client address"),
    ("user", "User"),
    ("rule", "Rule"),
    ("strategy", "Strategy"),
    ("since", "Since"),
    ("until", "Until"),
)
PAGE_LIMIT = 50
MAX_PAGE = 500
EXPORT_LIMIT = 1000
MAX_EXPORT = 100_000


class SearchError(ValueError):
    """A filter the page cannot use; `field` names the input to point the user at."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Search:
    """`params` are the non-empty filters as given, to refill the form and build links."""

    params: dict[str, str]
    filter: EventFilter
    before: Cursor | None = None
    after: Cursor | None = None

    @property
    def filtered(self) -> bool:
        return any(name in self.params for name, _ in FIELDS) or "event" in self.params


def format_cursor(cursor: Cursor) -> str:
    """repr() of a float reads back as the same float, so the cursor lands exactly."""
    return f"{cursor.ts!r}_{cursor.id}"


def parse_cursor(text: str, field: str) -> Cursor:
    ts, _, ident = text.partition("_")
    try:
        return Cursor(float(ts), int(ident))
    except ValueError:
        raise SearchError(field, f"{field}: {text!r} is not a page position") from None


def _text(query: MultiMapping[str], name: str) -> str | None:
    values = [v.strip() for v in query.getall(name, []) if v.strip()]
    return ",".join(values) if values else None


def parse_window(
    since: str | None, until: str | None, now: float
) -> tuple[float | None, float | None]:
    """`since` and `until` as the CLI reads them with --utc; None stays open-ended."""
    times: list[float | None] = []
    for name, text in (("since", since), ("until", until)):
        try:
            times.append(None if not text else parse_when(text, now, utc=True, option=name))
        except UsageError as exc:
            raise SearchError(name, str(exc)) from None
    start, end = times
    if start is not None and end is not None and start > end:
        raise SearchError("since", "since: later than until")
    return start, end


def parse_search(query: MultiMapping[str], now: float, *, export: bool = False) -> Search:
    """The URL's filters as an EventFilter; bad input is a SearchError naming the field."""
    params = {name: value for name, _ in FIELDS if (value := _text(query, name)) is not None}
    events = _text(query, "event")
    if events is not None:
        params["event"] = events
    limit_text = _text(query, "limit")
    default, most = (EXPORT_LIMIT, MAX_EXPORT) if export else (PAGE_LIMIT, MAX_PAGE)
    limit = default
    if limit_text is not None:
        try:
            limit = parse_limit(limit_text)
        except UsageError:
            raise SearchError("limit", f"limit: {limit_text!r} is not a positive number") from None
        if limit > most:
            raise SearchError("limit", f"limit: at most {most}")
        params["limit"] = limit_text
    since, until = parse_window(params.get("since"), params.get("until"), now)
    try:
        event_names = parse_events([events]) if events else ()
    except UsageError as exc:
        raise SearchError("event", str(exc).removeprefix("--")) from None
    f = EventFilter(
        since=since,
        until=until,
        events=event_names,
        message_id=params.get("message-id"),
        key=params.get("key"),
        rcpt=params.get("rcpt"),
        sender=params.get("from"),
        client=params.get("client"),
        limit=limit,
        queue_id=params.get("queue-id"),
        user=params.get("user"),
        strategy=params.get("strategy"),
        rule=params.get("rule"),
    )
    before = after = None
    if not export:
        if (text := _text(query, "before")) is not None:
            before = parse_cursor(text, "before")
        if (text := _text(query, "after")) is not None:
            after = parse_cursor(text, "after")
    return Search(params, f, before, after)


def search_url(path: str, params: Mapping[str, str], **changes: str | None) -> str:
    """`path` with the filters in `params`, changed by `changes` (None removes one)."""
    merged = {**params, **{k.replace("_", "-"): v for k, v in changes.items()}}
    pairs = [(k, v) for k, v in merged.items() if v is not None and v != ""]
    return path + ("?" + urlencode(pairs) if pairs else "")
