"""A 127.0.0.1 TCP proxy in front of PostgreSQL that cuts a connection at a chosen COMMIT.

A server that dies or a network that drops a packet cannot be told *when* to fail; this
proxy can. It reads the client's side of PostgreSQL's wire protocol (v3: the untyped start-up
packets, then a type byte and a length per message) and, once armed, acts on the next simple
`Query` whose text ends in COMMIT (how the store ends every batch):

- `after`: the COMMIT goes to the server, the proxy waits for the server's answer (so the
  transaction is committed), drops it and closes both sides: the client's outcome is unknown
  although the commit landed;
- `before`: the COMMIT is never forwarded and both sides are closed: nothing is committed.

Everything else passes through byte for byte. Only for tests; it runs on the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

__all__ = ["PgProxy"]

# Start-up requests the server answers with one byte, after which the client starts again.
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


class _Trap:
    def __init__(self, mode: str, within: bytes | None) -> None:
        self.mode = mode
        self.within = within
        self.fired = asyncio.Event()


class PgProxy:
    def __init__(self, server_port: int) -> None:
        self.server_port = server_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._trap: _Trap | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def arm(self, mode: str, within: bytes | None = None) -> asyncio.Event:
        """Act on the next COMMIT any connection sends (with `within`: the next one that ends a
        transaction in which the client sent those bytes, in a statement's text or a bound
        value); the event is set once it has."""
        assert mode in ("after", "before")
        self._trap = _Trap(mode, within)
        return self._trap.fired

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.server_port)
        except OSError:
            client_w.transport.abort()
            self._tasks.discard(task)
            return
        self._writers.update((client_w, server_w))
        answered = asyncio.Event()
        muted: list[_Trap] = []

        def cut() -> None:
            client_w.transport.abort()
            server_w.transport.abort()

        async def upstream() -> None:
            buffer = b""
            starting = True
            sent = b""  # what this transaction sent so far, for a trap's `within`
            seen = False
            while True:
                chunk = await client_r.read(65536)
                if not chunk:
                    return
                buffer += chunk
                while True:
                    size = _message_size(buffer, starting)
                    if size is None or len(buffer) < size:
                        break
                    message, buffer = buffer[:size], buffer[size:]
                    if starting:
                        code = struct.unpack("!I", message[4:8])[0] if size >= 8 else 0
                        starting = code in (_SSL_REQUEST, _GSSENC_REQUEST)
                    trap = self._trap
                    if starting:
                        pass
                    elif _ends_transaction(message):
                        seen = trap is not None and (trap.within is None or trap.within in sent)
                        sent = b""
                    else:
                        sent += message
                        seen = False
                    if trap is not None and seen and _is_commit(message):
                        self._trap = None
                        if trap.mode == "before":
                            cut()
                            trap.fired.set()
                            return
                        muted.append(trap)
                        server_w.write(message)
                        await server_w.drain()
                        await answered.wait()
                        return
                    server_w.write(message)
                await server_w.drain()

        async def downstream() -> None:
            while True:
                chunk = await server_r.read(65536)
                if muted:
                    # The server has answered the COMMIT (it is done): the answer is dropped.
                    cut()
                    muted[0].fired.set()
                    answered.set()
                    return
                if not chunk:
                    return
                client_w.write(chunk)
                await client_w.drain()

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            with contextlib.suppress(ConnectionError, OSError):
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                # The trap's pump waits for the answer the other pump reads.
                if muted:
                    await asyncio.wait(pumps, return_when=asyncio.ALL_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            cut()
            self._writers.difference_update((client_w, server_w))
            self._tasks.discard(task)


def _message_size(buffer: bytes, starting: bool) -> int | None:
    """The length of the first whole message in `buffer`, if its header has arrived."""
    if starting:
        return struct.unpack("!I", buffer[:4])[0] if len(buffer) >= 4 else None
    return 1 + struct.unpack("!I", buffer[1:5])[0] if len(buffer) >= 5 else None


def _query(message: bytes) -> str:
    if message[:1] != b"Q":
        return ""
    text = message[5:].rstrip(b"\0").decode("utf-8", "replace")
    return text.strip().rstrip(";").strip().upper()


def _is_commit(message: bytes) -> bool:
    return _query(message).endswith("COMMIT")


def _ends_transaction(message: bytes) -> bool:
    return _query(message).endswith(("COMMIT", "ROLLBACK"))
