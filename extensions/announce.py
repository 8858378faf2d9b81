"""Messages from the host to its users (XEP-0133): announcements, the message of the day and the welcome
message.

The message of the day is a standing announcement: each user gets it once, as a headline from the host, at
once when online as it is set and otherwise after the next login. Correcting it (edit-motd) does not send it
again to those who have it. The welcome message greets an account created by in-band registration; it
waits in the account's offline storage, so the first login finds it.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.jid import JID
from server.module import Module

if TYPE_CHECKING:
    from server.server import Server
    from server.sessions import Session

STORE = "announce"  # key-value documents: the host's 'motd' and 'welcome', each user's 'motd-seen'


def message(sender: str, body: str, subject: str | None = None, type: str = "headline") -> Element:
    el = Element(ns.qname(ns.CLIENT, "message"), {"from": sender, "type": type})
    if subject:
        SubElement(el, ns.qname(ns.CLIENT, "subject")).text = subject
    SubElement(el, ns.qname(ns.CLIENT, "body")).text = body
    return el


def broadcast(server: Server, domain: str, el: Element) -> list[JID]:
    """Send `el` to every session of the domain's online users; return those users."""
    users = server.sessions.users(domain)
    for user in users:
        for session in server.sessions.of(user):
            el.set("to", str(session.jid))
            session.send(el)
    return users


class Announce(Module):
    name = "announce"

    def setup(self) -> None:
        self.motd: dict[str, Any] | None = None  # {'id': changes with each new message, 'text': ...}
        self.hook("presence/initial", self.deliver_motd)
        self.hook("account/registered", self.welcome)

    async def start(self) -> None:
        self.motd = await self.server.storage.kv.get(self.host.name, "", STORE, "motd")

    async def set_motd(self, text: str, *, correction: bool = False) -> None:
        """A new message goes to the online users now and to everyone else at their next login; a correction
        replaces the text only for those who have not had the message yet."""
        kv = self.server.storage.kv
        motd_id = self.motd["id"] if correction and self.motd is not None else secrets.token_hex(8)
        motd = {"id": motd_id, "text": text}
        await kv.set(self.host.name, "", STORE, "motd", motd)
        self.motd = motd
        if not correction:
            for user in broadcast(self.server, self.host.name, message(self.host.name, text)):
                await kv.set(self.host.name, user.local or "", STORE, "motd-seen", motd["id"])

    async def delete_motd(self) -> None:
        await self.server.storage.kv.set(self.host.name, "", STORE, "motd", None)
        self.motd = None

    async def deliver_motd(self, session: Session) -> None:
        motd = self.motd
        if motd is None:
            return
        kv, user = self.server.storage.kv, session.bare.local or ""
        if await kv.get(self.host.name, user, STORE, "motd-seen") == motd["id"]:
            return
        await kv.set(self.host.name, user, STORE, "motd-seen", motd["id"])
        el = message(self.host.name, motd["text"])
        el.set("to", str(session.jid))
        session.send(el)

    async def welcome_text(self) -> str | None:
        return await self.server.storage.kv.get(self.host.name, "", STORE, "welcome")

    async def set_welcome(self, text: str | None) -> None:
        """The welcome message for accounts registered from now on; None: no welcome message."""
        await self.server.storage.kv.set(self.host.name, "", STORE, "welcome", text)

    async def welcome(self, user: JID) -> None:
        text = await self.welcome_text()
        if text:
            el = message(self.host.name, text, f"Welcome to {self.host.name}", type="normal")
            el.set("to", str(user))
            await self.server.router.send(el)
