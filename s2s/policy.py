"""Federation policy: which domains we talk to, and how much we demand of their certificates.

A domain listed in `allow`, `deny` or `accept_self_signed` covers its subdomains too, so that a rule for a
server also applies to its services (conference.example.org goes with example.org).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.config import S2SConfig
    from server.storage import KeyValueStore

# How a remote domain's certificate is checked.
VERIFY = "verify"  # a chain to a trusted CA, naming the domain (RFC 6125)
SELF_SIGNED = "self-signed"  # any chain, but it must name the domain (configured per domain)
UNCHECKED = "unchecked"  # not checked at all: dialback alone vouches for the domain
# Where the domains admins add at runtime (XEP-0133 edit-blacklist, edit-whitelist) are kept, so that they
# outlive a restart: documents 'deny' and 'allow' of the whole server (host and user '').
ADDED = "s2s-lists"


def covers(rules: list[str], domain: str) -> bool:
    """Whether `domain` is one of `rules` or a subdomain of one."""
    return any(domain == rule or domain.endswith("." + rule) for rule in rules)


class Policy:
    def __init__(self, config: S2SConfig) -> None:
        self.config = config
        self.require_encryption = config.require_encryption
        self.added: dict[str, list[str]] = {"deny": [], "allow": []}  # besides the configured lists

    async def load(self, kv: KeyValueStore) -> None:
        for name in self.added:
            self.added[name] = await kv.get("", "", ADDED, name) or []

    def allowed(self, domain: str) -> bool:
        if covers(self.config.deny, domain) or covers(self.added["deny"], domain):
            return False
        allow = self.config.allow + self.added["allow"]
        return not allow or covers(allow, domain)

    def certificate_mode(self, domain: str) -> str:
        if covers(self.config.accept_self_signed, domain):
            return SELF_SIGNED
        return VERIFY if self.config.require_valid_certificates else UNCHECKED
