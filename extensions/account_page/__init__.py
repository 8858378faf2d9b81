"""The account page: every user's own web page at /account/ on the http listeners, logged in with their XMPP
address and password (the shared web login, `server.web_login`).

On one page, server-rendered and usable without scripts: change the password (the old one asked again;
the FAST tokens and every XMPP session of the account end with it), the missed-message notification
settings (email address, quiet hours), the OMEMO devices of both generations with whether their keys are
published and a button that drops a stale one from the list, a download of the account's data as a XEP-0227
file, and deleting the account after typing its address and password again. Every form posts with the
session's CSRF token, and acts on the logged-in account only: no form names an account (`account.py`).

The paths are shared by the module's instances on every host: the account logged in says which host the
page acts on, and an account of a host that does not load the module is not let in.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from urllib.parse import quote

from aiohttp import web

from extensions.account_page.account import Device, Notify, OwnAccount, PageError
from server.jid import JID
from server.module import Module
from server.web_login import WebLogin
from server.web_pages import HEADERS, esc, field, form, hidden, message, page, table

PREFIX = "/account/"
SITE = "Your account"
Action = Callable[["AccountPage", web.Request, OwnAccount, dict[str, str]], Awaitable[web.StreamResponse]]


class AccountPage(Module):
    name = "account_page"

    def setup(self) -> None:
        self.login = WebLogin(self.server, PREFIX, self._may_use, site=SITE)
        for method, path, handler in self.login.paths():
            self.add_http(method, path, handler)
        self.add_http("GET", PREFIX, self.show)
        for action in ACTIONS:
            self.add_http("POST", f"{PREFIX}{action}", self.post)

    def _may_use(self, jid: JID) -> bool:
        host = self.server.hosts.get(jid.domain)
        return host is not None and self.name in host.modules

    def _address(self, request: web.Request) -> str:
        return self.server.http.peer(request).address

    async def show(self, request: web.Request) -> web.Response:
        jid = await self.login.require(request)
        return await self.render(request, OwnAccount(self.server.hosts[jid.domain], jid))

    async def post(self, request: web.Request) -> web.StreamResponse:
        """Every form: the CSRF token first (403 and nothing done without it), then the action its path names,
        on the logged-in account; a refusal shows the page again with the reason."""
        submitted = await request.post()
        jid = await self.login.check_csrf(request, submitted)
        values = {key: str(value) for key, value in submitted.items() if isinstance(value, str)}
        account = OwnAccount(self.server.hosts[jid.domain], jid)
        try:
            return await ACTIONS[request.path.removeprefix(PREFIX)](self, request, account, values)
        except PageError as exc:
            return await self.render(request, account, str(exc), error=True, status=400)

    # --- the page ------------------------------------------------------------------------------------

    async def render(self, request: web.Request, account: OwnAccount, note: str = "", *, error: bool = False,
                     status: int = 200) -> web.Response:
        csrf = self.login.csrf_field(request)
        sections = [message(note, error=error) if note else "",
                    self._password_section(csrf),
                    self._notifications_section(csrf, await account.notifications()),
                    self._devices_section(csrf, await account.devices()),
                    self._export_section(csrf),
                    self._delete_section(csrf, account.user)]
        return page(str(account.user), "\n".join(sections), status=status, site=SITE,
                    header=self.login.logout_form(request, account.user))

    @staticmethod
    def _password_section(csrf: str) -> str:
        fields = [field("old", "Current password", kind="password", required=True, autocomplete="current-password"),
                  field("new", "New password", kind="password", required=True, autocomplete="new-password"),
                  field("again", "New password again", kind="password", required=True,
                        autocomplete="new-password")]
        return ("<section aria-labelledby='password'><h2 id='password'>Change your password</h2>"
                "<p>Changing it logs out every device and app, which must log in again with the new one.</p>"
                f"{form(f'{PREFIX}password', fields, 'Change password', csrf)}</section>")

    @staticmethod
    def _notifications_section(csrf: str, current: Notify | None) -> str:
        head = "<section aria-labelledby='notifications'><h2 id='notifications'>Notifications</h2>"
        if current is None:
            return f"{head}<p>This server sends no missed-message emails.</p></section>"
        state = ""
        if current.email:
            state = (f"<p>Digests go to {esc(current.email)}.</p>" if current.confirmed else
                     f"<p>{esc(current.email)} has not been confirmed yet: open the link that was mailed to it.</p>")
        fields = [field("email", "Email address", kind="email", value=current.email, autocomplete="email",
                        hint="empty: no emails"),
                  field("quiet", "Quiet hours", value=current.quiet, hint="HH:MM-HH:MM, e.g. 22:00-07:00; empty: none"),
                  field("zone", "Time zone", value=current.zone, hint="of the quiet hours, e.g. Europe/Berlin")]
        return (f"{head}<p>An email lists what you missed while none of your devices was online.</p>{state}"
                f"{form(f'{PREFIX}notifications', fields, 'Save notification settings', csrf)}</section>")

    @staticmethod
    def _devices_section(csrf: str, devices: list[Device]) -> str:
        head = ("<section aria-labelledby='devices'><h2 id='devices'>Encryption devices (OMEMO)</h2>"
                "<p>Your contacts encrypt each message for every device listed here. Remove a device you no "
                "longer use: messages are then no longer encrypted for it.</p>")
        if not devices:
            return f"{head}<p>No device has published OMEMO keys.</p></section>"
        rows = []
        for device in devices:
            remove = form(f"{PREFIX}devices", [hidden("namespace", device.namespace), hidden("id", str(device.id))],
                          f"Remove device {device.id} ({device.generation})", csrf, inline=True,
                          danger=True)
            keys = "published" if device.bundle else "missing (stale)"
            rows.append([esc(device.id), esc(device.label or "-"), esc(device.generation), keys, remove])
        return f"{head}{table(['Device', 'Label', 'Protocol', 'Keys', 'Action'], rows)}</section>"

    @staticmethod
    def _export_section(csrf: str) -> str:
        return ("<section aria-labelledby='export'><h2 id='export'>Your data</h2>"
                "<p>A XEP-0227 file with your contacts, vCard, bookmarks and private data, offline messages and "
                "message archive, which other XMPP servers (Parley, ejabberd, Prosody) import.</p>"
                f"{form(f'{PREFIX}export', [], 'Download my data', csrf)}</section>")

    @staticmethod
    def _delete_section(csrf: str, user: JID) -> str:
        fields = [field("confirm", f"Type your address ({user})", required=True, autocomplete="off"),
                  field("password", "Password", kind="password", required=True, autocomplete="current-password")]
        return ("<section aria-labelledby='delete'><h2 id='delete'>Delete account</h2>"
                "<p>Your account and everything stored for it are deleted at once, for good.</p>"
                f"{form(f'{PREFIX}delete', fields, 'Delete my account', csrf, danger=True)}</section>")

    # --- the forms' actions --------------------------------------------------------------------------

    async def change_password(self, request: web.Request, account: OwnAccount,
                              values: dict[str, str]) -> web.StreamResponse:
        done = await account.change_password(values.get("old", ""), values.get("new", ""), values.get("again", ""),
                                             self._address(request))
        self.log.info("%s changed their password on the account page", account.user)
        renewed = await self.login.end_others(request)  # other browsers are logged out, this one stays
        response = await self.render(request, account, done)
        renewed(response)
        return response

    async def notifications(self, request: web.Request, account: OwnAccount,
                            values: dict[str, str]) -> web.StreamResponse:
        done = await account.set_notifications(values.get("email", ""), values.get("quiet", ""),
                                               values.get("zone", ""))
        return await self.render(request, account, done[:1].upper() + done[1:] + ".")

    async def remove_device(self, request: web.Request, account: OwnAccount,
                            values: dict[str, str]) -> web.StreamResponse:
        ident, namespace = values.get("id", ""), values.get("namespace", "")
        if not ident.isdigit():
            raise PageError("No device was chosen.")
        done = await account.remove_device(namespace, int(ident))
        return await self.render(request, account, done)

    async def export(self, request: web.Request, account: OwnAccount, values: dict[str, str]) -> web.StreamResponse:
        document = await account.export()
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        name = f"{account.user}-{stamp}.xml".replace("@", "_at_")
        # An address may hold any letter: an ASCII name for every browser, the real one (RFC 6266) for most.
        plain = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        disposition = f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name)}"
        return web.Response(body=document.encode(), content_type="application/xml", charset="utf-8",
                            headers={**HEADERS, "Content-Disposition": disposition})

    async def delete(self, request: web.Request, account: OwnAccount, values: dict[str, str]) -> web.StreamResponse:
        await account.delete(values.get("confirm", ""), values.get("password", ""), self._address(request))
        self.log.info("%s deleted their account on the account page", account.user)
        # The login's own logout ends the session in storage, so that its cookie, replayed later, is worthless
        # even for an account made again under the same name; its answer's cookie removal is kept.
        logged_out = await self.login.logout(request)
        response = page("Account deleted", message(f"{account.user} and everything stored for it were deleted."),
                        site=SITE)
        for name, cookie in logged_out.cookies.items():
            response.cookies[name] = cookie
        return response


ACTIONS: dict[str, Action] = {
    "password": AccountPage.change_password, "notifications": AccountPage.notifications,
    "devices": AccountPage.remove_device, "export": AccountPage.export, "delete": AccountPage.delete,
}
