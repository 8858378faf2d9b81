"""XEP-0012 Last Activity: the server's uptime, and when a user was last online.

A user's last logout reveals presence, so only the user and contacts allowed to see the user's
presence (subscription 'from' or 'both') may ask; everybody else gets forbidden.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from xml.etree.ElementTree import Element

from server import ns
from server.module import Module
from server.sessions import Session
from server.stanza import Stanza
from server.stream.errors import StanzaError

QUERY = ns.qname(ns.LAST, "query")
STATUS = ns.qname(ns.CLIENT, "status")
VISIBLE_TO = ("from", "both")


def last_query(seconds: float, status: str | None = None) -> Element:
    query = Element(QUERY, {"seconds": str(max(0, int(seconds)))})
    query.text = status
    return query


class Last(Module):
    name = "last"

    def setup(self) -> None:
        self.add_feature(ns.LAST)
        self.iq("get", QUERY, self.uptime)
        self.iq("get", QUERY, self.user_last, target="account")
        self.hook("presence/self", self.note_status, priority=200)
        self.hook("session/closed", self.session_closed)

    async def uptime(self, stanza: Stanza) -> Element:
        return last_query(time.time() - self.server.started)

    async def user_last(self, stanza: Stanza) -> Element:
        user = stanza.to.bare
        if stanza.from_.bare != user:
            item = await self.server.storage.roster.get_item(user.domain, user.local, str(stanza.from_.bare))
            if item is None or item.subscription not in VISIBLE_TO:
                raise StanzaError("forbidden", "you are not subscribed to this user's presence")
        if self.server.sessions.available(user):
            return last_query(0)
        account = await self.server.storage.accounts.get(user.domain, user.local)
        if account is None:
            raise StanzaError("service-unavailable")
        if account.last_logout is None:
            raise StanzaError("item-not-found", "no recorded activity")
        return last_query((datetime.now(UTC) - account.last_logout).total_seconds(), account.last_status)

    def note_status(self, stanza: Stanza) -> None:
        """Keep the status of the latest broadcast presence; it is the one to report after logout."""
        if stanza.origin is not None and stanza.type in (None, "unavailable"):
            stanza.origin.data[self.name] = stanza.el.findtext(STATUS)

    async def session_closed(self, session: Session) -> None:
        """Remember the logout once the user's last session is gone."""
        if self.server.sessions.of(session.bare):
            return
        status = session.data.get(self.name)
        await self.server.storage.accounts.record_logout(session.host.name, session.bare.local,
                                                         datetime.now(UTC), status)
