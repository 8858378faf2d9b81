"""The room's archive: XEP-0313 queries on the room JID (XEP-0313 'MUC archives').

Rooms share the server's message archive, each as its own owner (the service domain and the room name),
so paging, filters and full-text search are those of users' archives (extensions/mam.py). What the room
publishes with a body is archived under the room's stanza-id, and so are retraction and moderation notices,
which clients replay when they sync; a retracted message is replaced by its tombstone. Writes happen behind
the conversation (Recorder). The 'mam' field of
the room configuration turns archiving off. Who may read follows who may see the room's discussion: not
outcasts, only members in a members-only room, only occupants in a password-protected one.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from extensions.mam import answer_query, archive_metadata, query_form
from extensions.muc.protocol import BODY, RETRACT, affiliation_rank
from server.stanza import Stanza, parse_stored
from server.storage.archive import ArchiveFilter, ArchiveStore, NewMessage, UnknownArchiveId
from server.stream.errors import StanzaError
from server.stream.writer import serialize

if TYPE_CHECKING:
    from extensions.muc.room import Room

def store(room: Room) -> ArchiveStore:
    return room.service.server.storage.archive


def archivable(el: Element) -> bool:
    return el.find(BODY) is not None or el.find(RETRACT) is not None


class Recorder:
    """Writes a room's messages to the archive behind the conversation, in order and in batches: a message
    reaches the occupants without waiting for the database, and a busy room commits many at once. Whatever
    reads or changes the archive first waits for what is queued (`flush`), so it always sees every message
    already published."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.queued: list[NewMessage] = []
        self.task: asyncio.Task[None] | None = None

    def add(self, el: Element, uid: str, stamp: datetime) -> None:
        """Queue a published message; 'with' is the room with the sender's nick (none for the room's own)."""
        nick = (el.get("from") or "").partition("/")[2] or None
        body = " ".join(b.text for b in el.iterfind(BODY) if b.text) or None
        self.queued.append(NewMessage(uid, stamp, str(self.room.jid), nick, body, serialize(el)))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        room = self.room
        try:
            while self.queued:
                batch, self.queued = self.queued, []
                try:
                    await store(room).append_many(room.jid.domain, room.jid.local or "", batch)
                except Exception:
                    room.service.log.exception("%d messages of %s could not be archived", len(batch), room.jid)
        finally:
            self.task = None

    async def flush(self) -> None:
        while self.task is not None:
            await asyncio.shield(self.task)


async def find(room: Room, uid: str) -> Element | None:
    """An archived message by the room's stanza-id."""
    await room.recorder.flush()
    try:
        page = await store(room).query(room.jid.domain, room.jid.local or "", ArchiveFilter(ids=(uid,)), 1)
    except UnknownArchiveId:
        return None
    return parse_stored(page.messages[0].stanza_xml) if page.messages else None


async def replace(room: Room, uid: str, tombstone: Element) -> None:
    await room.recorder.flush()
    await store(room).replace(room.jid.domain, room.jid.local or "", uid, serialize(tombstone))


async def forget(room: Room) -> None:
    """The room is destroyed or no longer archived: its archive goes, once what is queued is written."""
    await room.recorder.flush()
    await store(room).delete_all(room.jid.domain, room.jid.local or "")


async def refill(room: Room) -> None:
    """The discussion history of a room loaded at start: its last archived messages."""
    size = room.history.entries.maxlen or 0
    if not room.config.archived or not size:
        return
    page = await store(room).query(room.jid.domain, room.jid.local or "", ArchiveFilter(), size, before="")
    for message in page.messages:
        room.history.add(parse_stored(message.stanza_xml), message.stamp)


def check_reader(room: Room, st: Stanza) -> None:
    affiliation = room.affiliation(st.from_)
    joined = st.from_ in room.by_session
    if affiliation == "outcast" or (room.config.members_only and not joined and
                                     affiliation_rank(affiliation) < affiliation_rank("member")) \
            or (room.config.password and not joined):
        raise StanzaError("forbidden", "you may not read this room's archive")


async def form(room: Room, st: Stanza) -> Element:
    check_reader(room, st)
    return query_form()


async def query(room: Room, st: Stanza) -> Element:
    check_reader(room, st)
    await room.recorder.flush()
    results: list[Element] = []
    fin = await answer_query(store(room), room.jid, st.el[0], st.from_, results.append,
                             room.service.option("max_page"))
    await room.flush([(el, [st.from_]) for el in results])
    return fin


async def metadata(room: Room, st: Stanza) -> Element:
    check_reader(room, st)
    await room.recorder.flush()
    return await archive_metadata(store(room), room.jid)
