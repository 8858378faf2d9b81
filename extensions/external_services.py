"""XEP-0215 External Service Discovery: the STUN and TURN servers that the host's users' calls go through.

Phones behind NAT need a TURN relay for their calls, and a relay must not be open to the world. The credentials
are those of the TURN REST API (draft-uberti-behave-turn-rest), which coturn checks with `use-auth-secret` and
`static-auth-secret`: the user name is the time it expires (Unix seconds), ':', the user's bare JID; the password
is the base64 HMAC-SHA1 of that name keyed with a secret that Parley and the TURN server share. So nothing passes
between the two servers and nothing is stored: the TURN server refuses a name whose time has passed, or a password
made without the secret. Restricted services carry such credentials in the list itself, as Prosody's
mod_external_services gives them and Conversations reads them, and again on request (`<credentials/>`).

Only the host's own users are answered; anyone else gets `forbidden` (XEP-0215 §2), as Prosody answers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Any
from xml.etree.ElementTree import Element

from server import ns
from server.module import Module
from server.options import Option
from server.stanza import Stanza, xmpp_datetime
from server.stream.errors import StanzaError

EXTDISCO = "urn:xmpp:extdisco:2"
SERVICES = ns.qname(EXTDISCO, "services")
CREDENTIALS = ns.qname(EXTDISCO, "credentials")
SERVICE = ns.qname(EXTDISCO, "service")

SERVICE_FIELDS = (
    Option("type", str, None, "what it is", choices=("stun", "stuns", "turn", "turns"), required=True),
    Option("host", str, None, "its host name or IP address; left out: the XMPP host's own domain"),
    Option("port", int, 3478, "its port (coturn's TLS port is 5349)", minimum=1, maximum=65535),
    Option("transport", str, "udp", "how clients reach it", choices=("udp", "tcp")),
    Option("restricted", bool, False, "hand out credentials made with `secret` that expire"),
    Option("ttl", int, 86400, "seconds such credentials last", minimum=1),
    Option("name", str, None, "a name for people to read"),
)
# What coturn serves with its default configuration, on the host's domain.
DEFAULT_SERVICES = (
    {"type": "stun"},
    {"type": "turn", "restricted": True},
    {"type": "turn", "transport": "tcp", "restricted": True},
)


def turn_credentials(secret: str, user: str, expires: int) -> tuple[str, str]:
    """The TURN REST API's user name and password for `user` until the Unix time `expires`."""
    username = f"{expires}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


class ExternalServices(Module):
    name = "external_services"
    options = (
        Option("secret", str, None, "the secret shared with the TURN server (coturn's static-auth-secret) that "
                                    "restricted services' credentials are made with; without it they are not offered"),
        Option("services", list, DEFAULT_SERVICES, "the STUN and TURN servers offered to the host's users",
               fields=SERVICE_FIELDS),
    )

    def setup(self) -> None:
        self.add_feature(EXTDISCO)
        self.iq("get", SERVICES, self.list_services)
        self.iq("get", CREDENTIALS, self.credentials)
        if self.option("secret") is None and any(service["restricted"] for service in self.option("services")):
            self.log.error("%s: restricted services are not offered: set [module_options.external_services] "
                           "secret to the TURN server's shared secret", self.host.name)

    def offered(self) -> list[dict[str, Any]]:
        """The configured services Parley can hand out: restricted ones only with a secret to sign for them."""
        secret = self.option("secret")
        return [service for service in self.option("services") if secret is not None or not service["restricted"]]

    async def list_services(self, stanza: Stanza) -> Element:
        self.check_user(stanza)
        wanted = stanza.el[0].get("type")
        answer = Element(SERVICES, {"type": wanted} if wanted else {})
        answer.extend([self.describe(service, stanza) for service in self.offered()
                      if wanted in (None, service["type"])])
        return answer

    async def credentials(self, stanza: Stanza) -> Element:
        """XEP-0215 §3.3: each requested service is named by type and host, and by port among several."""
        self.check_user(stanza)
        requested = [(service.get("type"), service.get("host"), service.get("port"))
                     for service in stanza.el[0].iter(SERVICE)]
        if not requested or any(not type_ or not host for type_, host, _ in requested):
            raise StanzaError("bad-request", "name each service with its type and host")
        matching = [self.describe(service, stanza) for service in self.offered() if service["restricted"] and any(
            (type_, host) == (service["type"], self.host_of(service)) and port in (None, str(service["port"]))
            for type_, host, port in requested)]
        if not matching:
            raise StanzaError("item-not-found", "no service with credentials matches")
        answer = Element(CREDENTIALS)
        answer.extend(matching)
        return answer

    def check_user(self, stanza: Stanza) -> None:
        if stanza.from_.local is None or stanza.from_.domain != self.host.name:
            raise StanzaError("forbidden", f"external services are for users of {self.host.name}")

    def host_of(self, service: dict[str, Any]) -> str:
        return service["host"] or self.host.name

    def describe(self, service: dict[str, Any], stanza: Stanza) -> Element:
        """A <service/> element, with fresh credentials for the requesting user when it is restricted."""
        attributes = {"type": service["type"], "host": self.host_of(service), "port": str(service["port"]),
                      "transport": service["transport"]}
        if service["name"]:
            attributes["name"] = service["name"]
        if service["restricted"]:
            expires = int(time.time()) + service["ttl"]
            username, password = turn_credentials(self.option("secret"), str(stanza.from_.bare), expires)
            attributes.update(username=username, password=password, restricted="1",
                              expires=xmpp_datetime(datetime.fromtimestamp(expires, UTC)))
        return Element(SERVICE, attributes)
