"""XEP-0049 Private XML Storage: any XML a user's clients want to keep on the server, by namespace.

Each child of the query is one document, kept as XML text in the key-value store under its qualified name
and readable only by the account's own clients. A module that keeps a document somewhere better (legacy
bookmarks live in PEP, XEP-0402) claims its namespace through 'private/get' (user, requested element) ->
stored element and 'private/set' (user, element) -> True.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element, fromstring

from server import ns
from server.jid import JID
from server.module import Module
from server.options import Option
from server.stanza import Stanza
from server.stream.errors import StanzaError
from server.stream.writer import serialize

PRIVATE = "jabber:iq:private"
QUERY = ns.qname(PRIVATE, "query")
STORE = "private"
MAX_SIZE = 65536
# Namespaces that are protocol, not data: XEP-0049 3 forbids storing them.
RESERVED = frozenset({PRIVATE, ns.CLIENT, ns.SERVER, ns.STREAM, ""})


def namespace_of(el: Element) -> str:
    return el.tag[1:].split("}", 1)[0] if el.tag.startswith("{") else ""


class Private(Module):
    name = "private"
    options = (Option("max_size", int, MAX_SIZE, "bytes one stored document may take", minimum=1),)

    def setup(self) -> None:
        self.add_feature(PRIVATE)
        self.iq("get", QUERY, self.get, target="own")
        self.iq("set", QUERY, self.set, target="own")

    def _documents(self, stanza: Stanza) -> list[Element]:
        documents = list(stanza.el[0])
        if not documents:
            raise StanzaError("bad-request", "name the data to get or set")
        if any(namespace_of(el) in RESERVED for el in documents):
            raise StanzaError("not-acceptable", "this namespace cannot be stored")
        return documents

    async def load(self, user: JID, tag: str) -> Element | None:
        stored = await self.server.storage.kv.get(user.domain, user.local or "", STORE, tag)
        return fromstring(stored) if stored is not None else None

    async def save(self, user: JID, document: Element) -> None:
        await self.server.storage.kv.set(user.domain, user.local or "", STORE, document.tag, serialize(document))

    async def get(self, stanza: Stanza) -> Element:
        user = stanza.to.bare
        out = Element(QUERY)
        for requested in self._documents(stanza):
            found = await self.host.hooks.fire("private/get", user, requested)
            if found is None:
                found = await self.load(user, requested.tag)
            out.append(found if found is not None else Element(requested.tag))  # nothing stored: the empty element
        return out

    async def set(self, stanza: Stanza) -> None:
        user = stanza.to.bare
        documents = self._documents(stanza)
        limit = self.option("max_size")
        if any(len(serialize(el).encode()) > limit for el in documents):
            raise StanzaError("not-acceptable", f"a document is larger than {limit} bytes")
        for document in documents:
            if await self.host.hooks.fire("private/set", user, document) is None:
                await self.save(user, document)
