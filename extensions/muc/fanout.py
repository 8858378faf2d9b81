"""Fan-out: one stanza from the room to many occupants.

A room message goes to every occupant and differs between them only in 'to'. The stanza is serialized
once with a placeholder 'to', split there, and each local session gets the two halves around its own
escaped JID: no per-occupant XML work, which is what keeps a 1,000-occupant room cheap. Occupants on
other servers are routed as usual, each with a copy of the element.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from server.jid import JID
from server.stream.writer import escape_attr, serialize

if TYPE_CHECKING:
    from server.server import Server

# A character XML forbids, so it cannot occur anywhere else in a serialized stanza.
_HOLE = "\x00"


async def fan_out(server: Server, el: Element, recipients: Iterable[JID]) -> None:
    """Send `el` to each full JID in `recipients`; `el` is left without a 'to'."""
    el.set("to", _HOLE)
    head, _, tail = serialize(el).partition(_HOLE)
    del el.attrib["to"]
    sessions = server.sessions
    remote: list[JID] = []
    for jid in recipients:
        session = sessions.get(jid)
        if session is not None:
            session.send_raw(head + escape_attr(str(jid)) + tail)
        elif jid.domain not in server.hosts:
            remote.append(jid)
        # else a local session that has just ended: its unavailable presence is on the way to the room
    for jid in remote:
        copy = Element(el.tag, el.attrib)
        copy.extend(el)
        copy.set("to", str(jid))
        await server.router.send(copy)
