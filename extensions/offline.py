"""XEP-0160 offline messages: keep chat and normal messages for users who are not online.

Messages are stored with a XEP-0203 delay stamp and delivered, oldest first, when the user's first
available presence has a non-negative priority. Chat-state-only messages are dropped (XEP-0160 says
not to store them, and bouncing them would only make noise); a XEP-0334 <no-store/> hint is honoured
by bouncing the message, so the sender learns it was not delivered. <no-permanent-store/> does not
forbid offline storage: XEP-0334 allows keeping such a message temporarily until delivery.
"""

from __future__ import annotations

import copy
import sys
from datetime import UTC, datetime
from xml.etree.ElementTree import Element

from server import ns
from server.module import Module
from server.sessions import Session
from server.stanza import Stanza, add_delay, parse_stored
from server.storage import QuotaExceeded
from server.storage.engine import Outage, storage_condition
from server.stream.errors import StanzaError
from server.stream.writer import serialize

HINTS = "urn:xmpp:hints"
CHATSTATES = "http://jabber.org/protocol/chatstates"
NO_STORE = ns.qname(HINTS, "no-store")
STORE = ns.qname(HINTS, "store")
THREAD = ns.qname(ns.CLIENT, "thread")
FULL = "offline storage full"
UNAVAILABLE = "offline storage is not available"


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
        self.hook("message/offline", self.store)
        self.hook("presence/initial", self.deliver)

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
        return True

    async def deliver(self, session: Session) -> None:
        if session.priority < 0:
            return
        bare = session.bare
        offline = self.server.storage.offline
        messages = await offline.pop_all(bare.domain, bare.local)
        if session.closed:
            # The session ended while the database answered: keep the messages for the next login,
            # past the quota, since they were accepted already.
            for stamp, xml in messages:
                await offline.push(bare.domain, bare.local, xml, stamp, sys.maxsize)
            return
        for _, xml in messages:
            session.send(parse_stored(xml))
