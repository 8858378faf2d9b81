"""Service discovery of the MUC service and its rooms (XEP-0045 6).

A room's features state its configuration (muc_persistent, muc_membersonly...), which is how clients
learn, before joining, whether their real JID will be shown; XEP-0128 extended information (the
muc#roominfo form) adds the description, subject and number of occupants.
"""

from __future__ import annotations

from collections.abc import Iterable
from xml.etree.ElementTree import Element, SubElement

from extensions import mam
from extensions.muc.protocol import MODERATE_NS, MUC, OCCUPANT_ID_NS, RETRACT_NS, ROOMINFO, SELF_PING, SID, STABLE_ID
from extensions.muc.registration import NICK_NODE, nick_info
from extensions.muc.room import Room
from extensions.muc.vcard import avatar_hash
from server import ns
from server.forms import Field, build_form
from server.module import Identity
from server.service import info_query
from server.stanza import Stanza
from server.stream.errors import StanzaError

INFO = ns.qname(ns.DISCO_INFO, "query")
ITEMS = ns.qname(ns.DISCO_ITEMS, "query")


def service_items(rooms: Iterable[Room]) -> Element:
    """XEP-0045 6.3: the public rooms; hidden and locked ones are left out."""
    query = Element(ITEMS)
    for room in sorted(rooms, key=lambda r: str(r.jid)):
        if room.config.public and not room.locked:
            SubElement(query, ns.qname(ns.DISCO_ITEMS, "item"), {"jid": str(room.jid), "name": room.title})
    return query


def room_features(room: Room) -> list[str]:
    config = room.config
    return [
        "muc_persistent" if config.persistent else "muc_temporary",
        "muc_public" if config.public else "muc_hidden",
        "muc_membersonly" if config.members_only else "muc_open",
        "muc_moderated" if config.moderated else "muc_unmoderated",
        "muc_nonanonymous" if config.non_anonymous else "muc_semianonymous",
        "muc_passwordprotected" if config.password else "muc_unsecured",
        ns.PING, SELF_PING, STABLE_ID, OCCUPANT_ID_NS, SID, RETRACT_NS, MODERATE_NS, ns.VCARD, ns.REGISTER,
        *([mam.MAM, mam.EXTENDED] if config.archive else []),
    ]


def _visible(room: Room, st: Stanza) -> None:
    if room.locked and room.affiliation(st.from_) != "owner":
        raise StanzaError("item-not-found", "no such room")


async def room_info(room: Room, st: Stanza) -> Element:
    """XEP-0045 6.4, with the muc#roominfo form of 15.5.4 (and the avatar's hash, XEP-0486)."""
    _visible(room, st)
    node = st.el[0].get("node")
    if node == NICK_NODE:
        return nick_info(room, st)
    if node:
        raise StanzaError("item-not-found", "no such node")
    query = info_query([Identity("conference", "text", room.title)],
                       [ns.DISCO_INFO, ns.DISCO_ITEMS, MUC, *room_features(room)])
    fields = [
        Field("muc#roominfo_description", label="Description", values=(room.config.description,)),
        Field("muc#roominfo_subject", label="Subject", values=(room.subject,)),
        Field("muc#roominfo_occupants", label="Number of occupants", values=(str(len(room.occupants)),)),
        Field("muc#roominfo_lang", label="Language of discussion", values=(room.config.language,)),
    ]
    avatar = avatar_hash(room)
    if avatar is not None:
        fields.append(Field("muc#roominfo_avatarhash", "text-multi", "Avatar hash", (avatar,)))
    query.append(build_form("result", fields, form_type=ROOMINFO))
    return query


async def room_items(room: Room, st: Stanza) -> Element:
    """XEP-0045 6.5: the occupants' room JIDs, to occupants and for public rooms; nobody else learns who is in."""
    _visible(room, st)
    query = Element(ITEMS)
    if room.config.public or st.from_ in room.by_session:
        for occupant in room.occupants.values():
            SubElement(query, ns.qname(ns.DISCO_ITEMS, "item"), {"jid": str(occupant.room_jid), "name": occupant.nick})
    return query
