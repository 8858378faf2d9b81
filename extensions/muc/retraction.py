"""Retracting one's own message (XEP-0424) and moderators retracting anyone's (XEP-0425).

Both name the message by the stanza-id the room stamped on it, found in the discussion history or else in
the room's archive. The room checks who may retract it - its author, recognised by occupant id (XEP-0421)
whatever nick they now use, or a moderator - then tells every occupant and puts a tombstone in place of
the message, in the history and the archive, so that neither late joiners nor archive queries get its
content any more.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, SubElement

from extensions.muc import archive
from extensions.muc.protocol import MODERATE_NS, OCCUPANT_ID, RETRACT, RETRACT_NS, RETRACTED, STANZA_ID
from server import ns
from server.stanza import Stanza, element, xmpp_datetime
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from extensions.muc.occupants import Occupant
    from extensions.muc.room import Room

MODERATE = ns.qname(MODERATE_NS, "moderate")
MODERATED = ns.qname(MODERATE_NS, "moderated")
REASON = ns.qname(MODERATE_NS, "reason")


async def original(room: Room, uid: str | None) -> Element:
    found = room.history.find(uid) if uid else None
    if found is None and uid and room.config.archive:
        found = await archive.find(room, uid)
    if found is None:
        raise StanzaError("item-not-found", "no such message in this room")
    return found


async def retract_own(room: Room, sender: Occupant, retract: Element) -> None:
    """XEP-0424 in a room: only the author may retract, whatever nick they use now."""
    uid = retract.get("id") or ""
    found = await original(room, uid)
    author = found.find(OCCUPANT_ID)
    if author is None or author.get("id") != sender.id:
        raise StanzaError("forbidden", "only its author retracts a message")
    await tombstone(room, uid, found, None)


async def moderate(room: Room, st: Stanza) -> None:
    """XEP-0425: a moderator's request (an iq with <moderate/>) retracts any message of the room."""
    moderator = room.by_session.get(st.from_)
    if moderator is None or moderator.role != "moderator":
        raise StanzaError("forbidden", "only moderators moderate messages")
    request = st.el[0]
    if request.find(RETRACT) is None:
        raise StanzaError("bad-request", "the only moderation is retraction")
    uid = request.get("id") or ""
    found = await original(room, uid)
    reason = request.findtext(REASON)
    await tombstone(room, uid, found, (moderator, reason))
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


async def tombstone(room: Room, uid: str, found: Element, moderation: tuple[Occupant, str | None] | None) -> None:
    """The message as the room keeps it from now on: its envelope, ids and author, and <retracted/>."""
    stone = Element(found.tag, found.attrib)
    stone.extend(child for child in found if child.tag in (STANZA_ID, OCCUPANT_ID))
    retracted = SubElement(stone, RETRACTED, {"stamp": xmpp_datetime(datetime.now(UTC))})
    if moderation is not None:
        moderator, reason = moderation
        retracted.append(_moderated(moderator))
        if reason:
            SubElement(retracted, ns.qname(RETRACT_NS, "reason")).text = reason
    room.history.replace(uid, stone)
    if room.config.archive:
        await archive.replace(room, uid, stone)
