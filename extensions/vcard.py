"""XEP-0054 vcard-temp: each user's vCard, readable by anyone, writable by its owner.

The vCard is kept as XML text in the key-value store; it is opaque to the server, which only bounds
its size so that one account cannot fill the database.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element, fromstring

from server import ns
from server.module import Module
from server.stanza import Stanza
from server.stream.errors import StanzaError
from server.stream.writer import serialize

VCARD = ns.qname(ns.VCARD, "vCard")
STORE = "vcard"
MAX_SIZE = 65536


class VCard(Module):
    name = "vcard"

    def setup(self) -> None:
        self.add_feature(ns.VCARD)
        self.iq("get", VCARD, self.get_vcard, target="account")
        self.iq("set", VCARD, self.set_vcard, target="account")

    async def get_vcard(self, stanza: Stanza) -> Element:
        user = stanza.to.bare
        stored = await self.server.storage.kv.get(user.domain, user.local, STORE)
        if stored is not None:
            return fromstring(stored)
        if not await self.server.storage.accounts.exists(user.domain, user.local):
            raise StanzaError("service-unavailable")
        return Element(VCARD)

    async def set_vcard(self, stanza: Stanza) -> None:
        user = stanza.to.bare
        if stanza.from_.bare != user:
            raise StanzaError("forbidden", "only the owner can change a vCard")
        xml = serialize(stanza.el[0])
        limit = self.option("max_size", MAX_SIZE)
        if len(xml.encode()) > limit:
            raise StanzaError("not-acceptable", f"the vCard is larger than {limit} bytes")
        await self.server.storage.kv.set(user.domain, user.local, STORE, "", xml)
