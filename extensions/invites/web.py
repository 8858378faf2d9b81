"""The invitation's web page, `/invite/TOKEN`: clients to install for the visitor's platform, the `xmpp:` URI as
a link and a QR code, and a form that creates the account (and its subscriptions with the inviter).

Plain server-rendered HTML without scripts, in the first language of the browser's Accept-Language that the
catalogue has (English otherwise). The form carries a fresh random token that must come back both as a
form field and as a SameSite=Strict cookie (double submit): a page of another site cannot post it.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, cast

import segno
from aiohttp import web

from server.accounts import AccountError
from server.commands import CommandError
from server.web_login import FormToken

if TYPE_CHECKING:
    from extensions.invites import Invites
    from server.server import Server
    from server.storage import Invite

CSRF = "invite_csrf"
PATH = "/invite/"
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",  # the path is the token
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}

MESSAGES: dict[str, dict[str, str]] = {
    "en": {
        "title_contact": "{inviter} invites you to chat",
        "title_account": "You are invited to {host}",
        "intro": "XMPP is an open chat network: pick an app, then join with this invitation.",
        "install": "1. Install an app",
        "open": "2. Open the invitation in the app",
        "open_button": "Open in your app",
        "qr": "Or scan this code with the app on your phone:",
        "register": "Or create your account here",
        "username": "Username",
        "password": "Password",
        "confirm": "Password again",
        "create": "Create account",
        "done_title": "Welcome!",
        "done": "Your account {jid} is ready. Log in with it in your app.",
        "done_contact": "{inviter} is already in your contacts.",
        "invalid": "This invitation is not valid: it expired or was used up.",
        "mismatch": "The two passwords differ.",
        "missing": "Choose a username and a password.",
        "expired_form": "The form expired; please send it again.",
    },
    "de": {
        "title_contact": "{inviter} lädt dich zum Chatten ein",
        "title_account": "Du bist zu {host} eingeladen",
        "intro": "XMPP ist ein offenes Chat-Netzwerk: Wähle eine App und tritt mit dieser Einladung bei.",
        "install": "1. Installiere eine App",
        "open": "2. Öffne die Einladung in der App",
        "open_button": "In der App öffnen",
        "qr": "Oder scanne diesen Code mit der App auf deinem Telefon:",
        "register": "Oder erstelle dein Konto hier",
        "username": "Benutzername",
        "password": "Passwort",
        "confirm": "Passwort wiederholen",
        "create": "Konto erstellen",
        "done_title": "Willkommen!",
        "done": "Dein Konto {jid} ist bereit. Melde dich damit in deiner App an.",
        "done_contact": "{inviter} ist schon in deinen Kontakten.",
        "invalid": "Diese Einladung ist nicht gültig: Sie ist abgelaufen oder aufgebraucht.",
        "mismatch": "Die beiden Passwörter sind verschieden.",
        "missing": "Wähle einen Benutzernamen und ein Passwort.",
        "expired_form": "Das Formular ist abgelaufen; bitte sende es noch einmal.",
    },
}

# (platform, the User-Agent words that say a visitor is on it, its apps)
CLIENTS: list[tuple[str, tuple[str, ...], list[tuple[str, str]]]] = [
    ("Android", ("android",), [
        ("Conversations", "https://play.google.com/store/apps/details?id=eu.siacs.conversations"),
        ("Conversations (F-Droid)", "https://f-droid.org/packages/eu.siacs.conversations/")]),
    ("iPhone, iPad, Mac", ("iphone", "ipad", "mac os"), [("Monal", "https://monal-im.org/")]),
    ("Linux", ("linux", "x11"), [("Dino", "https://dino.im/"), ("Gajim", "https://gajim.org/")]),
    ("Windows", ("windows",), [("Gajim", "https://gajim.org/download/")]),
    ("Web", (), [("Converse.js", "https://conversejs.org/")]),
]


def language(accept: str) -> str:
    """The catalogue's language the browser ranks highest (RFC 9110 12.5.4), English if none."""
    ranked: list[tuple[float, int, str]] = []
    for position, part in enumerate(accept.split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        primary = tag.strip().lower().split("-")[0]
        if primary in MESSAGES and quality > 0:
            ranked.append((-quality, position, primary))
    return min(ranked)[2] if ranked else "en"


def qr_svg(uri: str) -> str:
    return cast(str, segno.make(uri, error="m").svg_inline(scale=5, title="QR code", border=2))


class InvitePages:
    """Serves /invite/TOKEN for every host: the token names the invitation, and so the host."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.form_token = FormToken(server, CSRF)

    async def handle(self, request: web.Request) -> web.Response:
        token = request.path[len(PATH):]
        lang = language(request.headers.get("Accept-Language", ""))
        text = MESSAGES[lang]
        found = await self._invitation(token)
        if found is None:
            return _page(lang, text["invalid"], f"<p role='alert'>{escape(text['invalid'])}</p>", 404)
        module, invite = found
        if request.method == "POST" and module.registers(invite):
            return await self._register(request, lang, module, invite)
        return self._invite_page(request, lang, module, invite)

    async def _invitation(self, token: str) -> tuple[Invites, Invite] | None:
        if not token or "/" in token:
            return None
        invite = await self.server.storage.invites.get(token)
        host = self.server.hosts.get(invite.host) if invite is not None else None
        module = host.modules.get("invites") if host is not None else None
        if module is None or invite is None:
            return None
        module = cast("Invites", module)
        return (module, invite) if await module.valid(token) is not None else None

    def _invite_page(self, request: web.Request, lang: str, module: Invites, invite: Invite,
                     error: str = "", username: str = "", status: int = 200) -> web.Response:
        text = MESSAGES[lang]
        title = self._title(text, module, invite)
        uri = module.uri(invite)
        body = [f"<p>{escape(text['intro'])}</p>", f"<h2>{escape(text['install'])}</h2>",
                self._clients(request.headers.get("User-Agent", "")),
                f"<h2>{escape(text['open'])}</h2>",
                f"<p><a class='button' href='{escape(uri)}'>{escape(text['open_button'])}</a></p>",
                f"<p>{escape(text['qr'])}</p><figure>{qr_svg(uri)}</figure>",
                f"<p><code>{escape(uri)}</code></p>"]
        csrf = ""
        if module.registers(invite):
            csrf, csrf_field = self.form_token.field()
            alert = f"<p role='alert' class='error'>{escape(error)}</p>" if error else ""
            body.append(
                f"<h2>{escape(text['register'])}</h2>{alert}"
                f"<form method='post' action='{escape(invite.token)}'>"
                f"{csrf_field}"
                f"<p><label for='username'>{escape(text['username'])}</label> "
                f"<input id='username' name='username' autocomplete='username' required value='{escape(username)}'>"
                f" @{escape(module.host.name)}</p>"
                f"<p><label for='password'>{escape(text['password'])}</label> "
                f"<input id='password' name='password' type='password' autocomplete='new-password' required></p>"
                f"<p><label for='confirm'>{escape(text['confirm'])}</label> "
                f"<input id='confirm' name='confirm' type='password' autocomplete='new-password' required></p>"
                f"<p><button type='submit'>{escape(text['create'])}</button></p></form>")
        response = _page(lang, title, "\n".join(body), status)
        if csrf:
            self.form_token.set(request, response, csrf)
        return response

    async def _register(self, request: web.Request, lang: str, module: Invites, invite: Invite) -> web.Response:
        text = MESSAGES[lang]
        form = await request.post()
        username = str(form.get("username", "")).strip()
        password, confirm = str(form.get("password", "")), str(form.get("confirm", ""))
        if not self.form_token.valid(request, form):
            return self._invite_page(request, lang, module, invite, text["expired_form"], username, 403)
        if not username or not password:
            return self._invite_page(request, lang, module, invite, text["missing"], username, 400)
        if password != confirm:
            return self._invite_page(request, lang, module, invite, text["mismatch"], username, 400)
        try:
            user = await module.register(invite.token, username, password)
        except (AccountError, CommandError) as exc:
            return self._invite_page(request, lang, module, invite, str(exc), username, 400)
        done = [f"<p role='status'>{escape(text['done'].format(jid=user))}</p>"]
        if invite.inviter:
            done.append(f"<p>{escape(text['done_contact'].format(inviter=f'{invite.inviter}@{invite.host}'))}</p>")
        return _page(lang, text["done_title"], "\n".join(done), 200)

    @staticmethod
    def _title(text: dict[str, str], module: Invites, invite: Invite) -> str:
        if invite.kind == "contact":
            return text["title_contact"].format(inviter=f"{invite.inviter}@{module.host.name}")
        return text["title_account"].format(host=module.host.name)

    @staticmethod
    def _clients(agent: str) -> str:
        """The apps of every platform, the visitor's own first."""
        agent = agent.lower()
        rows = []
        for platform, _, apps in sorted(CLIENTS, key=lambda c: not any(word in agent for word in c[1])):
            links = ", ".join(f"<a href='{escape(url)}' rel='noopener'>{escape(name)}</a>" for name, url in apps)
            rows.append(f"<li><strong>{escape(platform)}</strong>: {links}</li>")
        return f"<ul class='clients'>{''.join(rows)}</ul>"


def _page(lang: str, title: str, body: str, status: int) -> web.Response:
    page = (f"<!DOCTYPE html><html lang='{lang}'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{escape(title)}</title><style>body{{font-family:sans-serif;max-width:40em;margin:auto;"
            "padding:1em}.button{display:inline-block;padding:.6em 1em;background:#1565c0;color:#fff;"
            "border-radius:4px;text-decoration:none}.error{color:#b00020}label{display:inline-block;"
            "min-width:10em}</style></head>"
            f"<body><main><h1>{escape(title)}</h1>\n{body}</main></body></html>")
    return web.Response(status=status, text=page, content_type="text/html", headers=HEADERS)
