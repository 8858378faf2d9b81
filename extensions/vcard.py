"""XEP-0054 vcard-temp, kept in step with the profile data clients publish through PEP.

Each user's vCard is XML text in the key-value store, readable by anyone, writable by its owner, bounded
in size so one account cannot fill the database. Older and newer clients see the same profile:
- avatars (XEP-0398): a vCard PHOTO is published as User Avatar data and metadata (XEP-0084), and a
  client's avatar metadata publication puts the image into the vCard PHOTO; the hash of the photo is
  written into the user's available presence, broadcast or directed (XEP-0153's vcard-temp:x:update);
- vCard4 (XEP-0292): a vcard-temp is published to the 'urn:xmpp:vcard4' node and a vCard4 published there
  updates the vcard-temp (`server.vcards` maps the fields both formats have).
Conversions run only for what clients send, never for what this module publishes itself, so they do not loop.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, cast
from xml.etree.ElementTree import Element, SubElement, fromstring

from server import ns
from server.commands import Arg, CommandError, Context, Declarations, module_on
from server.commands.service_admin import ACCOUNT, existing_account
from server.jid import JID
from server.module import Module
from server.options import Option
from server.stanza import Stanza, parse_stored
from server.storage import StoredItem
from server.stream.errors import StanzaError
from server.stream.writer import serialize
from server.vcards import (
    AVATAR_DATA,
    AVATAR_METADATA,
    VCARD4,
    Avatar,
    avatar_data,
    avatar_metadata,
    decode_data,
    embedded_info,
    photo_of,
    temp_to_vcard4,
    vcard4_to_temp,
    with_photo,
)

if TYPE_CHECKING:
    from extensions.pep import Pep

VCARD = ns.qname(ns.VCARD, "vCard")
STORE = "vcard"
MAX_SIZE = 65536
CONVERSION = "urn:xmpp:pep-vcard-conversion:0"
VCARD4_NODE = "urn:xmpp:vcard4"
UPDATE = "vcard-temp:x:update"
UPDATE_X = ns.qname(UPDATE, "x")
UPDATE_PHOTO = ns.qname(UPDATE, "photo")


class VCard(Module):
    name = "vcard"
    options = (Option("max_size", int, MAX_SIZE, "bytes a vCard may take", minimum=1),)
    depends = ("pep",)

    def setup(self) -> None:
        self._hashes: dict[JID, str | None] = {}  # avatar id of each user's vCard photo, once read
        self.add_feature(ns.VCARD)
        self.add_feature(CONVERSION, target="account")
        self.iq("get", VCARD, self.get_vcard, target="account")
        self.iq("set", VCARD, self.set_vcard, target="own")
        self.hook("pep/published", self.pep_published)
        self.hook("presence/self", self.stamp_presence, priority=150)
        self.hook("presence/outbound", self.stamp_presence, priority=150)
        self.hook("account/details", self.start_vcard)
        for declared in COMMANDS:
            self.add_command(declared)

    @property
    def pep(self) -> Pep:
        return cast("Pep", self.host.modules["pep"])

    async def load(self, user: JID) -> Element | None:
        stored = await self.server.storage.kv.get(user.domain, user.local or "", STORE)
        return fromstring(stored) if stored is not None else None

    async def save(self, user: JID, vcard: Element) -> None:
        await self.server.storage.kv.set(user.domain, user.local or "", STORE, "", serialize(vcard))
        photo = photo_of(vcard)
        self._hashes[user] = photo.id if photo else None

    async def get_vcard(self, stanza: Stanza) -> Element:
        user = stanza.to.bare
        stored = await self.load(user)
        if stored is not None:
            return stored
        if not await self.server.storage.accounts.exists(user.domain, user.local or ""):
            raise StanzaError("service-unavailable")
        return Element(VCARD)

    async def set_vcard(self, stanza: Stanza) -> None:
        user = stanza.to.bare
        vcard = stanza.el[0]
        limit = self.option("max_size")
        if len(serialize(vcard).encode()) > limit:
            raise StanzaError("not-acceptable", f"the vCard is larger than {limit} bytes")
        await self.store(user, vcard)

    async def store(self, user: JID, vcard: Element) -> None:
        """Replace a user's vCard and bring the PEP profile (avatar, vCard4) in step with it."""
        old = await self.load(user)
        await self.save(user, vcard)
        await self._publish(user, old, vcard)

    async def start_vcard(self, user: JID, details: dict[str, str]) -> None:
        """The vCard of an account an admin created with its email address or names (XEP-0133 add-user)."""
        await self.store(user, new_vcard(details.get("email"), details.get("given_name"), details.get("surname")))

    # --- vcard-temp -> PEP ----------------------------------------------------------------------------

    async def _publish(self, user: JID, old: Element | None, new: Element) -> None:
        """XEP-0398 3.2: a changed photo becomes avatar data then metadata; the fields become the vCard4."""
        service = self.pep.service
        photo, before = photo_of(new), photo_of(old) if old is not None else None
        if (photo and photo.id) != (before and before.id):
            if photo is not None:
                await service.publish_item(user, user, AVATAR_DATA, photo.id, avatar_data(photo))
            await service.publish_item(user, user, AVATAR_METADATA, photo.id if photo else None,
                                       avatar_metadata(photo))
        current = await self._payload(user, VCARD4_NODE)
        await service.publish_item(user, user, VCARD4_NODE, "current", temp_to_vcard4(new, current))

    async def _payload(self, user: JID, node: str, item_id: str | None = None) -> Element | None:
        """The payload of an item of one of the user's nodes: `item_id`, or the newest."""
        key = self.pep.service.key(user)
        if await self.server.storage.pubsub.node(*key, node) is None:
            return None
        found = await self.server.storage.pubsub.items(*key, node, [item_id] if item_id else None,
                                                       None if item_id else 1)
        return parse_stored(found[-1].payload) if found and found[-1].payload else None

    # --- PEP -> vcard-temp ----------------------------------------------------------------------------

    async def pep_published(self, user: JID, node: str, item: StoredItem, payload: Element | None) -> None:
        if node == AVATAR_METADATA and payload is not None:
            await self._avatar_to_vcard(user, payload)
        elif node == VCARD4_NODE and payload is not None and payload.tag == ns.qname(VCARD4, "vcard"):
            current = await self.load(user)
            await self.save(user, vcard4_to_temp(payload, current))

    async def _avatar_to_vcard(self, user: JID, metadata: Element) -> None:
        """XEP-0398 3.1: the image the metadata names, from the data node, into the vCard PHOTO."""
        avatar = None
        info = embedded_info(metadata)
        if info is not None:
            item_id, type_ = info
            data = decode_data(await self._payload(user, AVATAR_DATA, item_id))
            if data is None or Avatar(type_, data).id != item_id:
                self.log.info("avatar metadata of %s names no matching data item %s", user, item_id)
                return
            avatar = Avatar(type_, data)
        elif len(metadata):
            return  # only images at external URLs: nothing to put in a vCard
        current = await self.load(user)
        await self.save(user, with_photo(current if current is not None else Element(VCARD), avatar))

    # --- XEP-0153 presence ------------------------------------------------------------------------------

    async def photo_hash(self, user: JID) -> str | None:
        if user not in self._hashes:
            vcard = await self.load(user)
            photo = photo_of(vcard) if vcard is not None else None
            self._hashes[user] = photo.id if photo else None
        return self._hashes[user]

    async def stamp_presence(self, stanza: Stanza) -> None:
        """XEP-0398 4: the avatar hash in every available presence a user sends, unless it says <photo/>."""
        if stanza.origin is None or stanza.type is not None:
            return
        el = stanza.el
        x = el.find(UPDATE_X)
        photo = x.find(UPDATE_PHOTO) if x is not None else None
        if photo is not None and not (photo.text or "").strip():
            return  # the client says it has no avatar right now
        known = await self.photo_hash(stanza.origin.bare)
        if x is None:
            if known is None:
                return
            x = SubElement(el, UPDATE_X)
        elif photo is not None and known is None:
            return  # a hash the client computed, of a photo the server does not have
        for child in list(x):
            x.remove(child)
        SubElement(x, UPDATE_PHOTO).text = known


def new_vcard(email: str | None, given: str | None, family: str | None) -> Element:
    """A vcard-temp with what add-user's form gave."""
    vcard = Element(ns.qname(ns.VCARD, "vCard"))
    if given or family:
        name = SubElement(vcard, ns.qname(ns.VCARD, "N"))
        SubElement(name, ns.qname(ns.VCARD, "FAMILY")).text = family or ""
        SubElement(name, ns.qname(ns.VCARD, "GIVEN")).text = given or ""
        SubElement(vcard, ns.qname(ns.VCARD, "FN")).text = " ".join(p for p in (given, family) if p)
    if email:
        address = SubElement(vcard, ns.qname(ns.VCARD, "EMAIL"))
        SubElement(address, ns.qname(ns.VCARD, "INTERNET"))
        SubElement(address, ns.qname(ns.VCARD, "USERID")).text = email
    return vcard


# --- commands over vCard fields, which ejabberd's get_vcard and set_vcard map onto ----------------------

COMMANDS = Declarations()
FIELD = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
FIELD_NAME = Arg("field", "text", "vCard field (FN, NICKNAME, BDAY, TITLE, ROLE...)")


def _field(name: str) -> str:
    if not FIELD.fullmatch(name):
        raise CommandError(f"invalid vCard field name {name!r}")
    return ns.qname(ns.VCARD, name)


@COMMANDS.command("vcard-get-field", "The content of a field of an account's vCard", (ACCOUNT, FIELD_NAME),
                  (Arg("content", "text", "Content"),), offered=False)
async def get_field(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    owner = await existing_account(ctx, args["accountjid"])
    tag = _field(args["field"])
    vcard = await module_on(ctx.host, VCard).load(owner)
    if vcard is None:
        raise CommandError(f"{owner} has no vCard")
    value = vcard.findtext(tag)
    if not value:
        raise CommandError(f"the vCard of {owner} has no {args['field']}")
    return {"content": value}


@COMMANDS.command("vcard-set-field", "Set a field of an account's vCard",
                  (ACCOUNT, FIELD_NAME, Arg("content", "text", "Content")), offered=False)
async def set_field(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    owner = await existing_account(ctx, args["accountjid"])
    tag = _field(args["field"])
    module = module_on(ctx.host, VCard)
    vcard = await module.load(owner)
    if vcard is None:
        vcard = Element(VCARD)
    field = vcard.find(tag)
    if field is None:
        field = Element(tag)
        vcard.append(field)
    field.text = args["content"]
    await module.store(owner, vcard)
    return {}
