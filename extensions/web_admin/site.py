"""The web admin's pages, under the module's path (`/admin/` by default), for every host at once.

Who may see what is the command table's rule: a host's admins act on that host, the admins of every host
(server admins) on the server too (federation, tenants, the dashboard's charts of the whole process).
A page of a host the logged-in admin does not administer is 403, whether the host exists or not, and
no list shows another host's accounts, rooms or invitations.

Every change is a declared command (`server.commands`) run with a `Context` of the logged-in admin, as
ad-hoc commands and the HTTP API run it: the same checks, the same errors. A generic page renders any
command as a form and shows its result; the other pages put the commands that fit next to what they
list (a user's sessions with a button that ends one) and post to that generic page, which sends the
browser back to where it came from.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from aiohttp import web

from extensions.abuse_limits import DENIED
from extensions.web_admin.charts import line_chart
from extensions.web_admin.sampler import DAY, HOUR, SERIES, Sampler, latest
from s2s.manager import S2SManager
from server.commands import XML, Command, CommandError, Context
from server.host import server_admin
from server.jid import JID, JIDError
from server.stream.writer import serialize
from server.web_login import WebLogin
from server.web_pages import esc, field, form, hidden, message, page, redirect, table

if TYPE_CHECKING:
    from multidict import MultiDictProxy

    from server.host import Host
    from server.server import Server

SITE = "Parley admin"
MAX_LISTED = 200  # accounts a search shows at once
# The tenants helper's commands, offered on the Tenants page when the module that declares them is loaded.
TENANT_COMMANDS = ("list-tenants", "create-tenant", "disable-tenant", "enable-tenant", "remove-tenant",
                   "cancel-tenant-removal", "set-tenant-quotas", "set-tenant-admins")
# The dashboard's charts: the last minutes (what is happening now), the hour and the day.
SPANS = (("10min", "The last 10 minutes", 600.0), ("hour", "The last hour", HOUR), ("day", "The last day", DAY))
SECTIONS = (("", "Overview", None), ("users", "Users", None), ("rooms", "Rooms", "muc"),
            ("invites", "Invitations", "invites"), ("spam", "Spam and blocking", None),
            ("config", "Configuration", None), ("commands", "Commands", None))


def _when(moment: float | datetime | None) -> str:
    if moment is None:
        return "-"
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


class AdminSite:
    """The pages of one web admin path, shared by the module's instances on every host."""

    def __init__(self, server: Server, prefix: str, interval: float) -> None:
        self.server = server
        self.prefix = prefix
        self.login = WebLogin(server, prefix, self.is_admin, site=SITE)
        self.sampler = Sampler(server, interval)
        self.holders = 0

    def routes(self) -> list[tuple[str, str, Any]]:
        return [*self.login.paths(), ("GET", self.prefix, self.get), ("POST", self.prefix, self.post)]

    # --- who may do what --------------------------------------------------------------------------------

    def is_admin(self, jid: JID) -> bool:
        """An admin of some host: who may log in here."""
        return any(host.is_admin(jid) for host in self.server.hosts.values())

    def is_server_admin(self, jid: JID) -> bool:
        """An admin of every configured host: the command table's 'server' access."""
        return server_admin(self.server, jid)

    def hosts_of(self, actor: JID) -> list[Host]:
        return sorted((h for h in self.server.hosts.values() if h.is_admin(actor)), key=lambda h: h.name)

    def _host(self, request: web.Request, name: str, actor: JID) -> Host:
        """The host of a page's path, which the actor administers: 403 otherwise, an unknown host alike."""
        host = self.server.hosts.get(name.lower())
        if host is None or not host.is_admin(actor):
            raise self.login.forbidden("You do not administer this host.", request)
        return host

    def url(self, *parts: str, **query: str) -> str:
        path = self.prefix + "/".join(quote(p, safe="@") for p in parts)
        return f"{path}?{urlencode(query)}" if query else path

    # --- dispatch ---------------------------------------------------------------------------------------

    async def get(self, request: web.Request) -> web.StreamResponse:
        actor = await self.login.require(request)
        parts = request.path[len(self.prefix):].split("/")
        if parts == [""]:
            return await self.dashboard(request, actor)
        if parts == ["tenants"]:
            return await self.tenants(request, actor)
        if parts == ["federation"]:
            if not self.is_server_admin(actor):
                raise self.login.forbidden("Only the server's admins see this page.", request)
            return await self.federation(request, actor)
        if parts[0] == "hosts" and len(parts) >= 2:
            host = self._host(request, parts[1], actor)
            section, item = (parts[2] if len(parts) > 2 else ""), "/".join(parts[3:])
            pages = {"": self.overview, "users": self.users, "rooms": self.rooms, "invites": self.invites,
                     "spam": self.spam, "config": self.config, "commands": self.commands}
            if section in pages:
                return await pages[section](request, actor, host, item)
        raise web.HTTPNotFound()

    async def post(self, request: web.Request) -> web.StreamResponse:
        submitted = await request.post()
        actor = await self.login.check_csrf(request, submitted)
        parts = request.path[len(self.prefix):].split("/")
        if len(parts) == 4 and parts[0] == "hosts" and parts[2] == "commands":
            return await self.run(request, actor, self._host(request, parts[1], actor), parts[3], submitted)
        raise web.HTTPNotFound()

    # --- the layout -------------------------------------------------------------------------------------

    def _page(self, request: web.Request, actor: JID, title: str, body: str, host: Host | None = None,
              status: int = 200) -> web.Response:
        nav = [(self.prefix, "Dashboard")]
        nav += [(self.url("hosts", h.name, ""), h.name) for h in self.hosts_of(actor)]
        if self.is_server_admin(actor):
            nav.append((self.url("federation"), "Federation"))
        nav.append((self.url("tenants"), "Tenants"))
        done = request.query.get("done", "")
        command = self.server.commands.get(done) if done else None
        if command is not None:
            body = message(f"Done: {command.title}.") + body
        if host is not None:
            links = "".join(f"<li><a href='{esc(self.url('hosts', host.name, section))}'>{esc(text)}</a></li>"
                            for section, text, module in SECTIONS if module is None or module in host.modules)
            body = f"<nav aria-label='{esc(host.name)}'><ul>{links}</ul></nav>{body}"
        return page(title, body, status=status, nav=nav, header=self.login.logout_form(request, actor), site=SITE)

    # --- commands ---------------------------------------------------------------------------------------

    def _command(self, name: str, host: Host, actor: JID) -> Command | None:
        """The command `name` if it is loaded and the actor may run it on `host`."""
        command = self.server.commands.get(name)
        return command if command is not None and command.allowed(host, actor) else None

    def action(self, request: web.Request, host: Host, actor: JID, name: str, args: dict[str, str | list[str]],
               label: str, back: str, danger: bool = False) -> str:
        """A button that runs `name` with `args` and comes back to `back`; nothing when the actor may not."""
        if self._command(name, host, actor) is None:
            return ""
        fields = [hidden("back", back)]
        for key, value in args.items():
            fields += [hidden(key, v) for v in ([value] if isinstance(value, str) else value)]
        return form(self.url("hosts", host.name, "commands", name), fields, label, self.login.csrf_field(request),
                    danger=danger, inline=True)

    def command_form(self, request: web.Request, host: Host, actor: JID, name: str,
                     values: dict[str, list[str]] | None = None, back: str = "", fixed: Iterable[str] = (),
                     submit: str = "", key: str = "") -> str:
        """The form of command `name`, its fields filled from `values`; arguments in `fixed` are hidden; `key`
        tells apart the fields of several forms of one command on a page."""
        command = self._command(name, host, actor)
        if command is None:
            return ""
        values = values or {}
        fields = [hidden("back", back)] if back else []
        for arg in command.args:
            given = values.get(arg.name, [])
            if arg.name in fixed:
                fields += [hidden(arg.name, v) for v in given]
                continue
            ident = f"{name}-{arg.name}{'-' + key if key else ''}"
            if arg.type in ("jids", "lines"):
                fields.append(field(arg.name, arg.label, kind="textarea", value="\n".join(given),
                                    required=arg.required, hint="one per line", ident=ident))
                continue
            kind = {"password": "password", "int": "number"}.get(arg.type, "text")
            options = ("", *arg.options) if arg.options and not arg.required else arg.options
            fields.append(field(arg.name, arg.label, kind="select" if options else kind,
                                value=given[0] if given else "", required=arg.required, options=options,
                                autocomplete="new-password" if arg.type == "password" else "", ident=ident))
        return form(self.url("hosts", host.name, "commands", name), fields, submit or command.title,
                    self.login.csrf_field(request))

    @staticmethod
    def _submitted(command: Command, submitted: MultiDictProxy[Any]) -> dict[str, list[str]]:
        values: dict[str, list[str]] = {}
        for arg in command.args:
            raw = [str(v) for v in submitted.getall(arg.name, [])]
            values[arg.name] = [line for v in raw for line in v.splitlines()] if arg.type in ("jids", "lines") \
                else raw[:1]
        return values

    async def run(self, request: web.Request, actor: JID, host: Host, name: str,
                  submitted: MultiDictProxy[Any]) -> web.StreamResponse:
        """Run a command posted from any page, as the logged-in admin on `host`."""
        command = self.server.commands.get(name)
        if command is None:
            raise web.HTTPNotFound()
        if not command.allowed(host, actor):
            raise self.login.forbidden("You may not run this command.", request)
        values = self._submitted(command, submitted)
        try:
            result = await command.run(Context(host, actor), command.parse_form(values))
        except CommandError as exc:
            kept = {k: v for k, v in values.items() if next(a for a in command.args if a.name == k).type != "password"}
            return await self.command_page(request, actor, host, command, kept, str(exc), status=400)
        back = str(submitted.get("back", ""))
        if back.startswith(self.prefix) and "//" not in back and not command.result:
            return redirect(f"{back}{'&' if '?' in back else '?'}done={quote(name)}")
        return await self.command_page(request, actor, host, command, values, result=result)

    def result_html(self, command: Command, result: dict[str, Any]) -> str:
        """A command's result fields: records as a table, lists as lists, an XML payload as its text."""
        parts = []
        for arg in command.result:
            value = result.get(arg.name)
            if arg.type == "records":
                rows = [[esc(record.get(f, "")) for f in arg.fields] for record in value or []]
                parts.append(f"<h3>{esc(arg.label)}</h3>" + (table(arg.fields, rows) if rows else "<p>None.</p>"))
            elif arg.type == XML:
                text = serialize(value) if value is not None else ""
                parts.append(f"<h3>{esc(arg.label)}</h3><pre>{esc(text)}</pre>")
            elif isinstance(value, list | tuple | set):
                items = "".join(f"<li>{esc(v)}</li>" for v in value)
                parts.append(f"<h3>{esc(arg.label)}</h3>" + (f"<ul>{items}</ul>" if items else "<p>None.</p>"))
            else:
                shown = arg.format(value)[0] if value is not None else "-"
                parts.append(f"<p><strong>{esc(arg.label)}:</strong> <output>{esc(shown)}</output></p>")
        return "".join(parts) or "<p>Done.</p>"

    async def command_page(self, request: web.Request, actor: JID, host: Host, command: Command,
                           values: dict[str, list[str]] | None = None, error: str = "",
                           result: dict[str, Any] | None = None, status: int = 200) -> web.Response:
        values = dict(values or {})
        if not values and command.defaults is not None:
            defaults = await command.defaults(Context(host, actor))
            values = {a.name: a.format(defaults.get(a.name)) for a in command.args}
        for arg in command.args:
            if arg.name in request.query:
                values[arg.name] = request.query.getall(arg.name)
            if arg.name == "host" and not values.get("host"):
                values["host"] = [host.name]
        body = [message(error, error=True) if error else ""]
        if result is not None:
            body.append(f"<section aria-labelledby='result'><h2 id='result'>Result</h2>"
                        f"{message('Done.')}{self.result_html(command, result)}</section>")
        body.append(f"<h2>Run</h2><p class='hint'>{esc(command.name)} on {esc(host.name)}</p>")
        body.append(self.command_form(request, host, actor, command.name, values))
        return self._page(request, actor, command.title, "".join(body), host, status)

    async def commands(self, request: web.Request, actor: JID, host: Host, item: str) -> web.Response:
        if item:
            command = self._command(item, host, actor)
            if command is None:
                raise self.login.forbidden("You may not run this command, or it is not loaded.", request)
            return await self.command_page(request, actor, host, command)
        rows = [[f"<a href='{esc(self.url('hosts', host.name, 'commands', c.name))}'>{esc(c.title)}</a>",
                 f"<code>{esc(c.name)}</code>", esc(c.access)]
                for c in sorted(self.server.commands, key=lambda c: c.title)
                if (c.adhoc or c.name in TENANT_COMMANDS) and c.allowed(host, actor)]
        return self._page(request, actor, f"Commands of {host.name}",
                          table(("Command", "Name", "Who may run it"), rows), host)

    async def _run_quietly(self, name: str, host: Host, actor: JID, args: dict[str, Any]) -> dict[str, Any] | None:
        """A listing command's result, None when it is not loaded or not allowed."""
        command = self._command(name, host, actor)
        if command is None:
            return None
        return await command.run(Context(host, actor), command.parse({a.name: args.get(a.name) for a in command.args}))

    # --- the dashboard ----------------------------------------------------------------------------------

    async def dashboard(self, request: web.Request, actor: JID) -> web.Response:
        rows = []
        for host in self.hosts_of(actor):
            registered = await self.server.storage.accounts.count(host.name)
            online = len(await self.server.sessions.users(host.name))
            rows.append([f"<a href='{esc(self.url('hosts', host.name, ''))}'>{esc(host.name)}</a>",
                         esc(registered), esc(online)])
        body = ["<h2>Hosts</h2>", table(("Host", "Registered accounts", "Online accounts"), rows)]
        if self.is_server_admin(actor):
            now = time.time()
            body.append("<h2>This server process</h2>")
            current = [[esc(s.title), esc(f"{v:.2f}" if v is not None else "-"), esc(s.unit)]
                       for s, v in latest(self.sampler)]
            body.append(table(("Series", "Last value", "Unit"), current, caption="Latest sample"))
            for span_name, heading, span in SPANS:
                charts = "".join(
                    f"<figure><figcaption>{esc(s.title)} ({esc(s.unit)})</figcaption>"
                    + line_chart(f"{s.key}-{span_name}", s.title, s.unit, self.sampler.points(s.key, span_name),
                                 span, now)
                    + "</figure>" for s in SERIES)
                body.append(f"<h2>{heading}</h2><div class='charts'>{charts}</div>")
        return self._page(request, actor, "Dashboard", "".join(body))

    async def overview(self, request: web.Request, actor: JID, host: Host, item: str) -> web.Response:
        accounts = self.server.storage.accounts
        facts = [("Registered accounts", await accounts.count(host.name)),
                 ("Disabled accounts", len(await accounts.list(host.name, disabled_only=True))),
                 ("Online accounts", len(await self.server.sessions.users(host.name))),
                 ("Admins", ", ".join(sorted(str(a) for a in host.admins)) or "-"),
                 ("Modules", ", ".join(sorted(host.modules)))]
        rows = [[f"<th scope='row'>{esc(k)}</th>", esc(v)] for k, v in facts]
        html = "<table><tbody>" + "".join(f"<tr>{a}<td>{b}</td></tr>" for a, b in rows) + "</tbody></table>"
        now = time.time()
        charts = "".join(
            f"<figure><figcaption>{esc(heading)}</figcaption>"
            + line_chart(f"host-sessions-{span_name}", f"Client sessions of {host.name}", "sessions",
                         self.sampler.points("sessions", span_name, host.name), span, now)
            + "</figure>" for span_name, heading, span in SPANS)
        html += f"<h2>Sessions on this server process</h2><div class='charts'>{charts}</div>"
        return self._page(request, actor, host.name, html, host)

    # --- users ------------------------------------------------------------------------------------------

    async def users(self, request: web.Request, actor: JID, host: Host, item: str) -> web.Response:
        if item:
            return await self.user(request, actor, host, item)
        here = self.url("hosts", host.name, "users")
        query = request.query.get("q", "").strip().lower()
        accounts = self.server.storage.accounts
        names = [u for u in await accounts.list(host.name) if query in u]
        disabled = set(await accounts.list(host.name, disabled_only=True))
        online = {j.local for j in await self.server.sessions.users(host.name)}
        rows = [[f"<a href='{esc(self.url('hosts', host.name, 'users', u))}'>{esc(u)}@{esc(host.name)}</a>",
                 "disabled" if u in disabled else "active", "online" if u in online else "offline"]
                for u in names[:MAX_LISTED]]
        search = (f"<form method='get' action='{esc(here)}' role='search'>"
                  f"{field('q', 'Search accounts', value=query)}<button type='submit'>Search</button></form>")
        more = f"<p>{len(names) - MAX_LISTED} more: narrow the search.</p>" if len(names) > MAX_LISTED else ""
        listing = table(("Account", "Status", "Presence"), rows) if rows else "<p>No account matches.</p>"
        create = self.command_form(request, host, actor, "add-user", {"accountjid": [f"@{host.name}"]}, here,
                                   submit="Create user")
        body = f"{search}<h2>Accounts</h2>{listing}{more}<h2>Create a user</h2>{create}"
        return self._page(request, actor, f"Users of {host.name}", body, host)

    async def user(self, request: web.Request, actor: JID, host: Host, username: str) -> web.Response:
        account = await self.server.storage.accounts.get(host.name, username)
        if account is None:
            raise web.HTTPNotFound()
        jid = JID.make(username, host.name)
        here = self.url("hosts", host.name, "users", username)
        await self.server.sessions.ensure(jid)
        sessions = sorted(self.server.sessions.of(jid), key=lambda s: s.started)
        rows = [[esc(s.jid.resource), esc(s.remote_ip or "-"), esc(_when(s.started)),
                 self.action(request, host, actor, "end-user-session", {"accountjids": str(s.jid)},
                             f"Kick {s.jid.resource}", here)] for s in sessions]
        state = "disabled" if account.disabled else "active"
        toggle = self.action(request, host, actor, "reenable-user" if account.disabled else "disable-user",
                             {"accountjids": str(jid)}, "Re-enable" if account.disabled else "Disable", here,
                             danger=not account.disabled)
        kick = self.action(request, host, actor, "end-user-session", {"accountjids": str(jid)}, "Kick all sessions",
                           here)
        body = [f"<p>Status: <strong>{state}</strong>. Last logout: {esc(_when(account.last_logout))}.</p>",
                f"<p>{toggle} {kick}</p>",
                "<h2>Sessions</h2>",
                table(("Resource", "Address", "Since", "Action"), rows) if rows else "<p>Not online.</p>",
                "<h2>Reset the password</h2>",
                self.command_form(request, host, actor, "change-user-password", {"accountjid": [str(jid)]}, here,
                                  fixed=("accountjid",), submit="Set password"),
                "<h2>Delete the account</h2>",
                self.action(request, host, actor, "delete-user", {"accountjids": str(jid)}, f"Delete {jid}",
                            self.url("hosts", host.name, "users"), danger=True)]
        return self._page(request, actor, str(jid), "".join(body), host)

    # --- rooms ------------------------------------------------------------------------------------------

    def _muc(self, host: Host) -> Any:
        muc = host.modules.get("muc")
        if muc is None:
            raise web.HTTPNotFound()
        return muc

    async def rooms(self, request: web.Request, actor: JID, host: Host, item: str) -> web.Response:
        muc = self._muc(host)
        if item:
            return await self.room(request, actor, host, muc, item)
        found = await self._run_quietly("muc-rooms", host, actor, {"service": muc.domain}) or {"rooms": []}
        rows = []
        for jid in found["rooms"]:
            room = muc.rooms.get(jid)
            rows.append([f"<a href='{esc(self.url('hosts', host.name, 'rooms', str(jid)))}'>{esc(jid)}</a>",
                         esc(room.config.name if room else ""), esc(len(room.occupants) if room else "-")])
        listing = table(("Room", "Name", "Occupants"), rows) if rows else "<p>No rooms.</p>"
        create = self.command_form(request, host, actor, "muc-create-room", {"room": [f"@{muc.domain}"]},
                                   self.url("hosts", host.name, "rooms"), submit="Create room")
        return self._page(request, actor, f"Rooms of {muc.domain}",
                          f"{listing}<h2>Create a persistent room</h2>{create}", host)

    async def room(self, request: web.Request, actor: JID, host: Host, muc: Any, item: str) -> web.Response:
        try:
            jid = JID.parse(item)
        except JIDError:
            raise web.HTTPNotFound() from None
        if jid.domain != muc.domain:
            raise web.HTTPNotFound()
        try:
            occupants = await self._run_quietly("muc-room-occupants", host, actor, {"room": str(jid)})
        except CommandError:
            raise web.HTTPNotFound() from None
        here = self.url("hosts", host.name, "rooms", str(jid))
        rows = [[esc(o["nick"]), esc(o["jid"]), esc(o["role"])] for o in (occupants or {}).get("occupants", [])]
        body = ["<h2>Occupants</h2>", table(("Nickname", "Address", "Role"), rows) if rows else "<p>Nobody.</p>"]
        room = muc.rooms.get(jid)
        if room is not None:
            config = [[f"<code>{esc(f.name)}</code>", esc(getattr(room.config, f.name))]
                      for f in dataclasses.fields(room.config)]
            body += ["<h2>Configuration</h2>", table(("Option", "Value"), config),
                     "<h2>Affiliations</h2>",
                     table(("Address", "Affiliation"), [[esc(j), esc(a.affiliation)] for j, a in
                                                        sorted(room.affiliations.items(), key=lambda i: str(i[0]))])]
        body += ["<h2>Change an affiliation</h2>",
                 self.command_form(request, host, actor, "muc-set-affiliation", {"room": [str(jid)]}, here,
                                   fixed=("room",), submit="Set affiliation"),
                 "<h2>Destroy</h2>",
                 self.action(request, host, actor, "muc-destroy-room", {"room": str(jid)}, f"Destroy {jid}",
                             self.url("hosts", host.name, "rooms"), danger=True)]
        return self._page(request, actor, str(jid), "".join(body), host)

    # --- invitations, spam, configuration ---------------------------------------------------------------

    async def invites(self, request: web.Request, actor: JID, host: Host, item: str) -> web.Response:
        here = self.url("hosts", host.name, "invites")
        found = await self._run_quietly("list_invites", host, actor, {"host": host.name}) or {"invites": []}
        rows = [[esc(i["kind"]), esc(i["inviter"]), esc(i["uses_left"]), esc(i["expires"]),
                 f"<a href='{esc(i['url'])}'>page</a>",
                 self.action(request, host, actor, "delete_invite", {"host": host.name, "token": i["token"]},
                             "Revoke", here, danger=True)] for i in found["invites"]]
        listing = table(("Kind", "Inviter", "Uses left", "Expires", "Link", "Action"), rows) if rows \
            else "<p>No invitation may be used.</p>"
        create = self.command_form(request, host, actor, "generate_invite", {"host": [host.name], "uses": ["1"],
                                                                              "days": ["7"]}, fixed=("host",),
                                   submit="Create invitation")
        return self._page(request, actor, f"Invitations of {host.name}",
                          f"{listing}<h2>Create an account invitation</h2>{create}", host)

    async def spam(self, request: web.Request, actor: JID, host: Host, item: str) -> web.Response:
        here = self.url("hosts", host.name, "spam")
        body = ["<h2>Reports</h2>"]
        found = await self._run_quietly("spam-reports", host, actor, {})
        if found is None:
            body.append("<p>The spam_reporting module is not loaded on this host.</p>")
        else:
            rows = [[esc(r["id"]), esc(r["created"]), esc(r["reporter"]), esc(r["jid"]), esc(r["reason"]),
                     esc(r["text"]),
                     self.command_form(request, host, actor, "act-on-spam-report", {"report": [str(r["id"])]}, here,
                                       fixed=("report",), submit="Act", key=str(r["id"]))] for r in found["reports"]]
            body.append(table(("Number", "Received", "Reporter", "Reported", "Reason", "Text", "Action"), rows)
                        if rows else "<p>No open report.</p>")
        abuse = host.modules.get("abuse_limits")
        body.append("<h2>Denied addresses</h2>")
        if abuse is None:
            body.append("<p>The abuse_limits module is not loaded on this host.</p>")
        else:
            added = await self.server.storage.kv.get(host.name, "", DENIED) or []
            rows = [[esc(j), "deny-list file or URL"] for j in sorted(map(str, abuse.denied))]
            rows += [[esc(j), "an admin (spam report)"] for j in added]
            body.append(table(("Address", "Denied by"), rows) if rows else "<p>None.</p>")
        return self._page(request, actor, f"Spam and blocking on {host.name}", "".join(body), host)

    async def config(self, request: web.Request, actor: JID, host: Host, item: str) -> web.Response:
        # What the configuration file says for the host: its own table, or for a tenant its template's.
        configured = self.server.config.hosts.get(self.server.config.tenants.template or "" if host.tenant
                                                  else host.name)
        file_options = configured.options if configured is not None else {}
        body = []
        for name, module in sorted(host.modules.items()):
            rows = []
            for option in module.options:
                key = f"{name}.{option.name}"
                if key not in host.config_options:
                    value, source = option.default, "default"
                else:
                    value = host.config_options[key]
                    source = "configuration file" if key in file_options and file_options[key] == value \
                        else "tenant settings"
                rows.append([f"<code>{esc(option.name)}</code>", esc(_show(value)), esc(source), esc(option.doc)])
            body.append(f"<h2>{esc(name)}</h2>" +
                        (table(("Option", "Value", "From", "Meaning"), rows) if rows else "<p>No options.</p>"))
        return self._page(request, actor, f"Configuration of {host.name}", "".join(body), host)

    # --- server-wide pages ------------------------------------------------------------------------------

    def _first_host(self, actor: JID) -> Host:
        return self.hosts_of(actor)[0]

    async def federation(self, request: web.Request, actor: JID) -> web.Response:
        host = self._first_host(actor)
        body = ["<h2>Links</h2>", self._links()]
        for name in ("edit-blacklist", "edit-whitelist"):
            command = self._command(name, host, actor)
            if command is None:
                continue
            current = await command.defaults(Context(host, actor)) if command.defaults else {}
            listed = [v for arg in command.args for v in arg.format(current.get(arg.name))]
            items = "".join(f"<li>{esc(v)}</li>" for v in listed) or "<li>(empty)</li>"
            body.append(f"<h2>{esc(command.title)}</h2><ul>{items}</ul>"
                        f"<p><a href='{esc(self.url('hosts', host.name, 'commands', name))}'>Edit</a></p>")
        s2s = self.server.config.s2s
        body.append("<h2>Configured policy</h2>" + table(("Setting", "Value"), [
            [esc(f.name), esc(_show(getattr(s2s, f.name)))] for f in dataclasses.fields(s2s)]))
        return self._page(request, actor, "Federation", "".join(body))

    def _links(self) -> str:
        """The server-to-server streams of this process, each with its domains and state."""
        manager = self.server.s2s
        if not isinstance(manager, S2SManager):
            return "<p>Federation is not running (no s2s listener).</p>"
        rows = []
        for link in sorted(set(manager.links.values()), key=lambda link: (link.remote, link.local)):
            state = ", ".join(f"{local}: {method}" for (local, _), method in sorted(link.methods.items()))
            queued = sum(len(queue) for queue in link.queues.values())
            rows.append(["outgoing", esc(link.local), esc(link.remote), esc(link.remote_ip or "-"),
                         esc(state or "connecting"), esc(queued)])
        for stream in sorted(manager.incoming, key=lambda stream: str(stream.remote)):
            pairs = sorted(stream.pairs)
            rows.append(["incoming", esc(", ".join(local for _, local in pairs) or stream.local or "-"),
                         esc(", ".join(remote for remote, _ in pairs) or stream.remote or "-"),
                         esc(stream.remote_ip or "-"), "authenticated" if pairs else "authenticating", "-"])
        return table(("Direction", "Local domain", "Remote domain", "Address", "State", "Queued stanzas"), rows) \
            if rows else "<p>No link now.</p>"

    async def tenants(self, request: web.Request, actor: JID) -> web.Response:
        host = self._first_host(actor)
        available = [n for n in TENANT_COMMANDS if self._command(n, host, actor) is not None]
        if not available:
            return self._page(request, actor, "Tenants", "<p>The tenants module is not loaded.</p>")
        body = []
        listing = self._command("list-tenants", host, actor)
        if listing is not None:
            result = await listing.run(Context(host, actor), listing.parse_form({}))
            body.append(self.result_html(listing, result))
        here = self.url("tenants")
        for name in available:
            if name == "list-tenants":
                continue
            command = self.server.commands[name]
            body.append(f"<h2>{esc(command.title)}</h2>{self.command_form(request, host, actor, name, back=here)}")
        return self._page(request, actor, "Tenants", "".join(body))


def _show(value: Any) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        return ", ".join(map(str, value)) or "(none)"
    return "(worked out by the module)" if value is None else str(value)
