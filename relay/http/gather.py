"""The side port of a relay run as several workers: one endpoint for the whole relay.

Each worker serves its own side port on a private loopback port; the parent serves
`http.listen` and answers from theirs, so an operator sees one relay, as with one process:

- `/metrics`: every worker's metrics, summed per series (counters, histograms, sessions,
  memory), the store-wide queue gauges taken once, labelled with the relay's instance;
- `/readyz`: ready only when every worker is ready; `/healthz`: every running worker alive;
- anything else (the review pages, their login and exports): worker 0, so a login
  session stays on the process that issued it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from relay.config import HttpConfig
from relay.health import OK, Verdict
from relay.http.probes import verdict_response
from relay.http.site import SidePort

if TYPE_CHECKING:
    from relay.workers import Supervisor

__all__ = ["GatherPort", "merge_metrics"]

# Gauges that describe the shared store or the build, not a process: reported once.
_ONCE = {
    "dedup_relay_build_info": max,
    "dedup_relay_queue_messages": max,
    "dedup_relay_queue_oldest_age_seconds": max,
    "python_info": max,
    "process_max_fds": min,
    "process_start_time_seconds": min,
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
_TIMEOUT = aiohttp.ClientTimeout(total=30)


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_metrics(texts: Iterable[str], instance: str) -> list[Metric]:
    """Sum each series over the workers; `_ONCE` gauges take one value; one instance label."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            series = values.setdefault(merged.name, {})
            for sample in family.samples:
                labels = dict(sample.labels)
                if "instance" in labels:
                    labels["instance"] = instance
                key = (sample.name, tuple(sorted(labels.items())))
                series.setdefault(key, []).append(sample.value)
    for name, family in families.items():
        pick = _ONCE.get(name, sum)
        family.samples = [
            Sample(sample_name, dict(labels), float(pick(found)))
            for (sample_name, labels), found in values[name].items()
        ]
    return list(families.values())


class GatherPort:
    """`http.listen` in the parent, answered from the workers' private side ports."""

    def __init__(self, config: HttpConfig, supervisor: Supervisor) -> None:
        self.config = config
        self.supervisor = supervisor
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        self._site = SidePort(config, app)
        self._client: aiohttp.ClientSession | None = None

    @property
    def port(self) -> int:
        return self._site.port

    async def start(self) -> None:
        await self._site.start()
        self._client = aiohttp.ClientSession(timeout=_TIMEOUT, auto_decompress=False)

    async def stop(self) -> None:
        await self._site.stop()
        if self._client is not None:
            await self._client.close()

    def _ports(self) -> Iterator[tuple[int, int | None]]:
        yield from enumerate(self.supervisor.http_ports())

    async def _get(self, port: int, path: str) -> tuple[int, bytes]:
        assert self._client is not None
        try:
            async with self._client.get(
                f"http://127.0.0.1:{port}{path}", headers={"Accept-Encoding": "identity"}
            ) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 503, json.dumps({"checks": {"worker": f"no answer: {exc}"}}).encode()

    async def metrics(self, request: web.Request) -> web.Response:
        ports = [port for _, port in self._ports() if port is not None]
        replies = await asyncio.gather(*(self._get(port, "/metrics") for port in ports))
        texts = [body.decode() for status, body in replies if status == 200]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(merge_metrics(texts, self.supervisor.instance)))
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    async def _probe(self, path: str, *, every_slot: bool, good: str, bad: str) -> web.Response:
        """Each check `ok` only when it is on every worker asked; else the first reason why not."""
        checks: dict[str, str] = {"shutdown": "shutting down" if self.supervisor.stopping else OK}
        missing = [slot for slot, port in self._ports() if port is None]
        if every_slot:
            checks["workers"] = (
                OK if not missing else f"worker {', '.join(map(str, missing))} not running"
            )
        asked = [(slot, port) for slot, port in self._ports() if port is not None]
        replies = await asyncio.gather(*(self._get(port, path) for _, port in asked))
        for (slot, _), (status, body) in zip(asked, replies, strict=True):
            try:
                found = dict(json.loads(body)["checks"])
            except (ValueError, KeyError, TypeError):
                found = {"worker": f"HTTP {status}"}
            for name, result in found.items():
                if checks.get(name, OK) == OK:
                    checks[name] = OK if result == OK else f"worker {slot}: {result}"
        return verdict_response(Verdict.judge(checks, good=good, bad=bad))

    async def healthz(self, request: web.Request) -> web.Response:
        return await self._probe("/healthz", every_slot=False, good="alive", bad="not alive")

    async def readyz(self, request: web.Request) -> web.Response:
        return await self._probe("/readyz", every_slot=True, good="ready", bad="not ready")

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        assert self._client is not None
        port = self.supervisor.http_ports()[0]
        if port is None:
            raise web.HTTPServiceUnavailable(text="worker 0 is restarting, try again")
        headers = _end_to_end(request.headers.items())
        headers["X-Forwarded-For"] = request.remote or ""
        try:
            async with self._client.request(
                request.method,
                f"http://127.0.0.1:{port}{request.path_qs}",
                headers=headers,
                data=await request.read() if request.can_read_body else None,
                allow_redirects=False,
            ) as upstream:
                body = await upstream.read()
                out = _end_to_end(upstream.headers.items())
                return web.Response(status=upstream.status, body=body, headers=out)
        except (aiohttp.ClientError, TimeoutError):
            raise web.HTTPServiceUnavailable(text="worker 0 did not answer") from None


def _end_to_end(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """Every header but the hop-by-hop ones; repeated ones (Set-Cookie) kept."""
    return CIMultiDict((k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP)
