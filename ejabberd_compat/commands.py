"""ejabberd's administration commands for `parleyctl` and the HTTP API, installed by the composition root.

Names, argument names and order, and result kinds are ejabberd's (ejabberdctl and mod_http_api), so the
scripts admins wrote for ejabberd work unchanged. Each maps ejabberd's arguments and result shape onto the
command that does the work, run by name from the server's table: XEP-0133's over accounts and sessions,
those the modules that own the data declare (roster, vCard, rooms). Every command names its host in an
argument and may only reach hosts the caller administers.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.etree.ElementTree import Element

from ejabberd_compat import piefxis
from server import ns
from server.accounts import AccountError, create_account, password_matches, prepare_username
from server.commands import Arg, Command, CommandError, Conflict, Context, Declarations, NegativeAnswer, Run
from server.jid import JID, JIDError
from server.stream.errors import StreamError
from server.stream.parser import StreamParser

if TYPE_CHECKING:
    from server.storage.roster import RosterItem

log = logging.getLogger("parley.ejabberd_compat")

COMMANDS = Declarations()
MESSAGE_TYPES = ("chat", "normal", "headline", "groupchat")
STATS = ("registeredusers", "onlineusers", "onlineusersnode", "uptimeseconds", "uploadfiles", "uploadbytes")


def _text(name: str, label: str, required: bool = True) -> Arg:
    return Arg(name, "text", label, required=required)


USER, HOST = _text("user", "Username"), _text("host", "Server name")
ROOM, SERVICE = _text("name", "Room name"), _text("service", "MUC service")


def ejabberd(name: str, title: str, args: tuple[Arg, ...] = (), returns: str = "rescode",
             result: Arg | None = None, access: str = "admin") -> Callable[[Run], Command]:
    """Declare an ejabberd command: the title is ejabberd's description, shown by `parleyctl help`."""
    return COMMANDS.command(name, title, args, (result,) if result else (), access=access, returns=returns)


# --- helpers ---------------------------------------------------------------------------------------------

def _account(ctx: Context, user: str, host: str) -> JID:
    """The bare JID of `user` on `host`, a host the caller may act on."""
    target = ctx.target(host)
    try:
        return JID.make(prepare_username(user, target.name), target.name)
    except AccountError as exc:
        raise CommandError(str(exc)) from None


async def _on(ctx: Context, name: str, host: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run the command `name` that does the work on `host`, as the same caller."""
    return await ctx.host.server.commands.run(name, Context(ctx.target(host), ctx.actor, ctx.operator), args)


def _jid(text: str) -> JID:
    try:
        return JID.parse(text.strip())
    except JIDError as exc:
        raise CommandError(f"invalid JID {text!r}: {exc}") from None


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
    await _on(ctx, "delete-user", args["host"], {"accountjids": [_account(ctx, args["user"], args["host"])]})
    return {"res": ""}


@ejabberd("change_password", "Change the password of an account",
          (USER, HOST, Arg("newpass", "password", "New password")))
async def change_password(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    jid = _account(ctx, args["user"], args["host"])
    return await _on(ctx, "change-user-password", args["host"], {"accountjid": jid, "password": args["newpass"]})


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
    await _on(ctx, "disable-user", args["host"], {"accountjids": [jid]})
    log.info("%s banned %s: %s", ctx.actor, jid, args["reason"] or "no reason given")
    return {}


# --- sessions --------------------------------------------------------------------------------------------

@ejabberd("connected_users", "List all established sessions", (), "list", Arg("connected_users", "lines", "Sessions"))
async def connected_users(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    sessions = ctx.host.server.sessions
    found = [str(jid) for h in ctx.hosts() for jid in await sessions.everywhere(h.name)]
    return {"connected_users": sorted(found)}


@ejabberd("connected_users_number", "Get the number of established sessions", (), "integer",
          Arg("num_sessions", "int", "Number of sessions"))
async def connected_users_number(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"num_sessions": len((await connected_users.run(ctx, {}))["connected_users"])}


@ejabberd("kick_session", "Kick a user session",
          (USER, HOST, _text("resource", "Resource"), _text("reason", "Reason", required=False)))
async def kick_session(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    jid = _account(ctx, args["user"], args["host"])
    try:
        session = jid.with_resource(args["resource"])
    except JIDError as exc:
        raise CommandError(f"invalid resource: {exc}") from None
    await _on(ctx, "end-user-session", args["host"], {"accountjids": [session]})
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
    owner = _account(ctx, args["localuser"], args["localhost"])
    groups = list(dict.fromkeys(g.strip() for g in (args["group"] or "").split(";") if g.strip()))
    return await _on(ctx, "roster-set-item", owner.domain, {
        "accountjid": owner, "contact": _jid(f"{args['user']}@{args['host']}"), "name": args["nick"],
        "groups": groups, "subscription": args["subs"]})


@ejabberd("delete_rosteritem", "Delete an item from a user's roster", (*ROSTER_OWNER, *CONTACT))
async def delete_rosteritem(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    owner = _account(ctx, args["localuser"], args["localhost"])
    return await _on(ctx, "roster-remove-item", owner.domain,
                     {"accountjid": owner, "contact": _jid(f"{args['user']}@{args['host']}")})


@ejabberd("get_roster", "Get roster of a local user: one line per contact and group", (USER, HOST), "records",
          Arg("contacts", "records", "Contacts", fields=("jid", "nick", "subscription", "ask", "group")))
async def get_roster(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    owner = _account(ctx, args["user"], args["host"])
    items: list[RosterItem] = (await _on(ctx, "roster-items", owner.domain, {"accountjid": owner}))["items"]
    return {"contacts": [
        {"jid": item.jid, "nick": item.name or "", "subscription": item.subscription,
         "ask": "out" if item.ask else "none", "group": group}  # ejabberd's words for a pending request
        for item in items for group in item.groups or ("",)
    ]}


# --- vCard -----------------------------------------------------------------------------------------------

VCARD_NAME = _text("name", "vCard field (FN, NICKNAME, BDAY, TITLE, ROLE...)")


@ejabberd("get_vcard", "Get content from a vCard field", (USER, HOST, VCARD_NAME), "string",
          Arg("content", "text", "Content"))
async def get_vcard(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    owner = _account(ctx, args["user"], args["host"])
    return await _on(ctx, "vcard-get-field", owner.domain, {"accountjid": owner, "field": args["name"]})


@ejabberd("set_vcard", "Set content in a vCard field", (USER, HOST, VCARD_NAME, _text("content", "Content")))
async def set_vcard(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    owner = _account(ctx, args["user"], args["host"])
    return await _on(ctx, "vcard-set-field", owner.domain,
                     {"accountjid": owner, "field": args["name"], "content": args["content"]})


# --- rooms -----------------------------------------------------------------------------------------------

def _room_jid(name: str, service: str) -> JID:
    try:
        return JID.make(name.strip(), service.strip())
    except JIDError as exc:
        raise CommandError(f"invalid room name {name!r}: {exc}") from None


async def _on_room(ctx: Context, name: str, args: dict[str, Any], **more: Any) -> dict[str, Any]:
    """Run the command `name` on the room that ejabberd's arguments name and service designate."""
    return await ctx.host.server.commands.run(name, ctx, {"room": _room_jid(args["name"], args["service"]), **more})


@ejabberd("create_room", "Create a MUC room name@service in host: persistent, owned by the host's admins",
          (ROOM, SERVICE, HOST))
async def create_room(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return await _on(ctx, "muc-create-room", args["host"], {"room": _room_jid(args["name"], args["service"])})


@ejabberd("destroy_room", "Destroy a MUC room", (ROOM, SERVICE))
async def destroy_room(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return await _on_room(ctx, "muc-destroy-room", args)


@ejabberd("muc_online_rooms", "List existing rooms ('global' for every service)", (SERVICE,), "list",
          Arg("rooms", "lines", "Rooms"))
async def muc_online_rooms(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    service = None if args["service"] == "global" else args["service"]
    found = await ctx.host.server.commands.run("muc-rooms", ctx, {"service": service})
    return {"rooms": sorted(str(jid) for jid in found["rooms"])}


@ejabberd("get_room_occupants", "Get the list of occupants of a MUC room", (ROOM, SERVICE), "records",
          Arg("occupants", "records", "Occupants", fields=("jid", "nick", "role")))
async def get_room_occupants(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    found = await _on_room(ctx, "muc-room-occupants", args)
    return {"occupants": [{**o, "jid": str(o["jid"])} for o in found["occupants"]]}


@ejabberd("set_room_affiliation", "Change an affiliation in a MUC room",
          (ROOM, SERVICE, _text("jid", "JID"), _text("affiliation", "Affiliation")))
async def set_room_affiliation(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return await _on_room(ctx, "muc-set-affiliation", args, jid=_jid(args["jid"]), affiliation=args["affiliation"])


# --- the server ------------------------------------------------------------------------------------------

@ejabberd("stats", f"Get statistical value: {' '.join(STATS)}", (_text("name", "Statistic"),), "integer",
          Arg("stat", "int", "Value"))
async def stats(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    server, name = ctx.host.server, args["name"]
    if name == "registeredusers":
        return {"stat": sum([await server.storage.accounts.count(h.name) for h in ctx.hosts()])}
    if name == "onlineusersnode" and server.cluster is not None:  # this process's; the node's other workers aside
        return {"stat": len(server.sessions.all())}
    if name in ("onlineusers", "onlineusersnode"):
        return {"stat": (await connected_users_number.run(ctx, {}))["num_sessions"]}
    if name == "uptimeseconds":
        return {"stat": int(time.time() - server.started)}
    if name in ("uploadfiles", "uploadbytes"):  # HTTP File Upload's files and their bytes (upload-usage)
        return {"stat": (await server.commands.run("upload-usage", ctx, {}))[name.removeprefix("upload")]}
    raise CommandError(f"unknown statistic {name!r} (known: {', '.join(STATS)})")


def _version() -> str:
    try:
        return version("parley")
    except PackageNotFoundError:
        return "unknown"


@ejabberd("status", "Get status of the server", (), "restuple", Arg("res", "text", "Status"))
async def status(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    cluster = ctx.host.server.cluster
    node = cluster.node if cluster is not None else platform.node()
    text = f"The node parley@{node} is started with status: started\nParley {_version()} is running in that node"
    if cluster is not None:
        members = (await ctx.host.server.commands.run("get-cluster-members", ctx, {}))["members"]
        text += f"\nCluster of {len(cluster.nodes())} node(s) ({', '.join(cluster.nodes())}), " \
                f"{len(cluster.members())} member(s):\n" + "\n".join(f"  {line}" for line in members)
    return {"res": text}


@ejabberd("list_cluster", "List nodes that are part of the cluster", (), "list", Arg("nodes", "lines", "Nodes"))
async def list_cluster(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    cluster = ctx.host.server.cluster
    return {"nodes": [f"parley@{node}" for node in (cluster.nodes() if cluster is not None else [platform.node()])]}


@ejabberd("reload_config", "Reload the configuration file: each host's admins, registration and module "
          "options, limits, federation policy and lists, log level and certificates; the log file is reopened "
          "(hosts, listeners and storage need a restart)", access="server")
async def reload_config(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return await ctx.host.server.commands.run("reload-configuration", ctx, {})


@ejabberd("reopen_log", "Reopen the log file (after logrotate moved it away)", access="server")
async def reopen_log(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return await ctx.host.server.commands.run("reopen-log", ctx, {})


@ejabberd("stop", "Stop the server: clients are told it shuts down, and `parley serve` exits", access="server")
async def stop(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return await ctx.host.server.commands.run("shutdown", ctx, {"delay": None, "announcement": []})


@ejabberd("restart", "Restart the server in its process, on the configuration it runs (clients reconnect)",
          access="server")
async def restart(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return await ctx.host.server.commands.run("restart", ctx, {"delay": None, "announcement": []})


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


@COMMANDS.command("export-own-account", "Export my account with its data as a XEP-0227 file", (),
                  (Arg("document", "text", "The XEP-0227 document"),), access="user", offered=False)
async def export_own_account(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """The caller's own account, for the account page's download: the page is an extension, which may not
    import this package, so it runs this command by name."""
    user = ctx.actor.local
    if ctx.actor.domain != ctx.host.name or user is None:
        raise CommandError(f"{ctx.actor} is not an account of {ctx.host.name}")
    document = await piefxis.export_account(ctx.host.server.storage, ctx.host.name, user)
    log.info("%s exported their account", ctx.actor.bare)
    return {"document": document}
