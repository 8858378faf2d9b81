"""Admin commands, each declared once: name, typed arguments, result fields, who may run it, and the code.

Front ends (XEP-0050 ad-hoc commands now; the CLI and HTTP API later) read these declarations to build
their forms, options or JSON, parse arguments with `Arg.parse` and check `Command.allowed`, so no
command is written once per front end. Arguments carry a `stage`: a front end that asks step by step
(ad-hoc forms) asks for stage 0 first, then stage 1...; others ask for everything at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.accounts import AccountError, create_account, set_password
from server.jid import JID, JIDError

if TYPE_CHECKING:
    from server.host import Host

ADMIN_NS = "http://jabber.org/protocol/admin"
# Argument types and the XEP-0004 field type that asks for each.
FIELD_TYPES = {
    "jid": "jid-single", "jids": "jid-multi", "text": "text-single", "password": "text-private",
    "int": "text-single", "lines": "text-multi",
}


class CommandError(ValueError):
    """A user-facing reason why a command did not do what was asked."""


@dataclass(frozen=True)
class Arg:
    """An argument or a result field of a command."""

    name: str
    type: str  # a key of FIELD_TYPES
    label: str
    required: bool = True
    stage: int = 0

    def parse(self, values: list[str]) -> Any:
        """The typed value of what a front end received as strings (None when optional and absent)."""
        if self.type != "password":
            values = [v.strip() for v in values if v.strip()]
        if not values or not values[0]:
            if self.required:
                raise CommandError(f"{self.label} is required")
            return [] if self.type in ("jids", "lines") else None
        try:
            if self.type == "jid":
                return JID.parse(values[0])
            if self.type == "jids":
                return [JID.parse(v) for v in values]
            if self.type == "int":
                return int(values[0])
        except (JIDError, ValueError) as exc:
            raise CommandError(f"{self.label}: {exc}") from None
        if self.type == "lines":
            return values
        return values[0]

    def format(self, value: Any) -> list[str]:
        """A typed value as the strings a front end shows."""
        if isinstance(value, list | tuple | set):
            return [str(v) for v in value]
        return [] if value is None else [str(value)]


@dataclass
class Context:
    """Who runs a command, and on which host."""

    host: Host
    actor: JID


Run = Callable[[Context, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Command:
    name: str
    title: str
    run: Run
    args: tuple[Arg, ...] = ()
    result: tuple[Arg, ...] = ()
    access: str = "admin"  # 'admin': the host's admins; 'user': any account of the host
    namespace: str = ADMIN_NS

    @property
    def node(self) -> str:
        return f"{self.namespace}#{self.name}"

    @property
    def stages(self) -> int:
        return max((a.stage for a in self.args), default=-1) + 1

    def allowed(self, host: Host, jid: JID) -> bool:
        if self.access == "user":
            return jid.domain == host.name and jid.local is not None
        return host.is_admin(jid)


COMMANDS: dict[str, Command] = {}
# Commands of XEP-0133 that cannot exist here, with the reason every front end gives.
REFUSED: dict[str, str] = {
    "get-user-password": "passwords are stored only as SCRAM keys and cannot be retrieved; "
                         "use change-user-password instead",
}


def register(command: Command) -> Command:
    if command.name in COMMANDS:
        raise ValueError(f"command {command.name} is declared twice")
    COMMANDS[command.name] = command
    return command


def by_node(node: str) -> Command | None:
    return next((c for c in COMMANDS.values() if c.node == node), None)


def command(name: str, title: str, args: tuple[Arg, ...] = (), result: tuple[Arg, ...] = (),
            access: str = "admin") -> Callable[[Run], Run]:
    """Declare the decorated coroutine as the command `name`."""
    def declare(run: Run) -> Run:
        register(Command(name, title, run, args, result, access))
        return run
    return declare


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
