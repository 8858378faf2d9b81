"""Rooms in a cluster: each is served by the member that owns it (server/ownership.py), its occupants on any.

The owner keeps in the room's state hash in Redis what the next owner needs and PostgreSQL does not hold:
one field per joined session (nick, role, last presence) and, for a temporary room, the room itself
(configuration, affiliations, subject). It writes the changes after each stanza the room handled, fenced by
its lease. A member taking the room over loads it from PostgreSQL (persistent) or from that hash
(temporary), puts back the sessions that are still connected somewhere in the cluster, and tells the room
that the others left (status 333, as for a session whose server reported an error).

When the owner is lost, the survivors take its rooms over at once, each those that rendezvous hashing gives
it (server/ownership.py `Placement.take_over`), without waiting for a stanza: the occupants on the other
members stay in, and get the room's next message without joining again. A room nobody is left in is not kept.

A room is released when it empties: its state hash goes, and the next stanza to it claims it afresh
wherever it arrives.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import TYPE_CHECKING

from extensions.muc import archive
from extensions.muc.config import RoomConfig
from extensions.muc.protocol import REMOVED_ERROR
from extensions.muc.room import Batch, Room
from server.jid import JID
from server.ownership import NotOwner
from server.stanza import parse_stored
from server.storage.muc import Affiliation, StoredRoom
from server.stream.errors import StanzaError
from server.stream.writer import serialize

if TYPE_CHECKING:
    from extensions.muc.service import Muc
    from server.ownership import Lease

log = logging.getLogger("parley.muc")

PREFIX = "muc:"
OCCUPANT = "o:"  # state field of a joined session: 'o:' + its full JID
ROOM = "room"  # state field of a temporary room's own state


def owner_key(room: JID) -> str:
    return PREFIX + str(room)


def room_of(key: str) -> JID:
    return JID.parse(key[len(PREFIX):])


def snapshot(room: Room) -> str:
    """A temporary room's state, as `restore` reads it."""
    stored = room.stored()
    return json.dumps({"config": stored.config, "created": stored.created.isoformat(), "subject": stored.subject,
                       "subject_from": stored.subject_from, "vcard": stored.vcard, "locked": room.locked,
                       "affiliations": {jid: [a.affiliation, a.nick, a.reason]
                                        for jid, a in stored.affiliations.items()}})


def _from_snapshot(name: str, text: str) -> tuple[StoredRoom, bool]:
    data = json.loads(text)
    affiliations = {jid: Affiliation(*a) for jid, a in data["affiliations"].items()}
    return StoredRoom(name, data["config"], datetime.fromisoformat(data["created"]), data["subject"],
                      data["subject_from"], affiliations, data["vcard"]), data["locked"]


def _room(muc: Muc, jid: JID, stored: StoredRoom) -> Room:
    return Room(muc, jid, RoomConfig.from_json(stored.config), stored.created,
                {JID.parse(k): v for k, v in stored.affiliations.items()}, stored.subject, stored.subject_from,
                stored.vcard)


async def known_rooms(muc: Muc) -> list[Room]:
    """Every room of the service wherever it is served, as storage and the owners' snapshots describe it
    (without occupants): the stored rooms, and the temporary ones some member owns."""
    assert muc.placement is not None
    ownership = muc.placement.ownership
    found = {JID.make(stored.name, muc.domain): stored for stored in await muc.store.rooms(muc.domain)}
    rooms = [_room(muc, jid, stored) for jid, stored in found.items()]
    for key in await ownership.owned(f"{PREFIX}*@{muc.domain}"):
        jid = room_of(key)
        snapshot = (await ownership.state(key)).get(ROOM)
        if jid not in found and snapshot:
            stored, locked = _from_snapshot(jid.local or "", snapshot)
            rooms.append(_room(muc, jid, stored))
            rooms[-1].locked = locked
    return rooms


async def take(muc: Muc, lease: Lease) -> bool:
    """This member now owns the room: load it (from storage, or a temporary room from its state hash), with
    the occupants that are still connected somewhere in the cluster; those that are not leave (status 333).
    False when there is nothing to serve: no such room, or nobody left in it."""
    placement = muc.placement
    assert placement is not None
    jid = room_of(lease.key)
    state = await placement.ownership.state(lease.key)
    name = jid.local or ""
    stored = await muc.store.room(muc.domain, name)
    locked = False
    if stored is None and ROOM in state:
        stored, locked = _from_snapshot(name, state[ROOM])
    muc.rooms.pop(jid, None)
    if stored is None:
        return False  # no such room (yet): a join creates it here
    room = _room(muc, jid, stored)
    room.locked = locked
    room.lease = lease
    await archive.refill(room)
    joined = {JID.parse(field[len(OCCUPANT):]): json.loads(value) for field, value in state.items()
              if field.startswith(OCCUPANT)}
    await muc.server.sessions.ensure_all({session.bare for session in joined})
    gone: list[JID] = []
    for session, (nick, role, presence) in joined.items():
        occupant = room.find(nick) or room.new_occupant(nick, session, role)
        occupant.role = role
        room.add_session(occupant, session, parse_stored(presence))
        room.mirrored[str(session)] = (nick, role, occupant.sessions[session])
        if muc.server.sessions.get(session) is None:
            gone.append(session)
    room.mirrored_room = state.get(ROOM, "")
    muc.rooms[jid] = room
    log.info("room %s taken over (token %d): %d sessions, %d gone", jid, lease.token,
             len(room.by_session), len(gone))
    batches: list[Batch] = []
    for session in gone:
        occupant = room.remove_session(session)
        if not occupant.sessions:
            batches += room.broadcast_presence(occupant, to_self=[], session=session, unavailable=True,
                                               statuses=[REMOVED_ERROR])
    await room.flush(batches)
    return bool(room.by_session)


def lost(muc: Muc, key: str) -> None:
    """Another member owns the room now (or this one lost Redis): it is no longer served here."""
    jid = room_of(key)
    room = muc.rooms.pop(jid, None)
    if room is not None:
        log.warning("room %s is no longer served here", jid)


async def sync(muc: Muc, jid: JID) -> None:
    """After a stanza to the room: write what changed of its occupants (and, for a temporary room, of the
    room) to its state hash; release the room once nobody is in it."""
    placement = muc.placement
    assert placement is not None
    key = owner_key(jid)
    lease = placement.holds(key)
    if lease is None:
        return
    room = muc.rooms.get(jid)
    ours = room is not None and (room.lease is lease or room.lease is None)
    if not ours or not room.by_session:
        if room is not None and ours:
            await room.recorder.flush()
            del muc.rooms[jid]
        await placement.release(key, forget_state=True)
        return
    await record(room)


async def record(room: Room) -> None:
    """Write what changed of the room's occupants (and of a temporary room itself) to its state hash, fenced
    by the room's lease: done before the room sends anything, so that what occupants were told survives the
    owner. Refused (remote-server-timeout) when this member no longer owns the room, even with nothing to
    write: a member that stalled past its lease (its successor serves the room) sends nothing more for it."""
    placement = room.service.placement
    if placement is None:
        return
    if room.lease is None:
        room.lease = placement.holds(owner_key(room.jid))  # created here, by the stanza being served
    lease = room.lease
    if lease is None:
        return
    if placement.ownership.holds(lease.key) is not lease:  # stalled past the lease: another member may own it
        raise StanzaError("remote-server-timeout", "the room moved; try again")
    changes: dict[str, str | None] = {}
    current = {}
    for session, occupant in room.by_session.items():
        text = str(session)
        presence = occupant.sessions[session]
        current[text] = entry = (occupant.nick, occupant.role, presence)
        known = room.mirrored.get(text)
        if known is None or known[0] != entry[0] or known[1] != entry[1] or known[2] is not presence:
            changes[OCCUPANT + text] = json.dumps([occupant.nick, occupant.role, serialize(presence)])
    for text in room.mirrored.keys() - current.keys():
        changes[OCCUPANT + text] = None
    own = "" if room.config.persistent else snapshot(room)
    if own != room.mirrored_room:
        changes[ROOM] = own or None
    if not changes:
        return
    try:
        await placement.ownership.record(lease, changes)
    except NotOwner:
        raise StanzaError("remote-server-timeout", "the room moved; try again") from None
    room.mirrored, room.mirrored_room = current, own
