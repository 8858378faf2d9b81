"""Logging in to the server's web pages (the web admin, a user's account page) with an XMPP account.

The password typed is checked as SASL PLAIN checks one: SCRAM keys derived from it with the stored salt and
iteration count, StoredKey compared in constant time (`server.accounts.verify_plain`), under the same
throttle as the XMPP logins (`server.auth_throttle`, per address and per address and account), so that
the web is no cheaper way to guess a password.

A session lives in storage (`storage.kv`, one small document per session), so that every worker and every
member of a cluster knows it and a logout ends it everywhere. The cookie holds the session's expiry and
a random id made anew at every login; storage keeps only an HMAC of it under a server secret, so that the
database does not hold what a browser would present. An id that storage does not hold is never taken,
whoever set it: no session fixation. Cookies are HttpOnly and SameSite=Strict, and over TLS Secure with
the `__Host-` prefix (path '/', no domain), so that the web admin and the account page share one login.

Every POST carries a CSRF token: a session's is an HMAC of its id; before login (the login form itself)
a random token comes back both as a form field and as a cookie (`FormToken`, double submit), as the
invitation page does.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from server.accounts import verify_plain
from server.jid import JID, JIDError
from server.limits import login_keys
from server.sasl.scram import derive_credentials
from server.web_pages import HEADERS, esc, field, form, hidden, message, page, redirect

if TYPE_CHECKING:
    from server.server import Server

log = logging.getLogger("parley.web_login")

STORE = "web_login"  # storage.kv store of the sessions (host '', user '') and of the secret
ENDED = "ended"  # an account's key there: the time before which its sessions were ended (end_others)
SESSION = "parley_session"
FORM = "parley_form"
CSRF_FIELD = "csrf"
# Where `current` leaves the session it found on the request: a typed key where aiohttp has them (3.12 on).
REQUEST_KEY: Any = web.RequestKey("parley.web_login", object) if hasattr(web, "RequestKey") else "parley.web_login"
DEFAULT_LIFETIME = 8 * 3600
PRUNE_EVERY = 3600.0


def cookie_name(base: str, secure: bool) -> str:
    """A cookie's name: with the `__Host-` prefix over TLS, which the browser keeps to Secure cookies of
    path '/' set by this very host, so that neither plain HTTP nor a sibling domain can plant it."""
    return f"__Host-{base}" if secure else base


class FormToken:
    """The double-submit CSRF token of a form shown to someone not logged in: random, sent in a hidden
    field and in a SameSite=Strict cookie; a POST is taken only if both came back the same."""

    def __init__(self, server: Server, cookie: str = FORM) -> None:
        self.server = server
        self.cookie = cookie

    def field(self) -> tuple[str, str]:
        """A new token and the hidden field that carries it; `set` it on the response that shows the form."""
        token = secrets.token_urlsafe(24)
        return token, hidden(CSRF_FIELD, token)

    def set(self, request: web.Request, response: web.StreamResponse, token: str) -> None:
        secure = self.server.http.peer(request).secure
        response.set_cookie(cookie_name(self.cookie, secure), token, path="/", httponly=True,
                            samesite="Strict", secure=secure)

    def valid(self, request: web.Request, submitted: Mapping[str, Any]) -> bool:
        sent = str(submitted.get(CSRF_FIELD, ""))
        kept = request.cookies.get(cookie_name(self.cookie, self.server.http.peer(request).secure), "")
        return bool(sent) and hmac.compare_digest(sent.encode(), kept.encode())


class WebLogin:
    """The login of the pages under `path_prefix`: `{prefix}login` (GET the form, POST it) and
    `{prefix}logout` (POST); `paths()` lists them for `Module.add_http`.

    `who_may(jid)` says whether a logged-in account may use these pages (the web admin: admins only);
    others are told so with 403. Pages call `require(request)` for the account (it redirects to the login
    form when nobody is logged in), `csrf_field(request)` in their forms and `check_csrf(request, form)`
    first thing in every POST."""

    def __init__(self, server: Server, path_prefix: str, who_may: Callable[[JID], bool] | None = None,
                 *, site: str = "Parley", lifetime: int = DEFAULT_LIFETIME) -> None:
        if not path_prefix.startswith("/") or not path_prefix.endswith("/"):
            raise ValueError(f"a web login's prefix starts and ends with '/': {path_prefix!r}")
        self.server = server
        self.prefix = path_prefix
        self.who_may = who_may or (lambda jid: True)
        self.site = site
        self.lifetime = lifetime
        self.form_token = FormToken(server)
        self._secret: bytes | None = None
        self._pruned = 0.0

    @property
    def login_path(self) -> str:
        return f"{self.prefix}login"

    @property
    def logout_path(self) -> str:
        return f"{self.prefix}logout"

    def paths(self) -> list[tuple[str, str, Callable[[web.Request], Any]]]:
        """(method, path, handler) of the login form and the logout."""
        return [("GET", self.login_path, self.login_page), ("POST", self.login_path, self.login_post),
                ("POST", self.logout_path, self.logout)]

    async def _key(self) -> bytes:
        if self._secret is None:
            self._secret = await self.server.storage.kv.host_secret("", STORE)
        return self._secret

    async def _document_key(self, value: str) -> str:
        """Where storage keeps the session of cookie `value` ("EXPIRY.ID"): the expiry, readable so that
        expired sessions are pruned without reading them, then the id's HMAC."""
        expiry = value.split(".", 1)[0]
        return f"{expiry}.{hmac.new(await self._key(), value.encode(), hashlib.sha256).hexdigest()}"

    def _cookie(self, request: web.Request) -> str:
        return request.cookies.get(cookie_name(SESSION, self.server.http.peer(request).secure), "")

    # --- who is logged in -------------------------------------------------------------------------------

    async def current(self, request: web.Request) -> JID | None:
        """The account logged in with this request's session cookie: None without a cookie, for an id that
        storage does not hold (never issued, logged out, expired) and for an account gone or disabled."""
        if REQUEST_KEY in request:
            found: tuple[JID, str] | None = request[REQUEST_KEY]
            return found[0] if found else None
        request[REQUEST_KEY] = None
        value = self._cookie(request)
        expiry, _, ident = value.partition(".")
        if not ident or not expiry.isdigit() or int(expiry) <= time.time():
            return None
        document = await self.server.storage.kv.get("", "", STORE, await self._document_key(value))
        if not isinstance(document, dict):
            return None
        try:
            jid = JID.parse(str(document.get("jid", "")))
        except JIDError:
            return None
        host = self.server.hosts.get(jid.domain)
        account = await self.server.storage.accounts.get(jid.domain, jid.local or "") if host else None
        if account is None or account.disabled:
            return None
        ended = await self.server.storage.kv.get(jid.domain, account.username, STORE, ENDED)
        if isinstance(ended, float) and float(document.get("since", 0)) < ended:
            return None
        request[REQUEST_KEY] = (jid, value)
        return jid

    async def require(self, request: web.Request) -> JID:
        """The logged-in account, which `who_may` lets in; else the login form (303) or 403."""
        jid = await self.current(request)
        if jid is None:
            raise web.HTTPSeeOther(self.login_path, headers=HEADERS)
        if not self.who_may(jid):
            raise self.forbidden("This account may not use these pages.", request)
        return jid

    def forbidden(self, reason: str, request: web.Request | None = None) -> web.HTTPForbidden:
        """A 403 page to raise; with the logout button when `request` has a session."""
        found: tuple[JID, str] | None = request.get(REQUEST_KEY) if request is not None else None
        header = self.logout_form(request, found[0]) if request is not None and found else ""
        shown = page("Forbidden", message(reason, error=True), header=header, site=self.site)
        return web.HTTPForbidden(text=shown.text, content_type="text/html", headers=HEADERS)

    def csrf_token(self, request: web.Request) -> str:
        """The CSRF token of the session `current` found on this request."""
        found: tuple[JID, str] | None = request.get(REQUEST_KEY)
        if not found or self._secret is None:
            raise RuntimeError("csrf_token needs a request that `current` or `require` found logged in")
        return hmac.new(self._secret, b"csrf\0" + found[1].encode(), hashlib.sha256).hexdigest()

    def csrf_field(self, request: web.Request) -> str:
        """The hidden field every form of a logged-in page carries."""
        return hidden(CSRF_FIELD, self.csrf_token(request))

    async def check_csrf(self, request: web.Request, submitted: Mapping[str, Any]) -> JID:
        """The logged-in account, if the form came with its session's CSRF token; else 403 (or the login
        form when nobody is logged in), before anything is changed."""
        jid = await self.require(request)
        self._check_token(request, submitted)
        return jid

    def _check_token(self, request: web.Request, submitted: Mapping[str, Any]) -> None:
        sent = str(submitted.get(CSRF_FIELD, ""))
        if not sent or not hmac.compare_digest(sent.encode(), self.csrf_token(request).encode()):
            raise self.forbidden("The form expired or came from another site; please load the page again.", request)

    # --- logging in and out -----------------------------------------------------------------------------

    async def login_page(self, request: web.Request, error: str = "", jid: str = "",
                         status: int = 200) -> web.Response:
        token, csrf = self.form_token.field()
        fields = [field("jid", "Address (user@host)", value=jid, required=True, autocomplete="username"),
                  field("password", "Password", kind="password", required=True, autocomplete="current-password")]
        body = (message(error, error=True) if error else "") + form(self.login_path, fields, "Log in", csrf)
        response = page("Log in", body, status=status, site=self.site)
        self.form_token.set(request, response, token)
        return response

    def _parse_jid(self, request: web.Request, typed: str) -> JID | None:
        """The account typed: a full address, or a username of the host the browser asked for."""
        if "@" not in typed:
            typed = f"{typed}@{request.host.split(':', 1)[0]}"
        try:
            jid = JID.parse(typed).bare
        except JIDError:
            return None
        return jid if jid.local else None

    async def login_post(self, request: web.Request) -> web.Response:
        submitted = await request.post()
        typed = str(submitted.get("jid", "")).strip()
        if not self.form_token.valid(request, submitted):
            return await self.login_page(request, "The form expired; please send it again.", typed, 403)
        address = self.server.http.peer(request).address
        jid = self._parse_jid(request, typed)
        keys = login_keys(address, str(jid.bare) if jid is not None else None)  # the XMPP logins' budget
        throttle = self.server.auth_throttle
        wait = max(throttle.blocked_for(k) for k in keys)
        if wait > 0:
            return await self.login_page(
                request, f"Too many failed attempts; try again in {int(wait) + 1} s.", typed, 429)
        password = str(submitted.get("password", ""))
        account = None
        if jid is not None and jid.domain in self.server.hosts:
            account = await self.server.storage.accounts.get(jid.domain, jid.local or "")
        if account is None or not await verify_plain(self.server.storage, account, password):
            if account is None:  # as long as a wrong password: the time taken tells nothing of who exists
                await asyncio.to_thread(derive_credentials, password or "-", "SHA-256", b"web-login",
                                        self.server.config.scram_iterations)
            for key in keys:
                throttle.failed(key)
            self.server.stats.authenticated("WEB", "failure")
            log.info("web login failed for %s from %s", typed, address)
            return await self.login_page(request, "Wrong address or password.", typed, 401)
        assert jid is not None
        if account.disabled:
            return await self.login_page(request, "This account is disabled.", typed, 403)
        for key in keys:
            throttle.succeeded(key)
        self.server.stats.authenticated("WEB", "success")
        if not self.who_may(jid):
            return await self.login_page(request, "This account may not use these pages.", typed, 403)
        log.info("web login of %s from %s", jid, address)
        response = redirect(self.prefix)
        (await self._renew(request, jid))(response)
        response.del_cookie(cookie_name(FORM, self.server.http.peer(request).secure), path="/")
        return response

    async def _renew(self, request: web.Request, jid: JID) -> Callable[[web.StreamResponse], None]:
        """End the session the browser had (whatever it was: an id planted before a login is worthless after
        it) and open a new one of `jid`, which this request holds from now on (its CSRF token too); returns
        what sets its cookie on the answer."""
        await self._end(self._cookie(request))
        value = await self._open(jid)
        request[REQUEST_KEY] = (jid, value)
        secure = self.server.http.peer(request).secure

        def set_cookie(response: web.StreamResponse) -> None:
            response.set_cookie(cookie_name(SESSION, secure), value, path="/", max_age=self.lifetime,
                                httponly=True, samesite="Strict", secure=secure)

        return set_cookie

    async def end_others(self, request: web.Request) -> Callable[[web.StreamResponse], None]:
        """End every web session of the logged-in account but this browser's, which gets a new one (returned
        as by `_renew`): after a password change, a browser logged in with the old password (someone else's,
        maybe) is logged out. Kept as the time before which the account's sessions count as ended, so that no
        session needs to be found: one read per request, on every member of a cluster."""
        jid = await self.require(request)
        assert jid.local is not None
        await self.server.storage.kv.set(jid.domain, jid.local, STORE, ENDED, time.time())
        return await self._renew(request, jid)

    async def _open(self, jid: JID) -> str:
        """A new session of `jid`: its cookie value, with an id never seen before."""
        await self._prune()
        value = f"{int(time.time()) + self.lifetime}.{secrets.token_urlsafe(32)}"
        document = {"jid": str(jid), "since": time.time()}
        await self.server.storage.kv.set("", "", STORE, await self._document_key(value), document)
        return value

    async def _end(self, value: str) -> None:
        if "." in value:
            await self.server.storage.kv.set("", "", STORE, await self._document_key(value), None)

    async def _prune(self) -> None:
        """Forget expired sessions, at most once an hour per process."""
        now = time.time()
        if now - self._pruned < PRUNE_EVERY:
            return
        self._pruned = now
        for key in await self.server.storage.kv.keys("", "", STORE):
            expiry = key.split(".", 1)[0]
            if expiry.isdigit() and int(expiry) <= now:
                await self.server.storage.kv.set("", "", STORE, key, None)

    async def logout(self, request: web.Request) -> web.Response:
        """End the session (in storage: the cookie is worthless afterwards, wherever it is replayed), also of
        an account that `who_may` no longer lets in."""
        submitted = await request.post()
        if await self.current(request) is not None:
            self._check_token(request, submitted)
            await self._end(self._cookie(request))
        response = redirect(self.login_path)
        response.del_cookie(cookie_name(SESSION, self.server.http.peer(request).secure), path="/")
        return response

    def logout_form(self, request: web.Request, jid: JID) -> str:
        """Who is logged in and the button that logs out, for a page's header."""
        return (f"<span class='who'>{esc(jid)} "
                f"{form(self.logout_path, [], 'Log out', self.csrf_field(request), inline=True)}</span>")
