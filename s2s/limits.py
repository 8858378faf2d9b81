"""What each remote domain may cost us: a read rate shared by all its connections, a cap on the stanzas
waiting for it, and caps on incoming connections in total and per address.

A rate per connection would let a domain multiply its budget by opening more connections, so the budget
belongs to the authenticated domain. A connection reads under a budget of its own until it has
authenticated one. A domain's settings come from the most specific `[s2s.domains."X"]` table covering it
(X or a parent of it), else from `[s2s]`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from server.limits import ConnectionCounter, TokenBucket

if TYPE_CHECKING:
    from server.config import DomainLimits, S2SConfig


class FederationLimits:
    def __init__(self, config: S2SConfig) -> None:
        self.config = config
        # A domain's bucket lives as long as one of its connections reads from it.
        self._buckets: weakref.WeakValueDictionary[str, TokenBucket] = weakref.WeakValueDictionary()
        self.per_ip = ConnectionCounter(config.max_incoming_per_ip)

    def of(self, domain: str) -> DomainLimits:
        labels = domain.split(".")
        for i in range(len(labels)):
            rule = self.config.domains.get(".".join(labels[i:]))
            if rule is not None:
                return rule
        return self.config.limits

    def bucket(self, domain: str) -> TokenBucket:
        """The read budget shared by every connection authenticated for `domain`."""
        bucket = self._buckets.get(domain)
        if bucket is None:
            limits = self.of(domain)
            bucket = self._buckets[domain] = TokenBucket(limits.rate, limits.burst)
        return bucket

    def unauthenticated_bucket(self) -> TokenBucket:
        """A connection's own budget until it speaks for a domain."""
        return TokenBucket(self.config.limits.rate, self.config.limits.burst)

    def admit(self, ip: str, open_connections: int, descriptors_left: int) -> str | None:
        """None when one more incoming connection from `ip` may open (and is then counted), else the
        stream error condition that refuses it. `descriptors_left` is what remains of the server's
        connection budget, shared with clients: running out of descriptors would fail every connection."""
        if open_connections >= self.config.max_incoming or descriptors_left <= 0:
            return "resource-constraint"
        if not self.per_ip.acquire(ip):
            return "policy-violation"
        return None
