"""XEP-0133 Service Administration: the admin commands of the XEP, declared once for every front end."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.accounts import AccountError, create_account, set_password
from server.commands import Arg, CommandError, Context, command
from server.jid import JID

# --- helpers shared by the commands -------------------------------------------------------------------

def _local(ctx: Context, jid: JID) -> str:
    """The username of `jid`, which must be an account address on the command's host."""
    if jid.domain != ctx.host.name or jid.local is None or jid.resource is not None:
        raise CommandError(f"{jid} is not an account of {ctx.host.name}")
    return jid.local


def _close_sessions(ctx: Context, jid: JID, condition: str) -> int:
    sessions = ctx.host.server.sessions
    found = [s for s in [sessions.get(jid)] if s] if jid.resource else sessions.of(jid.bare)
    for session in found:
        session.close(condition)
    return len(found)


ACCOUNT = Arg("accountjid", "jid", "The Jabber ID for the account")
ACCOUNTS = Arg("accountjids", "jids", "The Jabber ID(s)")
PASSWORD = Arg("password", "password", "The password for this account")


# --- XEP-0133 Service Administration --------------------------------------------------------------------

@command("add-user", "Add User", (ACCOUNT, Arg("password", "password", "The password for this account", stage=1),
                                  Arg("password-verify", "password", "Retype password", stage=1)))
async def add_user(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    if args["password"] != args["password-verify"]:
        raise CommandError("the passwords do not match")
    server = ctx.host.server
    try:
        created = await create_account(server.storage, ctx.host.name, _local(ctx, args["accountjid"]),
                                       args["password"], server.config.scram_iterations)
    except AccountError as exc:
        raise CommandError(str(exc)) from None
    if not created:
        raise CommandError(f"{args['accountjid']} exists already")
    return {}


@command("delete-user", "Delete User", (ACCOUNTS,))
async def delete_user(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    users = [(jid, _local(ctx, jid)) for jid in args["accountjids"]]
    for jid, user in users:
        if await ctx.host.server.storage.accounts.delete(ctx.host.name, user):
            _close_sessions(ctx, jid, "not-authorized")
    return {}


@command("change-user-password", "Change User Password", (ACCOUNT, PASSWORD))
async def change_user_password(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    server = ctx.host.server
    try:
        changed = await set_password(server.storage, ctx.host.name, _local(ctx, args["accountjid"]),
                                     args["password"], server.config.scram_iterations)
    except AccountError as exc:
        raise CommandError(str(exc)) from None
    if not changed:
        raise CommandError(f"{args['accountjid']} does not exist")
    return {}


@command("get-registered-users-num", "Get Number of Registered Users",
         result=(Arg("registeredusersnum", "int", "The number of registered users"),))
async def registered_users_num(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"registeredusersnum": await ctx.host.server.storage.accounts.count(ctx.host.name)}


@command("get-registered-users-list", "Get List of Registered Users",
         result=(Arg("registereduserjids", "jids", "The list of all users"),))
async def registered_users_list(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    users = await ctx.host.server.storage.accounts.list(ctx.host.name)
    return {"registereduserjids": [JID.make(u, ctx.host.name) for u in sorted(users)]}


@command("get-online-users-num", "Get Number of Online Users",
         result=(Arg("onlineusersnum", "int", "The number of online users"),))
async def online_users_num(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"onlineusersnum": len(ctx.host.server.sessions.users(ctx.host.name))}


@command("get-online-users-list", "Get List of Online Users",
         result=(Arg("onlineuserjids", "jids", "The list of all online users"),))
async def online_users_list(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"onlineuserjids": sorted(ctx.host.server.sessions.users(ctx.host.name), key=str)}


@command("end-user-session", "End User Session", (ACCOUNTS,))
async def end_user_session(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """A full JID ends that session only, a bare JID every session of the account."""
    for jid in args["accountjids"]:
        _local(ctx, jid.bare)
    for jid in args["accountjids"]:
        _close_sessions(ctx, jid, "policy-violation")
    return {}


async def _set_disabled(ctx: Context, jids: list[JID], disabled: bool) -> None:
    users = [(jid, _local(ctx, jid)) for jid in jids]
    accounts = ctx.host.server.storage.accounts
    missing = [str(jid) for jid, user in users if not await accounts.exists(ctx.host.name, user)]
    if missing:
        raise CommandError(f"no such account: {', '.join(missing)}")
    for jid, user in users:
        await accounts.set_disabled(ctx.host.name, user, disabled)
        if disabled:
            _close_sessions(ctx, jid, "not-authorized")


@command("disable-user", "Disable User", (ACCOUNTS,))
async def disable_user(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await _set_disabled(ctx, args["accountjids"], True)
    return {}


@command("reenable-user", "Re-Enable User", (ACCOUNTS,))
async def reenable_user(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await _set_disabled(ctx, args["accountjids"], False)
    return {}


@command("announce", "Send Announcement to Online Users",
         (Arg("subject", "text", "Subject", required=False), Arg("announcement", "lines", "Announcement")))
async def announce(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    message = Element(ns.qname(ns.CLIENT, "message"), {"from": ctx.host.name, "type": "headline"})
    if args["subject"]:
        SubElement(message, ns.qname(ns.CLIENT, "subject")).text = args["subject"]
    SubElement(message, ns.qname(ns.CLIENT, "body")).text = "\n".join(args["announcement"])
    sessions = ctx.host.server.sessions
    for user in sessions.users(ctx.host.name):
        for session in sessions.of(user):
            message.set("to", str(session.jid))
            session.send(message)
    return {}


@command("user-stats", "Get User Statistics", (ACCOUNT,), (
    Arg("rostersize", "int", "Roster size"), Arg("onlineresources", "lines", "Online resources"),
    Arg("ipaddresses", "lines", "IP addresses")))
async def user_stats(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    user = _local(ctx, args["accountjid"])
    storage = ctx.host.server.storage
    if not await storage.accounts.exists(ctx.host.name, user):
        raise CommandError(f"{args['accountjid']} does not exist")
    _, roster = await storage.roster.get(ctx.host.name, user)
    sessions = ctx.host.server.sessions.of(args["accountjid"])
    return {"rostersize": len(roster), "onlineresources": [s.jid.resource for s in sessions],
            "ipaddresses": sorted({s.remote_ip for s in sessions if s.remote_ip})}


@command("get-user-lastlogin", "Get User Last Login Time", (ACCOUNT,), (
    Arg("lastlogin", "text", "The last login time (XEP-0082); while offline, when the user last logged out"),))
async def user_lastlogin(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """Logins are not stored, logouts are: an online user's oldest session start, else the last logout."""
    account = await ctx.host.server.storage.accounts.get(ctx.host.name, _local(ctx, args["accountjid"]))
    if account is None:
        raise CommandError(f"{args['accountjid']} does not exist")
    sessions = ctx.host.server.sessions.of(args["accountjid"])
    if sessions:
        when: datetime | None = datetime.fromtimestamp(min(s.started for s in sessions), UTC)
    else:
        when = account.last_logout
    return {"lastlogin": when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else "never"}
