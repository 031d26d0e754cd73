"""The `health` command: ask a running relay whether it is ready, in one line.

It is for Docker's HEALTHCHECK and scripts, so it needs nothing but the standard library (no
curl in the image). With `http.listen` set it asks `/readyz`, which checks the SMTP port and a
store write; without it, it can only check that the SMTP port greets with 220.
"""

from __future__ import annotations

import http.client
import json
import socket

from relay.config import Config, HttpConfig, ListenConfig

__all__ = ["TIMEOUT", "check"]

TIMEOUT = 5.0


def _local(host: str) -> str:
    """Where to reach a listener bound to every address: this host's own loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def check(config: Config, timeout: float = TIMEOUT) -> tuple[bool, str]:
    """(healthy, why) for the relay this config describes."""
    if config.http.listen is not None:
        return _readyz(config.http, timeout)
    return _smtp_greeting(config.listen, timeout)


def _readyz(http_config: HttpConfig, timeout: float) -> tuple[bool, str]:
    host = _local(http_config.host)
    where = f"http://{host if ':' not in host else f'[{host}]'}:{http_config.port}/readyz"
    connection = http.client.HTTPConnection(host, http_config.port, timeout=timeout)
    try:
        connection.request("GET", "/readyz")
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return False, f"not running: no answer from {where} ({reason})"
    finally:
        connection.close()
    try:
        verdict = json.loads(body)
        checks = dict(verdict["checks"])
    except (ValueError, KeyError, TypeError):
        return False, f"not a dedup-relay: {where} answered HTTP {response.status}"
    if response.status == 200:
        return True, f"ready: {', '.join(checks)} ok ({where})"
    failing = [name for name, result in checks.items() if result != "ok"]
    why = "; ".join(f"{name}: {checks[name]}" for name in failing) or f"HTTP {response.status}"
    return False, f"not ready: {why} ({where})"


def _smtp_greeting(listen: ListenConfig, timeout: float) -> tuple[bool, str]:
    host = _local(listen.host)
    where = f"smtp {host}:{listen.port}"
    try:
        with socket.create_connection((host, listen.port), timeout=timeout) as sock:
            greeting = sock.makefile("rb").readline(1024).decode("ascii", "replace").strip()
            if greeting.startswith("220"):
                sock.sendall(b"QUIT\r\n")
    except OSError as exc:
        return False, f"not running: no answer from {where} ({exc.strerror or exc})"
    if not greeting.startswith("220"):
        return False, f"not ready: {where} answered {greeting or 'nothing'!r}"
    return True, f"ready: {where} greets with 220 (set http.listen to check the store as well)"
