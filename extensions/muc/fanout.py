"""Fan-out: one stanza from the room to many occupants.

A room message goes to every occupant and differs between them only in 'to', so it is serialized once
(`server.service.Prepared`) and handed to the router with all its recipients (`Router.fan_out`): each
recipient's host applies its inbound policy (an occupant a user blocks is not heard), and each session
gets the same text with its own address, with no per-occupant XML work; that is what keeps a
1,000-occupant room cheap.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from server.jid import JID
from server.service import Prepared

if TYPE_CHECKING:
    from server.server import Server


async def fan_out(server: Server, stanza: Element | Prepared, recipients: Iterable[JID]) -> None:
    """Send the stanza to each full JID in `recipients`."""
    await server.router.fan_out(stanza if isinstance(stanza, Prepared) else Prepared(stanza), recipients)
