"""Wires the parts together and owns start-up and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from relay.audit import Emitter
from relay.clock import SYSTEM, Clock
from relay.config import Config, StoreConfig
from relay.delivery import Delivery
from relay.intake import Intake
from relay.server import FrontDoor
from relay.store import OnCommit, Store, open_store
from relay.upstream import Transport, describe, open_transport

__all__ = ["App", "serve"]

log = logging.getLogger("relay")


StoreFactory = Callable[[StoreConfig, OnCommit], Store]


class App:
    """The relay in one process; the store, the clock and the transports can be swapped.

    Tests give a store that fails on cue, a clock they move by hand, or a transport
    of their own; in service every one is the default.
    """

    def __init__(
        self,
        config: Config,
        transport_factory: Callable[[], Transport] | None = None,
        *,
        clock: Clock = SYSTEM,
        store_factory: StoreFactory = open_store,
    ) -> None:
        self.config = config
        self.emitter = Emitter(config.audit.output)
        self.store = store_factory(config.store, self.emitter.emit)
        factory = transport_factory or (
            lambda: open_transport(config.upstream, config.runtime.instance)
        )
        self.delivery = Delivery(config, self.store, factory, clock=clock)
        self.intake = Intake(config, self.store, on_spooled=self.delivery.wake, clock=clock)
        self.front = FrontDoor(config.listen, self.intake)

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
    await app.start()
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await app.stop()
