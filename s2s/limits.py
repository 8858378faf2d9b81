"""What each remote domain may cost us: read and stanza rates shared by all its connections, a cap on
the stanzas waiting for it, and caps on incoming connections in total and per address.

A rate per connection would let a domain multiply its budget by opening more connections, so the budget
belongs to the authenticated domain. A connection reads under a budget of its own until it has
authenticated one. Bytes are paid for before they are parsed (StreamEdge pauses reading), stanzas before
they are routed (the stream's handling waits, and reading behind it is still held to the byte rate).
A domain's settings come from the most specific `[s2s.domains."X"]` table covering it (X or a parent of
it), else from `[s2s]`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.limits import ConnectionCounter, TokenBucket

if TYPE_CHECKING:
    from server.config import DomainLimits, S2SConfig


@dataclass(eq=False)
class Budget:
    bytes: TokenBucket
    stanzas: TokenBucket

    @classmethod
    def of(cls, limits: DomainLimits) -> Budget:
        return cls(TokenBucket(limits.rate, limits.burst), TokenBucket(limits.stanza_rate, limits.stanza_burst))


class FederationLimits:
    def __init__(self, config: S2SConfig) -> None:
        self.config = config
        # A domain's budget lives as long as one of its connections reads under it.
        self._budgets: weakref.WeakValueDictionary[str, Budget] = weakref.WeakValueDictionary()
        self.per_ip = ConnectionCounter(config.max_incoming_per_ip)

    def of(self, domain: str) -> DomainLimits:
        labels = domain.split(".")
        for i in range(len(labels)):
            rule = self.config.domains.get(".".join(labels[i:]))
            if rule is not None:
                return rule
        return self.config.limits

    def budget(self, domain: str) -> Budget:
        """The budget shared by every connection authenticated for `domain`."""
        budget = self._budgets.get(domain)
        if budget is None:
            budget = self._budgets[domain] = Budget.of(self.of(domain))
        return budget

    def unauthenticated_budget(self) -> Budget:
        """A connection's own budget until it speaks for a domain."""
        return Budget.of(self.config.limits)

    def admit(self, ip: str, open_connections: int, descriptors_left: int) -> str | None:
        """None when one more incoming connection from `ip` may open (and is then counted), else the
        stream error condition that refuses it. `descriptors_left` is what remains of the server's
        connection budget, shared with clients: running out of descriptors would fail every connection."""
        if open_connections >= self.config.max_incoming or descriptors_left <= 0:
            return "resource-constraint"
        if not self.per_ip.acquire(ip):
            return "policy-violation"
        return None
