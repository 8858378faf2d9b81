"""XEP-0352 Client State Indication: an inactive client (a phone in a pocket) is woken only for what matters.

While a client says it is inactive, its session holds back presence updates and chat states and keeps
only the latest of each: one per sender for presence, one per conversation (and direction, for carbons)
for chat states. Everything else, messages with a body first, goes out at once; such a message also
drops the chat state held for its conversation, which it supersedes. On <active/> what is held goes
out in the order it came.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, SubElement

from extensions.offline import has_content
from server import ns
from server.module import Module
from server.sessions import Session
from server.stanza import MESSAGE, PRESENCE

if TYPE_CHECKING:
    from server.c2s import C2SConnection

CSI = "urn:xmpp:csi:0"
ACTIVE = ns.qname(CSI, "active")
INACTIVE = ns.qname(CSI, "inactive")


def conversation(el: Element) -> tuple[tuple[str, str], Element]:
    """How a message came and the other party's bare JID, and the message itself, out of its carbon."""
    for how in ("sent", "received"):
        inner = el.find(f"{{{ns.CARBONS}}}{how}/{{{ns.FORWARD}}}forwarded/{MESSAGE}")
        if inner is not None:
            return (how, _bare(inner.get("to" if how == "sent" else "from"))), inner
    return ("direct", _bare(el.get("from"))), el


def _bare(jid: str | None) -> str:
    return (jid or "").split("/", 1)[0]


class Held:
    """What an inactive session keeps back: the newest stanza per key, in the order of those stanzas."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.held: dict[tuple[str, ...], str] = {}

    def take(self, el: Element, data: str) -> bool:
        if el.tag == PRESENCE:
            if el.get("type") not in (None, "unavailable"):
                return False  # subscriptions and errors want an answer
            key: tuple[str, ...] = ("presence", el.get("from") or "")
        elif el.tag == MESSAGE:
            talk, message = conversation(el)
            key = ("chat state", *talk)
            if message.get("type") == "error" or has_content(message):
                self.held.pop(key, None)
                return False
        else:
            return False
        self.held.pop(key, None)  # so that the newest goes after what was held before it
        self.held[key] = data
        return True

    def flush(self) -> None:
        held, self.held = self.held, {}
        for data in held.values():
            self.session.send_raw(data)


class Csi(Module):
    name = "csi"

    def setup(self) -> None:
        self.hook("c2s/features", self.features)
        self.hook("c2s/nonza", self.nonza)
        self.hook("bind2/features", self.bind2_features)
        self.hook("bind2/inline", self.bind2_inline)

    def bind2_features(self, conn: C2SConnection, inline: Element) -> None:
        SubElement(inline, ns.qname(ns.BIND2, "feature"), {"var": CSI})

    def bind2_inline(self, conn: C2SConnection, el: Element) -> bool | None:
        """<inactive/> or <active/> in Bind2's <bind/>: the session starts in that state (XEP-0386)."""
        return self.nonza(conn.session, el) if el.tag in (ACTIVE, INACTIVE) else None

    def features(self, conn: C2SConnection, features: Element, stage: str) -> None:
        if stage == "post-auth":
            SubElement(features, ns.qname(CSI, "csi"))

    def nonza(self, session: Session, el: Element) -> bool | None:
        if el.tag == INACTIVE:
            if self.name not in session.data:
                held = session.data[self.name] = Held(session)
                session.hold = held.take
        elif el.tag == ACTIVE:
            held = session.data.pop(self.name, None)
            if isinstance(held, Held):
                session.hold = None
                held.flush()
        else:
            return None
        return True
