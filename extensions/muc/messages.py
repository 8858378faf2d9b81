"""Messages to a room: groupchat to everyone, the subject, private messages between occupants
(XEP-0045 7.4, 7.5, 8.1), and handing invitations and voice requests to their own files.

A groupchat message is reflected to every occupant, the sender included, from the sender's room JID and
with the sender's 'id', which is how clients recognise their own message coming back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, SubElement

from extensions.muc import invitations, voice
from extensions.muc.fanout import fan_out
from extensions.muc.occupants import Occupant
from extensions.muc.presence import leave
from extensions.muc.protocol import BODY, OCCUPANT_ID, REMOVED_ERROR, REQUEST, RETRACT, SUBJECT, X_USER
from extensions.muc.retraction import retract_own
from extensions.muc.room import Room
from server import ns
from server.forms import find_form
from server.stanza import Stanza
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from extensions.muc.service import Muc

ERROR = ns.qname(ns.CLIENT, "error")
THREAD = ns.qname(ns.CLIENT, "thread")  # a subject with a thread is a message, not a subject change (8.1)
# Errors saying that an occupant cannot be reached any more (XEP-0045 asks to remove such an occupant).
UNREACHABLE = frozenset({"gone", "item-not-found", "recipient-unavailable", "redirect", "remote-server-not-found",
                         "remote-server-timeout", "service-unavailable"})


def from_occupant(el: Element, occupant: Occupant) -> Element:
    """A copy of a client's stanza as the room sends it on: from the occupant's room JID, no 'to' yet, with
    the room's XEP-0421 occupant id in place of any the client put there."""
    out = Element(el.tag, {k: v for k, v in el.attrib.items() if k not in ("from", "to")})
    out.set("from", str(occupant.room_jid))
    out.extend(child for child in el if child.tag != OCCUPANT_ID)
    SubElement(out, OCCUPANT_ID, {"id": occupant.id})
    return out


async def handle_message(service: Muc, room: Room, st: Stanza) -> None:
    if st.type == "error":
        if st.from_ in room.by_session and error_condition(st.el) in UNREACHABLE:
            await leave(service, room, st.from_, None, [REMOVED_ERROR])
        return
    sender = room.by_session.get(st.from_)
    if st.to.resource is not None:
        if st.type == "groupchat":
            raise StanzaError("bad-request", "groupchat messages go to the room, not to an occupant")
        await private_message(service, room, sender, st)
    elif st.type == "groupchat":
        await groupchat(service, room, sender, st)
    elif (x := st.el.find(X_USER)) is not None:
        await invitations.handle(room, sender, st, x)
    elif (form := find_form(st.el, REQUEST)) is not None:
        await voice.handle(room, sender, st, form)
    elif sender is None:
        raise StanzaError("not-acceptable", "only occupants may send messages to the room")
    else:
        raise StanzaError("bad-request", "send groupchat messages to the room")


def error_condition(el: Element) -> str | None:
    error = el.find(ERROR)
    if error is None:
        return None
    return next((c.tag.split("}")[1] for c in error if c.tag.startswith(f"{{{ns.STANZAS_ERR}}}")), None)


def _occupant(sender: Occupant | None) -> Occupant:
    if sender is None:
        raise StanzaError("not-acceptable", "only occupants may send messages to the room")
    return sender


async def groupchat(service: Muc, room: Room, sender: Occupant | None, st: Stanza) -> None:
    sender = _occupant(sender)
    subject = st.el.find(SUBJECT)
    if subject is not None and st.el.find(BODY) is None and st.el.find(THREAD) is None:
        await change_subject(room, sender, st, subject.text or "")
        return
    if sender.role == "visitor":
        raise StanzaError("forbidden", "you have no voice in this moderated room")
    retract = st.el.find(RETRACT)
    if retract is not None:
        await retract_own(room, sender, retract)
    await room.publish(from_occupant(st.el, sender))


async def change_subject(room: Room, sender: Occupant, st: Stanza, subject: str) -> None:
    """XEP-0045 8.1: moderators may, and participants when the room allows it."""
    if sender.role != "moderator" and not (room.config.change_subject and sender.role == "participant"):
        raise StanzaError("forbidden", "you may not change the subject of this room")
    room.subject = subject
    room.subject_from = sender.nick
    await fan_out(room.service.server, from_occupant(st.el, sender), room.sessions())
    await room.save()


async def private_message(service: Muc, room: Room, sender: Occupant | None, st: Stanza) -> None:
    """XEP-0045 7.5: to every session of the addressee, marked with an empty muc#user <x/>."""
    sender = _occupant(sender)
    allowed = room.config.allow_pm
    if allowed == "none" or (allowed == "moderators" and sender.role != "moderator") or \
            (allowed == "participants" and sender.role == "visitor"):
        raise StanzaError("forbidden", "private messages are not allowed here")
    target = room.find(st.to.resource or "")
    if target is None:
        raise StanzaError("item-not-found", "no such occupant")
    el = from_occupant(st.el, sender)
    if el.find(X_USER) is None:
        el.append(Element(X_USER))
    await fan_out(service.server, el, list(target.sessions))
