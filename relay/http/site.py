"""Builds the side port's aiohttp application and runs it in the relay's event loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiohttp import web

from relay.config import Config, HttpConfig
from relay.errors import ListenError, os_reason
from relay.health import Health
from relay.http import metrics as metrics_routes
from relay.http import probes
from relay.http.keys import CONFIG, HEALTH, METRICS, STORE
from relay.metrics import Metrics
from relay.store import Store

__all__ = ["ListenError", "Mount", "SidePort", "build_app"]

# Adds routes or a sub-app (`app.add_subapp("/log/", sub)`) before the app starts.
Mount = Callable[[web.Application], None]
# In-flight requests get this long after the relay has finished its own shutdown.
SHUTDOWN_TIMEOUT = 1.0


def build_app(
    *,
    config: Config,
    health: Health,
    metrics: Metrics,
    store: Store,
    mounts: Sequence[Mount] = (),
) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app[HEALTH] = health
    app[METRICS] = metrics
    app[STORE] = store
    probes.add_routes(app)
    metrics_routes.add_routes(app)
    for mount in mounts:
        mount(app)
    return app


class SidePort:
    """One aiohttp site on `http.listen`, started and stopped with the relay."""

    def __init__(self, config: HttpConfig, app: web.Application) -> None:
        self.config = config
        # Probes every few seconds would drown the log; Prometheus keeps its own record.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)

    @property
    def port(self) -> int:
        for address in self._runner.addresses:
            return int(address[1])
        raise RuntimeError("the HTTP side port is not listening")

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ListenError(
                f"cannot listen on {self.config.listen} (http.listen): {os_reason(exc)}"
            ) from None

    async def stop(self) -> None:
        await self._runner.cleanup()
