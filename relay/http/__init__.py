"""The HTTP side port: health and readiness probes and Prometheus metrics, on aiohttp.

One small aiohttp application in the relay's own event loop. It is built to grow: a feature
that wants pages here (the log review) passes a `Mount` to `build_app`, which adds its routes
or a sub-app under its own prefix, and reaches the relay through the keys in `relay.http.keys`.
"""

from __future__ import annotations

from relay.http.keys import CONFIG, HEALTH, METRICS, STORE
from relay.http.site import ListenError, Mount, SidePort, build_app

__all__ = ["CONFIG", "HEALTH", "METRICS", "STORE", "ListenError", "Mount", "SidePort", "build_app"]
