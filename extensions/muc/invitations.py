"""Mediated invitations and declines (XEP-0045 7.8.2, 7.8.3).

The room sends the invitation itself, from its own JID, so the invitee learns the inviter's real JID and
the room's password without the inviter handing them over; in a members-only room an admin's (or, with
'allow invites', any occupant's) invitation also makes the invitee a member, or the invitation would be
useless. Direct invitations (XEP-0249) go from client to client and need nothing from the room.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element, SubElement

from extensions.muc.occupants import Occupant
from extensions.muc.protocol import USER, X_USER, affiliation_rank
from extensions.muc.room import Room
from server import ns
from server.jid import JID, JIDError
from server.stanza import Stanza, element
from server.storage.muc import Affiliation
from server.stream.errors import StanzaError

INVITE = ns.qname(USER, "invite")
DECLINE = ns.qname(USER, "decline")
REASON = ns.qname(USER, "reason")


def _jid(value: str | None) -> JID:
    try:
        return JID.parse(value or "")
    except JIDError as exc:
        raise StanzaError("jid-malformed", str(exc)) from None


async def handle(room: Room, sender: Occupant | None, st: Stanza, x: Element) -> None:
    invites, declines = x.findall(INVITE), x.findall(DECLINE)
    if not invites and not declines:
        raise StanzaError("bad-request", "nothing to do with this muc#user element")
    for decline in declines:
        await forward_decline(room, st, decline)
    if invites:
        await invite(room, sender, st, invites)


async def invite(room: Room, sender: Occupant | None, st: Stanza, invites: list[Element]) -> None:
    if sender is None:
        raise StanzaError("not-acceptable", "only occupants may invite")
    privileged = affiliation_rank(room.affiliation(st.from_)) >= affiliation_rank("admin")
    if room.config.members_only and not (privileged or room.config.allow_invites):
        raise StanzaError("forbidden", "only admins may invite to this room")
    invitees = [(_jid(it.get("to")), it.findtext(REASON)) for it in invites]
    for jid, reason in invitees:
        if room.config.members_only and room.affiliation(jid) == "none":
            room.affiliations[jid.bare] = Affiliation("member")
            await room.save_affiliation(jid.bare)
        await room.service.server.router.send(invitation(room, st.from_, jid, reason))


def invitation(room: Room, inviter: JID, invitee: JID, reason: str | None) -> Element:
    msg = element("message", from_=str(room.jid), to=str(invitee))
    SubElement(msg, ns.qname(ns.CLIENT, "body")).text = \
        f"{inviter.bare} invites you to the room {room.jid}" + (f": {reason}" if reason else "")
    x = SubElement(msg, X_USER)
    it = SubElement(x, INVITE, {"from": str(inviter)})
    if reason:
        SubElement(it, REASON).text = reason
    if room.config.password:
        SubElement(x, ns.qname(USER, "password")).text = room.config.password
    return msg


async def forward_decline(room: Room, st: Stanza, decline: Element) -> None:
    """XEP-0045 7.8.3: passed on to the inviter, from the room, naming who declined."""
    inviter = _jid(decline.get("to"))
    msg = element("message", from_=str(room.jid), to=str(inviter))
    x = SubElement(msg, X_USER)
    it = SubElement(x, DECLINE, {"from": str(st.from_.bare)})
    reason = decline.findtext(REASON)
    if reason:
        SubElement(it, REASON).text = reason
    await room.service.server.router.send(msg)
