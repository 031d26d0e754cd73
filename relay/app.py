"""Wires the parts together and owns start-up and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from relay.audit import Emitter
from relay.config import Config
from relay.delivery import Delivery
from relay.intake import Intake
from relay.server import FrontDoor
from relay.store.sqlite import SqliteStore
from relay.upstream import Transport, describe, open_transport

__all__ = ["App", "serve"]

log = logging.getLogger("relay")


class App:
    def __init__(
        self, config: Config, transport_factory: Callable[[], Transport] | None = None
    ) -> None:
        self.config = config
        self.emitter = Emitter(config.audit.output)
        self.store = SqliteStore(
            config.store.path, keep_bodies=config.store.keep_bodies, on_commit=self.emitter.emit
        )
        factory = transport_factory or (
            lambda: open_transport(config.upstream, config.runtime.instance)
        )
        self.delivery = Delivery(config, self.store, factory)
        self.intake = Intake(config, self.store, on_spooled=self.delivery.wake)
        self.front = FrontDoor(
            config.listen, self.intake, auth=config.auth, record=self.store.record
        )

    @property
    def port(self) -> int:
        return self.front.port

    async def start(self) -> None:
        await self.store.open()
        await self.delivery.start()
        await self.front.start()
        log.info(
            "dedup-relay listening on %s:%d, upstream %s, store %s",
            self.config.listen.host,
            self.port,
            describe(self.config.upstream),
            self.config.store.path,
        )

    def reload(self) -> None:
        """SIGHUP: the TLS certificate and the users file, without dropping a session."""
        self.front.reload()

    async def stop(self) -> None:
        """Stop taking mail, let open work finish within the grace period, then close the store."""
        grace = self.config.runtime.shutdown_grace
        await asyncio.gather(self.front.stop(grace), self.delivery.stop(grace))
        await self.store.close()
        self.emitter.close()
        log.info("dedup-relay stopped")


async def serve(config: Config) -> None:
    app = App(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app.reload)
    await app.start()
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await app.stop()
