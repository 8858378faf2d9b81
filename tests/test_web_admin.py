"""The web admin (extensions/web_admin) over real HTTP: in Debian's headless Chromium (log in, the dashboard's
charts, create a user, kick and disable, a room's page), and with a plain HTTP client for what a browser
would not send: forged posts (CSRF), a planted session id, guessed passwords, non-admins, an admin of one
host asking for another, and tenants created in the web admin end to end."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from extensions.web_admin.charts import line_chart
from extensions.web_admin.sampler import Sampler
from extensions.web_admin.site import AdminSite
from server.config import DEFAULT_MODULES
from server.jid import JID
from server.stanza import MESSAGE
from tests.browser_support import chromium, screenshot, wait_for, web_listener
from tests.conftest import Harness
from tests.s2s_support import linked, running_pair
from tests.test_web_login import hidden_csrf, log_in

MODULES = [*DEFAULT_MODULES, "web_admin", "invites", "spam_reporting", "abuse_limits"]
ADMIN = "/admin/"
WEB_ADMIN = pytest.mark.parley_config(
    modules=MODULES, module_options={"web_admin": {"sample_interval": 1}},
    hosts={"localhost": {"admins": ["admin@localhost"]}, "example.test": {"admins": ["boss@example.test"]}})
pytestmark = WEB_ADMIN


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def server_admin(server: Harness) -> None:
    """admin@localhost administers example.test too: an admin of every configured host, the server's admin."""
    await server.add_user("admin", "root-2026")
    await server.server.hosts["example.test"].set_admins({JID.parse("admin@localhost")})


async def admin_in(http: aiohttp.ClientSession, base: str, jid: str, password: str) -> None:
    response = await log_in(http, base, jid, password, prefix=ADMIN)
    assert response.status == 303 and response.headers["Location"] == ADMIN


async def page(http: aiohttp.ClientSession, url: str, status: int = 200) -> str:
    async with http.get(url, allow_redirects=False) as response:
        text = await response.text()
        assert response.status == status, (response.status, text[:500])
        return text


async def post_command(http: aiohttp.ClientSession, base: str, host: str, name: str, data: dict[str, str],
                       csrf: str | None) -> tuple[int, str]:
    body = {**data, **({"csrf": csrf} if csrf is not None else {})}
    async with http.post(f"{base}{ADMIN}hosts/{host}/commands/{name}", data=body, allow_redirects=False) as response:
        return response.status, await response.text()


# --- in a browser ---------------------------------------------------------------------------------------------

async def test_an_admin_in_the_browser_dashboard_users_sessions_and_rooms(server: Harness) -> None:
    base = await web_listener(server)
    await server_admin(server)
    await server.add_user("alice")
    alice = await server.client("alice@localhost")  # a login and a few messages for the charts
    for n in range(5):
        alice.send_message(mto="admin@localhost", mbody=f"hello {n}")
    site = server.server.hosts["localhost"].modules["web_admin"].site
    site.sampler.sample()
    await asyncio.sleep(1.2)
    site.sampler.sample()

    async with chromium() as browser:
        page_ = await browser.new_page()
        await page_.goto(f"{base}{ADMIN}")
        await page_.get_by_role("heading", name="Log in").wait_for()  # sent to the login form
        # By keyboard alone: the skip link first, then the fields in order, Enter sends.
        await page_.keyboard.press("Tab")
        assert await page_.evaluate("document.activeElement.textContent") == "Skip to the content"
        await page_.keyboard.press("Tab")
        await page_.keyboard.type("admin@localhost")
        await page_.keyboard.press("Tab")
        await page_.keyboard.type("root-2026")
        await page_.keyboard.press("Enter")
        await page_.get_by_role("heading", name="Dashboard").wait_for()
        charts = page_.locator("svg.chart")
        assert await charts.count() == 18  # six series, over ten minutes, an hour and a day
        sessions = page_.get_by_role("img", name="Client sessions").first
        assert int(await sessions.get_attribute("data-points") or 0) >= 2
        assert "last 1 sessions" in (await page_.locator("desc#sessions-10min-d").text_content() or "")
        await screenshot(page_, "web-admin-dashboard.png")

        # Users: create bob with the add-user command's form.
        await page_.get_by_role("navigation", name="Main").get_by_role("link", name="localhost").click()
        await page_.get_by_role("navigation", name="localhost").get_by_role("link", name="Users").click()
        await page_.get_by_role("heading", name="Users of localhost").wait_for()
        await page_.get_by_label("The Jabber ID for the account to be added").fill("bob@localhost")
        await page_.get_by_label("The password for this account").fill("builder-2026")
        await page_.get_by_label("Retype password").fill("builder-2026")
        await page_.get_by_role("button", name="Create user").click()
        await page_.get_by_role("status").filter(has_text="Done: Add User.").wait_for()
        assert await server.server.storage.accounts.exists("localhost", "bob")
        await page_.get_by_label("Search accounts").fill("bo")
        await page_.get_by_role("button", name="Search").click()
        await page_.get_by_role("link", name="bob@localhost").wait_for()
        assert await page_.get_by_role("link", name="alice@localhost").count() == 0

        # bob logs in; his page lists the session, and Kick ends it.
        bob = await server.client("bob@localhost", "builder-2026", resource="phone")
        gone = asyncio.get_running_loop().create_future()
        bob.add_event_handler("disconnected", lambda _: gone.done() or gone.set_result(True))
        await page_.get_by_role("link", name="bob@localhost").click()
        await page_.get_by_role("heading", name="bob@localhost").wait_for()
        await page_.get_by_role("cell", name="phone", exact=True).wait_for()
        await screenshot(page_, "web-admin-user.png")
        await page_.get_by_role("button", name="Kick phone").click()
        await page_.get_by_role("status").filter(has_text="Done: End User Session.").wait_for()
        await asyncio.wait_for(gone, 10)
        assert server.server.sessions.of(JID.parse("bob@localhost")) == []
        await page_.get_by_role("button", name="Disable").click()
        await page_.get_by_role("status").filter(has_text="Done: Disable User.").wait_for()
        account = await server.server.storage.accounts.get("localhost", "bob")
        assert account is not None and account.disabled
        await page_.get_by_role("button", name="Re-enable").wait_for()

        # Rooms: create one, see its page (occupants, configuration), destroy it.
        await page_.get_by_role("navigation", name="localhost").get_by_role("link", name="Rooms").click()
        await page_.get_by_label("The room's address (name@service)").fill("lobby@conference.localhost")
        await page_.get_by_role("button", name="Create room").click()
        await page_.get_by_role("link", name="lobby@conference.localhost").click()
        await page_.get_by_role("heading", name="lobby@conference.localhost").wait_for()
        await page_.get_by_role("heading", name="Configuration").wait_for()
        assert await page_.get_by_role("cell", name="persistent").count() == 1
        assert (await screenshot(page_, "web-admin-room.png")).stat().st_size > 0
        await page_.get_by_role("button", name="Destroy lobby@conference.localhost").click()
        await page_.get_by_role("status").filter(has_text="Done: Destroy a room.").wait_for()
        assert await page_.get_by_role("link", name="lobby@conference.localhost").count() == 0

        await page_.get_by_role("button", name="Log out").click()
        await page_.get_by_role("heading", name="Log in").wait_for()


# --- HTTP-level checks ----------------------------------------------------------------------------------------

async def test_a_forged_post_changes_nothing(server: Harness, http: aiohttp.ClientSession) -> None:
    base = await web_listener(server)
    await server_admin(server)
    await admin_in(http, base, "admin@localhost", "root-2026")
    token = hidden_csrf(await page(http, f"{base}{ADMIN}hosts/localhost/users"))
    form = {"accountjid": "eve@localhost", "password": "x-2026", "password-verify": "x-2026"}
    assert (await post_command(http, base, "localhost", "add-user", form, None))[0] == 403
    assert (await post_command(http, base, "localhost", "add-user", form, "f" * 64))[0] == 403
    assert not await server.server.storage.accounts.exists("localhost", "eve")
    # Without a session at all (another site's form, the cookie withheld by SameSite): the login form, no change.
    async with aiohttp.ClientSession() as stranger, stranger.post(
            f"{base}{ADMIN}hosts/localhost/commands/add-user", data={**form, "csrf": token},
            allow_redirects=False) as anonymous:
        assert anonymous.status == 303
    assert not await server.server.storage.accounts.exists("localhost", "eve")
    status, _ = await post_command(http, base, "localhost", "add-user", form, token)
    assert status == 200  # add-user has no result fields but was posted without `back`: its result page
    assert await server.server.storage.accounts.exists("localhost", "eve")
    # A command's refusal is the page again with the reason, and nothing done.
    status, text = await post_command(http, base, "localhost", "add-user",
                                      {**form, "accountjid": "eve2@localhost", "password-verify": "other"}, token)
    assert status == 400 and "the passwords do not match" in text
    assert not await server.server.storage.accounts.exists("localhost", "eve2")


async def test_a_planted_session_id_is_not_the_admins_session(server: Harness, http: aiohttp.ClientSession) -> None:
    base = await web_listener(server)
    await server_admin(server)
    planted = "9999999999.chosen-by-the-attacker"
    http.cookie_jar.update_cookies({"parley_session": planted})
    await page(http, f"{base}{ADMIN}", 303)  # the planted id is nobody's session
    await admin_in(http, base, "admin@localhost", "root-2026")
    issued = [c.value for c in http.cookie_jar if c.key == "parley_session" and c.value != planted]
    assert issued
    async with aiohttp.ClientSession(cookies={"parley_session": planted}) as attacker, \
            attacker.get(f"{base}{ADMIN}", allow_redirects=False) as seen:
        assert seen.status == 303


async def test_wrong_passwords_are_throttled(server: Harness, http: aiohttp.ClientSession) -> None:
    base = await web_listener(server)
    await server_admin(server)
    for _ in range(server.server.auth_throttle.max_failures):
        assert (await log_in(http, base, "admin@localhost", "guess", prefix=ADMIN)).status == 401
    assert (await log_in(http, base, "admin@localhost", "root-2026", prefix=ADMIN)).status == 429
    await page(http, f"{base}{ADMIN}", 303)


async def test_who_is_not_an_admin_gets_403(server: Harness, http: aiohttp.ClientSession) -> None:
    base = await web_listener(server)
    await server_admin(server)
    await server.add_user("alice", "wonderland")
    refused = await log_in(http, base, "alice@localhost", "wonderland", prefix=ADMIN)
    assert refused.status == 403 and not [c for c in http.cookie_jar if c.key == "parley_session"]
    # An admin removed while logged in (from the configuration, as a reload would): the session stays, the pages
    # do not.
    await admin_in(http, base, "admin@localhost", "root-2026")
    await server.server.hosts["example.test"].set_admins(set())
    server.server.hosts["localhost"].admins.discard(JID.parse("admin@localhost"))
    await page(http, f"{base}{ADMIN}", 403)
    forbidden = await page(http, f"{base}{ADMIN}hosts/localhost/users", 403)
    # Its 403 page still has the logout button, and logging out ends the session.
    stale = next(c.value for c in http.cookie_jar if c.key == "parley_session")
    async with http.post(f"{base}{ADMIN}logout", data={"csrf": "wrong"}) as wrong:
        assert wrong.status == 403
    async with http.post(f"{base}{ADMIN}logout", data={"csrf": hidden_csrf(forbidden)},
                         allow_redirects=False) as out:
        assert out.status == 303
    async with aiohttp.ClientSession(cookies={"parley_session": stale}) as replay, \
            replay.get(f"{base}{ADMIN}", allow_redirects=False) as again:
        assert again.status == 303


async def test_an_admin_of_one_host_sees_nothing_of_another(server: Harness, http: aiohttp.ClientSession) -> None:
    base = await web_listener(server)
    await server.add_user("admin", "root-2026")
    await server.add_user("boss", "boss-2026", host="example.test")
    await server.add_user("secretuser", "x", host="localhost")
    await admin_in(http, base, "boss@example.test", "boss-2026")
    dashboard = await page(http, f"{base}{ADMIN}")
    assert "example.test" in dashboard and "localhost" not in dashboard
    assert "svg" not in dashboard  # the process's charts are the server admins'
    for path in ("hosts/localhost/", "hosts/localhost/users", "hosts/localhost/users/secretuser",
                 "hosts/localhost/rooms", "hosts/localhost/config", "hosts/localhost/commands/add-user",
                 "hosts/nowhere.test/", "federation"):
        text = await page(http, f"{base}{ADMIN}{path}", 403)
        assert "secretuser" not in text
    users = await page(http, f"{base}{ADMIN}hosts/example.test/users")
    assert "boss@example.test" in users and "secretuser" not in users
    # Its host's page charts its own sessions only.
    await server.client("boss@example.test", "boss-2026")
    await server.client("secretuser@localhost", "x")
    server.server.hosts["example.test"].modules["web_admin"].site.sampler.sample()
    overview = await page(http, f"{base}{ADMIN}hosts/example.test/")
    assert "<title id='host-sessions-hour-t'>Client sessions of example.test</title>" in overview
    assert "last 1 sessions" in overview and "localhost" not in overview
    token = hidden_csrf(users)
    status, _ = await post_command(http, base, "localhost", "disable-user", {"accountjids": "secretuser@localhost"},
                                   token)
    assert status == 403
    account = await server.server.storage.accounts.get("localhost", "secretuser")
    assert account is not None and not account.disabled
    # Naming the other host's account in a command of one's own host is the command's refusal.
    status, text = await post_command(http, base, "example.test", "disable-user",
                                      {"accountjids": "secretuser@localhost"}, token)
    assert status == 400 and "not an account of example.test" in text
    account = await server.server.storage.accounts.get("localhost", "secretuser")
    assert account is not None and not account.disabled


async def test_configuration_page_says_where_each_value_comes_from(server: Harness,
                                                                   http: aiohttp.ClientSession) -> None:
    base = await web_listener(server)
    await server_admin(server)
    await admin_in(http, base, "admin@localhost", "root-2026")
    text = await page(http, f"{base}{ADMIN}hosts/localhost/config")
    row = re.search(r"<code>sample_interval</code></td><td>(.*?)</td><td>(.*?)</td>", text)
    assert row and row.groups() == ("1", "configuration file")
    row = re.search(r"<code>path</code></td><td>(.*?)</td><td>(.*?)</td>", text)
    assert row and row.groups() == ("/admin/", "default")
    # Every command a host's admin may run has its form; the listing commands show their result.
    commands = await page(http, f"{base}{ADMIN}hosts/localhost/commands")
    assert "get-registered-users-list" in commands
    listed = await page(http, f"{base}{ADMIN}hosts/localhost/commands/get-registered-users-list")
    token = hidden_csrf(listed)
    status, text = await post_command(http, base, "localhost", "get-registered-users-list", {"max_items": "none"},
                                      token)
    assert status == 200 and "<li>admin@localhost</li>" in text


# --- tenants, end to end ------------------------------------------------------------------------------------

def action_of(html: str, command: str) -> str:
    found = re.search(rf"<form method='post' action='([^']*/commands/{command})'", html)
    assert found, f"no form of {command}"
    return found.group(1)


async def submit(http: aiohttp.ClientSession, base: str, html: str, command: str, data: dict[str, str]) -> str:
    """Send the form of `command` found on a page (its action and CSRF token), as the browser would."""
    async with http.post(f"{base}{action_of(html, command)}", data={**data, "csrf": hidden_csrf(html)}) as done:
        text = await done.text()
        assert done.status == 200, text
        return text


async def browser_login(page_: Any, base: str, jid: str, password: str) -> None:
    await page_.goto(f"{base}{ADMIN}login")
    await page_.get_by_label("Address (user@host)").fill(jid)
    await page_.get_by_label("Password").fill(password)
    await page_.get_by_role("button", name="Log in").click()


async def test_a_tenant_created_in_the_browser_serves_its_user_at_once_and_its_admin_sees_only_it(
        server: Harness) -> None:
    """Issue #22's walk-through in Chromium: the server's admin creates a tenant and an account in it, which
    logs in over XMPP without a restart; the tenant's admin then sees that tenant and nothing else."""
    base = await web_listener(server)
    await server_admin(server)
    async with chromium() as browser:
        page_ = await browser.new_page()
        await browser_login(page_, base, "admin@localhost", "root-2026")
        await page_.get_by_role("heading", name="Dashboard").wait_for()
        await page_.get_by_role("navigation", name="Main").get_by_role("link", name="Tenants").click()
        await page_.get_by_role("heading", name="Tenants", exact=True, level=1).wait_for()
        await page_.locator("#f-create-tenant-domain").fill("t9.test")
        await page_.locator("#f-create-tenant-admins").fill("boss@t9.test")
        await page_.get_by_role("button", name="Create a tenant").click()
        await page_.get_by_role("status").filter(has_text="Tenant t9.test created and served").wait_for()
        await page_.goto(f"{base}{ADMIN}hosts/t9.test/users")
        for name in ("boss", "carol"):
            await page_.get_by_label("The Jabber ID for the account to be added").fill(f"{name}@t9.test")
            await page_.get_by_label("The password for this account").fill(f"{name}-2026")
            await page_.get_by_label("Retype password").fill(f"{name}-2026")
            await page_.get_by_role("button", name="Create user").click()
            await page_.get_by_role("status").filter(has_text="Done: Add User.").wait_for()
        await screenshot(page_, "web-admin-tenant-users.png")

    carol = await server.client("carol@t9.test", "carol-2026")  # served without a restart
    assert carol.boundjid.bare == "carol@t9.test"

    async with chromium() as browser:
        page_ = await browser.new_page()
        await browser_login(page_, base, "boss@t9.test", "boss-2026")
        await page_.get_by_role("link", name="carol@t9.test").or_(
            page_.get_by_role("heading", name="Dashboard")).first.wait_for()
        assert "localhost" not in await page_.get_by_role("navigation", name="Main").inner_text()
        response = await page_.goto(f"{base}{ADMIN}hosts/localhost/users")
        assert response is not None and response.status == 403
        assert "admin@localhost" not in await page_.content()


async def test_a_tenant_created_in_the_web_admin_serves_its_users_at_once_and_stays_its_own(
        server: Harness, http: aiohttp.ClientSession) -> None:
    base = await web_listener(server)
    await server_admin(server)
    await admin_in(http, base, "admin@localhost", "root-2026")
    tenants = await page(http, f"{base}{ADMIN}tenants")
    for domain in ("t1.test", "t2.test"):
        done = await submit(http, base, tenants, "create-tenant", {"domain": domain, "admins": f"boss@{domain}"})
        assert f"Tenant {domain} created and served" in done
        users = await page(http, f"{base}{ADMIN}hosts/{domain}/users")
        for name in ("boss", "carol"):
            await submit(http, base, users, "add-user", {"accountjid": f"{name}@{domain}",
                                                         "password": f"{name}-2026", "password-verify": f"{name}-2026"})
    listed = await page(http, f"{base}{ADMIN}tenants")
    assert "t1.test" in listed and "t2.test" in listed

    carol = await server.client("carol@t1.test", "carol-2026")  # served without a restart
    assert carol.boundjid.bare == "carol@t1.test"

    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        await admin_in(other, base, "boss@t2.test", "boss-2026")
        for path in ("", "tenants", "hosts/t2.test/users"):
            text = await page(other, f"{base}{ADMIN}{path}")
            assert "t1.test" not in text and "localhost" not in text
        for path in ("hosts/t1.test/", "hosts/t1.test/users", "hosts/t1.test/users/carol", "federation"):
            text = await page(other, f"{base}{ADMIN}{path}", 403)
            assert "carol" not in text
        # Its own tenant is its to run: it kicks nobody elsewhere, and its commands name its own accounts only.
        own = await page(other, f"{base}{ADMIN}hosts/t2.test/users")
        status, _ = await post_command(other, base, "t1.test", "end-user-session",
                                       {"accountjids": "carol@t1.test"}, hidden_csrf(own))
        assert status == 403
    assert server.server.sessions.of(JID.parse("carol@t1.test"))


async def test_every_page_of_a_server_admin_renders_and_invitations_come_and_go(
        server: Harness, http: aiohttp.ClientSession) -> None:
    base = await web_listener(server)
    await server_admin(server)
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    alice.send_presence(pto="tea@conference.localhost/Alice")  # enters (and creates) a room
    muc = server.server.hosts["localhost"].modules["muc"]
    await wait_for(lambda: JID.parse("tea@conference.localhost") in muc.rooms, 5, "the room")
    await admin_in(http, base, "admin@localhost", "root-2026")
    for path in ("", "federation", "tenants", "hosts/localhost/", "hosts/localhost/users/alice",
                 "hosts/localhost/rooms", "hosts/localhost/spam", "hosts/localhost/config",
                 "hosts/localhost/commands", "hosts/localhost/commands/edit-blacklist"):
        text = await page(http, f"{base}{ADMIN}{path}")
        assert "<h1>" in text and "Traceback" not in text
    federation = await page(http, f"{base}{ADMIN}federation")
    assert "Federation is not running (no s2s listener)." in federation  # the test server has none
    room = await page(http, f"{base}{ADMIN}hosts/localhost/rooms/tea@conference.localhost")
    assert "<td>Alice</td><td>alice@localhost/" in room
    user = await page(http, f"{base}{ADMIN}hosts/localhost/users/alice")
    roster = re.search(r"<a href='([^']*get-user-roster[^']*)'>Roster</a>", user)
    assert roster and "accountjids=alice%40localhost" in roster.group(1)
    assert "alice@localhost</textarea>" in await page(http, f"{base}{roster.group(1)}")  # the form, filled in
    await page(http, f"{base}{ADMIN}hosts/localhost/users/nobody", 404)
    await page(http, f"{base}{ADMIN}hosts/localhost/rooms/nothing@conference.localhost", 404)

    invites = await page(http, f"{base}{ADMIN}hosts/localhost/invites")
    assert "No invitation may be used." in invites
    created = await submit(http, base, invites, "generate_invite", {"host": "localhost", "uses": "2", "days": "3"})
    url = re.search(r"<output>(http[^<]+/invite/[^<]+)</output>", created)
    assert url, created
    listed = await page(http, f"{base}{ADMIN}hosts/localhost/invites")
    assert url.group(1) in listed
    async with http.post(f"{base}{action_of(listed, 'delete_invite')}", allow_redirects=False,
                         data={"host": "localhost", "token": url.group(1).rsplit("/", 1)[1],
                               "back": f"{ADMIN}hosts/localhost/invites", "csrf": hidden_csrf(listed)}) as revoked:
        assert revoked.status == 303
    assert "No invitation may be used." in await page(http, f"{base}{ADMIN}hosts/localhost/invites")


async def test_the_sampler_turns_counters_into_rates_and_keeps_an_hour_and_a_day(server: Harness) -> None:
    now = [1_000_000.0]
    sampler = Sampler(server.server, 10, clock=lambda: now[0])
    stats = server.server.stats
    for _ in range(3 * 360 + 5):  # three hours of samples, 10 s apart, each with 20 messages and a failed login
        stats.received[MESSAGE] += 20
        stats.authenticated("PLAIN", "failure")
        sampler.sample()
        now[0] += 10
    messages = sampler.points("messages", "hour")
    assert len(messages) == 360  # one hour of samples, the older ones dropped
    assert {value for _, value in messages} == {2.0}  # 20 messages in 10 s
    assert {value for _, value in sampler.points("failed_logins", "hour")} == {0.1}
    day = sampler.points("messages", "day")
    assert 36 <= len(day) <= 38 and all(value == 2.0 for _, value in day)  # five-minute averages
    assert all(later - earlier == 300 for (earlier, _), (later, _) in itertools.pairwise(day))
    stats.received[MESSAGE] = 0  # a counter that starts again is no negative rate
    sampler.sample()
    assert sampler.points("messages", "hour")[-1][1] == 0.0
    svg = line_chart("m", "Messages", "per second", sampler.points("messages", "hour"), 3600, now[0])
    assert svg.count("<polyline") == 1 and "last 0 per second" in svg


async def test_the_federation_page_lists_each_link_with_its_domains(tmp_path: Path) -> None:
    async with running_pair(tmp_path) as (a, b):
        await linked(a, b)  # alice@a.test wrote to bob@b.test: A's link out, B's link in
        await wait_for(lambda: any(link.methods for link in a.manager.links.values()) and
                       any(stream.pairs for stream in b.manager.incoming), 10, "the link authenticated")
        on_a, on_b = AdminSite(a.server, ADMIN, 10)._links(), AdminSite(b.server, ADMIN, 10)._links()
    row = r"<tr><td>(\w+)</td><td>([^<]*)</td><td>([^<]*)</td><td>[^<]*</td><td>([^<]*)</td>"
    assert ("outgoing", "a.test", "b.test", "a.test: external") in re.findall(row, on_a)
    assert ("incoming", "b.test", "a.test", "authenticated") in re.findall(row, on_b)
