"""The owner's side of a room (muc#owner): the configuration form and destroying the room (XEP-0045 10).

Submitting the form also unlocks a newly created room: an empty submitted form is the instant room
of 10.1.2, a cancelled one destroys a room still being created (10.1.3).
"""

from __future__ import annotations

from xml.etree.ElementTree import Element, SubElement

from extensions.muc import archive
from extensions.muc.config import RoomConfig, apply_form, config_form
from extensions.muc.protocol import (
    CONFIG_CHANGED,
    LOGGED,
    NOT_LOGGED,
    NOW_NON_ANONYMOUS,
    NOW_SEMI_ANONYMOUS,
    OWNER,
    OWNER_QUERY,
    REMOVED_MEMBERS_ONLY,
    SELF,
    USER,
    affiliation_rank,
)
from extensions.muc.room import Batch, Room
from server import ns
from server.forms import find_form
from server.jid import JID, JIDError
from server.stanza import Stanza
from server.stream.errors import StanzaError

DESTROY = ns.qname(OWNER, "destroy")


def require_owner(room: Room, st: Stanza) -> None:
    if room.affiliation(st.from_) != "owner":
        raise StanzaError("forbidden", "only owners may do that")


async def get_config(room: Room, st: Stanza) -> Element:
    require_owner(room, st)
    query = Element(OWNER_QUERY)
    query.append(config_form(room.config, f"Configuration of {room.jid}"))
    return query


async def set_config(room: Room, st: Stanza) -> None:
    require_owner(room, st)
    query = st.el[0]
    destroy_el = query.find(DESTROY)
    if destroy_el is not None:
        await destroy(room, destroy_el)
        return
    x = find_form(query)
    if x is None or x.get("type") not in ("submit", "cancel"):
        raise StanzaError("bad-request", "submit or cancel a muc#roomconfig form")
    if x.get("type") == "cancel":
        if room.locked:
            await destroy(room, None)
        return
    await reconfigure(room, apply_form(room.config, x))


async def reconfigure(room: Room, new: RoomConfig) -> None:
    """Apply a new configuration: store it, tell the occupants what changed (10.2.1), and remove the
    non-members when the room becomes members-only (status 322)."""
    old, was_locked = room.config, room.locked
    room.config, room.locked = new, False
    room.history.resize(new.max_history)
    statuses = [] if was_locked else [CONFIG_CHANGED]
    if new.whois != old.whois:
        statuses.append(NOW_NON_ANONYMOUS if new.non_anonymous else NOW_SEMI_ANONYMOUS)
    if new.archive != old.archive:
        statuses.append(LOGGED if new.archive else NOT_LOGGED)
    batches: list[Batch] = []
    if statuses:
        batches.append((room.status_message(*statuses), room.sessions()))
    if new.members_only and not old.members_only:
        for occupant in list(room.occupants.values()):
            if affiliation_rank(room.affiliation(occupant.jid)) < affiliation_rank("member"):
                batches += room.broadcast_presence(occupant, unavailable=True, statuses=[REMOVED_MEMBERS_ONLY])
                room.remove(occupant)
    service = room.service
    if old.archive and not new.archive:
        await archive.forget(room)
    if new.persistent != old.persistent:
        await room.guard()
    if new.persistent and not old.persistent:
        await service.store.save_room(service.domain, room.stored())
    elif new.persistent:
        await room.save()
    elif old.persistent:
        await service.store.delete_room(service.domain, room.jid.local or "")
    if not room.occupants and not new.persistent:
        service.discard(room)
    await room.flush(batches)


async def destroy(room: Room, destroy_el: Element | None) -> None:
    """XEP-0045 10.9: every occupant leaves with the <destroy/> (alternate venue and reason) the owner gave,
    each told only of its own departure, not of everyone else's."""
    reason = venue = None
    if destroy_el is not None:
        reason = destroy_el.findtext(ns.qname(OWNER, "reason"))
        venue = destroy_el.get("jid")
        if venue:
            try:
                JID.parse(venue)
            except JIDError as exc:
                raise StanzaError("jid-malformed", str(exc)) from None
    batches: list[Batch] = []
    for occupant in list(room.occupants.values()):
        batches.append((room.presence(occupant, real_jid=occupant.real_jid, unavailable=True, statuses=[SELF],
                                      extra=_destroy_notice(venue, reason)), list(occupant.sessions)))
        room.remove(occupant)
    # Until its data is gone, the room stays in place and lets nobody in, so that a room created under the
    # same name cannot inherit any of it.
    room.destroyed = True
    await room.flush(batches)
    if room.config.persistent:
        await room.guard()
        await room.service.store.delete_room(room.service.domain, room.jid.local or "")
    if room.config.archive:
        await archive.forget(room)
    room.service.discard(room)


def _destroy_notice(venue: str | None, reason: str | None) -> Element:
    el = Element(ns.qname(USER, "destroy"), {"jid": venue} if venue else {})
    if reason:
        SubElement(el, ns.qname(USER, "reason")).text = reason
    return el
