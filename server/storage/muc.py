"""Persistent multi-user chat rooms: their configuration, subject and affiliations (XEP-0045).

Only persistent rooms are stored; a room is written whole when it becomes persistent and then kept
up to date one change at a time. Rooms are keyed by service domain and room name (the localpart), and
affiliations by the JID they were given to (a bare JID or a domain), as XEP-0045 5.2 keys them. A room's
vCard (its avatar, XEP-0486) is a document of the key-value table, under the room as its user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.storage.engine import upsert, writer
from server.storage.schema import kv, muc_affiliations, muc_rooms

_STORE, _VCARD = "muc", "vcard"  # where in the key-value table a room's vCard is


@dataclass(frozen=True)
class Affiliation:
    affiliation: str  # owner, admin, member or outcast
    nick: str | None = None  # the registered (reserved) nickname
    reason: str | None = None


@dataclass
class StoredRoom:
    name: str
    config: dict[str, Any]
    created: datetime
    subject: str = ""
    subject_from: str = ""  # the nick that set the subject
    affiliations: dict[str, Affiliation] = field(default_factory=dict)
    vcard: str = ""  # serialized vcard-temp, '' for none


class MucStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)

    async def rooms(self, service: str) -> list[StoredRoom]:
        """Every stored room of the service, with its affiliations."""
        return list((await self._load(service, None)).values())

    async def room(self, service: str, name: str) -> StoredRoom | None:
        """One stored room with its affiliations, None if there is none: what a cluster member loads when it
        takes a room over, in three indexed queries whatever the number of rooms."""
        return (await self._load(service, name)).get(name)

    async def _load(self, service: str, name: str | None) -> dict[str, StoredRoom]:
        """The service's stored rooms by name: all of them, or the one named."""
        rooms_of = [muc_rooms.c.service == service]
        affiliations_of = [muc_affiliations.c.service == service]
        vcards_of = [kv.c.host == service, kv.c.store == _STORE, kv.c.key == _VCARD]
        if name is not None:
            rooms_of.append(muc_rooms.c.name == name)
            affiliations_of.append(muc_affiliations.c.room == name)
            vcards_of.append(kv.c.username == name)
        async with self._engine.begin() as conn:
            rows = await conn.execute(select(muc_rooms).where(*rooms_of))
            rooms = {row.name: StoredRoom(row.name, row.config, row.created, row.subject, row.subject_from or "")
                     for row in rows}
            if not rooms:
                return rooms
            for row in await conn.execute(select(muc_affiliations).where(*affiliations_of)):
                if row.room in rooms:
                    rooms[row.room].affiliations[row.jid] = Affiliation(row.affiliation, row.nick, row.reason)
            for username, value in await conn.execute(select(kv.c.username, kv.c.value).where(*vcards_of)):
                if username in rooms:
                    rooms[username].vcard = value
        return rooms

    async def save_room(self, service: str, room: StoredRoom) -> None:
        """Write a room with all its affiliations, replacing what was stored under its name."""
        async with self._writer.begin() as conn:
            await _delete(conn, service, room.name)
            await conn.execute(muc_rooms.insert().values(
                service=service, name=room.name, config=room.config, created=room.created, subject=room.subject,
                subject_from=room.subject_from))
            if room.affiliations:
                await conn.execute(muc_affiliations.insert(), [
                    {"service": service, "room": room.name, "jid": jid, "affiliation": a.affiliation,
                     "nick": a.nick, "reason": a.reason}
                    for jid, a in room.affiliations.items()])
            if room.vcard:
                await _set_vcard(conn, service, room.name, room.vcard)

    async def update_room(self, service: str, name: str, config: dict[str, Any], subject: str,
                          subject_from: str) -> None:
        async with self._writer.begin() as conn:
            await conn.execute(update(muc_rooms).where(*_room(service, name)).values(
                config=config, subject=subject, subject_from=subject_from))

    async def set_vcard(self, service: str, name: str, vcard: str) -> None:
        """Store the room's vCard; '' removes it."""
        async with self._writer.begin() as conn:
            await _set_vcard(conn, service, name, vcard)

    async def delete_room(self, service: str, name: str) -> None:
        async with self._writer.begin() as conn:
            await _delete(conn, service, name)

    async def set_affiliation(self, service: str, room: str, jid: str, affiliation: Affiliation | None) -> None:
        """Store one JID's affiliation; None removes it (the affiliation 'none')."""
        async with self._writer.begin() as conn:
            if affiliation is None:
                await conn.execute(delete(muc_affiliations).where(
                    muc_affiliations.c.service == service, muc_affiliations.c.room == room,
                    muc_affiliations.c.jid == jid))
                return
            await conn.execute(upsert(conn, muc_affiliations, {"service": service, "room": room, "jid": jid},
                                      {"affiliation": affiliation.affiliation, "nick": affiliation.nick,
                                       "reason": affiliation.reason}))


def _room(service: str, name: str) -> tuple[Any, Any]:
    return muc_rooms.c.service == service, muc_rooms.c.name == name


async def _delete(conn: AsyncConnection, service: str, name: str) -> None:
    """Remove a room, its affiliations and vCard (the tables have no foreign key, so all are deleted here)."""
    await conn.execute(delete(muc_affiliations).where(muc_affiliations.c.service == service,
                                                      muc_affiliations.c.room == name))
    await conn.execute(delete(muc_rooms).where(*_room(service, name)))
    await _set_vcard(conn, service, name, "")


async def _set_vcard(conn: AsyncConnection, service: str, name: str, vcard: str) -> None:
    key = {"host": service, "username": name, "store": _STORE, "key": _VCARD}
    if vcard:
        await conn.execute(upsert(conn, kv, key, {"value": vcard}))
    else:
        await conn.execute(delete(kv).where(*(kv.c[k] == v for k, v in key.items())))
