"""Discussion history sent on join (XEP-0045 7.2.14).

The room keeps its last messages in memory, as they were broadcast (stanza-id included), up to the
configured number; a persistent room that is archived refills it from its archive when loaded, so history
survives a restart. A joining client narrows what it gets with <history/>: 'maxstanzas', 'maxchars'
(counted over each message exactly as sent, delay included), 'seconds' and 'since', all of which apply
together. A value that cannot be read is ignored, as if the client had not limited that dimension.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from xml.etree.ElementTree import Element

from extensions.muc.protocol import BODY, MUC, RETRACTED, STANZA_ID
from server import ns
from server.stanza import add_delay
from server.stream.writer import serialize

HISTORY = ns.qname(MUC, "history")


@dataclass(frozen=True)
class Entry:
    stamp: datetime
    el: Element  # as broadcast, without 'to'


class History:
    def __init__(self, room: str, size: int) -> None:
        self.room = room  # the room's JID: the 'by' of its stanza-ids and the 'from' of its delay stamps
        self.entries: deque[Entry] = deque(maxlen=size)

    def add(self, el: Element, stamp: datetime) -> None:
        """Keep a published message if it is discussion: one with a body, or the tombstone of one."""
        if el.find(BODY) is not None or el.find(RETRACTED) is not None:
            self.entries.append(Entry(stamp, el))

    def find(self, uid: str) -> Element | None:
        """The message with the room's stanza-id `uid`, if it is still in memory."""
        for entry in reversed(self.entries):
            if stanza_id_of(entry.el, self.room) == uid:
                return entry.el
        return None

    def replace(self, uid: str, el: Element) -> None:
        self.entries = deque((Entry(e.stamp, el) if stanza_id_of(e.el, self.room) == uid else e for e in self.entries),
                             maxlen=self.entries.maxlen)

    def resize(self, size: int) -> None:
        if size != self.entries.maxlen:
            self.entries = deque(self.entries, maxlen=size)

    def select(self, request: Element | None, now: datetime) -> list[Element]:
        """The messages a joining client asked for, oldest first, each a copy with a XEP-0203 delay."""
        limits = request.attrib if request is not None else {}
        entries = list(self.entries)
        since = _when(limits.get("since"))
        if since is not None:
            entries = [e for e in entries if e.stamp > since]
        seconds = _count(limits.get("seconds"))
        if seconds is not None:
            entries = [e for e in entries if e.stamp >= now - timedelta(seconds=seconds)]
        stanzas = _count(limits.get("maxstanzas"))
        if stanzas is not None and stanzas < len(entries):
            entries = entries[len(entries) - stanzas:]
        copies = [_delayed(e, self.room) for e in entries]
        chars = _count(limits.get("maxchars"))
        if chars is not None:
            kept: list[Element] = []
            for copy in reversed(copies):
                chars -= len(serialize(copy))
                if chars < 0:
                    break
                kept.append(copy)
            copies = kept[::-1]
        return copies


def stanza_id_of(el: Element, by: str) -> str | None:
    """The id that `by` stamped on a message (XEP-0359)."""
    return next((found.get("id") for found in el.iterfind(STANZA_ID) if found.get("by") == by), None)


def _count(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _when(value: str | None) -> datetime | None:
    """A XEP-0082 DateTime; None when absent, unreadable or without a time zone."""
    try:
        when = datetime.fromisoformat(value.strip()) if value is not None else None
    except ValueError:
        return None
    return when if when is not None and when.tzinfo is not None else None


def _delayed(entry: Entry, room: str) -> Element:
    copy = Element(entry.el.tag, entry.el.attrib)
    copy.extend(entry.el)
    add_delay(copy, room, entry.stamp)
    return copy
