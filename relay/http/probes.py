"""`GET /healthz` (restart me?) and `GET /readyz` (route mail to me?), as JSON."""

from __future__ import annotations

from aiohttp import web

from relay.health import Verdict
from relay.http.keys import HEALTH

__all__ = ["add_routes", "verdict_response"]


def verdict_response(verdict: Verdict) -> web.Response:
    """200 or 503 with the checks as JSON; never cached, since the next probe must ask again."""
    response = web.json_response(verdict.to_json(), status=200 if verdict.ok else 503)
    response.headers["Cache-Control"] = "no-store"
    return response


async def healthz(request: web.Request) -> web.Response:
    return verdict_response(request.config_dict[HEALTH].live())


async def readyz(request: web.Request) -> web.Response:
    return verdict_response(await request.config_dict[HEALTH].ready())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
