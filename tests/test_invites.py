"""Invitations: XEP-0401 ad-hoc commands from slixmpp, XEP-0445 registration with a token over a raw stream,
XEP-0379 subscription with a token, expiry and uses, and the operator's commands over parleyctl's socket."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any
from xml.etree.ElementTree import Element

import aiohttp
import pytest
from slixmpp import ClientXMPP

from extensions.invites import Invites, now
from extensions.invites.web import language
from server.commands import Context
from server.config import DEFAULT_MODULES
from server.control import respond
from tests.browser_support import web_listener
from tests.conftest import Harness, RawClient
from tests.test_adhoc import PLUGINS, result_values
from tests.test_http_api import TOKEN, basic, with_http_api
from tests.test_register import ask, condition_of, legacy, unauthenticated

INVITE = "urn:xmpp:invite"
CLOSED = pytest.mark.parley_config(
    modules=[*DEFAULT_MODULES, "invites"],
    hosts={"localhost": {"registration": False, "admins": ["admin@localhost"]}, "example.test": {}},
)
pytestmark = CLOSED


def invites(server: Harness) -> Invites:
    module = server.server.hosts["localhost"].modules["invites"]
    assert isinstance(module, Invites)
    return module


async def run(client: ClientXMPP, name: str) -> dict[str, Any]:
    iq = await client.plugin["xep_0050"].send_command("localhost", f"{INVITE}#{name}", timeout=5)
    assert iq["command"]["status"] == "completed"
    return result_values(iq["command"])


def operator(server: Harness) -> Context:
    """Who runs parleyctl's commands."""
    host = server.server.hosts["localhost"]
    return Context(host, host.jid, operator=True)


async def refusal(client: ClientXMPP, name: str) -> str:
    """The error note of a command the server refused to carry out."""
    iq = await client.plugin["xep_0050"].send_command("localhost", f"{INVITE}#{name}", timeout=5)
    note = iq["command"].xml.find("{http://jabber.org/protocol/commands}note")
    assert note is not None and note.get("type") == "error", iq
    return note.text or ""


def token_of(uri: str) -> str:
    return uri.split("preauth=")[1].split(";")[0]


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def subscription(server: Harness, owner: str, contact: str) -> str | None:
    _, items = await server.server.storage.roster.get("localhost", owner)
    item = items.get(contact)
    return item.subscription if item is not None else None


async def preauth_register(server: Harness, token: str, username: str) -> tuple[RawClient, Any, Any]:
    """Present the token (XEP-0445), then register in-band; both answers."""
    raw, features = await unauthenticated(server)
    assert features.find("{urn:xmpp:ibr-token:0}register") is not None
    assert features.find(f"{{{INVITE}}}register") is not None
    await raw.send(f"<iq type='set' id='pre'><preauth xmlns='urn:xmpp:pars:0' token='{token}'/></iq>")
    presented = await raw.expect("{jabber:client}iq")
    if presented.get("type") != "result":
        return raw, presented, None
    return raw, presented, await ask(raw, "set", legacy(username, "s3cret-pass"))


# --- XEP-0401 from a client ----------------------------------------------------------------------------------

async def test_a_user_invites_a_contact_who_registers_with_the_token(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    result = await run(alice, "invite")
    assert result["uri"].startswith("xmpp:alice@localhost?roster;preauth=") and result["uri"].endswith(";ibr=y")
    assert result["landing-url"].endswith(f"/invite/{token_of(result['uri'])}")
    assert result["expire"]

    _, presented, registered = await preauth_register(server, token_of(result["uri"]), "juliet")
    assert presented.get("type") == "result" and registered.get("type") == "result", registered
    juliet = await server.client("juliet@localhost", "s3cret-pass")
    await juliet.get_roster(timeout=5)
    assert juliet.client_roster["alice@localhost"]["subscription"] == "both"
    assert await subscription(server, "alice", "juliet@localhost") == "both"


async def test_account_invitations_are_for_admins_unless_a_quota_allows(server: Harness) -> None:
    await server.add_user("admin")
    await server.add_user("bob")
    admin = await server.client("admin@localhost", plugins=PLUGINS)
    result = await run(admin, "create-account")
    assert result["uri"].startswith("xmpp:localhost?register;preauth=")
    bob = await server.client("bob@localhost", plugins=PLUGINS)
    assert "only admins" in await refusal(bob, "create-account")

    server.server.hosts["localhost"].config_options["invites.user_quota"] = 1
    mine = await run(bob, "create-account")
    assert "unused invitations" in await refusal(bob, "create-account")  # the quota: one unused invitation
    _, _, registered = await preauth_register(server, token_of(mine["uri"]), "carol")
    assert registered.get("type") == "result"
    assert await subscription(server, "bob", "carol@localhost") == "both"  # a user's invitee is a contact
    assert await subscription(server, "admin", "carol@localhost") is None


# --- XEP-0445 and bad tokens ------------------------------------------------------------------------------------

async def test_registration_is_closed_without_a_token(server: Harness) -> None:
    raw, _ = await unauthenticated(server)
    assert condition_of(await ask(raw, "set", legacy("mallory", "pass-word"))) == "not-allowed"


async def test_forged_expired_and_reused_tokens_are_refused(server: Harness) -> None:
    module = invites(server)
    _, forged, _ = await preauth_register(server, "forged-token", "mallory")
    assert condition_of(forged) == "item-not-found"

    expired = await module.create("account", days=0.001)
    await server.server.storage.invites.add(type(expired)(**{**expired.__dict__, "token": "old",
                                                             "expires": now() - timedelta(seconds=1)}))
    _, refused, _ = await preauth_register(server, "old", "mallory")
    assert condition_of(refused) == "item-not-found"

    once = await module.create("account")
    _, _, first = await preauth_register(server, once.token, "first")
    assert first.get("type") == "result"
    _, again, _ = await preauth_register(server, once.token, "second")
    assert condition_of(again) == "item-not-found"
    assert not await server.server.storage.accounts.exists("localhost", "second")
    assert not await server.server.storage.accounts.exists("localhost", "mallory")


async def test_a_token_spent_between_preauth_and_registration_creates_nothing(server: Harness) -> None:
    once = await invites(server).create("account")
    raw, _ = await unauthenticated(server)
    await raw.send(f"<iq type='set' id='pre'><preauth xmlns='urn:xmpp:pars:0' token='{once.token}'/></iq>")
    assert (await raw.expect("{jabber:client}iq")).get("type") == "result"
    _, _, other = await preauth_register(server, once.token, "quick")
    assert other.get("type") == "result"
    assert condition_of(await ask(raw, "set", legacy("slow", "pass-word"))) == "not-allowed"
    assert not await server.server.storage.accounts.exists("localhost", "slow")


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_a_multi_use_invitation_serves_its_uses_then_stops(server: Harness) -> None:
    multi = await invites(server).create("account", uses=2)
    for name in ("one", "two"):
        _, _, registered = await preauth_register(server, multi.token, name)
        assert registered.get("type") == "result"
    _, refused, _ = await preauth_register(server, multi.token, "three")
    assert condition_of(refused) == "item-not-found"


# --- XEP-0379: subscription with a token ------------------------------------------------------------------

async def test_a_subscription_request_with_the_token_is_approved_both_ways(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    await server.add_user("eve")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    token = token_of((await run(alice, "invite"))["uri"])
    bob = await server.client("bob@localhost")
    eve = await server.client("eve@localhost")
    alice.auto_authorize = None  # alice answers nothing herself: what is approved, the server approved

    async def pending() -> list[str]:
        return [jid for jid, _ in await server.server.storage.roster.list_pending("localhost", "alice")]

    forged = eve.make_presence(pto="alice@localhost", ptype="subscribe")
    forged.xml.append(_preauth("not-the-token"))
    forged.send()
    await eventually(lambda: _equal(pending(), ["eve@localhost"]), "eve's ordinary request waiting for alice")

    # As Conversations does: pre-approve the inviter (RFC 6121 3.4), then ask with the token.
    bob.make_presence(pto="alice@localhost", ptype="subscribed").send()
    request = bob.make_presence(pto="alice@localhost", ptype="subscribe")
    request.xml.append(_preauth(token))
    request.send()

    async def mutual() -> bool:
        return await subscription(server, "alice", "bob@localhost") == "both" and \
            await subscription(server, "bob", "alice@localhost") == "both"
    await eventually(mutual, "alice and bob subscribed both ways")
    assert await pending() == ["eve@localhost"]  # bob's request was approved without asking alice
    assert await subscription(server, "alice", "eve@localhost") is None

    eve.make_presence(pto="alice@localhost", ptype="unsubscribe").send()  # withdraws the request
    await eventually(lambda: _equal(pending(), []), "eve's request withdrawn")
    again = eve.make_presence(pto="alice@localhost", ptype="subscribe")
    again.xml.append(_preauth(token))  # single use: spent by bob
    again.send()
    await eventually(lambda: _equal(pending(), ["eve@localhost"]), "eve's request with a spent token: an ordinary one")
    assert await subscription(server, "alice", "eve@localhost") is None


def _preauth(token: str) -> Element:
    return Element("{urn:xmpp:pars:0}preauth", {"token": token})


async def _equal(value: Awaitable[Any], expected: Any) -> bool:
    return await value == expected


# --- the operator's commands --------------------------------------------------------------------------------

async def test_parleyctl_generates_lists_and_deletes_invitations(server: Harness) -> None:
    ctx = operator(server)
    made = await respond(["generate_invite", "localhost", "3", "2"], "/", ctx)
    assert made["exit"] == 0, made
    url = made["out"].strip()
    assert "/invite/" in url
    token = url.rsplit("/", 1)[1]
    listed = await respond(["list_invites", "localhost"], "/", ctx)
    rows = [line.split("\t") for line in listed["out"].splitlines()]
    assert [(r[0], r[1], r[3]) for r in rows] == [(token, "account", "3")]
    assert (await respond(["generate_invite", "localhost", "0", "2"], "/", ctx))["exit"] == 1
    assert (await respond(["delete_invite", "localhost", token], "/", ctx))["exit"] == 0
    assert (await respond(["list_invites", "localhost"], "/", ctx))["out"] == ""
    assert (await respond(["delete_invite", "localhost", token], "/", ctx))["exit"] == 1


async def test_the_http_api_generates_and_lists_invitations(server: Harness) -> None:
    api = await with_http_api(server)
    url = (await api.ok("generate_invite", {"host": "localhost", "uses": 2, "days": 1}, token=TOKEN))["url"]
    assert url.startswith(f"http://127.0.0.1:{api.port}/invite/")
    listed = await api.ok("list_invites", {"host": "localhost"}, token=TOKEN)
    assert [(i["token"], i["uses_left"]) for i in listed] == [(url.rsplit("/", 1)[1], 2)]
    await server.add_user("bob", "bobpw")
    status, _ = await api.call("list_invites", {"host": "localhost"}, auth=basic("bob@localhost", "bobpw"))
    assert status == 403


# --- the web page, without a browser --------------------------------------------------------------------------

async def test_the_web_form_needs_its_pages_token_and_a_valid_invitation(server: Harness) -> None:
    base = await web_listener(server)
    invite = await invites(server).create("account")
    form = {"username": "mallory", "password": "pass-word", "confirm": "pass-word"}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # cookies of an IP too
        async with http.get(f"{base}/invite/{invite.token}") as page:
            assert page.status == 200
            assert page.headers["Referrer-Policy"] == "no-referrer"
            assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
            csrf = csrf_of(await page.text())
        # A page of another site posts without the cookie, or with a token it made up.
        async with aiohttp.ClientSession() as other, \
                other.post(f"{base}/invite/{invite.token}", data={**form, "csrf": csrf}) as forged:
            assert forged.status == 403
        async with http.post(f"{base}/invite/{invite.token}", data={**form, "csrf": "made-up"}) as forged:
            assert forged.status == 403
            csrf = csrf_of(await forged.text())  # the form again, with a fresh token
        assert not await server.server.storage.accounts.exists("localhost", "mallory")
        async with http.post(f"{base}/invite/{invite.token}", data={**form, "csrf": csrf}) as done:
            assert done.status == 200 and "mallory@localhost" in await done.text()
        for token in (invite.token, "forged", "a/b", ""):
            async with http.get(f"{base}/invite/{token}") as gone:
                assert gone.status == 404, token
            async with http.post(f"{base}/invite/{token}", data={**form, "csrf": csrf}) as gone:
                assert gone.status == 404, token


def csrf_of(html: str) -> str:
    return html.split("name='csrf' value='")[1].split("'")[0]


def test_accept_language_picks_the_best_translation() -> None:
    assert language("") == "en"
    assert language("fr-CH, fr;q=0.9, de;q=0.8, en;q=0.7") == "de"
    assert language("en-GB,de;q=0.5") == "en"
    assert language("de;q=0, en;q=0.1") == "en"
    assert language("de-AT;q=bad, xx") == "en"


async def test_a_deleted_accounts_invitations_go_with_it(server: Harness) -> None:
    await server.add_user("alice")
    contact = await invites(server).create("contact", "alice")
    assert (await respond(["unregister", "alice", "localhost"], "/", operator(server)))["exit"] == 0
    assert await server.server.storage.invites.get(contact.token) is None
    _, refused, _ = await preauth_register(server, contact.token, "orphan")
    assert condition_of(refused) == "item-not-found"


@pytest.mark.parley_config(
    modules=[*DEFAULT_MODULES, "invites"],
    hosts={"localhost": {"registration": False, "module_options": {"invites": {"contact_invites_register": False}}},
           "example.test": {}},
)
async def test_contact_invitations_may_be_kept_from_registering(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    uri = (await run(alice, "invite"))["uri"]
    assert uri == f"xmpp:alice@localhost?roster;preauth={token_of(uri)}"  # no ibr=y
    _, refused, _ = await preauth_register(server, token_of(uri), "juliet")
    assert condition_of(refused) == "item-not-found"
    assert not await server.server.storage.accounts.exists("localhost", "juliet")


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_racing_uses_of_the_last_use_spend_it_once(server: Harness) -> None:
    store = server.server.storage.invites
    invite = await invites(server).create("account", uses=3)
    spent = await asyncio.gather(*(store.use(invite.token, now()) for _ in range(8)))
    assert sum(found is not None for found in spent) == 3
    left = await store.get(invite.token)
    assert left is not None and left.uses_left == 0
