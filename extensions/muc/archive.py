"""The room's archive: XEP-0313 queries on the room JID (XEP-0313 'MUC archives').

Rooms share the server's message archive, each as its own owner (the service domain and the room name),
so paging, filters and full-text search are those of users' archives (extensions/mam.py). What the room
publishes is archived under the room's stanza-id when users' archives would keep it (server/archiving.py:
bodies, reactions, markers, retractions and other fastenings, store hints), and so are moderation notices,
which clients replay when they sync; a retracted message is replaced by its tombstone. Writes happen behind
the conversation (Recorder). Every room is archived unless its configuration (or the service's 'archive'
option, for new rooms) turns it off; a temporary room's archive goes with the room (`clear`). Who may read
follows who may see the room's discussion: not outcasts, only members in a members-only room, only
occupants in a password-protected one.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from extensions.mam import answer_query, archive_metadata, query_form
from extensions.muc.protocol import BODY, affiliation_rank
from server.jid import JID
from server.stanza import Stanza, parse_stored
from server.storage.archive import ArchiveFilter, ArchiveStore, NewMessage, UnknownArchiveId
from server.stream.errors import StanzaError
from server.stream.writer import serialize

if TYPE_CHECKING:
    from extensions.muc.room import Room
    from extensions.muc.service import Muc


def store(room: Room) -> ArchiveStore:
    return room.service.server.storage.archive


class Recorder:
    """Writes a room's messages to the archive behind the conversation, in order and in batches: a message
    reaches the occupants without waiting for the database, and a busy room commits many at once. Whatever
    reads or changes the archive first waits for what is queued (`flush`), so it always sees every message
    already published."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.queued: list[NewMessage] = []
        self.task: asyncio.Task[None] | None = None
        # The archive of an earlier room of the same name being deleted: nothing is written or read before.
        self.cleared: asyncio.Task[None] | None = room.service.clearing.get(room.jid)

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
            await self._after_clearing()
            while self.queued:
                batch, self.queued = self.queued, []
                try:
                    await store(room).append_many(room.jid.domain, room.jid.local or "", batch)
                except Exception:
                    room.service.log.exception("%d messages of %s could not be archived", len(batch), room.jid)
        finally:
            self.task = None

    async def flush(self) -> None:
        await self._after_clearing()
        while self.task is not None:
            await asyncio.shield(self.task)

    async def _after_clearing(self) -> None:
        if self.cleared is not None:
            await asyncio.shield(self.cleared)
            self.cleared = None


def clear(service: Muc, jid: JID, recorder: Recorder | None) -> None:
    """Delete the archive of room name `jid` behind the conversation, once `recorder` (the room going away)
    has written what it holds. A room created under that name meanwhile waits for it (Recorder.cleared),
    and so does a later clearing, so that none deletes what a newer room wrote."""
    earlier = service.clearing.get(jid)

    async def run() -> None:
        if earlier is not None:
            await asyncio.shield(earlier)
        if recorder is not None:
            await recorder.flush()
        try:
            await service.server.storage.archive.delete_all(jid.domain, jid.local or "")
        except Exception:
            service.log.exception("the archive of %s could not be deleted", jid)

    task = asyncio.get_running_loop().create_task(run())
    service.clearing[jid] = task
    task.add_done_callback(lambda done: service.clearing.pop(jid) if service.clearing.get(jid) is done else None)


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
    if not room.config.archive or not size:
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
