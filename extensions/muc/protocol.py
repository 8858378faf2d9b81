"""XEP-0045 vocabulary shared by every part of the room: namespaces, status codes, affiliations and roles.

Affiliations are ranked so that permission checks compare ranks instead of spelling out every pair
(XEP-0045 5.2.2: a lower affiliation can never act on a higher one).
"""

from __future__ import annotations

from xml.etree.ElementTree import Element, SubElement

from server import ns

MUC = "http://jabber.org/protocol/muc"
USER = f"{MUC}#user"
ADMIN = f"{MUC}#admin"
OWNER = f"{MUC}#owner"
ROOMCONFIG = f"{MUC}#roomconfig"
ROOMINFO = f"{MUC}#roominfo"
REQUEST = f"{MUC}#request"
STABLE_ID = f"{MUC}#stable_id"  # the room reflects a message with its sender's id (7.4)

SID = "urn:xmpp:sid:0"  # XEP-0359 unique and stable stanza ids
OCCUPANT_ID_NS = "urn:xmpp:occupant-id:0"  # XEP-0421
SELF_PING = f"{MUC}#self-ping-optimization"  # XEP-0410
RETRACT_NS = "urn:xmpp:message-retract:1"  # XEP-0424
MODERATE_NS = "urn:xmpp:message-moderate:1"  # XEP-0425

X_MUC = ns.qname(MUC, "x")
X_USER = ns.qname(USER, "x")
ADMIN_QUERY = ns.qname(ADMIN, "query")
OWNER_QUERY = ns.qname(OWNER, "query")
BODY = ns.qname(ns.CLIENT, "body")
SUBJECT = ns.qname(ns.CLIENT, "subject")
STANZA_ID = ns.qname(SID, "stanza-id")
OCCUPANT_ID = ns.qname(OCCUPANT_ID_NS, "occupant-id")
RETRACT = ns.qname(RETRACT_NS, "retract")
RETRACTED = ns.qname(RETRACT_NS, "retracted")
# What a client may not put in a stanza the room passes on: the room adds its own.
ROOM_ONLY = frozenset({X_MUC, X_USER, OCCUPANT_ID})

# Status codes (XEP-0045 15.6.2), by what they tell the occupant.
NON_ANONYMOUS = "100"
AFFILIATION_CHANGED = "101"
CONFIG_CHANGED = "104"
SELF = "110"
LOGGED = "170"
NOT_LOGGED = "171"
NOW_NON_ANONYMOUS = "172"
NOW_SEMI_ANONYMOUS = "173"
CREATED = "201"
NICK_ASSIGNED = "210"
BANNED = "301"
NEW_NICK = "303"
KICKED = "307"
REMOVED_AFFILIATION = "321"
REMOVED_MEMBERS_ONLY = "322"
REMOVED_ERROR = "333"

AFFILIATIONS = ("outcast", "none", "member", "admin", "owner")
ROLES = ("none", "visitor", "participant", "moderator")


def affiliation_rank(affiliation: str) -> int:
    return AFFILIATIONS.index(affiliation)


def user_x(*statuses: str) -> Element:
    """A muc#user <x/> carrying the given status codes (the caller adds the <item/> first)."""
    x = Element(X_USER)
    for code in statuses:
        SubElement(x, ns.qname(USER, "status"), {"code": code})
    return x


def item(namespace: str, reason: str | None = None, **attrs: str | None) -> Element:
    """An <item/> of muc#user or muc#admin; attributes whose value is None are left out."""
    el = Element(ns.qname(namespace, "item"), {k: v for k, v in attrs.items() if v is not None})
    if reason:
        SubElement(el, ns.qname(namespace, "reason")).text = reason
    return el
