"""The MUC service of a host: conference.<host> (module option 'domain'), its rooms and what reaches them.

The service is a `server.service.Service` (`Rooms`): the router hands it every stanza addressed to the
service domain. Iqs to a room go through the router's iq dispatch to the handlers registered by payload
(disco.py, owner.py, admin.py, retraction.py, archive.py, vcard.py, registration.py); the rest goes to the
part of the package that deals with it: presence.py, messages.py, or occupant_iq.py for an occupant's JID.
What rooms send goes through the router (fanout.py). A handler refuses bad input by raising StanzaError;
the sender gets that error and the room carries on. Persistent rooms are loaded when the module starts,
with their discussion history from the archive; in a cluster, each room is loaded by the member that owns
it when it takes it over, and its occupants may be on any member (placement.py).

Options: 'domain'; 'name' (the service's disco name); 'create' - who may create rooms: 'local' users of
the host (the default), 'admins' of the host, or 'anyone'; 'archive' - whether new rooms are archived (true,
the default; an owner changes it per room); 'max_page' - the largest page of an archive query;
'max_vcard_size' - of a room's vCard, in bytes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from xml.etree.ElementTree import Element

from extensions import mam
from extensions.muc import admin, archive, disco, occupant_iq, owner, placement, registration, retraction, vcard
from extensions.muc.commands import COMMANDS, run_command
from extensions.muc.config import RoomConfig
from extensions.muc.messages import handle_message
from extensions.muc.presence import handle_presence
from extensions.muc.protocol import ADMIN_QUERY, MUC, OWNER_QUERY, STABLE_ID, X_MUC
from extensions.muc.room import Room
from extensions.vcard import MAX_SIZE as MAX_VCARD_SIZE
from server.jid import JID
from server.module import Identity, IqHandler, Module
from server.options import Domain, Option
from server.ownership import Lease
from server.service import Service
from server.stanza import Stanza, error_reply
from server.storage.muc import MucStore
from server.stream.errors import StanzaError

log = logging.getLogger("parley.muc")
RoomIq = Callable[[Room, Stanza], Awaitable[Element | None]]
OCCUPANT_ID_SECRET = "occupant-id-secret"  # kv key (host: the service domain) of the key of occupant ids


async def pong(room: Room, st: Stanza) -> None:
    """XEP-0199 ping of the room itself: it exists."""


ROOM_IQS: dict[tuple[str, str], RoomIq] = {
    ("get", disco.INFO): disco.room_info,
    ("get", disco.ITEMS): disco.room_items,
    ("get", OWNER_QUERY): owner.get_config,
    ("set", OWNER_QUERY): owner.set_config,
    ("get", ADMIN_QUERY): admin.get_list,
    ("set", ADMIN_QUERY): admin.change,
    ("get", occupant_iq.PING): pong,
    ("set", retraction.MODERATE): retraction.moderate,
    ("get", mam.QUERY): archive.form,
    ("set", mam.QUERY): archive.query,
    ("get", mam.METADATA): archive.metadata,
    ("get", vcard.VCARD): vcard.get,
    ("set", vcard.VCARD): vcard.set_vcard,
    ("get", registration.QUERY): registration.get,
    ("set", registration.QUERY): registration.register,
}


class Rooms(Service):
    """The service's address and everything under it: the rooms (bare JIDs) and their occupants (full JIDs)."""

    def __init__(self, muc: Muc) -> None:
        super().__init__(muc.server, muc.domain, Identity("conference", "text", muc.title), (MUC, STABLE_ID))
        self.muc = muc
        for (type, payload), handler in ROOM_IQS.items():
            self.iq(type, payload, self.in_room(handler), target="bare")

    def in_room(self, handler: RoomIq) -> IqHandler:
        """An iq handler of rooms: called with the room the iq is addressed to, which must exist."""
        async def serve(st: Stanza) -> Element | None:
            room = self.muc.rooms.get(st.to)
            if room is None:
                raise StanzaError("item-not-found", "no such room")
            return await handler(room, st)
        return serve

    async def disco_items(self, st: Stanza) -> Element:
        if st.el[0].get("node"):
            return await super().disco_items(st)
        if self.placement is not None:
            return disco.service_items(await placement.known_rooms(self.muc))
        return disco.service_items(self.muc.rooms.values())

    def owner_key(self, st: Stanza) -> str | None:
        return placement.owner_key(st.to.bare) if st.to.local is not None else None

    async def take(self, lease: Lease) -> bool:
        return await placement.take(self.muc, lease)

    def lost(self, key: str) -> None:
        placement.lost(self.muc, key)

    async def act(self, key: str, action: str, argument: str) -> None:
        """The room commands that change a room, run where it is owned (commands.py)."""
        room = self.muc.rooms.get(placement.room_of(key))
        if room is not None and not room.destroyed:
            await run_command(room, action, argument)
            await placement.sync(self.muc, room.jid)

    async def receive(self, st: Stanza) -> None:
        """In a cluster, what the stanza changed of its room's occupants is written where the room's next
        owner finds it."""
        await super().receive(st)
        if self.placement is not None and st.to.local is not None:
            try:
                await placement.sync(self.muc, st.to.bare)
            except StanzaError:
                log.warning("%s: lost while serving %r", st.to.bare, st)

    async def refuse(self, st: Stanza, error: StanzaError) -> None:
        """Answer with an error generated by the room, which says so in 'by' (RFC 6120 8.3.2, as XEP-0045's
        examples show); a refused join carries an empty MUC <x/>, as XEP-0045 7.2 shows and clients match on
        (the password, if any, is not echoed). Errors are never answered."""
        if st.type == "error":
            return
        answer = error_reply(st.el, error)
        answer[-1].set("by", str(st.to.bare))
        if st.kind == "presence" and st.el.find(X_MUC) is not None:
            answer.insert(0, Element(X_MUC))
        answer.set("from", str(st.to))
        await self.server.router.deliver_reply(st, answer, st.to)

    async def stanza(self, st: Stanza) -> None:
        to = st.to
        if to.local is None:
            await super().stanza(st)
            return
        muc = self.muc
        room = muc.rooms.get(to.bare)
        if st.kind == "presence":
            await handle_presence(muc, room, st)
        elif room is None:
            if st.type not in ("error", "result"):
                raise StanzaError("item-not-found", "no such room")
        elif st.kind == "message":
            await handle_message(muc, room, st)
        elif to.resource is not None:
            await occupant_iq.handle(room, st)
        elif st.type in ("get", "set"):
            raise StanzaError("service-unavailable")


class Muc(Module):
    name = "muc"
    depends = ("disco",)
    options = (
        Option("domain", Domain, None, "the rooms' address, conference.<host> unless set (in a host's own table)"),
        Option("name", str, "Chatrooms", "the service's name in service discovery"),
        Option("create", str, "local", "who may create rooms: the host's users, its admins, or anyone",
               choices=("local", "admins", "anyone")),
        Option("max_page", int, mam.MAX_PAGE, "the largest page of a room archive query", minimum=1),
        Option("max_vcard_size", int, MAX_VCARD_SIZE, "bytes a room's vCard may take", minimum=1),
        Option("archive", bool, True, "archive new rooms, temporary ones too (an owner turns it off per room)"),
    )

    def setup(self) -> None:
        self.domain: str = self.option("domain") or f"conference.{self.host.name}"
        self.title: str = self.option("name")
        self.rooms: dict[JID, Room] = {}
        self.clearing: dict[JID, asyncio.Task[None]] = {}  # archives of rooms gone, being deleted (archive.clear)
        self._secret = b""  # of occupant ids, read in start()
        self.store = MucStore(self.server.storage.engine)
        self.service = Rooms(self)
        self.placement = self.service.placement
        self.add_service(self.service)
        directory = self.host.modules["disco"]
        directory.add_item(self.domain, self.title)
        self._undo.append(lambda: directory.remove_item(self.domain))
        for declared in COMMANDS:
            self.add_command(declared)

    async def start(self) -> None:
        kv = self.server.storage.kv
        secret = await kv.get(self.domain, "", self.name, OCCUPANT_ID_SECRET)
        if secret is None:
            secret = secrets.token_hex(32)
            await kv.set(self.domain, "", self.name, OCCUPANT_ID_SECRET, secret)
        self._secret = bytes.fromhex(secret)
        if self.placement is not None:
            return  # each room is loaded by the member that takes it over
        for stored in await self.store.rooms(self.domain):
            jid = JID.make(stored.name, self.domain)
            affiliations = {JID.parse(k): v for k, v in stored.affiliations.items()}
            room = self.rooms[jid] = Room(self, jid, RoomConfig.from_json(stored.config), stored.created,
                                          affiliations, stored.subject, stored.subject_from, stored.vcard)
            await archive.refill(room)

    async def stop(self) -> None:
        """Messages still on their way to the archive are written before the database closes."""
        for room in list(self.rooms.values()):
            await room.recorder.flush()
        for task in list(self.clearing.values()):
            await task
        await self.service.stop()

    async def record(self, room: Room) -> None:
        """In a cluster, before the room sends anything: what changed of it is written where the next owner
        finds it (placement.py)."""
        if self.placement is not None:
            await placement.record(room)

    def occupant_id(self, room: JID, user: JID) -> str:
        """XEP-0421: stable for a user in a room, across nicks and restarts, and telling nothing about the user."""
        digest = hmac.new(self._secret, f"{room}\n{user}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:18]).decode()

    def may_create(self, jid: JID) -> bool:
        policy = self.option("create")
        if policy == "anyone":
            return True
        if policy == "admins":
            return self.host.is_admin(jid)
        return jid.domain == self.host.name

    def default_config(self) -> RoomConfig:
        return RoomConfig(archive=self.option("archive"))

    def discard(self, room: Room) -> None:
        """Forget a room that has no reason to exist any more (temporary and empty, or destroyed); a temporary
        room's archive goes with it (a destroyed room has deleted its own)."""
        if self.rooms.get(room.jid) is room:
            del self.rooms[room.jid]
            if room.config.archive and not room.config.persistent and not room.destroyed:
                archive.clear(self, room.jid, room.recorder)
