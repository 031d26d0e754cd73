"""`GET /healthz` (restart me?) and `GET /readyz` (route mail to me?), as JSON."""

from __future__ import annotations

from aiohttp import web

from relay.health import Verdict
from relay.http.keys import HEALTH

__all__ = ["add_routes"]


def _reply(verdict: Verdict) -> web.Response:
    response = web.json_response(verdict.to_json(), status=200 if verdict.ok else 503)
    response.headers["Cache-Control"] = "no-store"
    return response


async def healthz(request: web.Request) -> web.Response:
    return _reply(request.config_dict[HEALTH].live())


async def readyz(request: web.Request) -> web.Response:
    return _reply(await request.config_dict[HEALTH].ready())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
