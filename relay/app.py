"""Wires the parts together and owns start-up and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay import heap
from relay.audit import Emitter, Event
from relay.clock import SYSTEM, Clock
from relay.config import Config, StoreConfig, UpstreamConfig
from relay.delivery import Delivery
from relay.errors import RelayError
from relay.health import Health
from relay.http import Mount, SidePort, build_app
from relay.instance import InstanceLock
from relay.intake import Intake
from relay.metrics import Metrics
from relay.server import FrontDoor
from relay.store import OnBatch, OnCommit, Store, open_store
from relay.upstream import Transport, open_transport

if TYPE_CHECKING:
    from relay.upstream.mx import Resolver

__all__ = ["App", "listening_line", "serve"]

log = logging.getLogger("relay")


StoreFactory = Callable[[StoreConfig, OnCommit, OnBatch], Store]


class App:
    """The relay in one process; the store, the clock and the transports can be swapped.

    Tests give a store that fails on cue, a clock they move by hand, or a transport
    of their own; in service every one is the default.
    """

    def __init__(
        self,
        config: Config,
        transport_factory: Callable[[UpstreamConfig], Transport] | None = None,
        *,
        clock: Clock = SYSTEM,
        store_factory: StoreFactory = open_store,
        worker: int | None = None,
    ) -> None:
        self.config = config
        self.worker = worker
        self.emitter = Emitter(config.audit.output)
        self.metrics = Metrics(config.runtime.instance)
        self.store = store_factory(config.store, self._committed, self.metrics.observe_batch)
        resolvers: dict[str, Resolver] = {}
        factory = transport_factory or (
            lambda upstream: open_transport(upstream, config.runtime.instance, resolvers)
        )
        self.delivery = Delivery(config, self.store, factory, clock=clock)
        self.store.subscribe(self.delivery.wake)
        self.instance = InstanceLock(
            self.store, config.runtime.instance, clock=clock, on_lost=self._fail
        )
        # Set when the relay must stop on its own (its instance name was taken over).
        self.failure: str | None = None
        self.failed = asyncio.Event()
        self.intake = Intake(config, self.store, on_spooled=self.delivery.wake, clock=clock)
        self.front = FrontDoor(
            config.listen, self.intake, auth=config.auth, record=self.store.record
        )
        self.metrics.watch_sessions(lambda: len(self.front.sessions))
        self.health = Health(listening=lambda: self.front.listening, store=self.store)
        # Pages that live on the side port next to the probes add themselves here.
        self.http_mounts: list[Mount] = []
        if config.http.listen is not None:
            from relay import web

            self.http_mounts.append(web.mount(config, users_file=config.http.users_file))
        self.side: SidePort | None = None

    def _fail(self, reason: str) -> None:
        self.failure = reason
        self.health.draining = True
        self.failed.set()

    def _committed(self, events: list[Event]) -> None:
        self.emitter.emit(events)
        self.metrics.observe(events)

    @property
    def port(self) -> int:
        return self.front.port

    @property
    def http_port(self) -> int:
        if self.side is None:
            raise RuntimeError("http.listen is not set")
        return self.side.port

    async def start(self) -> None:
        """Bind, take the instance name, recover, then serve; each step can refuse the start.

        The ports come first: a second `serve` on a busy port must stop before it touches
        the store's leases. Recovery comes only once the instance name is this process's,
        because it takes back every lease under that name.
        """
        await self.store.open()
        try:
            await self.front.bind()
            if self.config.http.listen is not None:
                app = build_app(
                    config=self.config,
                    health=self.health,
                    metrics=self.metrics,
                    store=self.store,
                    mounts=self.http_mounts,
                )
                self.side = SidePort(self.config.http, app)
                await self.side.start()
                if self.config.http.users_file is None and not _loopback(self.config.http.host):
                    log.warning(
                        "the review pages on %s need no login: set http.users_file",
                        self.config.http.listen,
                    )
            await self.instance.acquire()
            await self.delivery.start()
            await self.front.serve()
        except BaseException:
            await self._abandon_start()
            raise
        if self.worker is None:
            http_port = self.side.port if self.side else None
            log.info("dedup-relay %s", listening_line(self.config, self.port, http_port))
        else:
            # The parent says "dedup-relay listening" once every worker serves.
            log.info(
                "worker %d (pid %d) ready on %s:%d",
                self.worker,
                os.getpid(),
                self.config.listen.host,
                self.port,
            )

    async def _abandon_start(self) -> None:
        self.front.close()
        with contextlib.suppress(Exception):
            if self.side is not None:
                await self.side.stop()
            await self.delivery.stop(0.0)
            await self.instance.release()
        with contextlib.suppress(Exception):
            await self.store.close()

    def reload(self) -> None:
        """SIGHUP: the TLS certificate and the users file, without dropping a session."""
        self.front.reload()

    def drain(self) -> None:
        """Fail readiness now, so the orchestrator routes elsewhere before the port closes."""
        self.health.draining = True

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking mail, let open work finish within the grace period, then close the store.

        The side port stays up to the end, answering 503, so probes see a draining relay
        rather than a dead one.
        """
        self.drain()
        grace = self.config.runtime.shutdown_grace if grace is None else grace
        await asyncio.gather(self.front.stop(grace), self.delivery.stop(grace))
        await self.instance.release()
        await self.store.close()
        if self.side is not None:
            await self.side.stop()
        self.emitter.close()
        log.info("dedup-relay stopped")


def listening_line(config: Config, port: int, http_port: int | None) -> str:
    """What a started relay says: where it listens, its upstreams and its store."""
    http = f", http on {config.http.host}:{http_port}" if http_port is not None else ""
    return (
        f"listening on {config.listen.host}:{port}, upstream {_upstreams(config)},"
        f" store {config.store.where}{http}"
    )


def _upstreams(config: Config) -> str:
    if not config.upstreams:
        return config.upstream.label
    return ", ".join(f"{u.name} ({u.url})" for u in config.upstreams)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def serve(
    config: Config, ready: Callable[[App], None] | None = None, *, worker: int | None = None
) -> None:
    """Run until SIGTERM or SIGINT; `ready` is called once the relay serves."""
    app = App(config, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app.reload)
    await app.start()
    heap.settle()
    if ready is not None:
        ready(app)
    grace = config.runtime.shutdown_grace
    try:
        await _first(stop, app.failed)
        if app.failure is None:  # else stop at once: another process holds the name now
            signalled = loop.time()
            app.drain()
            delay = config.runtime.drain_delay
            if delay > 0:
                log.info("draining: not ready; SMTP keeps accepting for %gs", delay)
                stop.clear()
                with contextlib.suppress(TimeoutError):  # a second signal cuts the delay short
                    await asyncio.wait_for(stop.wait(), delay)
            # The delay is part of the grace period, not added to it.
            grace = max(grace - (loop.time() - signalled), 0.0)
            log.info("shutting down")
    finally:
        await app.stop(grace)
    if app.failure is not None:
        raise RelayError(app.failure)


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
