"""What the HTTP handlers reach the relay through, stored on the root application.

A sub-app mounted later reads the same objects with `request.config_dict[KEY]`.
"""

from __future__ import annotations

from aiohttp import web

from relay.config import Config
from relay.health import Health
from relay.metrics import Metrics
from relay.store import Store

__all__ = ["CONFIG", "HEALTH", "METRICS", "STORE"]

CONFIG = web.AppKey("config", Config)
HEALTH = web.AppKey("health", Health)
METRICS = web.AppKey("metrics", Metrics)
STORE = web.AppKey("store", Store)
