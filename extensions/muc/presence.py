"""Presence to a room: creating it, joining, changing nick or status, leaving (XEP-0045 7.1-7.7, 7.14, 10.1).

A client's presence to room@service/nick reaches the room as directed presence (extensions/presence.py),
so the room also gets the unavailable presence when the client disconnects. Occupancy is by full JID:
whatever nick the stanza names, unavailable presence from a joined session is that session leaving. An
error from a joined session (its server could not deliver to it) removes that session with status 333,
so that the room does not keep sending to a ghost.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from extensions.muc import archive
from extensions.muc.history import HISTORY
from extensions.muc.occupants import Occupant, nick_key, prepare_nick
from extensions.muc.protocol import (
    CREATED,
    LOGGED,
    MUC,
    NEW_NICK,
    NICK_ASSIGNED,
    NON_ANONYMOUS,
    REMOVED_ERROR,
    SELF,
    USER,
    X_MUC,
    affiliation_rank,
    item,
    user_x,
)
from extensions.muc.room import Batch, Room
from server import ns
from server.jid import JID
from server.stanza import Stanza, element
from server.storage.muc import Affiliation
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from extensions.muc.service import Muc

PASSWORD = ns.qname(MUC, "password")


async def handle_presence(service: Muc, room: Room | None, st: Stanza) -> None:
    session = st.from_
    if st.type in ("unavailable", "error"):
        if room is not None and session in room.by_session:
            await leave(service, room, session, st.el if st.type == "unavailable" else None,
                        [] if st.type == "unavailable" else [REMOVED_ERROR])
        return
    if st.type == "probe" and room is not None and st.to.resource is not None:
        await answer_probe(room, st)
        return
    if st.type is not None:
        return  # subscriptions, and probes to the room itself, mean nothing to a room
    nick = prepare_nick(st.to.resource)
    created = room is None
    if room is None:
        room = create(service, st.to.bare, session, instant=st.el.find(X_MUC) is None)
    occupant = room.by_session.get(session)
    if occupant is None:
        await join(service, room, st, nick, created)
    elif nick_key(nick) != occupant.key:
        await change_nick(room, occupant, st, nick)
    else:
        occupant.update(session, st.el)
        resync = st.el.find(X_MUC) is not None
        await room.flush(welcome(room, occupant, st, nick) if resync else room.broadcast_presence(occupant))


async def answer_probe(room: Room, st: Stanza) -> None:
    """XEP-0045 17.3.4, as Prosody does: a probe of an occupant's room JID from an occupant (its client, or
    its server after an outage) gets that occupant's current presence, as the prober is allowed to see it,
    or unavailable presence when nobody has that nick. Others may not learn who is in the room."""
    prober = room.by_session.get(st.from_)
    if prober is None:
        raise StanzaError("not-acceptable", "you are not in this room")
    target = room.find(st.to.resource or "")
    if target is None:
        el = element("presence", from_=str(st.to), type="unavailable")
        x = user_x()
        x.append(item(USER, affiliation="none", role="none"))
        el.append(x)
        await room.flush([(el, [st.from_])])
        return
    await room.flush([(room.current_presence(target, with_jid=room.sees_jids(prober)), [st.from_])])


def create(service: Muc, jid: JID, creator: JID, *, instant: bool) -> Room:
    """XEP-0045 10.1: the creator owns the room, which stays locked until configured - unless the client
    does not speak the MUC protocol (no <x/> in its presence), which gets an instant room."""
    if not service.may_create(creator):
        raise StanzaError("not-allowed", "you may not create rooms here")
    # Whatever an earlier temporary room of this name left (the server stopped while it existed) is not
    # the new room's; the new room writes and reads its archive only once that is gone.
    archive.clear(service, jid, None)
    room = Room(service, jid, service.default_config(), datetime.now(UTC), {creator.bare: Affiliation("owner")})
    room.locked = not instant
    service.rooms[jid] = room
    return room


def check_entry(room: Room, st: Stanza, nick: str, affiliation: str) -> None:
    """XEP-0045 7.2.5-7.2.10: the reasons a user may not enter, in the order the XEP gives them."""
    user = st.from_.bare
    if room.destroyed:
        raise StanzaError("item-not-found", "the room has been destroyed")
    if room.locked and affiliation != "owner":
        raise StanzaError("item-not-found", "the room is being configured; try again later")
    if affiliation == "outcast":
        raise StanzaError("forbidden", "you are banned from this room")
    if room.config.members_only and affiliation_rank(affiliation) < affiliation_rank("member"):
        raise StanzaError("registration-required", "this room is for members only")
    holder = room.find(nick)
    reserved = room.nick_owner(nick)
    if (holder is not None and holder.jid != user) or (reserved is not None and reserved != user):
        raise StanzaError("conflict", "that nickname is in use")
    if room.config.password and affiliation != "owner":
        x = st.el.find(X_MUC)
        if x is None or x.findtext(PASSWORD) != room.config.password:
            raise StanzaError("not-authorized", "a password is required")
    if room.config.max_users and holder is None and len(room.occupants) >= room.config.max_users \
            and affiliation not in ("admin", "owner"):
        raise StanzaError("service-unavailable", "the room is full")


async def join(service: Muc, room: Room, st: Stanza, nick: str, created: bool) -> None:
    """XEP-0045 7.2: the checks, in the XEP's order, then the welcome."""
    session = st.from_
    affiliation = room.affiliation(session)
    try:
        check_entry(room, st, nick, affiliation)
    except StanzaError:
        if created:
            service.discard(room)
        raise
    occupant = room.find(nick) or room.new_occupant(nick, session, room.default_role(affiliation))
    room.add_session(occupant, session, st.el)
    await room.flush(welcome(room, occupant, st, nick, created))


def welcome(room: Room, occupant: Occupant, st: Stanza, nick: str, created: bool = False) -> list[Batch]:
    """What a session entering the room gets, and a joined one that joins again, which XEP-0045 (7.2.1 and
    17.3.3) takes as a client that lost track asking to be brought up to date: the others' presence, its own
    (also to everyone else), the discussion history it asks for, then the subject."""
    session = st.from_
    batches: list[Batch] = [
        (room.current_presence(other, with_jid=room.sees_jids(occupant)), [session])
        for other in room.occupants.values() if other is not occupant
    ]
    self_statuses = [NON_ANONYMOUS] if room.config.non_anonymous else []
    if room.config.archive:
        self_statuses.append(LOGGED)
    if created:
        self_statuses.append(CREATED)
    if nick != st.to.resource:
        self_statuses.append(NICK_ASSIGNED)
    batches += room.broadcast_presence(occupant, self_statuses=self_statuses)
    x = st.el.find(X_MUC)
    history = room.history.select(x.find(HISTORY) if x is not None else None, datetime.now(UTC))
    batches += [(el, [session]) for el in history]
    batches.append((room.subject_message(), [session]))
    return batches


async def change_nick(room: Room, occupant: Occupant, st: Stanza, nick: str) -> None:
    """XEP-0045 7.6: unavailable from the old nick with 303 and the new nick, then available from the new one.

    A session that shares its nick with other sessions of the same user moves alone, as if it left and
    joined again: the others keep the old nick, and the room sees that occupant stay and a new one arrive.
    """
    holder = room.find(nick)
    reserved = room.nick_owner(nick)
    if holder is not None or (reserved is not None and reserved != occupant.jid):
        raise StanzaError("conflict", "that nickname is in use")
    session = st.from_
    self_statuses = [NICK_ASSIGNED] if nick != st.to.resource else []
    if len(occupant.sessions) > 1:
        room.remove_session(session)
        batches = [(room.presence(occupant, real_jid=session, unavailable=True, statuses=[NEW_NICK, SELF],
                                  nick=nick), [session])]
        batches += room.broadcast_presence(occupant)
        moved = room.new_occupant(nick, occupant.jid, occupant.role)
        room.add_session(moved, session, st.el)
        batches += room.broadcast_presence(moved, self_statuses=self_statuses)
        await room.flush(batches)
        return
    batches = room.broadcast_presence(occupant, unavailable=True, statuses=[NEW_NICK], nick=nick)
    room.rename(occupant, nick)
    occupant.update(session, st.el)
    batches += room.broadcast_presence(occupant, self_statuses=self_statuses)
    await room.flush(batches)


async def leave(service: Muc, room: Room, session: JID, el: Element | None, statuses: Sequence[str] = ()) -> None:
    """XEP-0045 7.14. When another session keeps the nick, the others see it stay, with that session's presence."""
    occupant = room.remove_session(session)
    if occupant.sessions:
        batches = [(room.presence(occupant, el, real_jid=session, unavailable=True, statuses=[*statuses, SELF]),
                    [session])]
        batches += room.broadcast_presence(occupant)
    else:
        batches = room.broadcast_presence(occupant, el, to_self=[session], session=session, unavailable=True,
                                          statuses=statuses)
    if not room.occupants and (room.locked or not room.config.persistent):
        service.discard(room)
    await room.flush(batches)
