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

from server.commands import Arg, Context, Declarations, module_on
from server.commands.service_admin import broadcast, message
from server.jid import JID
from server.module import Module

if TYPE_CHECKING:
    from server.sessions import Session

STORE = "announce"  # key-value documents: the host's 'motd' and 'welcome', each user's 'motd-seen'


class Announce(Module):
    name = "announce"

    def setup(self) -> None:
        self.motd: dict[str, Any] | None = None  # {'id': changes with each new message, 'text': ...}
        self.hook("presence/initial", self.deliver_motd)
        self.hook("account/registered", self.welcome)
        for declared in COMMANDS:
            self.add_command(declared)

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
            for user in await broadcast(self.server, self.host.name, message(self.host.name, text)):
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


# --- XEP-0133's commands over the standing messages -----------------------------------------------------

COMMANDS = Declarations()
command = COMMANDS.command


def _announcer(ctx: Context) -> Announce:
    return module_on(ctx.host, Announce)


MOTD = Arg("motd", "lines", "Message of the Day")
WELCOME = Arg("welcome", "lines", "Welcome Message")


async def _current_motd(ctx: Context) -> dict[str, Any]:
    motd = _announcer(ctx).motd
    return {"motd": motd["text"].split("\n") if motd else None}


@command("set-motd", "Set Message of the Day", (MOTD,))
async def set_motd(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await _announcer(ctx).set_motd("\n".join(args["motd"]))
    return {}


@command("edit-motd", "Edit Message of the Day", (MOTD,), defaults=_current_motd)
async def edit_motd(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await _announcer(ctx).set_motd("\n".join(args["motd"]), correction=True)
    return {}


@command("delete-motd", "Delete Message of the Day")
async def delete_motd(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await _announcer(ctx).delete_motd()
    return {}


async def _current_welcome(ctx: Context) -> dict[str, Any]:
    text = await _announcer(ctx).welcome_text()
    return {"welcome": text.split("\n") if text else None}


@command("set-welcome", "Set Welcome Message", (WELCOME,), defaults=_current_welcome)
async def set_welcome(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await _announcer(ctx).set_welcome("\n".join(args["welcome"]))
    return {}


@command("delete-welcome", "Delete Welcome Message")
async def delete_welcome(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await _announcer(ctx).set_welcome(None)
    return {}
