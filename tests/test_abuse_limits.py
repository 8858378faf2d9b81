"""Anti-abuse limits over real sockets: deny-lists reloaded on SIGHUP's path for subscriptions and federation,
the rate on messages to non-contacts with the admins' note, and XEP-0157 contact addresses in disco#info."""

from __future__ import annotations

import asyncio
from xml.etree.ElementTree import Element

import pytest
from aiohttp import web

from extensions.abuse_limits import Bucket, parse_deny_list
from s2s.manager import S2SManager
from server.config import DEFAULT_MODULES
from server.jid import JID
from tests.conftest import Harness, free_port
from tests.test_basic_modules import wait_for
from tests.test_block_strangers import add_contact, logged_in, next_body, subscriptions
from tests.test_offline import collect
from tests.test_roster_presence import sync

MODULES = [*DEFAULT_MODULES, "abuse_limits"]
STANZAS = "{urn:ietf:params:xml:ns:xmpp-stanzas}"


def test_deny_list_format() -> None:
    text = "# spammers\nspam.example\n\n  bad@elsewhere.example/phone  # a resource counts as its account\n@@@\n"
    assert parse_deny_list(text) == {JID.parse("spam.example"), JID.parse("bad@elsewhere.example")}


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = Bucket(2, 3600, now=0.0)  # one token a second
    assert bucket.take(0.0) and bucket.take(0.0) and not bucket.take(0.5)
    assert bucket.take(1.6) and not bucket.take(1.6)
    assert bucket.take(100.0) and bucket.take(100.0) and not bucket.take(100.0)  # never more than the burst


def limited(error: Element) -> bool:
    return error.find(f"{{jabber:client}}error/{STANZAS}policy-violation") is not None


def subscribe(sender: str, to: str) -> Element:
    return Element("{jabber:client}presence", {"from": sender, "to": to, "type": "subscribe"})


@pytest.mark.parley_config(modules=MODULES)
async def test_a_deny_list_reloaded_on_sighup_refuses_subscriptions_and_federation(server: Harness) -> None:
    deny = server.data_dir / "deny.txt"
    deny.write_text("spam.example\nmallory@example.test\n")
    source = server.data_dir / "server.toml"
    source.write_text(f'modules = {MODULES!r}\n'
                      '[hosts."localhost"]\nadmins = ["admin@localhost"]\nregistration = true\n[hosts."example.test"]\n'
                      f'[module_options.abuse_limits]\ndeny_files = ["{deny}"]\n')
    server.server.config.source = source  # as if started with --config server.toml
    federation = S2SManager(server.server)  # federation without listeners: its policy and outgoing checks
    await federation.start([])
    server.server.s2s = federation
    try:
        alice = await logged_in(server, "alice@localhost")
        mallory = await logged_in(server, "mallory@example.test")
        asked = subscriptions(alice)
        mallory.send_presence(pto="alice@localhost", ptype="subscribe")
        assert await asyncio.wait_for(asked.get(), 5) == "mallory@example.test"  # nothing denied yet
        assert federation.policy.allowed("spam.example")

        server.server.control.reload_soon()  # what SIGHUP does

        async def denied() -> bool:
            return not federation.policy.allowed("muc.spam.example")
        await wait_for(denied)
        assert federation.policy.allowed("fine.example")
        mallory.send_presence(pto="alice@localhost", ptype="subscribe")
        await server.server.router.send(subscribe("eve@sub.spam.example", "alice@localhost"))
        await server.server.router.send(subscribe("carol@fine.example", "alice@localhost"))
        assert await asyncio.wait_for(asked.get(), 5) == "carol@fine.example"
        await sync(mallory, alice)
        assert asked.empty()

        errors = collect(alice, "error")
        alice.send_message(mto="bob@spam.example", mbody="hello?", mtype="chat")
        error = await asyncio.wait_for(errors.get(), 5)
        assert error.find(f"{{jabber:client}}error/{STANZAS}not-allowed") is not None

        deny.write_text("")  # emptied: the next reload lifts it
        server.server.control.reload_soon()

        async def lifted() -> bool:
            return federation.policy.allowed("spam.example")
        await wait_for(lifted)
        await server.server.router.send(subscribe("eve@sub.spam.example", "alice@localhost"))
        assert await asyncio.wait_for(asked.get(), 5) == "eve@sub.spam.example"
    finally:
        server.server.s2s = None
        await federation.stop()


@pytest.mark.parley_config(modules=MODULES)
async def test_a_deny_list_from_a_url_and_one_that_fails_later_keeps_the_last(server: Harness) -> None:
    served = {"text": "spam.example\n", "status": 200}

    async def deny_list(request: web.Request) -> web.Response:
        return web.Response(text=served["text"], status=served["status"])

    app = web.Application()
    app.router.add_get("/deny.txt", deny_list)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        host = server.server.hosts["localhost"]
        host.config_options["abuse_limits.deny_urls"] = (f"http://127.0.0.1:{port}/deny.txt",)
        module = host.modules["abuse_limits"]
        await module.load()
        assert module.denied == {JID.parse("spam.example")}
        assert await server.server.storage.kv.get("", "", "s2s-lists", "loaded:localhost") == ["spam.example"]
        alice = await logged_in(server, "alice@localhost")
        asked = subscriptions(alice)
        await server.server.router.send(subscribe("eve@spam.example", "alice@localhost"))
        await server.server.router.send(subscribe("carol@fine.example", "alice@localhost"))
        assert await asyncio.wait_for(asked.get(), 5) == "carol@fine.example"
        served["status"] = 500
        await module.load()
        assert module.denied == {JID.parse("spam.example")}
    finally:
        await runner.cleanup()


@pytest.mark.parley_config(modules=MODULES, module_options={"abuse_limits": {"deny_files": ["/nonexistent/deny"]}})
async def test_an_unreadable_deny_list_denies_nothing_and_the_server_runs(server: Harness) -> None:
    alice = await logged_in(server, "alice@localhost")
    asked = subscriptions(alice)
    await server.server.router.send(subscribe("carol@fine.example", "alice@localhost"))
    assert await asyncio.wait_for(asked.get(), 5) == "carol@fine.example"


@pytest.mark.parley_config(modules=MODULES, module_options={"abuse_limits": {
    "strangers_burst": 3, "strangers_per_hour": 1, "notify_interval": 3600.0}})
async def test_messages_to_strangers_past_the_burst_bounce_and_admins_hear_once(server: Harness) -> None:
    await server.add_user("admin")
    admin = await logged_in(server, "admin@localhost")
    admin_inbox = collect(admin)
    alice = await logged_in(server, "alice@localhost")
    await add_contact(server, "alice", "bob@localhost")
    bob = await logged_in(server, "bob@localhost")
    bob_inbox = collect(bob)
    errors = collect(alice, "error")
    for n in range(6):
        alice.send_message(mto=f"stranger{n}@example.test", mbody=f"hello {n}", mtype="chat")
    # No such accounts: the first three get through the limit and bounce for that, the others for the limit.
    bounced = [await asyncio.wait_for(errors.get(), 5) for _ in range(6)]
    assert [b.get("from") for b in bounced if limited(b)] == [f"stranger{n}@example.test" for n in (3, 4, 5)]
    alice.send_message(mto="bob@localhost", mbody="contacts are not limited", mtype="chat")
    assert await next_body(bob_inbox) == ("alice@localhost", "contacts are not limited")
    sender, note = await next_body(admin_inbox)
    assert sender == "localhost" and note.startswith("alice@localhost passed the limit of messages to non-contacts")
    await sync(alice, admin)
    assert admin_inbox.empty() and errors.empty()


@pytest.mark.parley_config(modules=MODULES, module_options={"abuse_limits": {"strangers_burst": 0}})
async def test_no_rate_when_the_burst_is_zero(server: Harness) -> None:
    alice = await logged_in(server, "alice@localhost")
    errors = collect(alice, "error")
    for n in range(40):
        alice.send_message(mto=f"stranger{n}@example.test", mbody="hi", mtype="chat")
    await sync(alice)
    assert not [b for b in [errors.get_nowait() for _ in range(errors.qsize())] if limited(b)]


SERVERINFO = "http://jabber.org/network/serverinfo"


@pytest.mark.parley_config(module_options={"disco": {
    "abuse_addresses": ["mailto:abuse@localhost", "xmpp:abuse@localhost"],
    "support_addresses": ["https://localhost/support"]}})
async def test_contact_addresses_in_the_servers_disco_info(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost", plugins=("xep_0030", "xep_0128"))
    info = await alice.plugin["xep_0030"].get_info("localhost", timeout=5)
    [form] = [x for x in info["disco_info"].xml.iterfind("{jabber:x:data}x")]
    fields = {f.get("var"): [v.text for v in f.iterfind("{jabber:x:data}value")]
              for f in form.iterfind("{jabber:x:data}field")}
    assert fields == {"FORM_TYPE": [SERVERINFO],
                      "abuse-addresses": ["mailto:abuse@localhost", "xmpp:abuse@localhost"],
                      "support-addresses": ["https://localhost/support"]}
    account = await alice.plugin["xep_0030"].get_info("alice@localhost", timeout=5)
    assert account["disco_info"].xml.find("{jabber:x:data}x") is None  # the server's, not its accounts'


