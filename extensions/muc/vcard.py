"""The room's vCard, which carries its avatar (XEP-0486, vcard-temp on the room JID).

Anyone may read it; owners set it, and an empty vCard removes it. The avatar's hash is in the room's
disco#info (muc#roominfo_avatarhash), so clients know it before joining, and occupants are told with a
configuration-change notice (104) to look again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from extensions.muc.owner import require_owner
from extensions.muc.protocol import CONFIG_CHANGED
from server import ns
from server.stanza import Stanza, parse_stored
from server.stream.errors import StanzaError
from server.stream.writer import serialize
from server.vcards import photo_of

if TYPE_CHECKING:
    from extensions.muc.room import Room

VCARD = ns.qname(ns.VCARD, "vCard")


def avatar_hash(room: Room) -> str | None:
    avatar = photo_of(parse_stored(room.vcard)) if room.vcard else None
    return avatar.id if avatar is not None else None


async def get(room: Room, st: Stanza) -> Element:
    return parse_stored(room.vcard) if room.vcard else Element(VCARD)


async def set_vcard(room: Room, st: Stanza) -> None:
    require_owner(room, st)
    card = st.el[0]
    xml = serialize(card) if len(card) else ""
    if len(xml) > room.service.option("max_vcard_size"):
        raise StanzaError("not-acceptable", "the vCard is too large")
    room.vcard = xml
    if room.config.persistent:
        await room.guard()
        await room.service.store.set_vcard(room.service.domain, room.jid.local or "", xml)
    await room.flush([(room.status_message(CONFIG_CHANGED), room.sessions())])
