"""ejabberd's administration commands, declared once in the command registry for `parleyctl` and the HTTP API.

Names, argument names and order, and result kinds are ejabberd's (ejabberdctl and mod_http_api), so the
scripts admins wrote for ejabberd work unchanged. Where a XEP-0133 command does the same thing, the
ejabberd command calls it; where a module owns the state (roster, vCard, rooms), the command calls the
module. Every command names its host in an argument and may only reach hosts the caller administers.
"""

from __future__ import annotations

import logging
import platform
import re
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.etree.ElementTree import Element

from ejabberd_compat import piefxis
from ejabberd_compat.config import load_any_config
from extensions.muc.admin import AffiliationChange, check_owners_remain, set_affiliation
from extensions.muc.owner import destroy
from extensions.muc.protocol import AFFILIATIONS
from extensions.muc.room import Room
from server import ns
from server.accounts import AccountError, create_account, password_matches, prepare_username
from server.commands import COMMANDS, Arg, CommandError, Conflict, Context, NegativeAnswer, Run, command
from server.config import ConfigError
from server.jid import JID, JIDError
from server.registry import available
from server.storage.muc import Affiliation
from server.storage.roster import RosterItem
from server.stream.errors import StanzaError, StreamError
from server.stream.parser import StreamParser

if TYPE_CHECKING:
    from extensions.muc.service import Muc
    from server.host import Host

log = logging.getLogger("parley.ejabberd_compat")

SUBSCRIPTIONS = ("none", "from", "to", "both")
MESSAGE_TYPES = ("chat", "normal", "headline", "groupchat")
STATS = ("registeredusers", "onlineusers", "onlineusersnode", "uptimeseconds")
VCARD_FIELD = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def _text(name: str, label: str, required: bool = True) -> Arg:
    return Arg(name, "text", label, required=required)


USER, HOST = _text("user", "Username"), _text("host", "Server name")
ROOM, SERVICE = _text("name", "Room name"), _text("service", "MUC service")


def ejabberd(name: str, title: str, args: tuple[Arg, ...] = (), returns: str = "rescode",
             result: Arg | None = None, access: str = "admin") -> Callable[[Run], Run]:
    """Declare an ejabberd command: the title is ejabberd's description, shown by `parleyctl help`."""
    return command(name, title, args, (result,) if result else (), access=access, returns=returns)


# --- helpers ---------------------------------------------------------------------------------------------

def _account(ctx: Context, user: str, host: str) -> JID:
    """The bare JID of `user` on `host`, a host the caller may act on."""
    target = ctx.target(host)
    try:
        return JID.make(prepare_username(user, target.name), target.name)
    except AccountError as exc:
        raise CommandError(str(exc)) from None


async def _existing(ctx: Context, user: str, host: str) -> JID:
    jid = _account(ctx, user, host)
    if not await ctx.host.server.storage.accounts.exists(jid.domain, jid.local or ""):
        raise CommandError(f"{jid} does not exist")
    return jid


async def _xep0133(ctx: Context, name: str, host: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run the XEP-0133 command that does the same on `host`, as the same caller."""
    return await COMMANDS[name].run(Context(ctx.target(host), ctx.actor, ctx.operator), args)


def _jid(text: str) -> JID:
    try:
        return JID.parse(text.strip())
    except JIDError as exc:
        raise CommandError(f"invalid JID {text!r}: {exc}") from None


def _module(host: Host, name: str) -> Any:
    """A module of the host, typed Any: commands call the methods of the module they name."""
    module = host.modules.get(name)
    if module is None:
        raise CommandError(f"the {name} module is not enabled on {host.name}")
    return module


def _sender(ctx: Context, text: str) -> JID:
    """A sender address on a host the caller may act on: an admin speaks only for its own tenants."""
    sender = _jid(text)
    if sender.domain not in {h.name for h in ctx.hosts()}:
        raise CommandError(f"{sender} is not an address of a host you administer")
    return sender


# --- accounts --------------------------------------------------------------------------------------------

@ejabberd("register", "Register a user", (USER, HOST, Arg("password", "password", "Password")), "restuple",
          Arg("res", "text", "Result"))
async def register(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    jid = _account(ctx, args["user"], args["host"])
    server = ctx.host.server
    try:
        created = await create_account(server.storage, jid.domain, jid.local or "", args["password"],
                                       server.config.scram_iterations)
    except AccountError as exc:
        raise CommandError(str(exc)) from None
    if not created:
        raise Conflict(f"User {jid} already registered")
    return {"res": f"User {jid} successfully registered"}


@ejabberd("unregister", "Unregister a user, with all the data of the account (roster, vCard...)",
          (USER, HOST), "restuple", Arg("res", "text", "Result"))
async def unregister(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await _xep0133(ctx, "delete-user", args["host"], {"accountjids": [_account(ctx, args["user"], args["host"])]})
    return {"res": ""}


@ejabberd("change_password", "Change the password of an account",
          (USER, HOST, Arg("newpass", "password", "New password")))
async def change_password(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    jid = _account(ctx, args["user"], args["host"])
    return await _xep0133(ctx, "change-user-password", args["host"], {"accountjid": jid, "password": args["newpass"]})


@ejabberd("check_account", "Check if an account exists or not", (USER, HOST))
async def check_account(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    jid = _account(ctx, args["user"], args["host"])
    if not await ctx.host.server.storage.accounts.exists(jid.domain, jid.local or ""):
        raise NegativeAnswer(f"{jid} does not exist")
    return {}


@ejabberd("check_password", "Check if a password is correct",
          (USER, HOST, Arg("password", "password", "Password")))
async def check_password(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    jid = _account(ctx, args["user"], args["host"])
    if not await password_matches(ctx.host.server.storage, jid.domain, jid.local or "", args["password"]):
        raise NegativeAnswer("the password is wrong, or the account does not exist or is disabled")
    return {}


@ejabberd("registered_users", "List all registered users in HOST", (HOST,), "list",
          Arg("users", "lines", "Usernames"))
async def registered_users(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    host = ctx.target(args["host"])
    return {"users": sorted(await ctx.host.server.storage.accounts.list(host.name))}


@ejabberd("ban_account", "Ban an account: end its sessions and disable it (reenable-user lifts the ban)",
          (USER, HOST, _text("reason", "Reason", required=False)))
async def ban_account(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    jid = _account(ctx, args["user"], args["host"])
    await _xep0133(ctx, "disable-user", args["host"], {"accountjids": [jid]})
    log.info("%s banned %s: %s", ctx.actor, jid, args["reason"] or "no reason given")
    return {}


# --- sessions --------------------------------------------------------------------------------------------

@ejabberd("connected_users", "List all established sessions", (), "list", Arg("connected_users", "lines", "Sessions"))
async def connected_users(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    sessions = ctx.host.server.sessions
    return {"connected_users": sorted(str(s.jid) for h in ctx.hosts() for u in sessions.users(h.name)
                                      for s in sessions.of(u))}


@ejabberd("connected_users_number", "Get the number of established sessions", (), "integer",
          Arg("num_sessions", "int", "Number of sessions"))
async def connected_users_number(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"num_sessions": len((await connected_users(ctx, {}))["connected_users"])}


@ejabberd("kick_session", "Kick a user session",
          (USER, HOST, _text("resource", "Resource"), _text("reason", "Reason", required=False)))
async def kick_session(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    jid = _account(ctx, args["user"], args["host"])
    try:
        session = jid.with_resource(args["resource"])
    except JIDError as exc:
        raise CommandError(f"invalid resource: {exc}") from None
    await _xep0133(ctx, "end-user-session", args["host"], {"accountjids": [session]})
    log.info("%s kicked %s: %s", ctx.actor, session, args["reason"] or "no reason given")
    return {}


# --- stanzas ---------------------------------------------------------------------------------------------

@ejabberd("send_message", "Send a message to a local or remote bare or full JID",
          (_text("type", "Message type"), _text("from", "Sender"), _text("to", "Recipient"),
           _text("subject", "Subject", required=False), _text("body", "Body", required=False)))
async def send_message(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    if args["type"] not in MESSAGE_TYPES:
        raise CommandError(f"the message type must be one of {', '.join(MESSAGE_TYPES)}")
    sender, recipient = _sender(ctx, args["from"]), _jid(args["to"])
    message = Element(ns.qname(ns.CLIENT, "message"), {"type": args["type"], "from": str(sender),
                                                       "to": str(recipient)})
    for name in ("subject", "body"):
        if args[name]:
            child = Element(ns.qname(ns.CLIENT, name))
            child.text = args[name]
            message.append(child)
    await ctx.host.server.router.send(message)
    return {}


def parse_stanza(text: str) -> Element:
    """One stanza from its XML, with the restrictions of a client stream (no DTD, entities or comments)."""
    stream = f"<stream:stream xmlns='{ns.CLIENT}' xmlns:stream='{ns.STREAM}'>{text}</stream:stream>"
    try:
        events = StreamParser().feed(stream.encode())
    except StreamError as exc:
        raise CommandError(f"invalid XML: {exc}") from None
    elements = [e for e in events if isinstance(e, Element)]
    if len(elements) != 1:
        raise CommandError("the stanza must be exactly one XML element")
    stanza = elements[0]
    if stanza.tag not in {ns.qname(ns.CLIENT, kind) for kind in ("message", "presence", "iq")}:
        raise CommandError("the stanza must be a message, presence or iq")
    return stanza


@ejabberd("send_stanza", "Send a stanza; provide From JID and valid To JID",
          (_text("from", "Sender"), _text("to", "Recipient"), Arg("stanza", "password", "Stanza")))
async def send_stanza(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    sender, recipient = _sender(ctx, args["from"]), _jid(args["to"])
    stanza = parse_stanza(args["stanza"])
    stanza.set("from", str(sender))
    stanza.set("to", str(recipient))
    await ctx.host.server.router.send(stanza)
    return {}


# --- roster ----------------------------------------------------------------------------------------------

ROSTER_OWNER = (_text("localuser", "User"), _text("localhost", "Server name"))
CONTACT = (USER, HOST)


@ejabberd("add_rosteritem", "Add an item to a user's roster; several groups are separated by ';'",
          (*ROSTER_OWNER, *CONTACT, _text("nick", "Nickname", required=False),
           _text("group", "Groups", required=False), _text("subs", "Subscription")))
async def add_rosteritem(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    owner = await _existing(ctx, args["localuser"], args["localhost"])
    if args["subs"] not in SUBSCRIPTIONS:
        raise CommandError(f"the subscription must be one of {', '.join(SUBSCRIPTIONS)}")
    contact = _jid(f"{args['user']}@{args['host']}")
    groups = tuple(dict.fromkeys(g.strip() for g in (args["group"] or "").split(";") if g.strip()))
    roster = _module(ctx.target(owner.domain), "roster")
    async with roster.locked(owner):
        await roster.update(owner, RosterItem(str(contact), args["nick"], args["subs"], groups=groups))
    return {}


@ejabberd("delete_rosteritem", "Delete an item from a user's roster", (*ROSTER_OWNER, *CONTACT))
async def delete_rosteritem(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    owner = await _existing(ctx, args["localuser"], args["localhost"])
    contact = _jid(f"{args['user']}@{args['host']}")
    roster = _module(ctx.target(owner.domain), "roster")
    if await roster.item(owner, contact) is not None:
        await roster.remove(owner, contact)
    return {}


@ejabberd("get_roster", "Get roster of a local user: one line per contact and group", (USER, HOST), "records",
          Arg("contacts", "records", "Contacts", fields=("jid", "nick", "subscription", "ask", "group")))
async def get_roster(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    owner = await _existing(ctx, args["user"], args["host"])
    roster = _module(ctx.target(owner.domain), "roster")
    items: dict[str, RosterItem] = await roster.items(owner)
    return {"contacts": [
        {"jid": item.jid, "nick": item.name or "", "subscription": item.subscription,
         "ask": "out" if item.ask else "none", "group": group}  # ejabberd's words for a pending request
        for item in sorted(items.values(), key=lambda i: i.jid) for group in item.groups or ("",)
    ]}


# --- vCard -----------------------------------------------------------------------------------------------

VCARD_NAME = _text("name", "vCard field (FN, NICKNAME, BDAY, TITLE, ROLE...)")


def _vcard_field(name: str) -> str:
    if not VCARD_FIELD.fullmatch(name):
        raise CommandError(f"invalid vCard field name {name!r}")
    return ns.qname(ns.VCARD, name)


@ejabberd("get_vcard", "Get content from a vCard field", (USER, HOST, VCARD_NAME), "string",
          Arg("content", "text", "Content"))
async def get_vcard(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    owner = await _existing(ctx, args["user"], args["host"])
    tag = _vcard_field(args["name"])
    vcard = await _module(ctx.target(owner.domain), "vcard").load(owner)
    if vcard is None:
        raise CommandError(f"{owner} has no vCard")
    value = vcard.findtext(tag)
    if not value:
        raise CommandError(f"the vCard of {owner} has no {args['name']}")
    return {"content": value}


@ejabberd("set_vcard", "Set content in a vCard field", (USER, HOST, VCARD_NAME, _text("content", "Content")))
async def set_vcard(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    owner = await _existing(ctx, args["user"], args["host"])
    tag = _vcard_field(args["name"])
    module = _module(ctx.target(owner.domain), "vcard")
    vcard = await module.load(owner)
    if vcard is None:
        vcard = Element(ns.qname(ns.VCARD, "vCard"))
    field = vcard.find(tag)
    if field is None:
        field = Element(tag)
        vcard.append(field)
    field.text = args["content"]
    await module.store(owner, vcard)
    return {}


# --- rooms -----------------------------------------------------------------------------------------------

def _services(ctx: Context, service: str) -> list[Muc]:
    found: list[Any] = [h.modules["muc"] for h in ctx.hosts() if "muc" in h.modules]
    if service != "global":
        found = [m for m in found if m.domain == service.strip().lower()]
        if not found:
            raise CommandError(f"no MUC service {service} on a host you administer")
    return found


def _room_jid(name: str, service: str) -> JID:
    try:
        return JID.make(name.strip(), service.strip())
    except JIDError as exc:
        raise CommandError(f"invalid room name {name!r}: {exc}") from None


def _room(ctx: Context, name: str, service: str) -> Room:
    jid = _room_jid(name, service)
    room = _services(ctx, service)[0].rooms.get(jid)
    if room is None or room.destroyed:
        raise CommandError(f"room {jid} not found")
    return room


@ejabberd("create_room", "Create a MUC room name@service in host: persistent, owned by the host's admins",
          (ROOM, SERVICE, HOST))
async def create_room(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    host = ctx.target(args["host"])
    muc = _module(host, "muc")
    if muc.domain != args["service"].strip().lower():
        raise CommandError(f"the MUC service of {host.name} is {muc.domain}")
    jid = _room_jid(args["name"], muc.domain)
    if jid in muc.rooms:
        raise CommandError(f"room {jid} already exists")  # ejabberd answers 400 here, not 409
    owners = host.admins if ctx.operator else {ctx.actor.bare}
    room = Room(muc, jid, replace(muc.default_config(), persistent=True), datetime.now(UTC),
                {owner: Affiliation("owner") for owner in owners})
    muc.rooms[jid] = room
    await muc.store.save_room(muc.domain, room.stored())
    return {}


@ejabberd("destroy_room", "Destroy a MUC room", (ROOM, SERVICE))
async def destroy_room(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await destroy(_room(ctx, args["name"], args["service"]), None)
    return {}


@ejabberd("muc_online_rooms", "List existing rooms ('global' for every service)", (SERVICE,), "list",
          Arg("rooms", "lines", "Rooms"))
async def muc_online_rooms(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"rooms": sorted(str(jid) for muc in _services(ctx, args["service"])
                            for jid, room in muc.rooms.items() if not room.destroyed)}


@ejabberd("get_room_occupants", "Get the list of occupants of a MUC room", (ROOM, SERVICE), "records",
          Arg("occupants", "records", "Occupants", fields=("jid", "nick", "role")))
async def get_room_occupants(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    room = _room(ctx, args["name"], args["service"])
    return {"occupants": [{"jid": str(o.real_jid), "nick": o.nick, "role": o.role}
                          for o in sorted(room.occupants.values(), key=lambda o: o.nick)]}


@ejabberd("set_room_affiliation", "Change an affiliation in a MUC room",
          (ROOM, SERVICE, _text("jid", "JID"), _text("affiliation", "Affiliation")))
async def set_room_affiliation(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    room = _room(ctx, args["name"], args["service"])
    if args["affiliation"] not in AFFILIATIONS:
        raise CommandError(f"the affiliation must be one of {', '.join(AFFILIATIONS)}")
    change = AffiliationChange(_jid(args["jid"]).bare, args["affiliation"], None, None)
    try:
        check_owners_remain(room, [change])
    except StanzaError as exc:
        raise CommandError(exc.text or exc.condition) from None
    batches = set_affiliation(room, change, None)
    await room.save_affiliation(change.jid)
    await room.flush(batches)
    return {}


# --- the server ------------------------------------------------------------------------------------------

@ejabberd("stats", f"Get statistical value: {' '.join(STATS)}", (_text("name", "Statistic"),), "integer",
          Arg("stat", "int", "Value"))
async def stats(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    server, name = ctx.host.server, args["name"]
    if name == "registeredusers":
        return {"stat": sum([await server.storage.accounts.count(h.name) for h in ctx.hosts()])}
    if name in ("onlineusers", "onlineusersnode"):
        return {"stat": (await connected_users_number(ctx, {}))["num_sessions"]}
    if name == "uptimeseconds":
        return {"stat": int(time.time() - server.started)}
    raise CommandError(f"unknown statistic {name!r} (known: {', '.join(STATS)})")


def _version() -> str:
    try:
        return version("parley")
    except PackageNotFoundError:
        return "unknown"


@ejabberd("status", "Get status of the server", (), "restuple", Arg("res", "text", "Status"))
async def status(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"res": f"The node parley@{platform.node()} is started with status: started\n"
                   f"Parley {_version()} is running in that node"}


@ejabberd("reload_config", "Reload the configuration file: each host's admins, registration and module "
          "options (hosts, listeners and storage need a restart)", access="server")
async def reload_config(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    server = ctx.host.server
    if server.config.source is None:
        raise CommandError("the server runs on the built-in configuration: there is no file to reload")
    try:
        config, _ = load_any_config(server.config.source, known_modules=available())
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    for name, host in server.hosts.items():
        new = config.hosts.get(name)
        if new is not None:
            added = host.admins - host.configured_admins  # by XEP-0133 edit-admin: they stay
            host.configured_admins = frozenset(JID.parse(a) for a in new.admins)
            host.admins = {*host.configured_admins, *added}
            host.config, host.config_options = new, dict(new.options)
    if set(config.hosts) != set(server.hosts) or config.listeners != server.config.listeners \
            or config.storage != server.config.storage:
        log.warning("reload_config: hosts, listeners and storage changed in %s take effect at the next restart",
                    server.config.source)
    log.info("%s reloaded %s", ctx.actor, server.config.source)
    return {}


# --- XEP-0227 --------------------------------------------------------------------------------------------

@ejabberd("export_piefxis", "Export the users of every host, with their data, to XEP-0227 files in a directory "
          "of the server's machine, as ejabberd's import_piefxis reads them (SHA-1 keys only; "
          "'parley export-piefxis' keeps every key)", (Arg("dir", "path", "Directory"),), access="server")
async def export_piefxis(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    try:
        path = await piefxis.export_piefxis(ctx.host.server.storage, Path(args["dir"]), [h.name for h in ctx.hosts()],
                                            for_ejabberd=True)
    except OSError as exc:
        raise CommandError(f"cannot write to {args['dir']}: {exc.strerror or exc}") from None
    log.info("%s exported the users to %s", ctx.actor, path)
    return {}


@ejabberd("import_piefxis", "Import users and their data from a XEP-0227 file (or directory) of the server's "
          "machine; existing accounts are left as they are", (Arg("file", "path", "File"),), access="server")
async def import_piefxis(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    server = ctx.host.server
    try:
        report = await piefxis.import_piefxis(server.storage, Path(args["file"]), [h.name for h in ctx.hosts()],
                            server.config.scram_iterations)
    except (piefxis.PiefxisError, OSError) as exc:
        raise CommandError(f"cannot import {args['file']}: {exc}") from None
    log.info("%s imported %s: %s", ctx.actor, args["file"], report.summary())
    return {}
