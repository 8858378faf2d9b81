"""Room bookmarks kept in step across three generations of clients.

- PEP native bookmarks (XEP-0402): one item per room in the private (XEP-0223) node 'urn:xmpp:bookmarks:1';
  these items are the truth.
- XEP-0048 bookmarks in private XML storage (XEP-0049), advertised as 'urn:xmpp:bookmarks:1#compat': a read
  is built from the native items (plus the URL bookmarks XEP-0402 has no place for); a write replaces the
  list, so only the rooms that changed are published and the ones left out are retracted, with notifications.
- XEP-0048 bookmarks in the PEP node 'storage:bookmarks' (XEP-0411 'urn:xmpp:bookmarks-conversion:0',
  '#compat-pep'): republished after every change, and a client's publication there is converted like a
  private-storage write.
Nodes the module creates get XEP-0223's private configuration (whitelist access, persistent items).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast
from xml.etree.ElementTree import Element, SubElement, fromstring

from extensions.private import STORE as PRIVATE_STORE
from server import ns
from server.jid import JID, JIDError
from server.module import Module
from server.stanza import parse_stored
from server.storage import Storage, StoredItem
from server.stream.writer import serialize

if TYPE_CHECKING:
    from extensions.pep import Pep

NATIVE = "urn:xmpp:bookmarks:1"
LEGACY = "storage:bookmarks"
STORAGE = ns.qname(LEGACY, "storage")
LEGACY_CONFERENCE = ns.qname(LEGACY, "conference")
CONFERENCE = ns.qname(NATIVE, "conference")
CONVERSION = "urn:xmpp:bookmarks-conversion:0"
EXTRAS = "extras"  # key-value store key of the legacy elements that are not rooms (URL bookmarks)
IMPORTED = "imported"  # host-wide key an import sets when it left XEP-0048 lists in private storage
PRIVATE_NODE = {"pubsub#access_model": ["whitelist"], "pubsub#persist_items": ["true"],
                "pubsub#send_last_published_item": ["never"]}
NATIVE_NODE = {**PRIVATE_NODE, "pubsub#max_items": ["max"]}

Fields = tuple[str | None, bool, str | None, str | None]


def is_true(value: str | None) -> bool:
    return value in ("1", "true")


def fields_of(conference: Element) -> Fields:
    """(name, autojoin, nick, password): what both formats say about a room."""
    tag = conference.tag.split("}")[0] + "}"
    return (conference.get("name"), is_true(conference.get("autojoin")), conference.findtext(f"{tag}nick"),
            conference.findtext(f"{tag}password"))


def conference(namespace: str, fields: Fields, jid: str | None = None) -> Element:
    name, autojoin, nick, password = fields
    attrs = {"jid": jid} if jid else {}
    if name:
        attrs["name"] = name
    attrs["autojoin"] = "true" if autojoin else "false"
    out = Element(ns.qname(namespace, "conference"), attrs)
    if nick:
        SubElement(out, ns.qname(namespace, "nick")).text = nick
    if password:
        SubElement(out, ns.qname(namespace, "password")).text = password
    return out


async def legacy_list(storage: Storage, user: JID) -> Element:
    """The user's XEP-0048 list: a conference per native bookmark, then the URL bookmarks a legacy client kept.
    From storage alone, so that an export (XEP-0227 carries bookmarks in this form) needs no loaded module."""
    found = Element(STORAGE)
    for item in await storage.pubsub.items(user.domain, user.local or "", NATIVE):
        if item.payload:
            found.append(conference(LEGACY, fields_of(parse_stored(item.payload)), item.id))
    extras = await storage.kv.get(user.domain, user.local or "", Bookmarks.name, EXTRAS)
    if extras is not None:
        found.extend(fromstring(extras))
    return found


async def note_imported(storage: Storage, host: str) -> None:
    """An import left XEP-0048 lists in private storage: the module converts them at the host's next start."""
    await storage.kv.set(host, "", Bookmarks.name, IMPORTED, True)


class Bookmarks(Module):
    name = "bookmarks"
    depends = ("pep", "private")

    def setup(self) -> None:
        for feature in (f"{NATIVE}#compat", f"{NATIVE}#compat-pep", CONVERSION):
            self.add_feature(feature, target="account")
        self.hook("private/get", self.private_get)
        self.hook("private/set", self.private_set)
        self.hook("pep/published", self.pep_published)
        self.hook("pep/retracted", self.pep_retracted)

    async def start(self) -> None:
        """Convert the XEP-0048 lists an import left in private storage, where this module keeps none
        (ejabberd and Prosody exports carry bookmarks there): once converted they are PEP bookmarks.
        Only after an import said so (`note_imported`), so that an ordinary start reads one key."""
        kv = self.server.storage.kv
        if not await kv.get(self.host.name, "", self.name, IMPORTED):
            return
        for user in await kv.owners(self.host.name, PRIVATE_STORE, STORAGE):
            stored = await kv.get(self.host.name, user, PRIVATE_STORE, STORAGE)
            jid = JID.make(user, self.host.name)
            await self.from_legacy(jid, fromstring(stored))
            await self.publish_legacy(jid)
            await kv.set(self.host.name, user, PRIVATE_STORE, STORAGE, None)
            self.log.info("converted the imported XEP-0048 bookmarks of %s", jid)
        await kv.set(self.host.name, "", self.name, IMPORTED, None)

    @property
    def pep(self) -> Pep:
        return cast("Pep", self.host.modules["pep"])

    async def _node_exists(self, user: JID, node: str) -> bool:
        return await self.server.storage.pubsub.node(*self.pep.service.key(user), node) is not None

    async def native(self, user: JID) -> dict[str, Element]:
        """The user's XEP-0402 conferences by room JID."""
        items = await self.server.storage.pubsub.items(*self.pep.service.key(user), NATIVE)
        return {item.id: parse_stored(item.payload) for item in items if item.payload}

    async def legacy(self, user: JID) -> Element:
        return await legacy_list(self.server.storage, user)

    async def from_legacy(self, user: JID, storage: Element) -> None:
        """A legacy client replaced the list: publish the rooms that changed, retract the ones left out."""
        wanted: dict[str, Fields] = {}
        for legacy in storage.iterfind(LEGACY_CONFERENCE):
            try:
                wanted[str(JID.parse(legacy.get("jid") or ""))] = fields_of(legacy)
            except JIDError:
                continue
        current = await self.native(user)
        service = self.pep.service
        options = None if await self._node_exists(user, NATIVE) else NATIVE_NODE
        for jid, fields in wanted.items():
            before = current.get(jid)
            if before is not None and fields_of(before) == fields:
                continue
            native = conference(NATIVE, fields)
            if before is not None:  # what only XEP-0402 clients can say stays
                native.extend(before.iterfind(ns.qname(NATIVE, "extensions")))
            await service.publish_item(user, user, NATIVE, jid, native, options)
            options = None
        gone = [jid for jid in current if jid not in wanted]
        if gone:
            await service.retract_items(user, user, NATIVE, gone, notify=True)
        extras = Element("extras")
        extras.extend(child for child in storage if child.tag != LEGACY_CONFERENCE)
        await self.server.storage.kv.set(user.domain, user.local or "", self.name, EXTRAS,
                                         serialize(extras) if len(extras) else None)

    async def publish_legacy(self, user: JID) -> None:
        """XEP-0411: the 'storage:bookmarks' PEP node mirrors the list."""
        options = None if await self._node_exists(user, LEGACY) else PRIVATE_NODE
        await self.pep.service.publish_item(user, user, LEGACY, "current", await self.legacy(user), options)

    # --- events ---------------------------------------------------------------------------------------

    async def private_get(self, user: JID, requested: Element) -> Element | None:
        return await self.legacy(user) if requested.tag == STORAGE else None

    async def private_set(self, user: JID, document: Element) -> bool | None:
        if document.tag != STORAGE:
            return None
        await self.from_legacy(user, document)
        await self.publish_legacy(user)
        return True

    async def pep_published(self, user: JID, node: str, item: StoredItem, payload: Element | None) -> None:
        if node == NATIVE:
            await self.publish_legacy(user)
        elif node == LEGACY and payload is not None and payload.tag == STORAGE:
            await self.from_legacy(user, payload)

    async def pep_retracted(self, user: JID, node: str, ids: list[str]) -> None:
        if node == NATIVE:
            await self.publish_legacy(user)
