"""XEP-0030 Service Discovery for the server and, on their behalf, for its accounts.

What is advertised comes from what modules registered (host.features / host.identities), so disco
never has to know about other modules. Nodes are answered through the hooks 'disco/info-node' and
'disco/items-node' (stanza, node) -> query Element, so modules like caps or ad-hoc commands can serve
their own nodes; an unclaimed node is item-not-found. The items of an account come from 'disco/account-items'
(stanza, query), whose handlers add to the query (PEP lists the nodes the requester may see).
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.forms import Field, build_form
from server.module import Module
from server.options import Option
from server.service import info_query
from server.stanza import Stanza
from server.stream.errors import StanzaError

INFO = ns.qname(ns.DISCO_INFO, "query")
ITEMS = ns.qname(ns.DISCO_ITEMS, "query")
SERVER_NAME = "Parley"
# XEP-0157 Contact Addresses: the host's disco#info carries them in an extended form (XEP-0128).
SERVERINFO = "http://jabber.org/network/serverinfo"
CONTACTS = ("abuse", "admin", "feedback", "sales", "security", "status", "support")


@dataclass(frozen=True)
class Item:
    jid: str
    name: str | None = None
    node: str | None = None


class Disco(Module):
    name = "disco"
    options = tuple(Option(f"{kind}_addresses", tuple, (), f"XEP-0157 {kind} contact addresses of the host "
                           "(mailto:, xmpp:, https: URIs)") for kind in CONTACTS)

    def setup(self) -> None:
        self.items: list[Item] = []
        self.add_identity("server", "im", SERVER_NAME)
        self.add_identity("account", "registered", target="account")
        for target in ("host", "account"):
            self.add_feature(ns.DISCO_INFO, target)
            self.add_feature(ns.DISCO_ITEMS, target)
            self.iq("get", INFO, self.info, target)
            self.iq("get", ITEMS, self.disco_items, target)

    def add_item(self, jid: str, name: str | None = None, node: str | None = None) -> None:
        """List a service (a component, a MUC domain...) in the items of the host."""
        self.items.append(Item(jid, name, node))

    def remove_item(self, jid: str, node: str | None = None) -> None:
        self.items = [i for i in self.items if (i.jid, i.node) != (jid, node)]

    def info_query(self, target: str = "host", node: str | None = None) -> Element:
        """The disco#info answer for the host or an account: sorted, without duplicates; the host's has its
        contact addresses, when configured."""
        query = info_query(self.host.identities[target], self.host.features[target], node)
        contacts = [Field(f"{kind}-addresses", "list-multi", values=addresses)
                    for kind, addresses in self.contact_addresses().items() if addresses]
        if target == "host" and node is None and contacts:
            query.append(build_form("result", contacts, form_type=SERVERINFO))
        return query

    def contact_addresses(self) -> dict[str, tuple[str, ...]]:
        """XEP-0157's addresses by kind, in CONTACTS' order."""
        return {"abuse": self.option("abuse_addresses"), "admin": self.option("admin_addresses"),
                "feedback": self.option("feedback_addresses"), "sales": self.option("sales_addresses"),
                "security": self.option("security_addresses"), "status": self.option("status_addresses"),
                "support": self.option("support_addresses")}

    async def info(self, stanza: Stanza) -> Element:
        node = stanza.el[0].get("node")
        target = await self._target(stanza)
        if node:
            return await self._node(stanza, "disco/info-node", node)
        return self.info_query(target)

    async def disco_items(self, stanza: Stanza) -> Element:
        node = stanza.el[0].get("node")
        target = await self._target(stanza)
        if node:
            return await self._node(stanza, "disco/items-node", node)
        query = Element(ITEMS)
        if target == "host":
            for item in self.items:
                attrs = {"jid": item.jid, "name": item.name, "node": item.node}
                SubElement(query, ns.qname(ns.DISCO_ITEMS, "item"), {k: v for k, v in attrs.items() if v})
        else:
            await self.host.hooks.fire("disco/account-items", stanza, query)
        return query

    async def _target(self, stanza: Stanza) -> str:
        """'host' or 'account'; an account that does not exist is unavailable, as for any stanza to it."""
        to = stanza.to
        if to.local is None:
            return "host"
        if not await self.server.storage.accounts.exists(to.domain, to.local):
            raise StanzaError("service-unavailable")
        return "account"

    async def _node(self, stanza: Stanza, event: str, node: str) -> Element:
        answer = await self.host.hooks.fire(event, stanza, node)
        if answer is None:
            raise StanzaError("item-not-found", f"no node {node!r} here")
        return answer
