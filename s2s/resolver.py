"""Where a remote domain's XMPP server listens: the static map, then DNS SRV, then the domain itself.

SRV records (RFC 6120 3.2.1) come from dnspython: `_xmpps-server._tcp` for Direct TLS (XEP-0368) and
`_xmpp-server._tcp` for STARTTLS, merged in one priority order. Without SRV records the domain's own
address on port 5269 is used; that lookup is left to the system resolver when connecting, so that
/etc/hosts and the system's address preferences apply as they would for any other program.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdtypes.IN.SRV
import dns.resolver

from s2s.certs import a_label
from server.config import StaticRoute

log = logging.getLogger("parley.s2s.resolver")

DEFAULT_PORT = 5269
DNS_LIFETIME = 5.0
RESOLVER: dns.asyncresolver.Resolver | None = None  # None: the system's (/etc/resolv.conf); tests set their own


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    direct_tls: bool


async def _srv(name: str) -> list[dns.rdtypes.IN.SRV.SRV] | None:
    """The SRV records of `name`; None when there are none, [] when the service is declared absent."""
    try:
        resolver = RESOLVER or dns.asyncresolver.get_default_resolver()
        answer = await resolver.resolve(name, "SRV", lifetime=DNS_LIFETIME, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
        return None
    except dns.exception.DNSException as exc:
        log.info("SRV lookup of %s failed: %s", name, exc)
        return None
    records = list(answer)
    if len(records) == 1 and str(records[0].target) == ".":
        return []  # RFC 2782: "the service is decidedly not available at this domain"
    return records


def _order(records: list[tuple[dns.rdtypes.IN.SRV.SRV, bool]]) -> list[Target]:
    """RFC 2782: by priority, and within one priority a weighted random order."""
    targets: list[Target] = []
    for priority in sorted({r.priority for r, _ in records}):
        group = [(r, direct) for r, direct in records if r.priority == priority]
        while group:
            weights = [r.weight + 1 for r, _ in group]  # +1 keeps zero-weight records in the draw
            pick = random.choices(range(len(group)), weights)[0]
            record, direct = group.pop(pick)
            targets.append(Target(str(record.target).rstrip("."), record.port, direct))
    return targets


async def resolve(domain: str, static: dict[str, StaticRoute]) -> list[Target]:
    """Candidates to connect to, best first."""
    route = static.get(domain)
    if route is not None:
        return [Target(route.address, route.port, route.tls == "direct")]
    ascii_domain = a_label(domain)
    direct, starttls = await asyncio.gather(_srv(f"_xmpps-server._tcp.{ascii_domain}."),
                                            _srv(f"_xmpp-server._tcp.{ascii_domain}."))
    if direct is None and starttls is None:
        return [Target(ascii_domain, DEFAULT_PORT, False)]
    records = [(r, True) for r in direct or []] + [(r, False) for r in starttls or []]
    return _order(records)
