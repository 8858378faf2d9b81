"""Block strangers: messages and subscription requests from addresses not in the user's roster are refused.

A user turns it on or off with the ad-hoc command 'block-strangers'; the host's `default` applies to users
who never chose. A stranger is an address that is none of: a roster item of the user (whatever its
subscription), a room (or an occupant of it) the user sent directed presence to, i.e. joined, the user's
own server or one of its services (a subdomain: conference.host, pubsub.host). What a stranger sends is
dropped, answered with service-unavailable ('bounce'), or held ('hold'): kept for the user, who reads the
held messages and subscription requests with the ad-hoc command 'held-from-strangers'. Errors always pass,
as they answer what the user sent.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from server.commands import Arg, CommandError, Context, Declarations, module_on
from server.jid import JID
from server.module import Module
from server.options import Option
from server.storage.kv import CachedDocuments
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from server.server import Server
    from server.stanza import Stanza

STORE = "block-strangers"  # each user's choice: true, false, or no document (the host's default)
HELD = "block-strangers-held"  # each user's held messages and requests, a list
PRIORITY = 900  # after blocking (1000): a blocked address is blocked whatever this module says
FILTERED = ("chat", "normal", "headline")  # message types from strangers; errors and groupchat pass


async def known(server: Server, user: JID, other: JID) -> bool:
    """Whether `other` is no stranger to the local account `user`: itself, its server and the server's
    services, its roster's items, the rooms it joined (directed presence)."""
    bare = other.bare
    if bare == user or other.domain.endswith("." + user.domain):
        return True
    if other.local is None and other.domain == user.domain:
        return True
    if any(jid.bare == bare for session in server.sessions.of(user) for jid in session.directed):
        return True
    return await server.storage.roster.get_item(user.domain, user.local or "", str(bare)) is not None


class BlockStrangers(Module):
    name = "block_strangers"
    options = (
        Option("default", bool, False, "block strangers for users who have not chosen with the ad-hoc command"),
        Option("action", str, "drop", "what a stranger's message or subscription request meets",
               choices=("drop", "bounce", "hold")),
        Option("max_held", int, 100, "messages and requests held per user; the oldest go first", minimum=1),
    )

    def setup(self) -> None:
        self._choices = CachedDocuments(self.server.storage.kv, STORE, lambda chosen: chosen)  # read per stanza
        self._holding = asyncio.Lock()  # held lists are read, extended and written back: one at a time
        self.hook("message/inbound", self.inbound, priority=PRIORITY)
        self.hook("presence/inbound", self.inbound, priority=PRIORITY)
        for declared in COMMANDS:
            self.add_command(declared)

    async def enabled(self, user: JID) -> bool:
        chosen = await self._choices.get(user.domain, user.local or "")
        return bool(self.option("default") if chosen is None else chosen)

    async def choose(self, user: JID, block: bool) -> None:
        await self._choices.set(user.domain, user.local or "", block)

    async def inbound(self, stanza: Stanza) -> bool | None:
        if stanza.kind == "message" and stanza.type not in FILTERED:
            return None
        if stanza.kind == "presence" and stanza.type != "subscribe":
            return None
        user = stanza.to.bare
        if user.local is None or not await self.enabled(user) or await known(self.server, user, stanza.from_):
            return None
        action = self.option("action")
        if action == "bounce":
            await self.server.router.bounce(stanza, StanzaError("service-unavailable"))
        elif action == "hold":
            await self.hold(user, stanza)
        return True

    async def hold(self, user: JID, stanza: Stanza) -> None:
        kv = self.server.storage.kv
        body = stanza.el.findtext("{jabber:client}body") or ""
        entry = {"from": str(stanza.from_), "kind": "subscription request" if stanza.kind == "presence" else "message",
                 "body": body, "stamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        async with self._holding:
            held = [*(await kv.get(user.domain, user.local or "", HELD) or []), entry]
            await kv.set(user.domain, user.local or "", HELD, "", held[-self.option("max_held"):])


COMMANDS = Declarations()
SETTING = Arg("block", "text", "Block messages and subscription requests from strangers", options=("on", "off"))


async def _current(ctx: Context) -> dict[str, Any]:
    module = module_on(ctx.host, BlockStrangers)
    return {"block": "on" if await module.enabled(ctx.actor.bare) else "off"}


@COMMANDS.command("block-strangers", "Block Strangers", (SETTING,), (Arg("block", "text", "Blocking strangers"),),
                  access="user", defaults=_current)
async def block_strangers(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    if args["block"] not in ("on", "off"):
        raise CommandError("block: on or off")
    await module_on(ctx.host, BlockStrangers).choose(ctx.actor.bare, args["block"] == "on")
    return {"block": args["block"]}


@COMMANDS.command("held-from-strangers", "Messages and Requests Held from Strangers",
                  result=(Arg("held", "lines", "Held, oldest first (now cleared)"),), access="user")
async def held_from_strangers(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """Reading them clears them: the user adds whom it wants to the roster, the rest is gone."""
    user, kv = ctx.actor.bare, ctx.host.server.storage.kv
    held = await kv.get(user.domain, user.local or "", HELD) or []
    await kv.set(user.domain, user.local or "", HELD, "", None)
    return {"held": [f"{h['stamp']} {h['kind']} from {h['from']}{': ' + h['body'] if h['body'] else ''}"
                     for h in held]}
