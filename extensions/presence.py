"""RFC 6121 sections 3 and 4: presence subscriptions, presence broadcast, probes and directed presence.

A subscription stanza is processed twice, as RFC 6121 Appendix A describes: by the sender's server
(outbound, A.2) and by the recipient's (inbound, A.3). The router fires presence events on the
destination host, so a stanza that still has its client origin is handed to the sender's host's
presence module for the outbound step (stanzas to remote domains are caught on 'route/remote'), which
sends it on through the router without an origin, where the destination treats it as inbound.

Subscription state lives in the roster (subscription, ask, approved); "Pending In" is a stored copy of
the request (storage add_pending), redelivered whenever the user becomes available until answered.

A user's last unavailable presence, which answers probes while the user is offline, is stored in the
background, the latest per user: a session's end does not wait for a write. When sessions end faster
than the store takes writes (a login storm), those waiting to be stored would otherwise each keep their
connection, and its TLS buffers, in memory (5 MiB for every 20 sessions waiting).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from typing import cast
from xml.etree.ElementTree import Element

from extensions.roster import Roster
from server import ns
from server.jid import JID
from server.module import Module
from server.sessions import Session
from server.stanza import Stanza, add_delay, element, error_reply, parse_stored
from server.storage import RosterItem
from server.stream.errors import StanzaError
from server.stream.writer import serialize

PRIORITY = ns.qname(ns.CLIENT, "priority")
PREAUTH = "{urn:xmpp:pars:0}preauth"
SUBSCRIPTION_TYPES = frozenset({"subscribe", "subscribed", "unsubscribe", "unsubscribed"})
LAST_UNAVAILABLE = "last-unavailable"  # kv key of the last unavailable presence, for probes
# Last unavailable presences kept in memory, least recently used dropped first: each contact that logs in
# probes an offline user, and the answer is that user's stored last presence.
LAST_KEPT = 1024


def has_to(item: RosterItem | None) -> bool:
    """The user receives the contact's presence."""
    return item is not None and item.subscription in ("to", "both")


def has_from(item: RosterItem | None) -> bool:
    """The contact receives the user's presence."""
    return item is not None and item.subscription in ("from", "both")


def subscription(to: bool, from_: bool) -> str:
    return ("none", "from", "to", "both")[2 * to + from_]


def copy_of(el: Element) -> Element:
    """A copy to readdress; the children are shared, so they must not be modified."""
    out = Element(el.tag, dict(el.attrib))
    out.extend(el)
    return out


def addressed(el: Element, to: JID | str, from_: JID | str | None = None) -> Element:
    out = copy_of(el)
    out.set("to", str(to))
    if from_ is not None:
        out.set("from", str(from_))
    return out


def parse_priority(el: Element) -> int:
    """RFC 6121 4.7.2.3: an integer from -128 to 127, 0 when absent; ValueError otherwise."""
    text = el.findtext(PRIORITY)
    if text is None:
        return 0
    value = int(text.strip())
    if not -128 <= value <= 127:
        raise ValueError(f"priority {value} out of range")
    return value


class Presence(Module):
    name = "presence"
    depends = ("roster",)

    def setup(self) -> None:
        self.hook("presence/outbound", self.outbound, priority=100)
        for target in ("bare", "full", "host"):
            self.hook(f"presence/{target}", self.inbound, priority=100)
        self.hook("presence/self", self.broadcast, priority=100)
        self.hook("session/closed", self.session_closed)
        self.hook("roster/removed", self.roster_removed)
        self.hook("session/available-elsewhere", self.available_elsewhere)
        self._last: dict[JID, str | None] = {}  # serialized last unavailable presence, by user
        self._unsaved: dict[JID, str] = {}  # last unavailable presences not stored yet, oldest first
        self._saving: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        """What the sessions that ended last left to store is stored before the server stops."""
        if self._saving is not None:
            await asyncio.shield(self._saving)

    @property
    def roster(self) -> Roster:
        return cast(Roster, self.host.modules["roster"])

    async def _send(self, stanzas: list[Element]) -> None:
        for el in stanzas:
            await self.server.router.send(el)

    def _deliver(self, user: JID, el: Element) -> None:
        """To every available resource: where RFC 6121 3.1.3 and 8.5.2.1 send subscription stanzas."""
        for session in self.server.sessions.available(user):
            session.send(el)

    def _current(self, user: JID, to: JID | str) -> list[Element]:
        """The presence of each of the user's available resources, addressed to `to`."""
        return [addressed(s.presence, to) for s in self.server.sessions.available(user)
                if s.presence is not None]

    def _unavailable(self, user: JID, to: JID | str) -> list[Element]:
        """Unavailable presence from each of the user's available resources, addressed to `to`."""
        return [element("presence", type="unavailable", from_=str(s.jid), to=str(to))
                for s in self.server.sessions.available(user)]

    # --- the user's server: presence a local client addressed to someone --------------------------

    async def outbound(self, stanza: Stanza) -> bool:
        """Presence a local client addressed to anyone, local, remote or a service such as a room."""
        session, kind, to = stanza.origin, stanza.type, stanza.to
        if kind in SUBSCRIPTION_TYPES:
            await self._outbound_subscription(session.bare, to.bare, stanza.el, kind)
        elif kind in (None, "unavailable"):
            await self._directed(session, to, stanza.el)
        elif kind in ("probe", "error"):
            await self.server.router.send(stanza.el)
        else:
            error = StanzaError("bad-request", f"unknown presence type {kind!r}")
            session.send(error_reply(stanza.el, error))
        return True

    async def _directed(self, session: Session, to: JID, el: Element) -> None:
        """RFC 6121 4.6: delivered as is; non-subscribers are remembered to get unavailable presence later."""
        if el.get("type") == "unavailable":
            session.directed.discard(to)
        elif to.bare != session.bare and not has_from(await self.roster.item(session.bare, to.bare)):
            session.directed.add(to)
        await self.server.router.send(el)

    async def _outbound_subscription(self, user: JID, contact: JID, el: Element, kind: str) -> None:
        """RFC 6121 A.2: update the user's side of the subscription, then route it where the table says."""
        if contact == user:
            return  # a user's resources share its presence implicitly (RFC 6121 4.2.2)
        store = self.server.storage.roster
        stamped = addressed(el, contact, user)  # RFC 6121 3.1.2: between bare JIDs
        out: list[Element] = []
        async with self.roster.locked(user):
            current = await self.roster.item(user, contact) or RosterItem(str(contact))
            new = current
            if kind == "subscribe":
                if not (has_to(current) or current.ask):
                    new = replace(current, ask=True)
                out.append(stamped)
            elif kind == "unsubscribe":
                new = replace(current, ask=False, subscription=subscription(False, has_from(current)))
                out.append(stamped)
            elif kind == "subscribed":
                if await store.remove_pending(user.domain, user.local or "", str(contact)):
                    new = replace(current, approved=False, subscription=subscription(has_to(current), True))
                    out += [stamped, *self._current(user, contact)]  # RFC 6121 3.1.5
                elif not has_from(current):
                    new = replace(current, approved=True)  # RFC 6121 3.4: a pre-approval stays here
            else:  # unsubscribed denies a pending request, cancels a subscription or withdraws a pre-approval
                pending = await store.remove_pending(user.domain, user.local or "", str(contact))
                new = replace(current, approved=False, subscription=subscription(has_to(current), False))
                if has_from(current):
                    out += [stamped, *self._unavailable(user, contact)]  # RFC 6121 3.2.2
                elif pending:
                    out.append(stamped)
            if new != current:
                await self.roster.update(user, new)
        await self._send(out)

    # --- the contact's server: presence addressed to a local account ------------------------------

    async def inbound(self, stanza: Stanza) -> bool | None:
        to, kind = stanza.to, stanza.type
        if to.local is None:
            return None
        if kind in SUBSCRIPTION_TYPES:
            await self._inbound_subscription(to.bare, stanza.from_.bare, stanza.el, kind)
            return True
        if kind == "probe":
            await self._answer_probe(to.bare, stanza.from_)
            return True
        if kind == "error":
            # Delivered as usual, never answered; the entity that failed gets no more directed presence.
            for session in self.server.sessions.of(to.bare):
                session.directed.discard(stanza.from_)
        return None

    async def _inbound_subscription(self, user: JID, contact: JID, el: Element, kind: str) -> None:
        """RFC 6121 A.3: update the user's side, then deliver the stanza or answer it where the table says."""
        store = self.server.storage.roster
        stamped = addressed(el, user, contact)
        deliver = False
        out: list[Element] = []
        # XEP-0379: a request carrying a token of the user's invitation is approved, and answered in kind.
        preauth = kind == "subscribe" and el.find(PREAUTH) is not None and \
            bool(await self.host.hooks.fire("presence/preauth", user, contact, el.find(PREAUTH)))
        async with self.roster.locked(user):
            item = await self.roster.item(user, contact)
            new = item
            if kind == "subscribe":
                if preauth and not has_from(item):
                    item = new = replace(item or RosterItem(str(contact)), approved=True)
                if item is not None and (has_from(item) or item.approved):
                    # Already subscribed (the user resynchronises), or pre-approved (RFC 6121 3.4): say yes.
                    new = replace(item, approved=False, subscription=subscription(has_to(item), True))
                    out.append(element("presence", type="subscribed", from_=str(user), to=str(contact)))
                    if not has_from(item):
                        out += self._current(user, contact)
                elif await self._new_request(user, contact):
                    await store.add_pending(user.domain, user.local or "", str(contact), serialize(stamped))
                    deliver = True
            elif kind == "subscribed":
                if item is not None and item.ask:
                    new = replace(item, ask=False, subscription=subscription(True, has_from(item)))
                    deliver = True
            elif kind == "unsubscribe":
                deliver = await store.remove_pending(user.domain, user.local or "", str(contact))
                if has_from(item):
                    new = replace(item, subscription=subscription(has_to(item), False))
                    deliver = True
                    out += self._unavailable(user, contact)  # RFC 6121 3.3.3
            elif item is not None and (item.ask or has_to(item)):  # unsubscribed
                new = replace(item, ask=False, subscription=subscription(False, has_from(item)))
                deliver = True
            if new is not None and new != item:
                await self.roster.update(user, new)
        if deliver:
            self._deliver(user, stamped)
        await self._send(out)
        if preauth and not has_to(new):
            await self._outbound_subscription(user, contact, element("presence", type="subscribe"), "subscribe")

    async def _new_request(self, user: JID, contact: JID) -> bool:
        """A request to remember and deliver: the account exists and the contact has none pending yet."""
        if not await self.server.storage.accounts.exists(user.domain, user.local or ""):
            return False  # RFC 6121 8.5.1: subscription stanzas to a missing account are ignored
        pending = await self.server.storage.roster.list_pending(user.domain, user.local or "")
        return all(jid != str(contact) for jid, _ in pending)

    async def _answer_probe(self, user: JID, requester: JID) -> None:
        """RFC 6121 4.3.2: subscribers learn the user's presence; anyone else learns only 'unsubscribed'."""
        if requester.bare != user and not has_from(await self.roster.item(user, requester.bare)):
            answers = [element("presence", type="unsubscribed", from_=str(user), to=str(requester.bare))]
        else:
            answers = self._current(user, requester) or [await self._last_unavailable(user, requester)]
        await self._send(answers)

    async def _last_unavailable(self, user: JID, to: JID) -> Element:
        """The stored presence, kept in memory when this process alone writes it (with several worker
        processes, the user's last session may have ended on another)."""
        if user in self._last:
            stored = self._last.pop(user)
            self._last[user] = stored  # most recently used goes last
        elif user in self._unsaved:
            stored = self._unsaved[user]
        else:
            stored = await self.server.storage.kv.get(user.domain, user.local or "", self.name, LAST_UNAVAILABLE)
            if self.server.cluster is None and user not in self._last:  # else a newer one came meanwhile
                self._keep_last(user, stored)
        if stored is None:
            return element("presence", type="unavailable", from_=str(user), to=str(to))
        return addressed(parse_stored(stored), to)

    # --- presence broadcast: presence without 'to' from a local client ----------------------------

    async def broadcast(self, stanza: Stanza) -> bool | None:
        session = stanza.origin
        if session is None:
            return None
        if stanza.type is None:
            await self._available(session, stanza.el)
        elif stanza.type == "unavailable":
            await self._go_unavailable(session, stanza.el)
        elif stanza.type != "error":
            error = StanzaError("bad-request", "this presence type needs a 'to'")
            session.send(error_reply(stanza.el, error))
        return True

    async def _available(self, session: Session, el: Element) -> None:
        """RFC 6121 4.2 and 4.4: to the contacts with 'from'/'both' and to all of the user's resources.

        Initial presence also probes the contacts with 'to'/'both' (from the full JID, so the answers reach
        only this resource), shows this resource the user's others and hands it pending subscription requests.
        """
        try:
            priority = parse_priority(el)
        except ValueError as exc:
            session.send(error_reply(el, StanzaError("bad-request", str(exc))))
            return
        initial = session.presence is None
        session.priority = priority
        session.presence = el
        user = session.bare
        items = await self.roster.items(user)
        out: list[Element] = []
        if initial:
            out += [element("presence", type="probe", from_=str(session.jid), to=jid)
                    for jid, item in items.items() if has_to(item)]
        out += [addressed(el, jid) for jid, item in items.items() if has_from(item)]
        for other in self.server.sessions.available(user):
            other.send(addressed(el, other.jid))
            if initial and other is not session and other.presence is not None:
                session.send(addressed(other.presence, session.jid))
        if initial:
            for _, xml in await self.server.storage.roster.list_pending(user.domain, user.local or ""):
                session.send(parse_stored(xml))
        await self._send(out)
        if initial:
            await self.host.hooks.fire("presence/initial", session)

    async def _go_unavailable(self, session: Session, el: Element) -> None:
        """RFC 6121 4.5.2: unavailable presence goes everywhere available presence went, directed included."""
        was_available = session.presence is not None
        session.presence = None
        user = session.bare
        targets: dict[str, None] = {}
        if was_available:
            self._remember_unavailable(user, el)
            items = await self.roster.items(user)
            targets.update((jid, None) for jid, item in items.items() if has_from(item))
            for other in self.server.sessions.available(user):
                other.send(addressed(el, other.jid))
        targets.update((str(jid), None) for jid in session.directed)
        session.directed.clear()
        await self._send([addressed(el, jid) for jid in targets])

    def _remember_unavailable(self, user: JID, el: Element) -> None:
        """Kept with a XEP-0203 stamp, to answer probes while the user is offline (RFC 6121 4.3.2)."""
        last = copy_of(el)
        add_delay(last, self.host.name, datetime.now(UTC))
        stored = serialize(last)
        if self.server.cluster is None:
            self._keep_last(user, stored)
        self._unsaved.pop(user, None)
        self._unsaved[user] = stored
        if self._saving is None:
            self._saving = self.spawn(self._save())

    async def _save(self) -> None:
        """Store the waiting presences one by one, oldest first; a user's newer one replaces the waiting one."""
        try:
            while self._unsaved:
                user, stored = next(iter(self._unsaved.items()))
                try:
                    await self.server.storage.kv.set(user.domain, user.local or "", self.name, LAST_UNAVAILABLE,
                                                     stored)
                except Exception:
                    self.log.exception("the last presence of %s could not be stored", user)
                if self._unsaved.get(user) is stored:
                    del self._unsaved[user]
        finally:
            self._saving = None

    def _keep_last(self, user: JID, stored: str | None) -> None:
        self._last.pop(user, None)
        self._last[user] = stored
        if len(self._last) > LAST_KEPT:
            del self._last[next(iter(self._last))]

    async def session_closed(self, session: Session) -> None:
        if session.presence is not None or session.directed:
            unavailable = element("presence", type="unavailable", from_=str(session.jid))
            await self._go_unavailable(session, unavailable)

    async def available_elsewhere(self, session: Session) -> None:
        """A contact's session on another process of a cluster became available: the user's resources here
        send it their presence, as if it had probed them. Its probes and this process's broadcasts crossed
        with the news, so they may have missed it; where they did not, the contact gets the same available
        presence twice, which changes nothing for its client."""
        out: list[Element] = []
        for jid, item in (await self.roster.items(session.bare)).items():
            user = JID.parse(jid)
            if not has_to(item) or user.domain != self.host.name:
                continue
            here = [s for s in self.server.sessions.available(user) if not s.elsewhere and s.presence is not None]
            if here and has_from(await self.roster.item(user, session.bare)):
                out += [addressed(s.presence, session.jid, s.jid) for s in here if s.presence is not None]
        await self._send(out)

    async def roster_removed(self, user: JID, item: RosterItem, pending: bool) -> None:
        """RFC 6121 2.5.2: removing a contact cancels the subscriptions both ways and any pending request."""
        out: list[Element] = []
        if item.ask or has_to(item):
            out.append(element("presence", type="unsubscribe", from_=str(user), to=item.jid))
        if pending or has_from(item):
            out.append(element("presence", type="unsubscribed", from_=str(user), to=item.jid))
        if has_from(item):
            out += self._unavailable(user, item.jid)
        await self._send(out)
