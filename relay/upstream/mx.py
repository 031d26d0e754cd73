"""Direct delivery: each recipient domain's own mail servers, found by MX lookup.

Recipients are grouped by domain and each group is one SMTP transaction. The MX
records (dnspython, cached for their TTL) are tried by preference, equal
preferences in random order; a domain without MX records is its own mail server
(RFC 5321 5.1); a null MX (RFC 7505) or a domain that does not exist fails
permanently; a lookup that fails (SERVFAIL, timeout) defers. STARTTLS is used when
offered, without checking the certificate (Postfix's `smtp_tls_security_level =
may`); `require_tls` makes it mandatory (`encrypt`). A server that cannot be used
(connect, TLS, greeting, 421) passes the transaction to the next address or MX host;
a reply about the message is its outcome.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from relay.config import UpstreamConfig, nameserver
from relay.errors import StoreError
from relay.upstream import Attempt, Gate, Outgoing, RecipientResult
from relay.upstream.replies import Kind
from relay.upstream.smtp import SmtpTransport

__all__ = ["MAX_ADDRESSES", "DnsFailure", "MxTransport", "Resolver", "Targets"]

# Postfix's smtp_mx_address_limit: addresses tried per domain in one attempt.
MAX_ADDRESSES = 5

Shuffle = Callable[[list[Any]], None]


class DnsFailure(Exception):
    """A lookup that decided the recipients' fate: `kind` is temporary or permanent."""

    def __init__(self, kind: Kind, text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text


@dataclass(frozen=True)
class Targets:
    """The hosts to try for a domain, in order; `implicit` when it has no MX records."""

    hosts: tuple[str, ...]
    implicit: bool = False


class Resolver:
    """MX and address lookups through dnspython, cached for their TTL."""

    def __init__(
        self,
        servers: tuple[str, ...] = (),
        timeout: float = 10.0,
        shuffle: Shuffle = random.shuffle,
    ) -> None:
        resolver = dns.asyncresolver.Resolver(configure=not servers)
        if servers:
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*nameserver(server)) for server in servers
            ]
        resolver.lifetime = timeout
        resolver.cache = dns.resolver.Cache()
        self._resolver = resolver
        self._shuffle = shuffle

    async def targets(self, domain: str) -> Targets:
        literal = _address_literal(domain)
        if literal is not None:
            return Targets((literal,), implicit=True)
        try:
            answer = await self._resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise DnsFailure(Kind.PERMANENT, f"5.1.2 {domain}: no such domain") from None
        except dns.resolver.NoAnswer:
            return Targets((domain,), implicit=True)
        except dns.exception.DNSException as exc:
            raise DnsFailure(
                Kind.TEMPORARY, f"4.4.3 MX lookup for {domain} failed: {_dns_text(exc)}"
            ) from None
        records = [(r.preference, r.exchange) for r in answer]
        hosts = [(pref, name) for pref, name in records if name != dns.name.root]
        if not hosts:
            raise DnsFailure(Kind.PERMANENT, f"5.1.10 {domain} accepts no mail (null MX, RFC 7505)")
        ordered: list[str] = []
        for pref in sorted({pref for pref, _ in hosts}):
            same = [name.to_text(omit_final_dot=True) for p, name in hosts if p == pref]
            self._shuffle(same)
            ordered.extend(same)
        return Targets(tuple(ordered))

    async def addresses(self, host: str) -> tuple[str, ...]:
        """IPv4 and IPv6 addresses of a host; empty when it has none."""
        if _is_ip(host):
            return (host,)
        found: list[str] = []
        failure: dns.exception.DNSException | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(host, rdtype)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except dns.exception.DNSException as exc:
                failure = exc
                continue
            found.extend(r.address for r in answer)
        if not found and failure is not None:
            raise DnsFailure(
                Kind.TEMPORARY, f"4.4.3 address lookup for {host} failed: {_dns_text(failure)}"
            )
        return tuple(found)


def _dns_text(error: dns.exception.DNSException) -> str:
    if isinstance(error, dns.resolver.NoNameservers):
        return "the DNS servers failed to answer (SERVFAIL or refused)"
    if isinstance(error, dns.exception.Timeout):
        return "timed out"
    return str(error).splitlines()[0][:200] or type(error).__name__


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _address_literal(domain: str) -> str | None:
    """`[192.0.2.1]` or `[IPv6:2001:db8::1]`, RFC 5321 4.1.3: the address itself."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    inner = inner[5:] if inner.lower().startswith("ipv6:") else inner
    return inner if _is_ip(inner) else None


class MxTransport:
    """Direct delivery for one worker at a time; keeps a connection per server address."""

    def __init__(self, config: UpstreamConfig, resolver: Resolver) -> None:
        self.config = config
        self._sent = False
        self._current: SmtpTransport | None = None
        self._resolver = resolver
        self._servers: dict[str, SmtpTransport] = {}

    @property
    def payload_sent(self) -> bool:
        """Read while a server's transaction is still under way too: a worker cancelled while
        an MX server holds the payload must record `ambiguous`, not give the message back."""
        current = self._current
        return self._sent or (current is not None and current.payload_sent)

    def _server(self, address: str) -> SmtpTransport:
        transport = self._servers.get(address)
        if transport is None:
            server = replace(
                self.config,
                scheme="smtp",
                host=address,
                tls_verify=False,
                ca_file=None,
                username=None,
                password=None,
            )
            transport = self._servers[address] = SmtpTransport(server)
        return transport

    async def send(self, message: Outgoing, gate: Gate | None = None) -> Attempt:
        started = time.monotonic()
        self._sent = False
        self._current = None
        domains: dict[str, list[str]] = {}
        for rcpt in message.recipients:
            domains.setdefault(rcpt.rpartition("@")[2].lower(), []).append(rcpt)
        results: dict[str, RecipientResult] = {}
        try:
            for domain, rcpts in domains.items():
                await self._deliver(
                    domain, replace(message, recipients=tuple(rcpts)), gate, results
                )
        except StoreError as exc:
            # The gate or the fence stopped a domain before its payload. With nothing settled
            # yet the lease goes back; else the domains already done keep their outcomes, as
            # "ambiguous for all" would send a delivered recipient again.
            if not results:
                raise
            text = f"4.3.0 not sent: the relay's store failed ({exc})"
            for rcpt in message.recipients:
                results.setdefault(rcpt, RecipientResult(rcpt, Kind.TEMPORARY, None, text))
        return Attempt(
            tuple(results[r] for r in message.recipients), None, time.monotonic() - started
        )

    async def _deliver(
        self,
        domain: str,
        message: Outgoing,
        gate: Gate | None,
        final: dict[str, RecipientResult],
    ) -> None:
        """Into `final` as each server answers, so what one server settled is kept if the
        next one's turn fails."""
        try:
            targets = await self._resolver.targets(domain)
        except DnsFailure as exc:
            final.update(
                (r, RecipientResult(r, exc.kind, None, exc.text)) for r in message.recipients
            )
            return
        pending = message.recipients
        last = ""
        tried = 0
        for host in targets.hosts:
            try:
                addresses = await self._resolver.addresses(host)
            except DnsFailure as exc:
                last = exc.text
                continue
            if not addresses and targets.implicit:
                text = f"5.1.2 {domain} has no MX and no address"
                final.update((r, RecipientResult(r, Kind.PERMANENT, None, text)) for r in pending)
                return
            for address in addresses:
                if tried >= MAX_ADDRESSES:
                    break
                tried += 1
                server = self._server(address)
                self._current = server
                attempt = await server.send(replace(message, recipients=pending), gate)
                self._sent = self._sent or server.payload_sent
                self._current = None
                where = f"relay={host}[{address}]:{self.config.port}"
                for r in attempt.results:
                    if not r.failover:
                        final[r.rcpt] = replace(
                            r, reply=f"{r.reply} ({where})", upstream_id=attempt.upstream_id
                        )
                pending = tuple(r.rcpt for r in attempt.results if r.failover)
                if not pending:
                    return
                last = f"{host}[{address}]: {attempt.down}"
        text = f"4.4.1 no mail server for {domain} could be reached" + (
            f" (last: {last})" if last else ""
        )
        final.update(
            (r, RecipientResult(r, Kind.TEMPORARY, None, text, failover=True)) for r in pending
        )

    async def close_idle(self) -> None:
        for address, server in list(self._servers.items()):
            await server.close_idle()
            if not server.connected:
                del self._servers[address]

    async def close(self) -> None:
        for server in self._servers.values():
            await server.close()
        self._servers.clear()
