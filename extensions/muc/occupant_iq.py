"""IQs addressed to an occupant (room@service/nick): self-ping (XEP-0410) and private IQs between occupants.

A client pings its own occupant JID to learn whether it is still joined; the room answers that itself
(the 'self-ping optimization') and says not-acceptable to a session that is not joined. Other IQs go on
to the occupant, from the asker's room JID so that no real JID leaks, under an id of the room's making;
the answer comes back to the room, which restores the asker's id and address. vCard requests go to the
occupant's account rather than a resource, as a vCard belongs to the account.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from server import ns
from server.jid import JID
from server.stanza import Stanza
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from extensions.muc.room import Room

PING = ns.qname(ns.PING, "ping")
VCARD = ns.qname(ns.VCARD, "vCard")
MAX_PENDING = 1000  # forwarded IQs awaiting an answer, per room; the oldest are forgotten first


@dataclass(frozen=True)
class Pending:
    asker: JID  # the asking session
    id: str | None  # its id for the request
    target: JID  # where the request went, the only address whose answer is taken
    answerer: JID  # the target's room JID, which the answer is sent from


class OccupantIqs:
    """Forwarded IQs of one room, awaiting their answers."""

    def __init__(self) -> None:
        self.pending: OrderedDict[str, Pending] = OrderedDict()

    def remember(self, pending: Pending) -> str:
        key = secrets.token_hex(8)
        self.pending[key] = pending
        if len(self.pending) > MAX_PENDING:
            self.pending.popitem(last=False)
        return key


async def handle(room: Room, st: Stanza) -> None:
    if st.type in ("result", "error"):
        await answer(room, st)
        return
    sender = room.by_session.get(st.from_)
    if sender is None:
        raise StanzaError("not-acceptable", "you are not in this room")
    target = room.find(st.to.resource or "")
    if target is None:
        raise StanzaError("item-not-found", "no such occupant")
    if target is sender and len(st.el) == 1 and st.el[0].tag == PING:
        await room.service.server.router.result(st, None)
        return
    to = target.jid if len(st.el) == 1 and st.el[0].tag == VCARD else target.real_jid
    key = room.iqs.remember(Pending(st.from_, st.id, to, target.room_jid))
    out = Element(st.el.tag, {**st.el.attrib, "from": str(sender.room_jid), "to": str(to), "id": key})
    out.extend(st.el)
    await room.service.server.router.send(out)


async def answer(room: Room, st: Stanza) -> None:
    pending = room.iqs.pending.get(st.id or "")
    if pending is None or st.from_ not in (pending.target, pending.target.bare):
        return
    del room.iqs.pending[st.id or ""]
    out = Element(st.el.tag, {**st.el.attrib, "from": str(pending.answerer), "to": str(pending.asker)})
    if pending.id is None:
        del out.attrib["id"]
    else:
        out.set("id", pending.id)
    out.extend(st.el)
    await room.service.server.router.send(out)
