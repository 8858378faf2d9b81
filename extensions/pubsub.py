"""XEP-0060 publish-subscribe service on pubsub.<host>, for feeds and push app servers.

Same protocol core as PEP (`server.pubsub`), with a generic service's policy: any account of the host may
create nodes and becomes their owner; access is open or by whitelist (there is no owner roster to
consult); notifications go to subscribers. The domain is the option `pubsub.domain`.

In a cluster, the requests about one node are served by the member that owns that node (server/ownership.py),
so that two members never change one node at once; the node's state is all in storage, so taking a node
over loads nothing. A request that changes a node is fenced: refused unless Redis still names this member
as the node's owner, so that a member that stalled past its lease does not write after its successor.
Requests that name no node (disco of the service, all subscriptions) go anywhere.
"""

from __future__ import annotations

from typing import cast
from xml.etree.ElementTree import Element, SubElement

from extensions.disco import Disco
from server import ns
from server.jid import JID
from server.module import Identity, Module
from server.options import Domain, Option
from server.ownership import Lease, NotOwner
from server.pubsub import OWNER_QUERY, PUBSUB_QUERY, NodeConfig, PubSubService
from server.service import ITEMS, Service, info_query
from server.stanza import Stanza
from server.stream.errors import StanzaError

NAME = "Publish-Subscribe"
PREFIX = "pubsub:"  # of a node's owner key, before '<service domain>/<node>'


class DomainService(PubSubService):
    def __init__(self, module: PubSub) -> None:
        super().__init__(module.server)
        self.module = module

    def default_config(self) -> NodeConfig:
        return NodeConfig(max_items=10, send_last_published_item="never")

    async def may_create(self, service: JID, requester: JID) -> bool:
        return requester.domain == self.module.host.name and requester.local is not None


class Address(Service):
    """The service's domain: its pubsub and pubsub#owner iqs, and the disco of the domain and its nodes."""

    idle_release = 60.0  # a node's lease: nothing is loaded with it, so an idle one is given up

    def __init__(self, module: PubSub, domain: str) -> None:
        pubsub = module.service
        super().__init__(module.server, domain, Identity("pubsub", "service", NAME), pubsub.features())
        self.pubsub = pubsub
        for type in ("get", "set"):
            for payload in (PUBSUB_QUERY, OWNER_QUERY):
                self.iq(type, payload, self.request)

    def owner_key(self, stanza: Stanza) -> str | None:
        if stanza.kind != "iq" or not len(stanza.el) or not len(stanza.el[0]):
            return None
        node = stanza.el[0][0].get("node")
        return f"{PREFIX}{self.domain}/{node}" if node else None

    async def take(self, lease: Lease) -> bool:
        """Nothing to load: whether the node exists."""
        try:
            await self.pubsub.config(self.jid, lease.key.partition("/")[2])
        except StanzaError:
            return False
        return True

    async def request(self, stanza: Stanza) -> Element | None:
        if self.placement is not None and stanza.type == "set":
            await self.fence(stanza)
        return await self.pubsub.handle(stanza, self.jid)

    async def fence(self, stanza: Stanza) -> None:
        """Before a change to a node in a cluster: refused unless Redis still names this member its owner."""
        assert self.placement is not None
        key = self.owner_key(stanza)
        if key is None:
            return
        lease = self.placement.holds(key)
        try:
            if lease is None:
                raise NotOwner(key)
            await self.placement.ownership.guard(lease)
        except NotOwner:
            raise StanzaError("remote-server-timeout", "the node moved; try again") from None

    async def disco_info(self, stanza: Stanza) -> Element:
        node = stanza.el[0].get("node")
        if not node:
            return await super().disco_info(stanza)
        await self.pubsub.config(self.jid, node)
        return info_query([Identity("pubsub", "leaf")], [ns.DISCO_INFO], node)

    async def disco_items(self, stanza: Stanza) -> Element:
        """The nodes of the service (XEP-0060 5.2); a node itself has no items to list here."""
        node = stanza.el[0].get("node")
        query = Element(ITEMS, {"node": node} if node else {})
        if node:
            await self.pubsub.config(self.jid, node)
            return query
        for name in sorted(await self.server.storage.pubsub.nodes(*self.pubsub.key(self.jid))):
            SubElement(query, ns.qname(ns.DISCO_ITEMS, "item"), {"jid": self.domain, "node": name})
        return query


class PubSub(Module):
    name = "pubsub"
    depends = ("disco",)
    options = (Option("domain", Domain, None,
                      "the service's address, pubsub.<host> unless set (in a host's own table)"),)

    def setup(self) -> None:
        domain = self.option("domain") or f"pubsub.{self.host.name}"
        self.service = DomainService(self)
        self.address = Address(self, domain)
        self.add_service(self.address)
        self.disco.add_item(domain, NAME)
        self._undo.append(lambda: self.disco.remove_item(domain))

    async def stop(self) -> None:
        await self.address.stop()

    @property
    def disco(self) -> Disco:
        return cast(Disco, self.host.modules["disco"])
