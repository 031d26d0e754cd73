"""A real DNS server on loopback for the direct-delivery tests: Debian's dnsmasq.

dnsmasq answers for a test zone exactly what the test gives it (MX records, addresses, a null
MX as a raw record), NXDOMAIN for any other name in the zone, and forwards chosen domains to
a few lines of Python that answer SERVFAIL, so every DNS outcome the relay must handle
arrives over the wire as a resolver would see it. Its query log lets a test count lookups.

(Not named ``dns.py``: this folder is on ``sys.path`` and would hide dnspython.)
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
from dataclasses import dataclass
from typing import Self

import dns.message
import dns.nameserver
import dns.rcode
import dns.resolver

from tests.mta import LOOPBACK, _make_workdir, _Server, free_port, require_program, wait_until

__all__ = ["Dnsmasq", "Zone"]


@dataclass(frozen=True)
class Zone:
    """What the server knows: (domain, host, preference) MX records, (name, IPv4) addresses,
    domains with a null MX (RFC 7505), and domains whose lookups fail with SERVFAIL."""

    mx: tuple[tuple[str, str, int], ...] = ()
    addresses: tuple[tuple[str, str], ...] = ()
    null_mx: tuple[str, ...] = ()
    servfail: tuple[str, ...] = ()
    suffix: str = "test"
    ttl: int = 300


class _Servfail:
    """A UDP server that answers every query with SERVFAIL (a broken authoritative server)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="servfail", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = dns.message.make_response(dns.message.from_wire(data))
            reply.set_rcode(dns.rcode.SERVFAIL)
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class Dnsmasq(_Server):
    """dnsmasq on 127.0.0.1 and a port of its own, serving `zone`; a context manager."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.port = 0
        self.workdir = _make_workdir("dnsmasq-")
        self.log_file = self.workdir / "dnsmasq.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._servfail: _Servfail | None = None

    @property
    def address(self) -> str:
        """As `upstream.dns_servers` takes it."""
        return f"{LOOPBACK}:{self.port}"

    def _argv(self, binary: str) -> list[str]:
        z = self.zone
        argv = [
            binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--pid-file=",
            f"--listen-address={LOOPBACK}",
            "--bind-interfaces",
            f"--port={self.port}",
            f"--local=/{z.suffix}/",
            f"--local-ttl={z.ttl}",
            "--log-queries",
            "--log-facility=-",
        ]
        if os.geteuid() == 0:
            argv += ["--user=nobody", "--group=nogroup"]
        argv += [f"--mx-host={domain},{host},{pref}" for domain, host, pref in z.mx]
        argv += [f"--host-record={name},{ip}" for name, ip in z.addresses]
        # Preference 0 and the root name "." (one zero byte): RFC 7505's null MX.
        argv += [f"--dns-rr={domain},15,000000" for domain in z.null_mx]
        if z.servfail:
            assert self._servfail is not None
            argv += [f"--server=/{d}/{LOOPBACK}#{self._servfail.port}" for d in z.servfail]
        return argv

    def start(self) -> Self:
        binary = require_program("dnsmasq", "dnsmasq-base")
        if self.zone.servfail:
            self._servfail = _Servfail()
        for _ in range(5):
            self.port = free_port()
            log = self.log_file.open("wb")
            self._proc = subprocess.Popen(
                self._argv(binary), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
            log.close()
            try:
                wait_until(self._ready, 10.0, "dnsmasq to answer")
                return self
            except TimeoutError:
                self._stop_process()
        raise RuntimeError(f"dnsmasq would not start:\n{self.log()}")

    def _ready(self) -> bool | None:
        if self._proc is not None and self._proc.poll() is not None:
            raise TimeoutError("dnsmasq exited")  # most likely the port was taken: try another
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(LOOPBACK, self.port)]
        resolver.lifetime = 0.5
        try:
            resolver.resolve(f"ready.{self.zone.suffix}", "A")
        except dns.resolver.NXDOMAIN:
            return True
        except Exception:
            return None
        return True

    def queries(self, name: str, rdtype: str) -> int:
        """How many times a resolver asked for `name`'s `rdtype` records."""
        pattern = rf"query\[{re.escape(rdtype)}\] {re.escape(name)} from "
        return len(re.findall(pattern, self.log()))

    def _stop_process(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def close(self) -> None:
        self._stop_process()
        if self._servfail is not None:
            self._servfail.close()
            self._servfail = None
