"""XEP-0160 offline messages: keep chat and normal messages for users who are not online.

Messages are stored with a XEP-0203 delay stamp and delivered, oldest first, when the user's first
available presence has a non-negative priority. Chat-state-only messages are dropped (XEP-0160 says
not to store them, and bouncing them would only make noise); a XEP-0334 <no-store/> hint is honoured
by bouncing the message, so the sender learns it was not delivered. <no-permanent-store/> does not
forbid offline storage: XEP-0334 allows keeping such a message temporarily until delivery.

Delivery goes in pages as fast as the client takes them. What never reached a client that went
('session/undelivered') comes back here: messages go to another resource, or back to offline storage
ahead of what was stored since, in their order.

A message may be stored just after the user's initial presence took the backlog: its sender's process
(another member of a cluster, or this one while the store waited for the database) did not know the user
was available yet; so may what a session that went hands back. So every store, and every return to storage,
wakes the user's available sessions, here and, in a cluster, on the other members (frame 'offline/HOST'), and
one of them takes what came.
"""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime
from weakref import WeakKeyDictionary, WeakSet
from xml.etree.ElementTree import Element

from server import ns
from server.jid import JID, JIDError
from server.module import Module
from server.router import highest
from server.sessions import Session
from server.stanza import IQ, MESSAGE, Stanza, add_delay, parse_stored
from server.storage import QuotaExceeded
from server.storage.engine import Outage, storage_condition
from server.stream.errors import StanzaError
from server.stream.writer import serialize

HINTS = "urn:xmpp:hints"
CHATSTATES = "http://jabber.org/protocol/chatstates"
NO_STORE = ns.qname(HINTS, "no-store")
STORE = ns.qname(HINTS, "store")
THREAD = ns.qname(ns.CLIENT, "thread")
DELAY = ns.qname(ns.DELAY, "delay")
FULL = "offline storage full"
UNAVAILABLE = "offline storage is not available"
PAGE = 100  # messages taken from storage at a time for a client that takes them


def has_content(el: Element) -> bool:
    """Whether a message carries something for the user, not just a chat state, hints or a thread id."""
    return any(
        child.tag != THREAD and not child.tag.startswith((f"{{{HINTS}}}", f"{{{CHATSTATES}}}"))
        for child in el
    )


class Offline(Module):
    name = "offline"

    def setup(self) -> None:
        self.add_feature(ns.OFFLINE)
        # Messages that could not be stored (a full disk): bounced, counted, logged once per burst.
        self.outage = Outage("offline storage", "messages to offline users are bounced")
        self.server.metrics.watch(self.outage)
        self.hook("message/offline", self.store)
        self.hook("presence/initial", self.deliver)
        self.hook("session/closed", self.session_closed, priority=-50)  # after stream management
        self.hook("session/undelivered", self.undelivered)
        self.frame_kind = f"offline/{self.host.name}"
        if self.server.cluster is not None:
            self.server.cluster.on(self.frame_kind, self.from_member)
        self._delivering: dict[Session, asyncio.Task[None]] = {}
        # How many messages of a session went back to storage: what it hands on later goes behind them.
        self._restored: WeakKeyDictionary[Session, int] = WeakKeyDictionary()
        self._again: WeakSet[Session] = WeakSet()  # woken while taking the backlog: another look when done

    async def store(self, stanza: Stanza) -> bool | None:
        """Take a chat or normal message for a user without an available resource.

        True when the message was stored (or bounced for the quota, or dropped as content-free); None
        lets the router bounce it as service-unavailable.
        """
        el = stanza.el
        if el.find(NO_STORE) is not None:
            return None
        if el.find(STORE) is None and not has_content(el):
            return True
        now = datetime.now(UTC)
        stored = copy.copy(el)
        add_delay(stored, self.host.name, now, "Offline Storage")
        user = stanza.to.bare
        try:
            await self.server.storage.offline.push(user.domain, user.local, serialize(stored), now,
                                                   self.server.config.limits.offline_quota)
        except QuotaExceeded:
            self.log.info("offline storage of %s is full; bouncing a message from %s", user, stanza.from_)
            await self.server.router.bounce(stanza, StanzaError("resource-constraint", FULL))
        except Exception as exc:
            condition = storage_condition(exc)
            if condition is None:
                raise
            self.outage.failed(exc)
            await self.server.router.bounce(stanza, StanzaError(condition, UNAVAILABLE))
        else:
            self.outage.succeeded()
            self._stored(user)
        return True

    def _stored(self, user: JID) -> None:
        cluster = self.server.cluster
        if cluster is not None:
            for member in cluster.members():
                if member != cluster.member:
                    cluster.send(member, self.frame_kind, str(user))
        self.wake(user)

    async def from_member(self, sender: str, payload: str) -> None:
        self.wake(JID.parse(payload))

    def wake(self, user: JID) -> None:
        """A message was stored for `user`: the session of this process that a message to the account goes to,
        if any is available yet, takes the backlog now."""
        sessions = highest([s for s in self.server.router.candidates(user) if not s.elsewhere and not s.closed])
        if not sessions:
            return
        session = sessions[0]
        if session in self._delivering:
            self._again.add(session)
        else:
            self.spawn(self.deliver(session))

    async def deliver(self, session: Session) -> None:
        """Deliver the stored messages, oldest first, a page at a time as the client takes them.

        A page leaves storage only when the client has room for it (stream management's queue, or the
        connection's buffer), so a backlog larger than stream management's 'max_queue' never overflows it
        and what is not sent yet stays stored if the session ends. What the client has room for goes at
        once; the rest follows from a task of its own, since the acknowledgements it waits for are read by
        this connection's reader, which is running this hook.
        """
        if session.priority < 0:
            return
        if await self._page(session, wait=False) is not False:
            task = self.spawn(self._pages(session))
            self._delivering[session] = task
            task.add_done_callback(lambda _: self._delivering.pop(session, None))

    async def _pages(self, session: Session) -> None:
        while await self._page(session, wait=True) is not False or self._woken(session):
            pass

    def _woken(self, session: Session) -> bool:
        """Once after a wake during the delivery: what was stored meanwhile may be behind the last page."""
        if session not in self._again:
            return False
        self._again.discard(session)
        return not session.closed

    async def _page(self, session: Session, wait: bool) -> bool | None:
        """Send one page of the backlog: False when the backlog is done or the session is closed, None when
        the client had no room and `wait` was False."""
        wanted = await session.ready(PAGE, wait)
        if not wanted:
            return None if not wait and not session.closed else False
        bare = session.bare
        page = await self.server.storage.offline.pop(bare.domain, bare.local, wanted)
        for _, xml in page:
            session.send(parse_stored(xml))  # a session that closed meanwhile hands them on when it ends
        return len(page) == wanted

    async def session_closed(self, session: Session) -> None:
        """Let a page under way reach the session before the session hands on what it did not deliver."""
        task = self._delivering.get(session)
        if task is not None:
            await asyncio.wait([task])

    async def undelivered(self, session: Session, stanzas: list[Element]) -> None:
        """What never reached a client that went: messages to another resource, else back to offline storage
        ahead of what was stored since (they are older), iq requests refused; the rest is dropped, as
        XEP-0198 allows for what a session that is not resumed leaves behind."""
        back: list[tuple[datetime, str]] = []
        for el in stanzas:
            sender = _sender(el)
            if sender is None:
                continue
            if el.tag == IQ and el.get("type") in ("get", "set"):
                await self.server.router.bounce(Stanza(el, "iq", sender, session.jid),
                                                StanzaError("service-unavailable"))
            elif el.tag == MESSAGE and _worth_keeping(session, el, sender):
                message = copy.copy(el)
                message.set("to", str(session.bare))
                if el.find(NO_STORE) is not None:
                    await self.server.router.bounce(Stanza(message, "message", sender, session.bare),
                                                    StanzaError("service-unavailable"))
                elif not self._to_other_resources(session, message):
                    now = datetime.now(UTC)
                    if message.find(DELAY) is None:
                        add_delay(message, self.host.name, now, "Offline Storage")
                    back.append((now, serialize(message)))
        if back:
            restored = self._restored.get(session, 0)
            self._restored[session] = restored + len(back)
            await self.server.storage.offline.restore(session.bare.domain, session.bare.local, back, restored)
            self._stored(session.bare)  # a resource that came meanwhile took the backlog before these

    def _to_other_resources(self, session: Session, message: Element) -> bool:
        others = highest([s for s in self.server.router.candidates(session.bare) if not s.closed and s is not session])
        if not others:
            return False
        add_delay(message, self.host.name, datetime.now(UTC), "Resent after a lost connection")
        for other in others:
            other.send(message)
        return True


def _worth_keeping(session: Session, el: Element, sender: JID) -> bool:
    """A chat or normal message with content from someone else; the account's own copies (carbons, archive
    results) are elsewhere already."""
    return (el.get("type") or "normal") in ("chat", "normal") and has_content(el) and sender.bare != session.bare


def _sender(el: Element) -> JID | None:
    try:
        return JID.parse(el.get("from") or "")
    except JIDError:
        return None
