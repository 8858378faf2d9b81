"""The account page (/account/) end to end in Debian's headless Chromium: a user logs in with their XMPP
address, changes the password (the old one stops working for slixmpp, the other session ends, the FAST token
is refused), sets notification settings, removes a stale OMEMO device (a contact's client is notified of the
new list), downloads the account as XEP-0227 and imports it with `parley import-piefxis` on a fresh server,
and deletes the account. Forms without the session's CSRF token, from another site, or from another
account's session change nothing. The screenshot is tests/artifacts/account-page.png (with
PARLEY_README_SCREENSHOTS=1 copied to docs/screenshots/ for the README)."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

import aiohttp
import pytest
from slixmpp import ClientXMPP

from parley import COMMANDS, build_server
from server.accounts import password_matches
from server.config import DEFAULT_MODULES
from server.jid import JID
from server.storage import RosterItem
from tests.browser_support import chromium, screenshot, static_site
from tests.conftest import Harness, free_ports, make_config
from tests.omemo_clients import AXOLOTL, DEVICELIST, PUBSUB, GajimOmemo
from tests.test_basic_modules import send_iq
from tests.test_cluster_outage import two_members
from tests.test_mam import Archive
from tests.test_notifications import Smtp
from tests.test_pep import notify_known, pep_client
from tests.test_roster_presence import befriend
from tests.test_sasl2 import AGENT, issued_token, refused
from tests.test_session_directory import cluster_config, redis_prefix

OMEMO2 = "urn:xmpp:omemo:2"
NOTES = "http://miranda-im.org/storage#notes"
CSRF = re.compile(r"name='csrf' value='([^']+)'")
STALE = 424242  # a device id that no client holds: its keys were never published
SAVE = "Save notification settings"
SETTINGS = {"Email address": "alice@example.org", "Quiet hours": "22:00-07:00", "Time zone": "Europe/Berlin"}
DELETE, CONFIRM = "Delete my account", "Type your address (alice@localhost)"


@dataclass
class Site:
    """A running server with the account page on its http listener."""

    xmpp: Harness
    url: str  # of the http listener

    @property
    def account(self) -> str:
        return f"{self.url}/account/"


def site_config(data_dir: Path, smtp_port: int) -> tuple[Any, int, int, int]:
    """A configuration with c2s, Direct TLS and http listeners, the notifications module (mailing through
    `smtp_port`) and the account page; and its three ports."""
    port, direct, http = free_ports(3)
    config = make_config(data_dir, port, direct, f"sqlite+aiosqlite:///{data_dir}/parley.db", listeners=[
        {"type": "c2s", "address": "127.0.0.1", "port": port, "tls": "starttls"},
        {"type": "c2s", "address": "127.0.0.1", "port": direct, "tls": "direct"},
        {"type": "http", "address": "127.0.0.1", "port": http, "tls": "none"},
    ], modules=[*DEFAULT_MODULES, "notifications", "account_page"], module_options={"notifications": {
        "smtp_host": "127.0.0.1", "smtp_port": smtp_port, "smtp_tls": "none", "tick": 0.05}},
        hosts={"example.test": {"modules_disabled": ["account_page"]}})  # a tenant without the page
    return config, port, direct, http


async def start_site(data_dir: Path, smtp_port: int) -> Site:
    config, port, direct, http = site_config(data_dir, smtp_port)
    server = build_server(config)
    await server.start()
    return Site(Harness(server, port, direct, data_dir), f"http://127.0.0.1:{http}")


async def stop_site(site: Site) -> None:
    await site.xmpp.close()
    await site.xmpp.server.stop()


@pytest.fixture(name="smtp")
def smtp_fixture() -> Any:
    server = Smtp(free_ports(1)[0])
    server.start()
    yield server
    server.stop()


@pytest.fixture(name="site")
async def site_fixture(tmp_path: Path, smtp: Smtp) -> AsyncIterator[Site]:
    site = await start_site(tmp_path, smtp.port)
    try:
        yield site
    finally:
        await stop_site(site)


# --- the browser's side ------------------------------------------------------------------------------

async def log_in(page: Any, site: Site, jid: str, password: str = "secret") -> None:
    """Open the account page, which sends a visitor to the login form, and log in by the form's labels."""
    await page.goto(site.account)
    await submit(page, "Log in", {"Address (user@host)": jid, "Password": password})
    await page.get_by_role("heading", name=jid, exact=True).wait_for()


async def submit(page: Any, button: str, fields: dict[str, str], *, enter: bool = False) -> None:
    """Fill a form's fields by their labels and send it with its button (or Enter in the last field)."""
    for label, value in fields.items():
        await page.get_by_label(label, exact=True).fill(value)
    if enter:
        await page.get_by_label(label, exact=True).press("Enter")
    else:
        await page.get_by_role("button", name=button).click()


async def said(page: Any, role: str = "status") -> str:
    """The text of the page's status line (or its alert, with role 'alert')."""
    await page.get_by_role(role).wait_for()
    return str(await page.get_by_role(role).inner_text())


async def csrf_of(page: Any) -> str:
    return str(await page.locator("input[name=csrf]").first.get_attribute("value"))


async def cookie_header(context: Any) -> str:
    """The browser's cookies for the site, as a Cookie header another client can replay."""
    return "; ".join(f"{c['name']}={c['value']}" for c in await context.cookies())


async def post(site: Site, path: str, data: dict[str, str], cookie: str = "") -> int:
    """A form POST from a client other than the browser; the HTTP status (redirects not followed)."""
    headers = {"Cookie": cookie} if cookie else {}
    async with aiohttp.ClientSession() as http, \
            http.post(f"{site.account}{path}", data=data, headers=headers, allow_redirects=False) as response:
        return response.status


async def logs_in(site: Site, jid: str, password: str) -> bool:
    """Whether slixmpp logs in with that password."""
    try:
        client = await site.xmpp.client(jid, password)
    except AssertionError:
        return False
    await client.disconnect()
    return True


async def unthrottled(site: Site) -> None:
    """Wait until logins from this address are not refused for the failures before (the lockout is short)."""
    await asyncio.sleep(site.xmpp.server.auth_throttle.blocked_for("ip:127.0.0.1"))


def ended(client: ClientXMPP) -> asyncio.Future[bool]:
    """Done when the server ends the client's stream."""
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    client.add_event_handler("disconnected", lambda _: future.done() or future.set_result(True))
    return future


# --- password ----------------------------------------------------------------------------------------

async def test_a_new_password_ends_the_old_one_the_other_sessions_and_the_fast_tokens(site: Site) -> None:
    await site.xmpp.add_user("alice")
    token = await issued_token(site.xmpp)  # a FAST token of a device of alice's
    phone = await site.xmpp.client("alice@localhost", resource="phone")
    phone_ended = ended(phone)
    laptop = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # another browser of hers
    assert (await http_login(laptop, site.url, "alice@localhost"))[0] == 200

    async with chromium() as browser, laptop:
        page = await browser.new_page()
        await log_in(page, site, "alice@localhost")
        new = {"New password": "looking-glass", "New password again": "looking-glass"}
        await submit(page, "Change password", {"Current password": "not the password", **new})
        assert "current password is wrong" in await said(page, "alert")
        assert not phone_ended.done()

        await submit(page, "Change password", {"Current password": "secret", **new}, enter=True)  # by keyboard
        assert "Password changed" in await said(page)
        async with laptop.get(site.account) as response:  # the other browser is logged out
            assert response.url.path == "/account/login"
        # This browser stays logged in, its forms carrying its new session's token.
        await submit(page, SAVE, {"Quiet hours": "soon"})  # a form past the CSRF check is answered, not 403
        assert "HH:MM-HH:MM" in await said(page, "alert")

    await asyncio.wait_for(phone_ended, 5)
    assert not await logs_in(site, "alice@localhost", "secret")
    await unthrottled(site)  # slixmpp tried each mechanism with the old password
    assert await logs_in(site, "alice@localhost", "looking-glass")
    assert await site.xmpp.server.storage.fast.of_device("localhost", "alice", AGENT) == []
    assert await refused(site.xmpp, token)


async def test_guessing_the_current_password_on_the_page_is_throttled(site: Site) -> None:
    """Wrong current passwords count against the XMPP logins' throttle: a stolen page session is no cheaper way
    to guess the password. After three, even the right one is refused for the lockout's length."""
    await site.xmpp.add_user("alice")
    site.xmpp.server.auth_throttle.lockout = 60.0  # as a reload of [limits] sets it: longer than this test
    alerts = []
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        _, page = await http_login(http, site.url, "alice@localhost")
        csrf = CSRF.search(page)
        assert csrf is not None
        for old in ("guess 1", "guess 2", "guess 3", "secret"):
            async with http.post(f"{site.account}password", data={
                    "old": old, "new": "stolen", "again": "stolen", "csrf": csrf.group(1)}) as response:
                alert = re.search(r"role='alert' class='error'>([^<]*)<", await response.text())
                assert response.status == 400 and alert is not None
                alerts.append(alert.group(1))
    assert alerts[:3] == ["The current password is wrong."] * 3
    assert alerts[3].startswith("Too many failed attempts; try again in ")
    assert await password_matches(site.xmpp.server.storage, "localhost", "alice", "secret")


async def http_login(http: aiohttp.ClientSession, base: str, jid: str, password: str = "secret") -> tuple[int, str]:
    """Log in with the login form over plain HTTP (its double-submit token included); the status and text of
    the page the login led to."""
    async with http.get(f"{base}/account/login") as response:
        token = CSRF.search(await response.text())
    assert token is not None
    async with http.post(f"{base}/account/login", data={"jid": jid, "password": password,
                                                         "csrf": token.group(1)}) as response:
        return response.status, await response.text()


async def test_a_password_change_ends_the_sessions_on_every_member_of_a_cluster(tmp_path: Path) -> None:
    """The page is served by one member, the phone's session is held by the other: it ends all the same."""
    http_port = free_ports(1)[0]

    def member(*extra: dict[str, Any]) -> Any:
        port, direct = free_ports(2)
        return cluster_config(tmp_path, prefix, modules=[*DEFAULT_MODULES, "account_page"], listeners=[
            {"type": "c2s", "address": "127.0.0.1", "port": port, "tls": "starttls"},
            {"type": "c2s", "address": "127.0.0.1", "port": direct, "tls": "direct"}, *extra])

    async with redis_prefix() as prefix, two_members(
            member({"type": "http", "address": "127.0.0.1", "port": http_port, "tls": "none"}), member(),
            tmp_path) as (first, second):
        for declared in COMMANDS:  # what build_server gives `parley serve`; the members here are bare servers
            first.server.commands.add(declared)
        await first.add_user("alice")
        phone = await second.client("alice@localhost", resource="phone")
        phone_ended = ended(phone)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            _, page = await http_login(http, f"http://127.0.0.1:{http_port}", "alice@localhost")
            csrf = CSRF.search(page)
            assert csrf is not None
            async with http.post(f"http://127.0.0.1:{http_port}/account/password", data={
                    "old": "secret", "new": "looking-glass", "again": "looking-glass",
                    "csrf": csrf.group(1)}) as response:
                assert response.status == 200 and "1 session(s) ended" in await response.text()
        await asyncio.wait_for(phone_ended, 5)
        assert await second.client("alice@localhost", "looking-glass")


# --- notifications -----------------------------------------------------------------------------------

async def test_notification_settings_are_saved_and_read_back(site: Site, smtp: Smtp) -> None:
    await site.xmpp.add_user("alice")
    async with chromium() as browser:
        page = await browser.new_page()
        await log_in(page, site, "alice@localhost")
        await submit(page, SAVE, SETTINGS)
        assert "confirmation link was sent to alice@example.org" in await said(page)

        await page.goto(site.account)  # read back from storage
        for label, value in SETTINGS.items():
            assert await page.get_by_label(label, exact=True).input_value() == value
        assert "has not been confirmed yet" in await page.locator("#notifications + p + p").inner_text()

        await submit(page, SAVE, {"Quiet hours": "25:00-07:00"})  # refused: nothing changes
        assert "HH:MM-HH:MM" in await said(page, "alert")

    module = site.xmpp.server.hosts["localhost"].modules["notifications"]
    prefs = await module.preferences(JID.parse("alice@localhost"))  # type: ignore[attr-defined]
    assert (prefs.email, prefs.verified, prefs.quiet, prefs.zone) == \
        ("alice@example.org", False, "22:00-07:00", "Europe/Berlin")
    [confirmation] = await smtp.mailbox.wait("alice@example.org")
    assert confirmation["Subject"] == "Confirm notifications for alice@localhost"


# --- OMEMO devices -----------------------------------------------------------------------------------

def device_ids(message: Element) -> dict[str, list[int]]:
    """The device ids of each device list a PEP notification carries, by node."""
    found = {}
    for items in message.iter(f"{{{PUBSUB}#event}}items"):
        found[items.get("node", "")] = [int(d.get("id", "0")) for d in items.iter()
                                        if d.tag in (f"{{{AXOLOTL}}}device", f"{{{OMEMO2}}}device")]
    return found


async def hears(inbox: asyncio.Queue[Element], node: str, devices: list[int]) -> bool:
    """Whether a notification of the list `node` naming exactly `devices` comes (those before it, such as the
    last item sent when the contact came online, may name others)."""
    while True:
        try:
            message = await asyncio.wait_for(inbox.get(), 10)
        except TimeoutError:
            return False
        if device_ids(message).get(node) == devices:
            return True


async def test_a_stale_omemo_device_is_removed_and_a_contact_sees_the_new_list(site: Site) -> None:
    for name in ("alice", "bob"):
        await site.xmpp.add_user(name)
    await befriend(site.xmpp, "alice", "bob")
    alice = await site.xmpp.client("alice@localhost", resource="desktop", plugins=("xep_0030", "xep_0060"))
    omemo = GajimOmemo(alice)  # omemo-dr publishes its device and bundle, as Gajim does
    await omemo.publish()
    # The list also names a device long gone (its keys never published), in both OMEMO generations.
    await omemo.iq("set", f"<pubsub xmlns='{PUBSUB}'><publish node='{DEVICELIST}'><item id='current'>"
                          f"<list xmlns='{AXOLOTL}'><device id='{omemo.device_id}'/><device id='{STALE}'/></list>"
                          "</item></publish></pubsub>")
    await omemo.iq("set", f"<pubsub xmlns='{PUBSUB}'><publish node='{OMEMO2}:devices'><item id='current'>"
                          f"<devices xmlns='{OMEMO2}'><device id='7' label='Laptop'/><device id='{STALE}'/></devices>"
                          "</item></publish></pubsub>")
    await omemo.iq("set", f"<pubsub xmlns='{PUBSUB}'><publish node='{OMEMO2}:bundles'><item id='7'>"
                          f"<bundle xmlns='{OMEMO2}'/></item></publish></pubsub>")
    alice.send_presence()
    bob, inbox = await pep_client(site.xmpp, "bob@localhost", DEVICELIST, f"{OMEMO2}:devices")
    await notify_known(site.xmpp, "alice@localhost", str(bob.boundjid))

    async with chromium() as browser:
        page = await browser.new_page()
        await log_in(page, site, "alice@localhost")
        rows = page.locator("#devices ~ table tbody tr")
        assert await rows.count() == 4
        table = await page.locator("#devices ~ table").inner_text()
        assert f"{omemo.device_id}\t-\tlegacy OMEMO\tpublished" in table
        assert f"{STALE}\t-\tlegacy OMEMO\tmissing (stale)" in table
        assert "7\tLaptop\tOMEMO 2\tpublished" in table
        await submit(page, SAVE, SETTINGS)  # for the README's picture
        await said(page)
        await screenshot(page, "account-page.png")

        await page.get_by_role("button", name=f"Remove device {STALE} (legacy OMEMO)").click()
        assert f"Device {STALE} was removed" in await said(page)
        assert await hears(inbox, DEVICELIST, [omemo.device_id])  # bob's client is told
        await page.get_by_role("button", name=f"Remove device {STALE} (OMEMO 2)").click()
        assert await hears(inbox, f"{OMEMO2}:devices", [7])
        assert await rows.count() == 2

    # What a client fetching the list now gets, and the bundle of the remaining device is untouched.
    fetched = await send_iq(bob, "get", f"<pubsub xmlns='{PUBSUB}'><items node='{DEVICELIST}'/></pubsub>",
                            "alice@localhost")
    assert [int(d.get("id", "0")) for d in fetched.iter(f"{{{AXOLOTL}}}device")] == [omemo.device_id]
    await omemo.fetch("alice@localhost")


# --- export and import -------------------------------------------------------------------------------

def parley_command() -> list[str]:
    """The `parley` console script of this environment."""
    script = Path(sys.executable).with_name("parley")
    return [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from parley import main; "
                                                                        "sys.exit(main(sys.argv[1:]))"]


async def test_the_exported_account_imports_on_a_fresh_server(site: Site, smtp: Smtp, tmp_path: Path) -> None:
    storage = site.xmpp.server.storage
    await site.xmpp.add_user("alice", "wonderland")
    await site.xmpp.add_user("bob")
    await storage.roster.put("localhost", "alice", RosterItem("bob@localhost", "Bobby", "both", groups=("Friends",)))
    await storage.roster.put("localhost", "bob", RosterItem("alice@localhost", None, "both"))
    alice = await site.xmpp.client("alice@localhost", "wonderland")
    bob = await site.xmpp.client("bob@localhost")
    await send_iq(alice, "set", "<vCard xmlns='vcard-temp'><FN>Alice Liddell</FN></vCard>")
    await send_iq(alice, "set", "<query xmlns='jabber:iq:private'><storage xmlns='storage:bookmarks'>"
                                "<conference jid='tea@conference.localhost' name='Tea party' autojoin='true'>"
                                "<nick>alice</nick></conference></storage></query>")
    await send_iq(alice, "set", f"<query xmlns='jabber:iq:private'><notes xmlns='{NOTES}'><note>n</note></notes>"
                                "</query>")
    alice.send_message(mto="bob@localhost", mbody="down the rabbit hole", mtype="chat")
    history = await Archive(alice).all()
    assert [r.body for r in history] == ["down the rabbit hole"]
    await bob.disconnect()

    async with chromium() as browser:
        page = await browser.new_page()
        await log_in(page, site, "alice@localhost", "wonderland")
        async with page.expect_download() as info:
            await page.get_by_role("button", name="Download my data").click()
        download = await info.value
        assert download.suggested_filename.startswith("alice_at_localhost-")
        assert download.suggested_filename.endswith(".xml")
        exported = tmp_path / "alice.xml"
        await download.save_as(str(exported))

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "parley.toml").write_text(f'data_dir = "{fresh}"\n[hosts."localhost"]\n')
    done = await asyncio.create_subprocess_exec(*parley_command(), "import-piefxis", str(exported),
                                                "--config", str(fresh / "parley.toml"),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await done.communicate()
    assert done.returncode == 0, err.decode()
    assert out.decode().startswith("imported 1 user(s), 1 roster item(s), 1 vCard(s), 2 private document(s), "
                                   "0 offline message(s), 1 archived message(s)"), out.decode()

    other = await start_site(fresh, smtp.port)  # a new server on the fresh data folder
    try:
        moved = await other.xmpp.client("alice@localhost", "wonderland", plugins=("xep_0054",))
        items = (await moved.get_roster())["roster"]["items"]
        assert (items["bob@localhost"]["name"], items["bob@localhost"]["groups"]) == ("Bobby", ["Friends"])
        assert (await moved.plugin["xep_0054"].get_vcard("alice@localhost"))["vcard_temp"]["FN"] == "Alice Liddell"
        assert [(r.id, r.body) for r in await Archive(moved).all()] == [(r.id, r.body) for r in history]
        notes = await send_iq(moved, "get", f"<query xmlns='jabber:iq:private'><notes xmlns='{NOTES}'/></query>")
        assert notes.findtext(f".//{{{NOTES}}}note") == "n"
        marks = await send_iq(moved, "get", "<query xmlns='jabber:iq:private'>"
                                            "<storage xmlns='storage:bookmarks'/></query>")
        conference = marks.find(".//{storage:bookmarks}conference")
        assert conference is not None and conference.get("jid") == "tea@conference.localhost"
        assert conference.get("name") == "Tea party"
    finally:
        await stop_site(other)
    shutil.rmtree(fresh)


# --- deletion ----------------------------------------------------------------------------------------

async def test_the_account_is_deleted_after_its_address_and_password_are_typed_again(site: Site) -> None:
    await site.xmpp.add_user("alice")
    await site.xmpp.server.storage.roster.put("localhost", "alice", RosterItem("bob@localhost", "Bob", "both"))
    phone = await site.xmpp.client("alice@localhost", resource="phone")
    phone_ended = ended(phone)
    async with chromium() as browser:
        page = await browser.new_page()
        await log_in(page, site, "alice@localhost")
        session = await cookie_header(browser)
        await submit(page, DELETE, {CONFIRM: "bob@localhost", "Password": "secret"})
        assert "Type your address" in await said(page, "alert")
        await submit(page, DELETE, {CONFIRM: "alice@localhost", "Password": "wrong"})
        assert "password is wrong" in await said(page, "alert")
        assert await site.xmpp.server.storage.accounts.exists("localhost", "alice")
        assert not phone_ended.done()

        await submit(page, DELETE, {CONFIRM: "alice@localhost", "Password": "secret"})
        await page.get_by_role("heading", name="Account deleted").wait_for()
        await page.goto(site.account)  # logged out: the login form
        await page.get_by_role("button", name="Log in").wait_for()

    assert not await site.xmpp.server.storage.accounts.exists("localhost", "alice")
    assert (await site.xmpp.server.storage.roster.get("localhost", "alice"))[1] == {}  # its data went with it
    await asyncio.wait_for(phone_ended, 5)
    assert not await logs_in(site, "alice@localhost", "secret")
    # The page's session ended in storage: its cookie, replayed, does not reach an account made again.
    await site.xmpp.add_user("alice", "another")
    async with aiohttp.ClientSession() as http, \
            http.get(site.account, headers={"Cookie": session}, allow_redirects=False) as response:
        assert response.status == 303 and response.headers["Location"] == "/account/login"


# --- forged and foreign requests ---------------------------------------------------------------------

async def test_forged_and_foreign_requests_change_nothing(site: Site) -> None:
    await site.xmpp.add_user("alice")
    await site.xmpp.add_user("bob", "builder")
    async with chromium() as browser:
        page = await browser.new_page()
        await log_in(page, site, "alice@localhost")
        alice_cookie, alice_csrf = await cookie_header(browser), await csrf_of(page)
        change = {"old": "secret", "new": "stolen", "again": "stolen"}

        # Alice's cookie without her CSRF token, or with a made-up one: 403, nothing changed.
        assert await post(site, "password", change, alice_cookie) == 403
        assert await post(site, "password", {**change, "csrf": "forged"}, alice_cookie) == 403
        assert await post(site, "delete", {"confirm": "alice@localhost", "password": "secret"}, alice_cookie) == 403
        # A page of another site posting the form from alice's browser: her SameSite cookie stays home.
        evil = (f"<form id='f' method='post' action='{site.account}password'><input name='old' value='secret'>"
                "<input name='new' value='stolen'><input name='again' value='stolen'></form>"
                "<button onclick=\"document.getElementById('f').submit()\">Win a prize</button>")
        async with static_site({"/": evil}, Path(__file__).parent) as origin:
            attacker = await browser.new_page()
            await attacker.goto(origin.replace("127.0.0.1", "localhost") + "/")  # another site than the page's
            await attacker.get_by_role("button", name="Win a prize").click()
            await attacker.get_by_role("button", name="Log in").wait_for()  # no session came along
            assert attacker.url == f"{site.account}login"

        # Bob's session with alice's CSRF token, and with his own but alice's address: nothing of alice's.
        other = await browser.browser.new_context()  # another browser profile: bob's cookies only
        bob_page = await other.new_page()
        await log_in(bob_page, site, "bob@localhost", "builder")
        bob_cookie = await cookie_header(other)
        assert await post(site, "password", {**change, "csrf": alice_csrf}, bob_cookie) == 403
        bob_csrf = await csrf_of(bob_page)
        assert await post(site, "delete", {"confirm": "alice@localhost", "password": "secret", "csrf": bob_csrf,
                                           "jid": "alice@localhost"}, bob_cookie) == 400
        assert await post(site, "password", {**change, "csrf": bob_csrf, "jid": "alice@localhost"}, bob_cookie) \
            == 400  # the old password is checked against bob's account, the one logged in
        await other.close()

    assert await site.xmpp.server.storage.accounts.exists("localhost", "alice")
    assert await logs_in(site, "alice@localhost", "secret")
    assert await logs_in(site, "bob@localhost", "builder")


async def test_the_page_needs_a_login_to_an_account_of_a_host_that_offers_it(site: Site) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(site.account, allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == "/account/login"
        async with http.get(f"{site.account}login") as response:
            text = await response.text()
            assert response.status == 200 and "csrf" in text
            assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    await site.xmpp.add_user("carol", host="example.test")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        status, text = await http_login(http, site.url, "carol@example.test")
    assert status == 403 and "may not use these pages" in text
