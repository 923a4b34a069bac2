"""MX resolution with dnspython (SPEC §6).

- `dns.static` overrides answer first (tests and smart hosts).
- MX answers sorted by preference; a null MX (RFC 7505: one MX ".") and NXDOMAIN are
  permanent (the recipient bounces); no MX records -> implicit MX: the domain's own
  A/AAAA (RFC 5321 §5.1).
- SERVFAIL, timeouts and unreachable name servers are temporary: the mail is deferred,
  never bounced.
- Answers are cached for their TTL (negative answers for a short while), so a campaign of
  a million recipients to gmail.com asks once per TTL, not once per message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from ..types import MxHost, Reply, Route, RouteError

NEGATIVE_TTL = 60.0
TEMPFAIL_TTL = 5.0
MAX_TTL = 3600.0


@dataclass(slots=True)
class _Cached:
    expires: float
    route: Route | None
    error: RouteError | None


def _servfail(domain: str, detail: str) -> RouteError:
    return RouteError(Reply(451, f"4.4.3 DNS lookup for {domain} failed temporarily ({detail})", "dns"),
                      permanent=False, reason="networkerror")


class MxResolver:
    def __init__(self, nameservers: tuple[tuple[str, int], ...], static: dict[str, tuple[tuple[str, int], ...]],
                 *, timeout: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.static = static
        self.clock = clock
        if nameservers:
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers]
        else:
            self.resolver = dns.asyncresolver.Resolver()
        self.resolver.lifetime = timeout
        self.resolver.timeout = timeout
        self._cache: dict[str, _Cached] = {}
        self._inflight: dict[str, asyncio.Future[Route]] = {}
        self.hits = 0
        self.misses = 0

    async def resolve(self, domain: str) -> Route:
        """The route for a destination domain, or raise RouteError."""
        domain = domain.lower().rstrip(".")
        static = self.static.get(domain)
        if static is not None:
            return Route(domain, tuple(MxHost(host, ((host, port),)) for host, port in static))
        cached = self._cache.get(domain)
        if cached is not None and cached.expires > self.clock():
            self.hits += 1
            if cached.error is not None:
                raise cached.error
            assert cached.route is not None
            return cached.route
        self.misses += 1
        pending = self._inflight.get(domain)
        if pending is not None:  # one lookup per domain at a time, however many queues ask
            return await asyncio.shield(pending)
        fut: asyncio.Future[Route] = asyncio.get_running_loop().create_future()
        self._inflight[domain] = fut
        try:
            route, ttl = await self._lookup(domain)
        except RouteError as exc:
            ttl = NEGATIVE_TTL if exc.permanent else TEMPFAIL_TTL
            self._cache[domain] = _Cached(self.clock() + ttl, None, exc)
            fut.set_exception(exc)
            fut.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            self._inflight.pop(domain, None)
        self._cache[domain] = _Cached(self.clock() + ttl, route, None)
        fut.set_result(route)
        return route

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """An answer, None for 'no records of this type', or raise RouteError."""
        try:
            return await self.resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise RouteError(Reply(550, f"5.1.2 {name}: domain does not exist (NXDOMAIN)", "dns"),
                             permanent=True, reason="hostunknown") from None
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NoNameservers as exc:
            raise _servfail(name, "SERVFAIL") from exc
        except (dns.exception.Timeout, dns.resolver.LifetimeTimeout):
            raise _servfail(name, "timeout") from None
        except dns.exception.DNSException as exc:
            raise _servfail(name, type(exc).__name__) from exc

    async def _addresses(self, host: str) -> tuple[list[tuple[str, int]], float]:
        found: list[tuple[str, int]] = []
        ttl = MAX_TTL
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._query(host, rdtype)
            except RouteError as exc:
                if exc.permanent:
                    return [], NEGATIVE_TTL
                raise
            if answer is not None:
                ttl = min(ttl, float(answer.rrset.ttl) if answer.rrset else ttl)
                found += [(r.address, 25) for r in answer]
        return found, ttl

    async def _lookup(self, domain: str) -> tuple[Route, float]:
        answer = await self._query(domain, "MX")
        if answer is None or answer.rrset is None:
            addresses, ttl = await self._addresses(domain)  # implicit MX (RFC 5321 §5.1)
            if not addresses:
                raise RouteError(Reply(550, f"5.1.2 {domain}: no MX and no address records", "dns"),
                                 permanent=True, reason="hostunknown")
            return Route(domain, (MxHost(domain, tuple(addresses)),)), ttl
        records = sorted(answer, key=lambda r: r.preference)
        if len(records) == 1 and records[0].exchange.to_text() == ".":
            raise RouteError(Reply(556, f"5.1.10 {domain} does not accept mail (null MX, RFC 7505)", "dns"),
                             permanent=True, reason="notaccept")
        ttl = float(answer.rrset.ttl)
        hosts: list[MxHost] = []
        temp: RouteError | None = None
        for record in records:
            name = record.exchange.to_text().rstrip(".").lower()
            if not name:
                continue
            try:
                addresses, host_ttl = await self._addresses(name)
            except RouteError as exc:
                temp = exc
                continue
            if addresses:
                hosts.append(MxHost(name, tuple(addresses)))
                ttl = min(ttl, host_ttl)
        if not hosts:
            if temp is not None:
                raise temp
            raise RouteError(Reply(451, f"4.4.4 {domain}: no MX host has an address", "dns"),
                             permanent=False, reason="hostunknown")
        return Route(domain, tuple(hosts)), max(1.0, min(ttl, MAX_TTL))
