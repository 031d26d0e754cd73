"""The front door's TLS: one server context, swapped whole on reload.

Every listener (STARTTLS and the implicit-TLS port) is handed one context for
good. Its SNI callback, which OpenSSL calls for every handshake whether or not
the client names a server, points the handshake at the current context. A
reload builds and checks a complete new context first and then swaps it in, so
a bad certificate on disk never breaks new connections and open sessions keep
the one they started with.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from relay.config import ConfigError, TlsConfig

__all__ = ["CIPHERS", "ServerTls", "server_context"]

log = logging.getLogger(__name__)

# TLS 1.2 suites with forward secrecy and AEAD only (Mozilla's "intermediate" list);
# TLS 1.3 suites are all modern and stay on.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """A context for `cert_file`/`key_file`; any problem is a ConfigError naming the key."""
    assert config.cert_file is not None and config.key_file is not None
    for key, path in (("cert_file", config.cert_file), ("key_file", config.key_file)):
        if not Path(path).is_file():
            raise ConfigError(f"listen.tls.{key}: {path} is not a readable file")
        # OpenSSL's own errors do not say which of the two files it could not read.
        try:
            with open(path, "rb") as file:
                file.read(1)
        except OSError as exc:
            raise ConfigError(f"listen.tls.{key}: cannot read {path}: {exc.strerror}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"listen.tls.cert_file: cannot use {config.cert_file} with {config.key_file}"
            f" ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"listen.tls.cert_file: cannot read it: {exc.strerror}") from None
    return context


class ServerTls:
    """The context every listener holds, and the current certificate behind it."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        # The first context serves both roles until a reload replaces `current`.
        self.context = self.current = server_context(config)
        self.context.sni_callback = self._select

    def _select(
        self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, context: ssl.SSLContext
    ) -> None:
        connection.context = self.current

    def reload(self) -> None:
        """Read the files again; raises ConfigError and keeps the old certificate when broken."""
        self.current = server_context(self.config)
