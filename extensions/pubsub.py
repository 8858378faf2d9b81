"""XEP-0060 publish-subscribe service on pubsub.<host>, for feeds and push app servers.

Same protocol core as PEP (`server.pubsub`), with a generic service's policy: any account of the host may
create nodes and becomes their owner; access is open or by whitelist (there is no owner roster to
consult); notifications go to subscribers. The domain is the option `pubsub.domain`.
"""

from __future__ import annotations

from typing import cast
from xml.etree.ElementTree import Element, SubElement

from extensions.disco import Disco
from server import ns
from server.jid import JID
from server.module import Module
from server.options import Domain, Option
from server.pubsub import OWNER_QUERY, PUBSUB_QUERY, NodeConfig, PubSubService
from server.stanza import Stanza, reply
from server.stream.errors import StanzaError

INFO = ns.qname(ns.DISCO_INFO, "query")
ITEMS = ns.qname(ns.DISCO_ITEMS, "query")
NAME = "Publish-Subscribe"


class DomainService(PubSubService):
    def __init__(self, module: PubSub) -> None:
        super().__init__(module.server)
        self.module = module

    def default_config(self) -> NodeConfig:
        return NodeConfig(max_items=10, send_last_published_item="never")

    async def may_create(self, service: JID, requester: JID) -> bool:
        return requester.domain == self.module.host.name and requester.local is not None


class PubSub(Module):
    name = "pubsub"
    depends = ("disco",)
    options = (Option("domain", Domain, None,
                      "the service's address, pubsub.<host> unless set (in a host's own table)"),)

    def setup(self) -> None:
        self.domain = JID.parse(self.option("domain") or f"pubsub.{self.host.name}")
        self.service = DomainService(self)
        self.add_service(str(self.domain), self.stanza)
        self.disco.add_item(str(self.domain), NAME)
        self._undo.append(lambda: self.disco.remove_item(str(self.domain)))

    @property
    def disco(self) -> Disco:
        return cast(Disco, self.host.modules["disco"])

    async def stanza(self, stanza: Stanza) -> None:
        """Everything sent to the service's domain: iqs are answered, other stanzas are ignored."""
        if stanza.kind != "iq" or stanza.type not in ("get", "set"):
            if stanza.kind == "message":
                await self.server.router.bounce(stanza, StanzaError("service-unavailable"))
            return
        try:
            if len(stanza.el) != 1:
                raise StanzaError("bad-request", "an iq get or set has exactly one child")
            payload = await self.answer(stanza)
        except StanzaError as exc:
            await self.server.router.bounce(stanza, exc)
            return
        answer = reply(stanza.el)
        answer.set("from", str(stanza.to))
        if payload is not None:
            answer.append(payload)
        await self.server.router.deliver_reply(stanza, answer, stanza.to)

    async def answer(self, stanza: Stanza) -> Element | None:
        tag = stanza.el[0].tag
        if stanza.to.local is not None or stanza.to.resource is not None:
            raise StanzaError("service-unavailable")
        if tag in (PUBSUB_QUERY, OWNER_QUERY):
            return await self.service.handle(stanza, self.domain)
        if stanza.type == "get" and tag == INFO:
            return await self.info(stanza.el[0].get("node"))
        if stanza.type == "get" and tag == ITEMS:
            return await self.items(stanza.el[0].get("node"))
        raise StanzaError("service-unavailable")

    async def info(self, node: str | None) -> Element:
        query = Element(INFO, {"node": node} if node else {})
        if node:
            await self.service.config(self.domain, node)
            SubElement(query, ns.qname(ns.DISCO_INFO, "identity"), {"category": "pubsub", "type": "leaf"})
            SubElement(query, ns.qname(ns.DISCO_INFO, "feature"), {"var": ns.DISCO_INFO})
            return query
        SubElement(query, ns.qname(ns.DISCO_INFO, "identity"), {"category": "pubsub", "type": "service",
                                                               "name": NAME})
        for var in sorted({ns.DISCO_INFO, ns.DISCO_ITEMS, *self.service.features()}):
            SubElement(query, ns.qname(ns.DISCO_INFO, "feature"), {"var": var})
        return query

    async def items(self, node: str | None) -> Element:
        """The nodes of the service (XEP-0060 5.2); a node itself has no items to list here."""
        query = Element(ITEMS, {"node": node} if node else {})
        if node:
            await self.service.config(self.domain, node)
            return query
        for name in sorted(await self.server.storage.pubsub.nodes(*self.service.key(self.domain))):
            SubElement(query, ns.qname(ns.DISCO_ITEMS, "item"), {"jid": str(self.domain), "node": name})
        return query
