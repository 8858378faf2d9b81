"""Commands over rooms, which ejabberd's create_room, destroy_room, muc_online_rooms, get_room_occupants and
set_room_affiliation map onto. Each reaches the MUC services of the hosts its caller may act on.

In a cluster the rooms are spread over the members (placement.py): the list comes from storage and from
the rooms owned in Redis, the occupants from the room's state hash there, and a change (destroy, an
affiliation) is run by the member that owns the room.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from extensions.muc import placement
from extensions.muc.admin import AffiliationChange, check_owners_remain, set_affiliation
from extensions.muc.owner import destroy
from extensions.muc.protocol import AFFILIATIONS
from extensions.muc.room import Room
from server.commands import Arg, CommandError, Context, Declarations
from server.jid import JID
from server.storage.muc import Affiliation
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from extensions.muc.service import Muc
    from server.host import Host

COMMANDS = Declarations()
ROOM = Arg("room", "jid", "The room's address (name@service)")


def services(ctx: Context, domain: str | None) -> list[Muc]:
    """The MUC services of the hosts the caller may act on: the one at `domain`, or all of them."""
    found: list[Any] = [h.modules["muc"] for h in ctx.hosts() if "muc" in h.modules]
    if domain is not None:
        found = [m for m in found if m.domain == domain]
        if not found:
            raise CommandError(f"no MUC service {domain} on a host you administer")
    return found


def _service_of(host: Host) -> Muc:
    """The host's MUC service (found by the module's name: the service module imports this file)."""
    module = host.modules.get("muc")
    if module is None:
        raise CommandError(f"the muc module is not loaded on {host.name}")
    return cast("Muc", module)


def _room(ctx: Context, args: dict[str, Any]) -> Room:
    jid = args["room"]
    room = services(ctx, jid.domain)[0].rooms.get(jid)
    if room is None or room.destroyed:
        raise CommandError(f"room {jid} not found")
    return room


@COMMANDS.command("muc-create-room", "Create a persistent room on the host's MUC service, owned by the caller "
                  "(the host's admins for the operator)", (ROOM,), offered=False)
async def create_room(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    muc, jid = _service_of(ctx.host), args["room"]
    if muc.domain != jid.domain:
        raise CommandError(f"the MUC service of {ctx.host.name} is {muc.domain}")
    if jid in muc.rooms or (muc.placement is not None and await exists(muc, jid)):
        raise CommandError(f"room {jid} already exists")  # ejabberd answers 400 here, not 409
    owners = ctx.host.admins if ctx.operator else {ctx.actor.bare}
    room = Room(muc, jid, replace(muc.default_config(), persistent=True), datetime.now(UTC),
                {owner: Affiliation("owner") for owner in owners})
    if muc.placement is None:
        muc.rooms[jid] = room  # in a cluster, the member that takes the room over loads it from storage
    await muc.store.save_room(muc.domain, room.stored())
    return {}


async def exists(muc: Muc, jid: JID) -> bool:
    """In a cluster: the room is stored, or owned by a member now."""
    assert muc.placement is not None
    return await muc.store.room(muc.domain, jid.local or "") is not None or \
        await muc.placement.ownership.owner(placement.owner_key(jid)) is not None


async def at_owner(ctx: Context, args: dict[str, Any], action: str, argument: str) -> None:
    """In a cluster, run `action` on the room by the member that owns it (`run_command` there); in a single
    process, here."""
    jid = args["room"]
    muc = services(ctx, jid.domain)[0]
    if muc.placement is None:
        await run_command(_room(ctx, args), action, argument)
        return
    if not await exists(muc, jid):
        raise CommandError(f"room {jid} not found")
    try:
        await muc.placement.act(muc.service, placement.owner_key(jid), action, argument)
    except StanzaError as exc:
        raise CommandError(exc.text or exc.condition) from None


async def run_command(room: Room, action: str, argument: str) -> None:
    """A change to a room, where it is served: 'destroy', or 'affiliation' with [jid, affiliation]."""
    if action == "destroy":
        await destroy(room, None)
        return
    jid, value = json.loads(argument)
    change = AffiliationChange(JID.parse(jid), value, None, None)
    try:
        check_owners_remain(room, [change])
    except StanzaError as exc:
        raise CommandError(exc.text or exc.condition) from None
    batches = set_affiliation(room, change, None)
    await room.save_affiliation(change.jid)
    await room.flush(batches)


@COMMANDS.command("muc-destroy-room", "Destroy a room", (ROOM,), offered=False)
async def destroy_room(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await at_owner(ctx, args, "destroy", "")
    return {}


@COMMANDS.command("muc-rooms", "The rooms of a MUC service (of every service when none is named)",
                  (Arg("service", "text", "MUC service", required=False),), (Arg("rooms", "jids", "Rooms"),),
                  offered=False)
async def rooms(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    domain = args["service"].strip().lower() if args["service"] else None
    found: set[JID] = set()
    for muc in services(ctx, domain):
        if muc.placement is None:
            found.update(jid for jid, room in muc.rooms.items() if not room.destroyed)
            continue
        found.update(JID.make(stored.name, muc.domain) for stored in await muc.store.rooms(muc.domain))
        owned = await muc.placement.ownership.owned(f"{placement.PREFIX}*@{muc.domain}")
        found.update(placement.room_of(key) for key in owned)
    return {"rooms": sorted(found, key=str)}


@COMMANDS.command("muc-room-occupants", "The occupants of a room, by nickname", (ROOM,),
                  (Arg("occupants", "records", "Occupants", fields=("jid", "nick", "role")),), offered=False)
async def occupants(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    jid = args["room"]
    muc = services(ctx, jid.domain)[0]
    if muc.placement is not None:
        state = await muc.placement.ownership.state(placement.owner_key(jid))
        return {"occupants": sorted(({"jid": JID.parse(field[len(placement.OCCUPANT):]),
                                      "nick": json.loads(value)[0], "role": json.loads(value)[1]}
                                     for field, value in state.items() if field.startswith(placement.OCCUPANT)),
                                    key=lambda o: o["nick"])}
    room = _room(ctx, args)
    return {"occupants": [{"jid": o.real_jid, "nick": o.nick, "role": o.role}
                          for o in sorted(room.occupants.values(), key=lambda o: o.nick)]}


@COMMANDS.command("muc-set-affiliation", "Change an affiliation in a room, as an owner's admin iq would",
                  (ROOM, Arg("jid", "jid", "JID"), Arg("affiliation", "text", "Affiliation")), offered=False)
async def affiliation(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    if args["affiliation"] not in AFFILIATIONS:
        raise CommandError(f"the affiliation must be one of {', '.join(AFFILIATIONS)}")
    await at_owner(ctx, args, "affiliation", json.dumps([str(args["jid"].bare), args["affiliation"]]))
    return {}
