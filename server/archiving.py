"""What a message archive keeps (XEP-0313): one rule for users' archives (extensions/mam.py) and rooms'
(extensions/muc/archive.py), so that a client catching up from either finds the same kinds of message.

A message is kept when it carries something a client shows or acts on later - a body, a reaction
(XEP-0444), a chat marker (XEP-0333), a retraction (XEP-0424) or anything else fastened to an earlier
message (XEP-0422) - or when it asks to be with a XEP-0334 <store/> hint. A <no-store/> or
<no-permanent-store/> hint keeps any message out. Which message types an archive takes is its own affair.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element

from server import ns

NO_STORE = (ns.qname(ns.HINTS, "no-store"), ns.qname(ns.HINTS, "no-permanent-store"))
STORE = ns.qname(ns.HINTS, "store")
MARKERS = "urn:xmpp:chat-markers:0"
KEPT = (
    ns.qname(ns.CLIENT, "body"),
    ns.qname("urn:xmpp:reactions:0", "reactions"),
    *(ns.qname(MARKERS, marker) for marker in ("received", "displayed", "acknowledged")),
    ns.qname("urn:xmpp:message-retract:1", "retract"),
    ns.qname("urn:xmpp:fasten:0", "apply-to"),
)


def worth_archiving(el: Element) -> bool:
    """Whether a message's content belongs in an archive, by the rule above."""
    if any(el.find(hint) is not None for hint in NO_STORE):
        return False
    return el.find(STORE) is not None or any(el.find(tag) is not None for tag in KEPT)
