"""Federation policy: which domains we talk to, and how much we demand of their certificates.

A domain listed in `allow`, `deny` or `accept_self_signed` covers its subdomains too, so that a rule for a
server also applies to its services (conference.example.org goes with example.org).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.config import S2SConfig

# How a remote domain's certificate is checked.
VERIFY = "verify"  # a chain to a trusted CA, naming the domain (RFC 6125)
SELF_SIGNED = "self-signed"  # any chain, but it must name the domain (configured per domain)
UNCHECKED = "unchecked"  # not checked at all: dialback alone vouches for the domain


def covers(rules: list[str], domain: str) -> bool:
    """Whether `domain` is one of `rules` or a subdomain of one."""
    return any(domain == rule or domain.endswith("." + rule) for rule in rules)


class Policy:
    def __init__(self, config: S2SConfig) -> None:
        self.config = config
        self.require_encryption = config.require_encryption

    def allowed(self, domain: str) -> bool:
        if covers(self.config.deny, domain):
            return False
        return not self.config.allow or covers(self.config.allow, domain)

    def certificate_mode(self, domain: str) -> str:
        if covers(self.config.accept_self_signed, domain):
            return SELF_SIGNED
        return VERIFY if self.config.require_valid_certificates else UNCHECKED
