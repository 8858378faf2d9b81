"""Fan-out: one stanza from the room to many occupants.

A room message goes to every occupant and differs between them only in 'to'. The stanza is serialized
once with a placeholder 'to', split there (a Prepared stanza), and each local session gets the two
halves around its own escaped JID: no per-occupant XML work, which is what keeps a 1,000-occupant room
cheap. Occupants on other servers are routed as usual, each with a copy of the element.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from server.jid import JID
from server.stream.writer import escape_attr, serialize

if TYPE_CHECKING:
    from server.server import Server

class Prepared:
    """A stanza serialized once, ready to be addressed to anyone; `el` is kept without a 'to'.

    The 'to' attribute goes right after the element's name: `head` ends with its opening quote and `tail`
    starts with its closing one, so addressing is one concatenation around the escaped JID.
    """

    __slots__ = ("el", "head", "tail")

    def __init__(self, el: Element) -> None:
        el.attrib.pop("to", None)
        xml = serialize(el)
        name_end = next(i for i, c in enumerate(xml) if c in " />" and i > 0)
        self.head, self.tail = xml[:name_end] + ' to="', '"' + xml[name_end:]
        self.el = el


async def fan_out(server: Server, stanza: Element | Prepared, recipients: Iterable[JID]) -> None:
    """Send the stanza to each full JID in `recipients`."""
    prepared = stanza if isinstance(stanza, Prepared) else Prepared(stanza)
    await route_remote(server, prepared, deliver_local(server, prepared, recipients))


def deliver_local(server: Server, prepared: Prepared, recipients: Iterable[JID]) -> list[JID]:
    """Write the stanza to the recipients' sessions on this server, at once; the remote recipients are left."""
    head, tail = prepared.head, prepared.tail
    sessions = server.sessions
    remote: list[JID] = []
    for jid in recipients:
        session = sessions.get(jid)
        if session is not None:
            session.send_raw(head + escape_attr(str(jid)) + tail, prepared.el)
        elif jid.domain not in server.hosts:
            remote.append(jid)
        # else a local session that has just ended: its unavailable presence is on the way to the room
    return remote


async def route_remote(server: Server, prepared: Prepared, remote: list[JID]) -> None:
    for jid in remote:
        copy = Element(prepared.el.tag, prepared.el.attrib)
        copy.extend(prepared.el)
        copy.set("to", str(jid))
        await server.router.send(copy)
