"""XEP-0133 Service Administration over what the core owns: accounts, sessions, admins, the server itself.

The XEP's commands over a module's data (the message of the day, rosters, federation lists) are declared by
that module; these are installed by the composition root.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast
from xml.etree.ElementTree import Element, SubElement

from server import logs, ns
from server.accounts import AccountError, create_account, set_password
from server.commands import Arg, CommandError, Context, Declarations
from server.config import Config, ConfigError
from server.jid import JID
from server.tls import TlsError

if TYPE_CHECKING:
    from server.server import Server
    from server.sessions import Session
    from server.storage import Storage

log = logging.getLogger("parley.commands")

COMMANDS = Declarations()
command = COMMANDS.command

IDLE_AFTER = 600.0  # seconds without a stanza after which an online user counts as idle
MAX_DELAY = 3600  # seconds a restart or shutdown may be put off

# --- helpers shared by the commands -------------------------------------------------------------------

def message(sender: str, body: str, subject: str | None = None, type: str = "headline") -> Element:
    """A message from the server to its users (an announcement, the message of the day)."""
    el = Element(ns.qname(ns.CLIENT, "message"), {"from": sender, "type": type})
    if subject:
        SubElement(el, ns.qname(ns.CLIENT, "subject")).text = subject
    SubElement(el, ns.qname(ns.CLIENT, "body")).text = body
    return el


async def broadcast(server: Server, domain: str, el: Element) -> list[JID]:
    """Send `el` to every session of the domain's online users; return those users."""
    users = await server.sessions.users(domain)
    for user in users:
        await server.sessions.ensure(user)
        for session in server.sessions.of(user):
            el.set("to", str(session.jid))
            session.send(el)
    return users


def local_user(ctx: Context, jid: JID) -> str:
    """The username of `jid`, which must be an account address on the command's host."""
    if jid.domain != ctx.host.name or jid.local is None or jid.resource is not None:
        raise CommandError(f"{jid} is not an account of {ctx.host.name}")
    return jid.local


async def existing_account(ctx: Context, jid: JID) -> JID:
    """`jid`, which must name an existing account of the command's host."""
    if not await ctx.host.server.storage.accounts.exists(ctx.host.name, local_user(ctx, jid)):
        raise CommandError(f"{jid} does not exist")
    return jid


async def _close_sessions(ctx: Context, jid: JID, condition: str) -> int:
    """End the sessions of `jid` wherever they are: in a cluster, the account is looked up first, since this
    member may not be tracking an account none of its own users has contact with."""
    sessions = ctx.host.server.sessions
    await sessions.ensure(jid.bare)
    found = [s for s in [sessions.get(jid)] if s] if jid.resource else sessions.of(jid.bare)
    for session in found:
        session.close(condition)
    return len(found)


ACCOUNT = Arg("accountjid", "jid", "The Jabber ID for the account")
ACCOUNTS = Arg("accountjids", "jids", "The Jabber ID(s)")
PASSWORD = Arg("password", "password", "The password for this account")


# --- XEP-0133 Service Administration --------------------------------------------------------------------

async def _set_credentials(ctx: Context, jid: JID, password: str,
                           action: Callable[[Storage, str, str, str, int], Awaitable[bool]]) -> bool:
    """Run `action` (create_account or set_password) for `jid`; the account rules' refusals become the
    command's error."""
    server = ctx.host.server
    try:
        return await action(server.storage, ctx.host.name, local_user(ctx, jid), password,
                            server.config.scram_iterations)
    except AccountError as exc:
        raise CommandError(str(exc)) from None


@command("add-user", "Add User", (
    Arg("accountjid", "jid", "The Jabber ID for the account to be added"), PASSWORD,
    Arg("password-verify", "password", "Retype password"), Arg("email", "text", "Email address", required=False),
    Arg("given_name", "text", "Given name", required=False), Arg("surname", "text", "Family name", required=False)))
async def add_user(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """XEP-0133's one form; the email address and names, when given, go to the host's modules as
    'account/details' (jid, {'email', 'given_name', 'surname'}): the vCard module starts the account's vCard."""
    if args["password"] != args["password-verify"]:
        raise CommandError("the passwords do not match")
    if not await _set_credentials(ctx, args["accountjid"], args["password"], create_account):
        raise CommandError(f"{args['accountjid']} exists already")
    details = {name: args[name] for name in ("email", "given_name", "surname") if args[name]}
    if details:
        await ctx.host.hooks.fire("account/details", args["accountjid"], details)
    return {}


@command("delete-user", "Delete User", (ACCOUNTS,))
async def delete_user(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    users = [(jid, local_user(ctx, jid)) for jid in args["accountjids"]]
    for jid, user in users:
        if await ctx.host.server.storage.accounts.delete(ctx.host.name, user):
            await _close_sessions(ctx, jid, "not-authorized")
            await ctx.host.hooks.fire_all("account/deleted", user)  # modules drop what they keep elsewhere
    return {}


@command("change-user-password", "Change User Password", (ACCOUNT, PASSWORD))
async def change_user_password(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    if not await _set_credentials(ctx, args["accountjid"], args["password"], set_password):
        raise CommandError(f"{args['accountjid']} does not exist")
    return {}


@command("get-registered-users-num", "Get Number of Registered Users",
         result=(Arg("registeredusersnum", "int", "The number of registered users"),))
async def registered_users_num(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"registeredusersnum": await ctx.host.server.storage.accounts.count(ctx.host.name)}


MAX_ITEMS = Arg("max_items", "text", "Maximum number of items to show", required=False,
                options=("25", "50", "75", "100", "150", "200", "none"))


def _user_list(name: str, title: str, var: str, label: str, users: Callable[[Context], Awaitable[list[JID]]]) -> None:
    """Declare the list command `name`: XEP-0133 asks how many to show (max_items), then lists them in `var`."""
    async def listed(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        found, limit = await users(ctx), args["max_items"]
        if limit is None or limit == "none":
            return {var: found}
        if not limit.isdigit():
            raise CommandError(f"{MAX_ITEMS.label}: a number or 'none', not {limit!r}")
        return {var: found[:int(limit)]}

    command(name, title, (MAX_ITEMS,), (Arg(var, "jids", label),))(listed)


async def _registered(ctx: Context) -> list[JID]:
    users = await ctx.host.server.storage.accounts.list(ctx.host.name)
    return [JID.make(u, ctx.host.name) for u in sorted(users)]


_user_list("get-registered-users-list", "Get List of Registered Users", "registereduserjids", "The list of all users",
           _registered)


@command("get-online-users-num", "Get Number of Online Users",
         result=(Arg("onlineusersnum", "int", "The number of online users"),))
async def online_users_num(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"onlineusersnum": len(await ctx.host.server.sessions.users(ctx.host.name))}


@command("get-cluster-members", "Get the Members of the Cluster", access="server", offered=False,
         result=(Arg("members", "lines", "Live members (node/worker), with their sessions"),))
async def cluster_members(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """Every live process of the cluster and how many sessions it serves, as this one knows them; a single
    process is its own one member."""
    server = ctx.host.server
    cluster = server.cluster
    if cluster is None:
        return {"members": [f"{platform.node()} (single process): {len(server.sessions.all())} sessions"]}
    counts = cluster.sessions.members_of()
    lines = []
    for member in cluster.members():
        sessions = len(server.sessions.all()) if member == cluster.member else counts.get(member, 0)
        lines.append(f"{member}{' (this one)' if member == cluster.member else ''}: {sessions} sessions")
    if not cluster.connected:
        lines.append("Redis is out of reach: the list is as of the last heartbeat")
    return {"members": lines}


async def _online(ctx: Context) -> list[JID]:
    return sorted(await ctx.host.server.sessions.users(ctx.host.name), key=str)


_user_list("get-online-users-list", "Get List of Online Users", "onlineuserjids", "The list of all online users",
           _online)


@command("end-user-session", "End User Session", (ACCOUNTS,))
async def end_user_session(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """A full JID ends that session only, a bare JID every session of the account."""
    for jid in args["accountjids"]:
        local_user(ctx, jid.bare)
    for jid in args["accountjids"]:
        await _close_sessions(ctx, jid, "policy-violation")
    return {}


async def _set_disabled(ctx: Context, jids: list[JID], disabled: bool) -> None:
    users = [(jid, local_user(ctx, jid)) for jid in jids]
    accounts = ctx.host.server.storage.accounts
    missing = [str(jid) for jid, user in users if not await accounts.exists(ctx.host.name, user)]
    if missing:
        raise CommandError(f"no such account: {', '.join(missing)}")
    for jid, user in users:
        await accounts.set_disabled(ctx.host.name, user, disabled)
        if disabled:
            await _close_sessions(ctx, jid, "not-authorized")


@command("disable-user", "Disable User", (ACCOUNTS,))
async def disable_user(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await _set_disabled(ctx, args["accountjids"], True)
    return {}


@command("reenable-user", "Re-Enable User", (ACCOUNTS,))
async def reenable_user(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await _set_disabled(ctx, args["accountjids"], False)
    return {}


@command("announce", "Send Announcement to Online Users", (Arg("announcement", "lines", "Announcement"),))
async def announce(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await broadcast(ctx.host.server, ctx.host.name, message(ctx.host.name, "\n".join(args["announcement"])))
    return {}


@command("user-stats", "Get User Statistics", (ACCOUNT,), (
    Arg("rostersize", "int", "Roster size"), Arg("onlineresources", "lines", "Online resources"),
    Arg("ipaddresses", "lines", "IP addresses")))
async def user_stats(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    user = (await existing_account(ctx, args["accountjid"])).local or ""
    _, roster = await ctx.host.server.storage.roster.get(ctx.host.name, user)
    sessions = ctx.host.server.sessions.of(args["accountjid"])
    return {"rostersize": len(roster), "onlineresources": [s.jid.resource for s in sessions],
            "ipaddresses": sorted({s.remote_ip for s in sessions if s.remote_ip})}


def single_account(args: dict[str, Any]) -> JID:
    """The account of a command whose XEP-0133 form takes several (accountjids) but whose result describes one."""
    jids = args["accountjids"]
    if len(jids) != 1:
        raise CommandError("give one account: the result describes a single account")
    return cast(JID, jids[0])


@command("get-user-lastlogin", "Get User Last Login Time", (ACCOUNTS,), (
    ACCOUNTS, Arg("lastlogin", "text", "The last login time (XEP-0082); while offline, when the user last logged out")))
async def user_lastlogin(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """Logins are not stored, logouts are: an online user's oldest session start, else the last logout."""
    jid = single_account(args)
    account = await ctx.host.server.storage.accounts.get(ctx.host.name, local_user(ctx, jid))
    if account is None:
        raise CommandError(f"{jid} does not exist")
    sessions = ctx.host.server.sessions.of(jid)
    if sessions:
        when: datetime | None = datetime.fromtimestamp(min(s.started for s in sessions), UTC)
    else:
        when = account.last_logout
    return {"accountjids": [jid], "lastlogin": when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else "never"}


def _user_lists(kind: str, title: str, users: Callable[[Context], Awaitable[list[JID]]], list_node: str,
                list_var: str) -> None:
    """Declare get-KIND-users-num and the list command over the one function that finds those users. The
    list's node and field are XEP-0133's: get-disabled-users-list, but get-active-users and get-idle-users,
    and the idle list comes in activeuserjids, as in the XEP's example (its registry has no idleuserjids)."""
    async def count(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        return {f"{kind}usersnum": len(await users(ctx))}

    command(f"get-{kind}-users-num", f"Get Number of {title} Users",
            result=(Arg(f"{kind}usersnum", "int", f"The number of {kind} users"),))(count)
    _user_list(list_node, f"Get List of {title} Users", list_var, f"The list of {kind} users", users)


async def _disabled(ctx: Context) -> list[JID]:
    users = await ctx.host.server.storage.accounts.list(ctx.host.name, disabled_only=True)
    return [JID.make(u, ctx.host.name) for u in users]


def _active(session: Session, now: float) -> bool:
    return session.hold is None and now - session.last_active < IDLE_AFTER


async def _online_by_activity(ctx: Context, active: bool) -> list[JID]:
    """XEP-0133 splits online users into active and idle. A session is active when its client sent a stanza
    in the last IDLE_AFTER seconds and has not said it is inactive (XEP-0352: a phone in a pocket); a user is
    active when one of their sessions is, idle when online and none is."""
    sessions, now = ctx.host.server.sessions, time.monotonic()
    users = await sessions.users(ctx.host.name)
    for user in users:
        await sessions.ensure(user)
    return sorted((u for u in users if any(_active(s, now) for s in sessions.of(u)) == active), key=str)


async def _active_users(ctx: Context) -> list[JID]:
    return await _online_by_activity(ctx, True)


async def _idle_users(ctx: Context) -> list[JID]:
    return await _online_by_activity(ctx, False)


_user_lists("disabled", "Disabled", _disabled, "get-disabled-users-list", "disableduserjids")
_user_lists("active", "Active", _active_users, "get-active-users", "activeuserjids")
_user_lists("idle", "Idle", _idle_users, "get-idle-users", "activeuserjids")


# --- lists: admins of the host, and the federation lists of the server ----------------------------------

ADMINS = Arg("adminjids", "jids", "The admin list", required=False)


async def _current_admins(ctx: Context) -> dict[str, Any]:
    return {"adminjids": sorted(ctx.host.admins, key=str)}


@command("edit-admin", "Edit Admin List", (ADMINS,), defaults=_current_admins)
async def edit_admin(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """The list replaces the admins added here; those of the configuration file can only be removed there.
    Like those, an admin is an account of the host."""
    admins = {JID.make(local_user(ctx, jid), ctx.host.name) for jid in args["adminjids"]}
    kept = sorted(str(a) for a in ctx.host.configured_admins - admins)
    if kept:
        raise CommandError(f"{', '.join(kept)}: admin in the configuration file, which must change instead")
    await ctx.host.set_admins(admins)
    return {}


# --- the whole server: its configuration, restart and shut down ----------------------------------------

@command("reload-configuration", "Reload the configuration file: each host's admins, registration and module "
         "options, limits, federation policy and lists, log level and certificates; the log file is reopened "
         "(hosts, listeners and storage need a restart)", access="server", offered=False)
async def reload_configuration(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """What SIGHUP and ejabberd's reload_config do; the file is read as at start (TOML, or an ejabberd.yml).
    A file with an error, or a certificate that does not load, changes nothing."""
    server = ctx.host.server
    if server.config.source is None:
        raise CommandError("the server runs on the built-in configuration: there is no file to reload")
    try:
        config = server.read_config(server.config.source)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    _keep_generated_certificates(server, config)
    try:
        handler = logs.destination(config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    try:
        _reload_certificates(server, config)
    except CommandError:
        if handler is not None:
            handler.close()
        raise
    logs.apply(config, handler)
    for name, host in server.hosts.items():
        new = config.hosts.get(name)
        if new is not None:
            added = host.admins - host.configured_admins  # by XEP-0133 edit-admin: they stay
            host.configured_admins = frozenset(JID.parse(a) for a in new.admins)
            host.admins = {*host.configured_admins, *added}
            host.config, host.config_options = new, dict(new.options)
            server.config.hosts[name] = new
    _reload_limits(server, config)
    _update(server.config.s2s, config.s2s)
    _update(server.config.logging, config.logging)
    _update(server.config.tenants, config.tenants)  # for tenants created or served from now on
    await server.hooks.fire_all("server/reloaded", server)
    configured = {name for name, host in server.hosts.items() if not host.tenant}
    if set(config.hosts) != configured or config.listeners != server.config.listeners \
            or config.storage != server.config.storage:
        log.warning("reload_config: hosts, listeners and storage changed in %s take effect at the next restart",
                    server.config.source)
    log.info("%s reloaded %s", ctx.actor, server.config.source)
    return {}


def _update(current: object, new: object) -> None:
    """A section of the configuration takes the reloaded values in place, so that every part holding it (the
    federation manager, its policy and limits) reads them from now on."""
    vars(current).update(vars(new))


def _keep_generated_certificates(server: Server, config: Config) -> None:
    """A host without certificate files of its own keeps the pair generated at start: a data folder named
    differently (which takes a restart) has none yet."""
    for name, hc in config.hosts.items():
        current = server.config.hosts.get(name)
        if current is not None and not hc.certificate.exists() and not hc.key.exists():
            config.hosts[name] = replace(hc, certificate=current.certificate, key=current.key)


def _reload_certificates(server: Server, config: Config) -> None:
    """The hosts' certificates read again for connections from now on; one that does not load stops the reload."""
    if server.tls is None:
        return
    # Hosts removed from the file go at the restart; tenants keep their own certificates.
    hosts = {name: config.hosts.get(name, host.config) for name, host in server.hosts.items()}
    certs = {name: (hc.certificate, hc.key) for name, hc in hosts.items()}
    try:
        server.tls.reload(certs)
    except TlsError as exc:
        raise CommandError(f"certificates not reloaded: {exc}") from None


def _reload_limits(server: Server, config: Config) -> None:
    """[limits] for connections from now on; open ones keep the rates and sizes they started with."""
    _update(server.config.limits, config.limits)
    limits = server.config.limits
    server.auth_throttle.max_failures, server.auth_throttle.lockout = limits.auth_max_failures, limits.auth_lockout
    server.ip_counter.max_per_ip = limits.max_connections_per_ip
    server.output.total = limits.max_output_total
    if limits.max_connections:  # 0 keeps what the descriptor limit allowed at start
        server.max_connections = limits.max_connections


@command("reopen-log", "Reopen the log file (after logrotate moved it)", access="server", offered=False)
async def reopen_log(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    for path in logs.reopen():
        log.info("%s reopened the log file %s", ctx.actor, path)
    return {}


DELAY = Arg("delay", "int", "Time delay in seconds (none: at once)", required=False,
            options=("0", "30", "60", "90", "120", "180", "240", "300"))
ANNOUNCEMENT = Arg("announcement", "lines", "Announcement", required=False)


async def _plan(ctx: Context, args: dict[str, Any], restart: bool) -> None:
    """Tell every online user of every host what is coming, then leave the act to the server after the delay."""
    delay = args["delay"] or 0
    if not 0 <= delay <= MAX_DELAY:
        raise CommandError(f"the delay must be between 0 and {MAX_DELAY} seconds")
    server = ctx.host.server
    if args["announcement"]:
        for host in server.hosts:
            await broadcast(server, host, message(host, "\n".join(args["announcement"])))
    server.plan(restart, delay)


@command("restart", "Restart Service", (DELAY, ANNOUNCEMENT), access="server")
async def restart(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """In-process: the server stops (clients get 'system-shutdown') and starts again on the same configuration."""
    await _plan(ctx, args, restart=True)
    return {}


@command("shutdown", "Shut Down Service", (DELAY, ANNOUNCEMENT), access="server")
async def shutdown(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """The server stops, and `parley serve` exits."""
    await _plan(ctx, args, restart=False)
    return {}


# --- FAST tokens (XEP-0484) ------------------------------------------------------------------------------

DEVICE = Arg("device", "text", "The device's user-agent id (all devices if empty)", required=False)
REVOKED = (Arg("revoked", "int", "Tokens revoked"),)


@command("revoke-fast-tokens", "Revoke FAST Login Tokens", (ACCOUNT, DEVICE), REVOKED, namespace=ns.FAST)
async def revoke_fast_tokens(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """A lost phone or a leaked token: the device must log in with the password again."""
    jid = await existing_account(ctx, args["accountjid"])
    return {"revoked": await ctx.host.server.storage.fast.revoke(ctx.host.name, jid.local, args["device"])}


@command("revoke_fast_tokens", "Revoke every FAST login token of an account", (
    Arg("user", "text", "Username"), Arg("host", "text", "Server name")), REVOKED, returns="integer")
async def revoke_fast_tokens_of(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """revoke-fast-tokens for parleyctl and the HTTP API, in ejabberd's shape (user, host)."""
    host = ctx.target(args["host"])
    return {"revoked": await host.server.storage.fast.revoke(host.name, args["user"])}


@command("revoke-my-fast-tokens", "Revoke My FAST Login Tokens", (DEVICE,), REVOKED, access="user",
         namespace=ns.FAST)
async def revoke_my_fast_tokens(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """The same for one's own account, from any of one's clients."""
    return {"revoked": await ctx.host.server.storage.fast.revoke(ctx.host.name, ctx.actor.local, args["device"])}
