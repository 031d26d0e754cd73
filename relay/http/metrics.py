"""`GET /metrics`: the relay's registry as Prometheus or OpenMetrics text (prometheus_client)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from relay.http.keys import METRICS, STORE

__all__ = ["add_routes"]


def add_routes(app: web.Application) -> None:
    metrics = app[METRICS]
    store = app[STORE]
    export = make_aiohttp_handler(metrics.registry)

    async def scrape(request: web.Request) -> web.StreamResponse:
        await metrics.refresh(store.queue_depth)
        return await export(request)

    app.router.add_get("/metrics", scrape)
