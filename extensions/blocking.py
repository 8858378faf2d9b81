"""XEP-0191 Blocking Command: a user cuts all traffic with the addresses it blocks.

Enforcement sits on the router's filtering events, ahead of every other module:
- '<kind>/outbound': what the user's own client sends to a blocked address is refused with
  not-acceptable and <blocked/> (XEP-0191 3.3), before carbons or the archive see it;
- '<kind>/inbound' (any stanza to a local account): from an address the recipient blocks, presence is
  dropped, an iq get or set gets service-unavailable, and a message is dropped, or bounced with
  service-unavailable when the 'bounce' option is set. What the server sends on a user's behalf
  (presence broadcasts, probe answers) to an address that user blocks is dropped here too, and on
  'route/remote' when it is leaving for another server;
- '<kind>/inbound-many' (what a service sends to many at once, a room's messages and presence to its
  occupants): the recipients who block the sender (an occupant's room JID, the room) are left out,
  silently, as an error from an occupant would tell the room that it has gone.
Before a block is stored, 'blocking/block' (user, <block/>) lets other modules read what its items carry
(spam_reporting: XEP-0377 reports).
On block the contact gets the user's unavailable presence and the user's resources the contact's; on
unblock the contact gets the current presence and is probed, so both sides see each other again.

The list is a document in the key-value store, cached for the per-stanza checks.
"""

from __future__ import annotations

import asyncio
import secrets
from xml.etree.ElementTree import Element, SubElement

from extensions.presence import addressed, has_from, has_to
from server import ns
from server.jid import JID, JIDError
from server.module import Module
from server.options import Option
from server.stanza import Stanza, element
from server.storage.kv import CachedDocuments
from server.stream.errors import StanzaError

BLOCKING = "urn:xmpp:blocking"
BLOCKLIST = ns.qname(BLOCKING, "blocklist")
BLOCK = ns.qname(BLOCKING, "block")
UNBLOCK = ns.qname(BLOCKING, "unblock")
ITEM = ns.qname(BLOCKING, "item")
BLOCKED = ns.qname("urn:xmpp:blocking:errors", "blocked")
PRIORITY = 1000


def matches(items: frozenset[JID], jid: JID) -> bool:
    """XEP-0191 4: an item matches itself, a bare JID its resources, a domain everything at or under it."""
    if not items:
        return False
    if jid in items or jid.bare in items:
        return True
    labels = jid.domain.split(".")
    return any(JID.make(None, ".".join(labels[i:])) in items for i in range(len(labels)))


def parse_list(stored: list[str] | None) -> frozenset[JID]:
    return frozenset(JID.parse(jid) for jid in stored or ())


def parse_items(payload: Element) -> set[JID]:
    try:
        return {JID.parse(item.get("jid") or "") for item in payload.iterfind(ITEM)}
    except JIDError as exc:
        raise StanzaError("jid-malformed", str(exc)) from None


class Blocking(Module):
    name = "blocking"
    shared_session_state = True  # blocklist pushes from other workers go to the sessions that asked for the list
    options = (Option("bounce", bool, False,
                      "answer blocked senders' messages with an error instead of dropping them silently"),)

    def setup(self) -> None:
        self._lists = CachedDocuments(self.server.storage.kv, self.name, parse_list)
        self._changing = asyncio.Lock()  # blocklist edits are rare: one at a time per host
        self.add_feature(BLOCKING)
        self.iq("get", BLOCKLIST, self.get_blocklist, target="own")
        self.iq("set", BLOCK, self.block, target="own")
        self.iq("set", UNBLOCK, self.unblock, target="own")
        for kind in ("message", "presence", "iq"):
            self.hook(f"{kind}/outbound", self.outbound, priority=PRIORITY)
            self.hook(f"{kind}/inbound", self.inbound, priority=PRIORITY)
            self.hook(f"{kind}/inbound-many", self.inbound_many, priority=PRIORITY)
        self.hook_global("route/remote", self.remote, priority=PRIORITY)

    # --- the list ---------------------------------------------------------------------------------

    async def blocklist(self, user: JID) -> frozenset[JID]:
        return await self._lists.get(user.domain, user.local or "")

    async def blocks(self, user: JID, other: JID) -> bool:
        """Whether `user` blocks `other`; never its own account or its server."""
        if other.bare == user or other == self.host.jid:
            return False
        return matches(await self.blocklist(user), other)

    async def _save(self, user: JID, items: frozenset[JID]) -> None:
        await self._lists.set(user.domain, user.local or "", sorted(map(str, items)) or None)

    # --- enforcement ------------------------------------------------------------------------------

    async def outbound(self, stanza: Stanza) -> bool | None:
        if not await self.blocks(stanza.origin.bare, stanza.to):
            return None
        await self.server.router.bounce(stanza, StanzaError("not-acceptable", extra=Element(BLOCKED)))
        return True

    async def inbound(self, stanza: Stanza) -> bool | None:
        if await self.blocks(stanza.to.bare, stanza.from_):
            kind, type = stanza.kind, stanza.type
            if (kind == "iq" and type in ("get", "set")) or (kind == "message" and self.option("bounce")):
                await self.server.router.bounce(stanza, StanzaError("service-unavailable"))
            return True
        sender = self.server.hosts.get(stanza.from_.domain)
        module = sender.modules.get(self.name) if sender is not None else None
        return await module.on_behalf(stanza) if isinstance(module, Blocking) else None

    async def inbound_many(self, stanza: Stanza, recipients: list[JID]) -> None:
        """Leave out the recipients who block the sender. Most have an empty list in the cache, which costs a
        lookup each; the store is asked only for lists not cached."""
        blocked = set()
        for jid in recipients:
            items = self._lists.cached(jid.domain, jid.local or "")
            if items is None:
                items = await self.blocklist(jid)
            if items and await self.blocks(jid.bare, stanza.from_):
                blocked.add(jid)
        if blocked:
            recipients[:] = [jid for jid in recipients if jid not in blocked]

    async def remote(self, stanza: Stanza) -> bool | None:
        return await self.on_behalf(stanza) if stanza.from_.domain == self.host.name else None

    async def on_behalf(self, stanza: Stanza) -> bool | None:
        """Drop what the server sends for a user of this host to an address the user blocks.

        Errors pass: they answer the blocked address's own stanzas, as XEP-0191 3.3 asks.
        """
        if stanza.from_.local is None or stanza.type == "error":
            return None
        return True if await self.blocks(stanza.from_.bare, stanza.to) else None

    # --- the protocol -----------------------------------------------------------------------------

    async def get_blocklist(self, stanza: Stanza) -> Element:
        user = stanza.to.bare
        if stanza.origin is not None:
            stanza.origin.data[self.name] = True  # pushes go to resources that asked for the list
        result = Element(BLOCKLIST)
        for jid in sorted(map(str, await self.blocklist(user))):
            SubElement(result, ITEM, {"jid": jid})
        return result

    async def block(self, stanza: Stanza) -> None:
        user = stanza.to.bare
        jids = parse_items(stanza.el[0])
        if not jids:
            raise StanzaError("bad-request", "block at least one JID")
        # What else the items carry (XEP-0377 spam reports) is for other modules; one may refuse the block.
        await self.host.hooks.fire("blocking/block", user, stanza.el[0])
        async with self._changing:
            old = await self.blocklist(user)
            added = frozenset(jids - old)
            # Sent while the contacts are not blocked yet, so that this presence still reaches them.
            await self._hide(user, added)
            await self._save(user, old | added)
        self._push(user, BLOCK, added)

    async def unblock(self, stanza: Stanza) -> None:
        user = stanza.to.bare
        jids = parse_items(stanza.el[0])
        async with self._changing:
            old = await self.blocklist(user)
            removed = old & jids if jids else old
            await self._save(user, old - removed)
        # A push without items means "all unblocked" (XEP-0191 3.4).
        self._push(user, UNBLOCK, removed if jids else frozenset())
        await self._reveal(user, removed)

    def _push(self, user: JID, tag: str, jids: frozenset[JID]) -> None:
        for session in self.server.sessions.of(user):
            if session.data.get(self.name):
                iq = element("iq", type="set", id=f"push-{secrets.token_hex(6)}", to=str(session.jid))
                payload = SubElement(iq, tag)
                for jid in sorted(map(str, jids)):
                    SubElement(payload, ITEM, {"jid": jid})
                session.send(iq)

    async def _contacts(self, user: JID, jids: frozenset[JID]) -> list[tuple[JID, bool, bool]]:
        """Roster contacts the changed items match: (JID, user sees its presence, it sees the user's)."""
        if not jids:
            return []
        _, items = await self.server.storage.roster.get(user.domain, user.local or "")
        found = []
        for item in items.values():
            contact = JID.parse(item.jid)
            if matches(jids, contact):
                found.append((contact, has_to(item), has_from(item)))
        return found

    async def _hide(self, user: JID, jids: frozenset[JID]) -> None:
        """XEP-0191 3.3: the contact gets the user's unavailable presence, and the user's resources the contact's."""
        contacts = await self._contacts(user, jids)
        subscribers = {contact for contact, _, sees in contacts if sees}
        out: list[Element] = []
        for session in self.server.sessions.of(user):
            hidden = {jid for jid in session.directed if matches(jids, jid)}
            session.directed -= hidden
            if session.available:
                hidden |= subscribers
            out += [element("presence", type="unavailable", from_=str(session.jid), to=str(jid)) for jid in hidden]
        for el in out:
            await self.server.router.send(el)
        sessions = self.server.sessions.available(user)
        await self.server.sessions.ensure_all(contact for contact, seen, _ in contacts if seen)
        for contact, seen, _ in contacts:
            if seen:
                gone = [s.jid for s in self.server.sessions.available(contact)] or [contact]
                for session in sessions:
                    for jid in gone:
                        session.send(element("presence", type="unavailable", from_=str(jid), to=str(session.jid)))

    async def _reveal(self, user: JID, jids: frozenset[JID]) -> None:
        """XEP-0191 3.4: the contact gets the user's current presence; a probe brings back the contact's."""
        sessions = self.server.sessions.available(user)
        for contact, seen, sees in await self._contacts(user, jids):
            if sees:
                for session in sessions:
                    await self.server.router.send(addressed(session.presence, contact, session.jid))
            if seen and sessions:
                await self.server.router.send(element("presence", type="probe", from_=str(user), to=str(contact)))
