"""The shared web login (server/web_login.py) over real HTTP: a page behind it, its forms' CSRF tokens, session
fixation, the throttle shared with XMPP logins, logout, TLS cookies, and a session that another process
(another WebLogin with no memory of it) recognises from storage."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from server.jid import JID
from server.web_login import WebLogin
from server.web_pages import esc, form, page, redirect
from tests.browser_support import web_listener
from tests.conftest import Harness

PREFIX = "/t/"


class Protected:
    """A page behind the login whose one form changes something (a counter), as an admin page would."""

    def __init__(self, login: WebLogin) -> None:
        self.login = login
        self.changes: list[str] = []

    async def show(self, request: web.Request) -> web.StreamResponse:
        jid = await self.login.require(request)
        body = f"<p id='who'>{esc(jid)}</p>" + form(f"{PREFIX}change", [], "Change", self.login.csrf_field(request))
        return page("Protected", body, header=self.login.logout_form(request, jid))

    async def change(self, request: web.Request) -> web.StreamResponse:
        jid = await self.login.check_csrf(request, await request.post())
        self.changes.append(str(jid))
        return redirect(PREFIX)


def mount(server: Harness, who_may: object = None) -> Protected:
    login = WebLogin(server.server, PREFIX, who_may)  # type: ignore[arg-type]
    protected = Protected(login)
    for method, path, handler in login.paths():
        server.server.http.add(method, path, handler)
    server.server.http.add("GET", PREFIX, protected.show)
    server.server.http.add("POST", f"{PREFIX}change", protected.change)
    return protected


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


def hidden_csrf(html: str) -> str:
    found = re.search(r"name='csrf' value='([^']+)'", html)
    assert found, html
    return found.group(1)


async def log_in(http: aiohttp.ClientSession, base: str, jid: str, password: str,
                 host: str | None = None, prefix: str = PREFIX) -> aiohttp.ClientResponse:
    """Load the login form under `prefix` and send it: the response, its redirection not followed."""
    headers = {"Host": host} if host else {}
    async with http.get(f"{base}{prefix}login", headers=headers) as shown:
        assert shown.status == 200
        token = hidden_csrf(await shown.text())
    async with http.post(f"{base}{prefix}login", data={"jid": jid, "password": password, "csrf": token},
                         headers=headers, allow_redirects=False) as response:
        await response.read()
        return response


def session_cookie(http: aiohttp.ClientSession, name: str = "parley_session") -> str:
    return next((c.value for c in http.cookie_jar if c.key == name), "")


async def test_log_in_use_the_page_and_log_out(server: Harness, http: aiohttp.ClientSession) -> None:
    base = await web_listener(server)
    protected = mount(server)
    await server.add_user("alice", "wonderland")
    async with http.get(f"{base}{PREFIX}", allow_redirects=False) as anonymous:
        assert anonymous.status == 303 and anonymous.headers["Location"] == f"{PREFIX}login"

    response = await log_in(http, base, "alice@localhost", "wonderland")
    assert response.status == 303 and response.headers["Location"] == PREFIX
    cookie = response.headers.getall("Set-Cookie")
    session = next(c for c in cookie if c.startswith("parley_session="))
    assert "HttpOnly" in session and "SameSite=Strict" in session and "Path=/" in session
    assert "Secure" not in session  # plain HTTP: a Secure cookie would never come back

    async with http.get(f"{base}{PREFIX}") as shown:
        html = await shown.text()
        assert shown.status == 200 and "<p id='who'>alice@localhost</p>" in html
        assert shown.headers["Cache-Control"] == "no-store"
    async with http.post(f"{base}{PREFIX}change", data={"csrf": hidden_csrf(html)}) as changed:
        assert changed.status == 200
    assert protected.changes == ["alice@localhost"]

    stolen = session_cookie(http)
    async with http.post(f"{base}{PREFIX}logout", data={"csrf": hidden_csrf(html)}, allow_redirects=False) as out:
        assert out.status == 303
    # The cookie, replayed after logout (a copy an attacker kept), is worth nothing: the session is gone.
    async with aiohttp.ClientSession(cookies={"parley_session": stolen}) as replay, \
            replay.get(f"{base}{PREFIX}", allow_redirects=False) as again:
        assert again.status == 303


async def test_a_post_without_the_sessions_csrf_token_changes_nothing(server: Harness,
                                                                      http: aiohttp.ClientSession) -> None:
    base = await web_listener(server)
    protected = mount(server)
    await server.add_user("alice", "wonderland")
    assert (await log_in(http, base, "alice@localhost", "wonderland")).status == 303
    async with http.post(f"{base}{PREFIX}change", data={}) as missing:
        assert missing.status == 403
    async with http.post(f"{base}{PREFIX}change", data={"csrf": "0" * 64}) as wrong:
        assert wrong.status == 403
    # Another session's token is no good either.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        await server.add_user("mallory", "evil-2026")
        assert (await log_in(other, base, "mallory@localhost", "evil-2026")).status == 303
        async with other.get(f"{base}{PREFIX}") as shown:
            mallorys = hidden_csrf(await shown.text())
    async with http.post(f"{base}{PREFIX}change", data={"csrf": mallorys}) as foreign:
        assert foreign.status == 403
    assert protected.changes == []
    # The login form has its own token (double submit): a login posted from another site is refused.
    async with aiohttp.ClientSession() as fresh, fresh.post(
            f"{base}{PREFIX}login", data={"jid": "alice@localhost", "password": "wonderland", "csrf": "x"},
            allow_redirects=False) as forged:
        assert forged.status == 403 and "parley_session" not in forged.cookies


async def test_session_fixation_a_cookie_set_before_login_is_never_the_session(
        server: Harness, http: aiohttp.ClientSession) -> None:
    base = await web_listener(server)
    mount(server)
    await server.add_user("alice", "wonderland")
    await server.add_user("mallory", "evil-2026")
    # Mallory logs in herself and plants her own (valid) session id in alice's browser, and a made-up one.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as attacker:
        assert (await log_in(attacker, base, "mallory@localhost", "evil-2026")).status == 303
        planted = session_cookie(attacker)
    made_up = "9999999999.attacker-chosen-id"
    for fixed in (planted, made_up):
        http.cookie_jar.clear()
        http.cookie_jar.update_cookies({"parley_session": fixed})
        response = await log_in(http, base, "alice@localhost", "wonderland")
        assert response.status == 303
        issued = response.cookies["parley_session"].value
        assert issued and issued != fixed
        # What the attacker holds never becomes alice's session.
        async with aiohttp.ClientSession(cookies={"parley_session": fixed}) as replay, \
                replay.get(f"{base}{PREFIX}", allow_redirects=False) as seen:
            assert seen.status == 303 or "alice@localhost" not in await seen.text()
    async with aiohttp.ClientSession(cookies={"parley_session": made_up}) as forged, \
            forged.get(f"{base}{PREFIX}", allow_redirects=False) as seen:
        assert seen.status == 303


async def test_wrong_passwords_are_throttled_like_xmpp_logins(server: Harness, http: aiohttp.ClientSession) -> None:
    base = await web_listener(server)
    mount(server)
    await server.add_user("alice", "wonderland")
    failures = server.server.auth_throttle.max_failures
    for _ in range(failures):
        assert (await log_in(http, base, "alice@localhost", "guess")).status == 401
    # Locked out now, even with the right password: the throttle answers before the password is checked.
    locked = await log_in(http, base, "alice@localhost", "wonderland")
    assert locked.status == 429 and not session_cookie(http)
    assert server.server.auth_throttle.blocked_for("ip:127.0.0.1|alice@localhost") > 0
    assert server.server.stats.auth[("WEB", "failure")] == failures
    # Unknown accounts and hosts fail the same way.
    server.server.auth_throttle.succeeded("ip:127.0.0.1")
    assert (await log_in(http, base, "nobody@localhost", "x")).status == 401
    assert (await log_in(http, base, "alice@elsewhere.example", "wonderland")).status == 401


async def test_who_may_and_disabled_accounts(server: Harness, http: aiohttp.ClientSession) -> None:
    base = await web_listener(server)
    mount(server, who_may=lambda jid: jid == JID.parse("admin@localhost"))
    await server.add_user("alice", "wonderland")
    await server.add_user("admin", "root-2026")
    refused = await log_in(http, base, "alice@localhost", "wonderland")
    assert refused.status == 403 and not session_cookie(http)
    # A bare username is an account of the host the browser asked for.
    assert (await log_in(http, base, "admin", "root-2026", host="localhost")).status == 303
    async with http.get(f"{base}{PREFIX}") as shown:
        assert shown.status == 200
    await server.server.storage.accounts.set_disabled("localhost", "admin", True)
    async with http.get(f"{base}{PREFIX}", allow_redirects=False) as after:
        assert after.status == 303  # a disabled account's sessions end with it


async def test_tls_cookies_and_a_session_any_process_knows(server: Harness, http: aiohttp.ClientSession) -> None:
    base = await web_listener(server, tls="direct")
    mount(server)
    await server.add_user("alice", "wonderland")
    async with http.get(f"{base}{PREFIX}login", ssl=False) as shown:
        token = hidden_csrf(await shown.text())
        assert any(c.startswith("__Host-parley_form=") and "Secure" in c for c in shown.headers.getall("Set-Cookie"))
    async with http.post(f"{base}{PREFIX}login", data={"jid": "alice@localhost", "password": "wonderland",
                                                       "csrf": token}, ssl=False, allow_redirects=False) as done:
        assert done.status == 303
        session = next(c for c in done.headers.getall("Set-Cookie") if c.startswith("__Host-parley_session="))
        assert "Secure" in session and "HttpOnly" in session and "Path=/" in session and "Domain" not in session
    # The plain name is not read over TLS: a cookie planted over plain HTTP does not count.
    value = session_cookie(http, "__Host-parley_session")
    async with aiohttp.ClientSession(cookies={"parley_session": value}) as plain, \
            plain.get(f"{base}{PREFIX}", ssl=False, allow_redirects=False) as seen:
        assert seen.status == 303
    # Another worker (a WebLogin that never saw this session) finds it in storage.
    server.server.http._routes.clear()
    mount(server)
    async with http.get(f"{base}{PREFIX}", ssl=False) as again:
        assert again.status == 200 and "alice@localhost" in await again.text()
