"""XEP-0199 XMPP Ping: answers pings to the server and to accounts."""

from __future__ import annotations

from server import ns
from server.module import Module
from server.stanza import Stanza

PING = ns.qname(ns.PING, "ping")


class Ping(Module):
    name = "ping"

    def setup(self) -> None:
        self.add_feature(ns.PING)
        self.iq("get", PING, self.pong)
        self.iq("get", PING, self.pong, target="account")

    async def pong(self, stanza: Stanza) -> None:
        return None
