"""`serve --workers N`: one parent supervising N relay processes that share the port and the store.

As with gunicorn and uvicorn, the parent relays no mail. It reserves the SMTP port, starts
N workers (each a whole relay: front door, intake, delivery) that bind the same port with
`SO_REUSEPORT`, so the kernel spreads connections across them, and share the store, whose
unique index arbitrates claims and whose leases arbitrate deliveries between them, as
between replicas. The parent restarts a worker that dies, forwards SIGTERM, SIGINT and
SIGHUP, and exits 0 once every worker has shut down cleanly.

Workers are started as new interpreters (`python -m relay serve --workers 1 ...`), as
uvicorn does, not forked: nothing of the parent's event loop or threads leaks into one.
Each worker gets its own instance name (`<instance>.w<slot>`) for its delivery leases (and
for the store's lock on a live name), so two workers never share one, and a restarted worker
takes back the leases its predecessor held, exactly as a restarted relay does. A worker
dies with the parent (`PR_SET_PDEATHSIG`), so `kill -9` of the parent is `kill -9` of
the relay, which the store is built to survive.

With `http.listen`, the parent serves the side port for the whole relay
(`relay.http.gather`): metrics summed over the workers, readiness only when every
worker is ready, and the review pages from worker 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relay.config import Config
from relay.errors import EXIT_FAILURE, ListenError, RelayError

__all__ = [
    "WORKER_OPTION",
    "ReadyPipe",
    "StartError",
    "Supervisor",
    "WorkerSlot",
    "default_workers",
    "die_with_parent",
    "parse_worker_option",
    "worker_instance",
]

log = logging.getLogger(__name__)

# The hidden `serve` option that makes a process a worker: "SLOT:READY_FD:PARENT_PID".
WORKER_OPTION = "--worker-slot"
# A worker that dies sooner than this after its start is restarted after a growing pause.
STABLE_AFTER = 10.0
MAX_PAUSE = 30.0
_PR_SET_PDEATHSIG = 1


def worker_instance(instance: str, slot: int) -> str:
    """The instance name of the worker in `slot`: stable across its restarts, unique per slot."""
    return f"{instance}.w{slot}"


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask, as `nproc` counts them)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class WorkerSlot:
    slot: int
    ready_fd: int
    parent: int


def parse_worker_option(value: str) -> WorkerSlot:
    slot, fd, parent = (int(part) for part in value.split(":"))
    return WorkerSlot(slot, fd, parent)


def die_with_parent(parent: int) -> bool:
    """Ask the kernel for SIGKILL when the parent dies; False if it is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return os.getppid() == parent


class ReadyPipe:
    """A worker's end of the pipe its parent reads at start: one line, then it is closed.

    `PORT HTTP_PORT` once the worker serves, or `error STATUS MESSAGE` when it cannot start,
    so the parent ends with the worker's own one line and status, said once, whatever the
    number of workers, as `--workers 1` would say it.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def ready(self, port: int, http_port: int) -> None:
        self._send(f"{port} {http_port}")

    def failed(self, status: int, message: str) -> bool:
        """Hand a start failure to the parent; False when it is no longer listening (print it)."""
        if self._fd is None:
            return False
        try:
            self._send(f"error {status} {' '.join(message.split())}")
        except OSError:
            return False
        return True

    def _send(self, line: str) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            raise RuntimeError("a worker answers its parent once")
        try:
            os.write(fd, f"{line}\n".encode())
        finally:
            os.close(fd)


@dataclass
class Worker:
    slot: int
    process: asyncio.subprocess.Process
    started: float
    http_port: int | None = None
    ready: bool = False


class StartError(RelayError):
    """A worker exited before it was serving: the relay cannot start.

    `said` when the worker told why (its own error line, such as an audit log it could not
    open); the relay then ends with that line and the worker's status, as one process would.
    """

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(message or f"a worker exited with {_status(code)} during start")
        self.code = code
        self.said = message is not None
        self.exit_code = code if code > 0 else EXIT_FAILURE


def reserve(host: str, port: int, *, shared: bool = False) -> socket.socket:
    """Bind the SMTP port for the workers' reuse_port group, and keep it while they restart.

    Unless `listen.reuse_port` says the port is meant to be shared with other relays, a
    plain bind comes first, so a port someone else holds (with or without SO_REUSEPORT)
    is an error here, as it is for one process, rather than silently shared. The socket
    never listens, so the kernel gives it no connections.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if not shared or port == 0:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
                port = probe.getsockname()[1]
        held = socket.socket(family, socket.SOCK_STREAM)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((host, port))
    except OSError as exc:
        raise ListenError.bind_failed(host, port, "listen.port", exc) from None
    return held


class Supervisor:
    """Starts, watches and stops the workers; `run()` returns the parent's exit status."""

    def __init__(
        self,
        config: Config,
        count: int,
        args: Sequence[str],
        *,
        instance: str | None = None,
        command: Sequence[str] = (sys.executable, "-m", "relay", "serve"),
    ) -> None:
        self.config = config
        self.count = count
        self.args = list(args)
        self.command = list(command)
        self._instance = instance
        self.workers: dict[int, Worker] = {}
        self.stopping = False
        self.port = config.listen.port
        self._stop = asyncio.Event()
        self._signals = 0
        self._watchers: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self.failure: str | None = None

    @property
    def instance(self) -> str:
        if self._instance is not None:
            return self._instance
        configured = self.config.runtime.instance
        if configured == f"{socket.gethostname()}:{self.config.listen.port}":
            return f"{socket.gethostname()}:{self.port}"  # the port 0 became
        return configured

    def http_ports(self) -> list[int | None]:
        """Each slot's private side port, None while that slot has no ready worker."""
        ports: list[int | None] = []
        for slot in range(self.count):
            worker = self.workers.get(slot)
            ports.append(worker.http_port if worker is not None and worker.ready else None)
        return ports

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers.values() if w.process.returncode is None]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["RELAY_LISTEN__PORT"] = str(self.port)
        env["RELAY_LISTEN__REUSE_PORT"] = "true"
        if self.config.http.listen is not None:
            # The parent owns http.listen; each worker answers it on a private loopback port.
            env["RELAY_HTTP__LISTEN"] = "127.0.0.1:0"
        return env

    async def _spawn(self, slot: int) -> Worker:
        """Start one worker and wait until it serves; StartError if it exits first."""
        read_end, write_end = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                *self.args,
                "--workers",
                "1",
                "--instance",
                worker_instance(self.instance, slot),
                WORKER_OPTION,
                f"{slot}:{write_end}:{os.getpid()}",
                env=self._env(),
                pass_fds=(write_end,),
                # Its own session: a terminal's Ctrl-C reaches the parent, which forwards it
                # once, instead of every process at once.
                start_new_session=True,
            )
        finally:
            os.close(write_end)
        worker = Worker(slot, process, time.monotonic())
        self.workers[slot] = worker
        try:
            line = await asyncio.get_running_loop().run_in_executor(None, _read_line, read_end)
        finally:
            os.close(read_end)
        if not line:
            raise StartError(await process.wait())
        if line.startswith("error "):
            await process.wait()
            _, status, message = line.rstrip("\n").split(" ", 2)
            raise StartError(int(status), message)
        _, http_port = (int(part) for part in line.split())
        worker.http_port = http_port or None
        worker.ready = True
        self._changed.set()
        return worker

    async def _watch(self, worker: Worker) -> None:
        """Restart the slot's worker whenever it dies, until the relay stops."""
        pause = 0.0
        while True:
            code = await worker.process.wait()
            worker.ready = False
            self._changed.set()
            if self.stopping:
                return
            lived = time.monotonic() - worker.started
            log.error(
                "worker %d (pid %d) exited with %s after %.0fs; starting a new one",
                worker.slot,
                worker.process.pid,
                _status(code),
                lived,
            )
            pause = 0.0 if lived >= STABLE_AFTER else _longer(pause)
            while not self.stopping:
                if pause:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), pause)
                    if self.stopping:
                        return
                try:
                    worker = await self._spawn(worker.slot)
                except StartError as exc:
                    log.error("worker %d could not start: %s", worker.slot, exc)
                    pause = _longer(pause)
                    continue
                log.info("worker %d restarted (pid %d)", worker.slot, worker.process.pid)
                break

    def signal(self, signum: int) -> None:
        """SIGTERM or SIGINT: stop (a second one cuts the drain short, as for one process)."""
        self._signals += 1
        self.stopping = True
        self._stop.set()
        self._forward(signal.SIGTERM)

    def fail(self, reason: str) -> None:
        """Stop every worker and exit 1: the relay's instance name was taken over."""
        self.failure = reason
        self.signal(signal.SIGTERM)

    def _forward(self, signum: int) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    async def start(self) -> None:
        """Every worker serving, or StartError (after stopping the ones that did start)."""
        results = await asyncio.gather(
            *(self._spawn(slot) for slot in range(self.count)), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed and self._signals:
            return  # told to stop while starting: a worker that ended for it is no failure
        if failed:
            self.stopping = True
            self._forward(signal.SIGTERM)
            await self._reap(self._deadline())
            said = [f for f in failed if isinstance(f, StartError) and f.said]
            error = (said or failed)[0]
            raise error if isinstance(error, StartError) else StartError(1) from error
        self._watchers = [
            asyncio.create_task(self._watch(worker), name=f"watch-{worker.slot}")
            for worker in list(self.workers.values())
        ]

    def _deadline(self) -> float:
        runtime = self.config.runtime
        return runtime.shutdown_grace + runtime.drain_delay + 10.0

    async def _reap(self, deadline: float) -> bool:
        """Wait for every worker; SIGKILL what is left at the deadline. True if all exited 0."""
        processes = [w.process for w in self.workers.values()]
        waiting = [asyncio.ensure_future(p.wait()) for p in processes]
        if not waiting:
            return True
        _, pending = await asyncio.wait(waiting, timeout=deadline)
        if pending:
            log.error("%d worker(s) still running after %.0fs: killed", len(pending), deadline)
            for process in processes:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await asyncio.gather(*pending)
        # A worker stopped by SIGTERM before it had installed its handlers had nothing to lose.
        return all(p.returncode in (0, -signal.SIGTERM) for p in processes)

    async def wait(self) -> int:
        """Until SIGTERM/SIGINT; then every worker's shutdown. 0 when all ended cleanly."""
        await self._stop.wait()
        log.info("shutting down %d worker(s)", len(self.pids()))
        clean = await self._reap(self._deadline())
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        return 0 if clean and self.failure is None else 1

    async def changed(self) -> None:
        """Wakes when a worker becomes ready or dies (for tests and the side port)."""
        self._changed.clear()
        await self._changed.wait()


def _read_line(fd: int) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 256)
        if not chunk:
            return ""
        data += chunk
    return data.decode()


def _longer(pause: float) -> float:
    """The next pause before restarting a worker that keeps dying: doubled, from 0.5s to 30s."""
    return min(max(pause * 2, 0.5), MAX_PAUSE)


def _status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


async def supervise(
    config: Config,
    count: int,
    args: Sequence[str],
    *,
    instance: str | None = None,
    side_port: Callable[[Supervisor], object] | None = None,
) -> int:
    """The parent's whole life: reserve the port, take the name, start the workers, stop them.

    The parent holds the relay's instance name in the store, as a single process does:
    a second `serve` under the same name is refused before it starts a worker.
    """
    from relay.app import listening_line
    from relay.http.gather import GatherPort
    from relay.instance import InstanceLock
    from relay.store import open_store

    listen = config.listen
    held = reserve(listen.host, listen.port, shared=listen.reuse_port)
    supervisor = Supervisor(config, count, args, instance=instance)
    supervisor.port = held.getsockname()[1]
    loop = asyncio.get_running_loop()
    side = GatherPort(config.http, supervisor) if config.http.listen is not None else None
    store = open_store(config.store)
    name = InstanceLock(store, supervisor.instance, on_lost=supervisor.fail)
    try:
        await store.open()
        await name.acquire()
        if side is not None:
            await side.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, supervisor.signal, signum)
        loop.add_signal_handler(signal.SIGHUP, supervisor._forward, signal.SIGHUP)
        await supervisor.start()
        where = listening_line(
            config,
            supervisor.port,
            side.port if side is not None else None,
        )
        log.info(
            "dedup-relay %s, %d workers (pids %s)",
            where,
            count,
            " ".join(str(pid) for pid in supervisor.pids()),
        )
        status = await supervisor.wait()
        if supervisor.failure is not None:
            log.error("%s", supervisor.failure)
        return status
    finally:
        if side is not None:
            await side.stop()
        await name.release()
        await store.close()
        held.close()
