"""Retracting one's own message (XEP-0424) and moderators retracting anyone's (XEP-0425).

Both name the message by the stanza-id the room stamped on it. The room checks who may retract it - its
author, recognised by occupant id (XEP-0421) whatever nick they now use, or a moderator - then tells every
occupant and puts a tombstone in place of the message, so that late joiners no longer get its content.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, SubElement

from extensions.muc.protocol import OCCUPANT_ID, STANZA_ID
from server import ns
from server.stanza import Stanza, element, xmpp_datetime
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from extensions.muc.occupants import Occupant
    from extensions.muc.room import Room

RETRACT_NS = "urn:xmpp:message-retract:1"
MODERATE_NS = "urn:xmpp:message-moderate:1"
RETRACT = ns.qname(RETRACT_NS, "retract")
RETRACTED = ns.qname(RETRACT_NS, "retracted")
MODERATE = ns.qname(MODERATE_NS, "moderate")
MODERATED = ns.qname(MODERATE_NS, "moderated")
REASON = ns.qname(MODERATE_NS, "reason")


def original(room: Room, uid: str | None) -> Element:
    found = room.history.find(uid) if uid else None
    if found is None:
        raise StanzaError("item-not-found", "no such message in this room")
    return found


def check_own_retraction(room: Room, sender: Occupant, retract: Element) -> None:
    """XEP-0424 in a room: only the author may retract, whatever nick they use now."""
    author = original(room, retract.get("id")).find(OCCUPANT_ID)
    if author is None or author.get("id") != sender.id:
        raise StanzaError("forbidden", "only its author retracts a message")
    tombstone(room, retract.get("id") or "", None)


async def moderate(room: Room, st: Stanza) -> None:
    """XEP-0425: a moderator's request (an iq with <moderate/>) retracts any message of the room."""
    moderator = room.by_session.get(st.from_)
    if moderator is None or moderator.role != "moderator":
        raise StanzaError("forbidden", "only moderators moderate messages")
    request = st.el[0]
    if request.find(RETRACT) is None:
        raise StanzaError("bad-request", "the only moderation is retraction")
    uid = request.get("id") or ""
    original(room, uid)
    reason = request.findtext(REASON)
    tombstone(room, uid, (moderator, reason))
    notice = element("message", from_=str(room.jid), type="groupchat")
    retract = SubElement(notice, RETRACT, {"id": uid})
    retract.append(_moderated(moderator))
    if reason:
        SubElement(retract, ns.qname(RETRACT_NS, "reason")).text = reason
    await room.publish(notice)


def _moderated(moderator: Occupant) -> Element:
    moderated = Element(MODERATED, {"by": str(moderator.room_jid)})
    SubElement(moderated, OCCUPANT_ID, {"id": moderator.id})
    return moderated


def tombstone(room: Room, uid: str, moderation: tuple[Occupant, str | None] | None) -> None:
    """The message as the room keeps it from now on: its envelope, ids and author, and <retracted/>."""
    found = original(room, uid)
    stone = Element(found.tag, found.attrib)
    stone.extend(child for child in found if child.tag in (STANZA_ID, OCCUPANT_ID))
    retracted = SubElement(stone, RETRACTED, {"stamp": xmpp_datetime(datetime.now(UTC))})
    if moderation is not None:
        moderator, reason = moderation
        retracted.append(_moderated(moderator))
        if reason:
            SubElement(retracted, ns.qname(RETRACT_NS, "reason")).text = reason
    room.history.replace(uid, stone)
