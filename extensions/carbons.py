"""XEP-0280 Message Carbons: every device of a user sees both sides of its conversations.

A session that enabled carbons gets a copy of each eligible message another resource of its user
sends ('message/outbound') and of each one delivered to its user that it did not receive itself
('message/deliver' names the sessions the router chose, so the addressed resource gets no duplicate).
Copies are sent straight to the sessions, never routed, so nothing else (the archive, offline storage)
sees them twice. The hooks run at default priority, after the archive has stamped its stanza-id, so
received copies carry it as XEP-0313 4.1 asks.
"""

from __future__ import annotations

from collections.abc import Container
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.jid import JID
from server.module import Module
from server.sessions import Session
from server.stanza import Stanza, element
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from server.c2s import C2SConnection

ENABLE = ns.qname(ns.CARBONS, "enable")
DISABLE = ns.qname(ns.CARBONS, "disable")
PRIVATE = ns.qname(ns.CARBONS, "private")
SENT = ns.qname(ns.CARBONS, "sent")
RECEIVED = ns.qname(ns.CARBONS, "received")
FORWARDED = ns.qname(ns.FORWARD, "forwarded")
NO_COPY = ns.qname(ns.HINTS, "no-copy")
BODY = ns.qname(ns.CLIENT, "body")
MUC_USER = "{http://jabber.org/protocol/muc#user}x"


def eligible(el: Element) -> bool:
    """XEP-0280 section 6: chat, or normal with a body; not private, not no-copy (XEP-0334), not from a room."""
    mtype = el.get("type") or "normal"
    if not (mtype == "chat" or (mtype == "normal" and el.find(BODY) is not None)):
        return False
    return el.find(PRIVATE) is None and el.find(NO_COPY) is None and el.find(MUC_USER) is None


class Carbons(Module):
    name = "carbons"
    shared_session_state = True  # a user's resources on other workers copy to the sessions that enabled carbons

    def setup(self) -> None:
        self.add_feature(ns.CARBONS)
        self.iq("set", ENABLE, self.enable, target="own")
        self.iq("set", DISABLE, self.disable, target="own")
        self.hook("message/outbound", self.sent)
        self.hook("message/deliver", self.received)
        self.hook("bind2/features", self.bind2_features)
        self.hook("bind2/inline", self.bind2_inline)

    def bind2_features(self, conn: C2SConnection, inline: Element) -> None:
        SubElement(inline, ns.qname(ns.BIND2, "feature"), {"var": ns.CARBONS})

    def bind2_inline(self, conn: C2SConnection, el: Element) -> bool | None:
        """<enable/> in Bind2's <bind/>: carbons from the session's first stanza on (XEP-0386)."""
        if el.tag != ENABLE:
            return None
        conn.session.data[self.name] = True
        return True

    def _own_session(self, stanza: Stanza) -> Session:
        """Carbons are switched for the session that asks (XEP-0280 4.1): an iq the server made has none."""
        if stanza.origin is None:
            raise StanzaError("not-allowed", "carbons are switched by a client for its own session")
        return stanza.origin

    async def enable(self, stanza: Stanza) -> None:
        self._own_session(stanza).data[self.name] = True

    async def disable(self, stanza: Stanza) -> None:
        self._own_session(stanza).data.pop(self.name, None)

    def sent(self, stanza: Stanza) -> None:
        session = stanza.origin
        # A message to the user's own account is copied where it is delivered, as received.
        if session is None or stanza.to.bare == session.bare or not eligible(stanza.el):
            return
        self._copy(session.bare, SENT, stanza.el, (session,))

    def received(self, stanza: Stanza, sessions: list[Session]) -> None:
        el = stanza.el
        private = el.find(PRIVATE)
        if private is not None:
            el.remove(private)  # XEP-0280 8: the recipient needs no private marker
            return
        if eligible(el):
            stanza.copies = self._copy(stanza.to.bare, RECEIVED, el, (*sessions, stanza.origin))

    def _copy(self, user: JID, direction: str, el: Element,
              exclude: Container[Session | None]) -> tuple[Session, ...]:
        """Copy `el` to the user's sessions that enabled carbons, but those excluded; the sessions copied to."""
        copied = tuple(s for s in self.server.sessions.of(user) if s.data.get(self.name) and s not in exclude)
        for session in copied:
            wrapper = element("message", from_=str(user), to=str(session.jid), type=el.get("type"))
            SubElement(SubElement(wrapper, direction), FORWARDED).append(el)
            session.send(wrapper)
        return copied
