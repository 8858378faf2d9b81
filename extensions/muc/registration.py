"""Registered nicknames (XEP-0045 7.10 and 7.12): a user registers with a room to become a member under a
nick that nobody else may then use there, and clients discover that nick before joining (the
'x-roomuser-item' disco node).

A members-only room takes no registrations from strangers (its admins make members); members register
or change their nick in it. Removing the registration gives up the nick and the membership.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, SubElement

from extensions.muc.admin import AffiliationChange, check_owners_remain, set_affiliation
from extensions.muc.occupants import prepare_nick
from extensions.muc.protocol import MUC, affiliation_rank
from server import ns
from server.forms import Field, build_form, find_form, first_value, read_form
from server.stanza import Stanza
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from extensions.muc.room import Room

QUERY = ns.qname(ns.REGISTER, "query")
REGISTER_FORM = f"{MUC}#register"
NICK_FIELD = "muc#register_roomnick"
NICK_NODE = "x-roomuser-item"


def registered_nick(room: Room, st: Stanza) -> str | None:
    found = room.affiliations.get(st.from_.bare)
    return found.nick if found else None


def nick_info(room: Room, st: Stanza) -> Element:
    """XEP-0045 7.12: the requester's registered nick, as the identity of the x-roomuser-item node."""
    query = Element(ns.qname(ns.DISCO_INFO, "query"), {"node": NICK_NODE})
    nick = registered_nick(room, st)
    if nick:
        SubElement(query, ns.qname(ns.DISCO_INFO, "identity"), {"category": "conference", "type": "text",
                                                               "name": nick})
    return query


async def get(room: Room, st: Stanza) -> Element:
    query = Element(QUERY)
    nick = registered_nick(room, st)
    if nick:
        SubElement(query, ns.qname(ns.REGISTER, "registered"))
        SubElement(query, ns.qname(ns.REGISTER, "username")).text = nick
        return query
    SubElement(query, ns.qname(ns.REGISTER, "instructions")).text = "Choose the nickname to register in this room."
    query.append(build_form("form", [Field(NICK_FIELD, label="Nickname", required=True)], form_type=REGISTER_FORM))
    return query


async def register(room: Room, st: Stanza) -> None:
    user = st.from_.bare
    affiliation = room.affiliation(user)
    if affiliation == "outcast":
        raise StanzaError("forbidden", "you are banned from this room")
    payload = st.el[0]
    if payload.find(ns.qname(ns.REGISTER, "remove")) is not None:
        await unregister(room, st)
        return
    form = find_form(payload, REGISTER_FORM)
    if form is None or form.get("type") != "submit":
        raise StanzaError("bad-request", "submit the muc#register form")
    try:
        nick = prepare_nick(first_value(read_form(form), NICK_FIELD))
    except StanzaError:
        raise StanzaError("not-acceptable", "not a valid nickname") from None
    holder = room.nick_owner(nick)
    occupant = room.find(nick)
    if (holder is not None and holder != user) or (occupant is not None and occupant.jid != user):
        raise StanzaError("conflict", "that nickname is taken")
    if room.config.members_only and affiliation_rank(affiliation) < affiliation_rank("member"):
        raise StanzaError("not-allowed", "members of this room are chosen by its admins")
    kept = affiliation if affiliation_rank(affiliation) >= affiliation_rank("member") else "member"
    await _apply(room, AffiliationChange(user, kept, None, nick))


async def unregister(room: Room, st: Stanza) -> None:
    user = st.from_.bare
    held = room.affiliations.get(user)
    if held is None:
        return
    change = AffiliationChange(user, "none" if held.affiliation == "member" else held.affiliation, None, None)
    check_owners_remain(room, [change])
    if change.affiliation == "none":
        await _apply(room, change)
    else:
        room.affiliations[user] = replace(held, nick=None)
        await room.save_affiliation(user)


async def _apply(room: Room, change: AffiliationChange) -> None:
    batches = set_affiliation(room, change, None)
    await room.save_affiliation(change.jid)
    await room.flush(batches)
