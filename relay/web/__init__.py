"""Log review in the browser: a dashboard, the log search, one message's timeline, exports.

Read-only, server-rendered (Jinja2), with one small script that draws the dashboard's chart
with Chart.js, shipped in `static/` so a `pip install` serves a working page with no network.

The HTTP side port mounts these pages at `/` next to its health and metrics paths:

    app.add_routes(relay.web.routes(config, users_file=config.http.users_file))
    # or, as a callable that does that: relay.web.mount(config, users_file=...)

`create_app` wraps the same routes in an application of their own (tests, a separate port).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from aiohttp import web

from relay.config import Config
from relay.store.reader import open_reader
from relay.web.auth import Gate
from relay.web.pages import ReaderFactory, Site
from relay.web.users import load_users, users_file_option

__all__ = [
    "STATIC",
    "ReaderFactory",
    "create_app",
    "load_users",
    "mount",
    "routes",
    "users_file_option",
]

STATIC = Path(str(files("relay.web") / "static"))


def routes(
    config: Config,
    reader_factory: ReaderFactory | None = None,
    *,
    users_file: str | None = None,
    login_failure_delay: float = 0.5,
    clock: Callable[[], float] | None = None,
) -> list[web.AbstractRouteDef]:
    """The page routes, each behind the login when `users_file` is set; static files are open.

    `reader_factory` opens a read-only view of the store per request (default: the CLI's
    read-only connection to the store the config names). Headers of a message are shown only
    when the relay keeps bodies (`store.keep_bodies`); the body never is. Raises ConfigError for
    a bad users file, naming the line.
    """
    factory = reader_factory or (lambda: open_reader(config.store))
    gate = Gate(users_file, failure_delay=login_failure_delay)
    extra = {} if clock is None else {"clock": clock}
    site = Site(factory, gate, show_headers=config.store.keep_bodies > 0, **extra)
    page = gate.protect
    return [
        web.get("/", page(site.dashboard)),
        web.get("/log", page(site.log)),
        web.get("/log.csv", page(site.export_csv)),
        web.get("/log.json", page(site.export_json)),
        web.get("/message/{ident:.+}", page(site.message)),
        web.get("/login", site.login_form),
        web.post("/login", site.login),
        web.post("/logout", site.logout),
        web.static("/static", STATIC),
    ]


def mount(
    config: Config, reader_factory: ReaderFactory | None = None, **options: Any
) -> Callable[[web.Application], None]:
    """Adds the pages to an application the caller builds (the side port); `options` as in
    `routes`. The users file is read now, so a bad one fails before the port opens."""
    pages = routes(config, reader_factory, **options)

    def add(app: web.Application) -> None:
        app.add_routes(pages)

    return add


def create_app(
    config: Config, reader_factory: ReaderFactory | None = None, **options: Any
) -> web.Application:
    """The pages as an application of their own; `options` are those of `routes`."""
    app = web.Application()
    app.add_routes(routes(config, reader_factory, **options))
    return app
