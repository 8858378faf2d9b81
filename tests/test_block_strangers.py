"""Block strangers over real sockets: a stranger's message and subscription request are dropped, bounced or
held, while contacts, the user's own server and the rooms the user joined still get through."""

from __future__ import annotations

import asyncio
from xml.etree.ElementTree import Element

import pytest
from slixmpp import ClientXMPP

from server.config import DEFAULT_MODULES
from server.jid import JID
from server.stanza import Stanza
from server.storage import RosterItem
from tests.conftest import Harness
from tests.test_adhoc import PLUGINS
from tests.test_adhoc import run as run_adhoc
from tests.test_muc import create, join
from tests.test_offline import collect
from tests.test_roster_presence import sync
from tests.test_service_admin import complete

MODULES = [*DEFAULT_MODULES, "block_strangers"]


async def logged_in(server: Harness, jid: str) -> ClientXMPP:
    local, domain = jid.split("@")
    if not await server.server.storage.accounts.exists(domain, local):
        await server.add_user(local, host=domain)
    client = await server.client(jid, plugins=(*PLUGINS, "xep_0045", "xep_0199"))
    client.auto_authorize = None
    client.auto_subscribe = False
    client.send_presence()
    await sync(client)
    return client


def subscriptions(client: ClientXMPP) -> asyncio.Queue[str]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    client.add_event_handler("presence_subscribe", lambda p: queue.put_nowait(str(p["from"].bare)))
    return queue


async def next_body(queue: asyncio.Queue[Element]) -> tuple[str, str]:
    el = await asyncio.wait_for(queue.get(), 5)
    return el.get("from", "").split("/")[0], el.findtext("{jabber:client}body") or ""


async def add_contact(server: Harness, user: str, contact: str) -> None:
    """`contact` in `user`'s roster without any subscription: known, not subscribed."""
    await server.server.storage.roster.put("localhost", user, RosterItem(contact))


async def strangers_then_contact(server: Harness, alice: ClientXMPP) -> tuple[ClientXMPP, ClientXMPP]:
    """A stranger (on the other host) and a contact send alice a message and a subscription request each,
    the stranger first, the server handling all of the stranger's stanzas before the contact's."""
    stranger = await logged_in(server, "mallory@example.test")
    await add_contact(server, "alice", "bob@localhost")
    bob = await logged_in(server, "bob@localhost")
    stranger.send_message(mto="alice@localhost", mbody="buy now", mtype="chat")
    stranger.send_presence(pto="alice@localhost", ptype="subscribe")
    await sync(stranger)
    bob.send_message(mto="alice@localhost", mbody="hi, it's bob", mtype="chat")
    bob.send_presence(pto="alice@localhost", ptype="subscribe")
    await sync(bob)
    return stranger, bob


@pytest.mark.parley_config(modules=MODULES)
async def test_a_user_turns_it_on_and_strangers_are_dropped_but_contacts_pass(server: Harness) -> None:
    alice = await logged_in(server, "alice@localhost")
    form = (await run_adhoc(alice, "block-strangers"))["form"]  # the form shows the current setting
    assert form.get_fields()["block"].get_value() == "off"
    done = await complete(alice, "block-strangers", block="on")
    assert done["form"].get_fields()["block"].get_value() == "on"
    inbox, asked = collect(alice), subscriptions(alice)
    await strangers_then_contact(server, alice)
    assert await next_body(inbox) == ("bob@localhost", "hi, it's bob")
    assert await asyncio.wait_for(asked.get(), 5) == "bob@localhost"
    assert inbox.empty() and asked.empty()


@pytest.mark.parley_config(modules=MODULES)
async def test_off_by_default_and_after_turning_it_off(server: Harness) -> None:
    alice = await logged_in(server, "alice@localhost")
    await complete(alice, "block-strangers", block="on")
    await complete(alice, "block-strangers", block="off")
    inbox, asked = collect(alice), subscriptions(alice)
    await strangers_then_contact(server, alice)
    assert await next_body(inbox) == ("mallory@example.test", "buy now")
    assert await asyncio.wait_for(asked.get(), 5) == "mallory@example.test"


@pytest.mark.parley_config(modules=MODULES, module_options={"block_strangers": {"default": True}})
async def test_rooms_the_user_joined_and_its_own_server_get_through(server: Harness) -> None:
    room = "lounge@conference.example.test"  # not a service of alice's server: joined, so known
    alice = await logged_in(server, "alice@localhost")
    mallory = await logged_in(server, "mallory@example.test")
    await create(mallory, "mallory", room)
    await join(alice, "alice", room)
    inbox = collect(alice)
    mallory.send_message(mto=f"{room}/alice", mbody="psst, in the room", mtype="chat")
    assert await next_body(inbox) == (room, "psst, in the room")
    mallory.send_message(mto=room, mbody="hello all", mtype="groupchat")
    assert await next_body(inbox) == (room, "hello all")
    await server.server.router.send(_headline("localhost", "alice@localhost", "from the server"))
    assert await next_body(inbox) == ("localhost", "from the server")


@pytest.mark.parley_config(modules=MODULES, module_options={"block_strangers": {"default": True}})
async def test_a_remote_room_the_user_joined_gets_through(server: Harness) -> None:
    """A room on another server sends over federation, through the recipient's inbound policy: the directed
    presence that joined it makes it known. Here the other server's MUC service is a stand-in that takes the
    join, and its stanzas are injected as the federation stream would route them."""
    room = "chat@conference.remote.example"
    joined: asyncio.Queue[Stanza] = asyncio.Queue()

    async def stand_in(stanza: Stanza) -> None:
        joined.put_nowait(stanza)

    server.server.services["conference.remote.example"] = stand_in
    alice = await logged_in(server, "alice@localhost")
    alice.send_presence(pto=f"{room}/alice")
    assert str((await asyncio.wait_for(joined.get(), 5)).to) == f"{room}/alice"
    [session] = server.server.sessions.of(JID.make("alice", "localhost"))
    assert any(str(jid.bare) == room for jid in session.directed)
    inbox = collect(alice)
    await server.server.router.send(_chat("spam@remote.example/x", "alice@localhost", "buy now"))
    await server.server.router.send(_chat(f"{room}/mallory", str(alice.boundjid), "psst, in the room"))
    assert await next_body(inbox) == (room, "psst, in the room")
    await sync(alice)
    assert inbox.empty()


def _chat(sender: str, to: str, body: str) -> Element:
    return _headline(sender, to, body, "chat")


def _headline(sender: str, to: str, body: str, type: str = "headline") -> Element:
    el = Element("{jabber:client}message", {"from": sender, "to": to, "type": type})
    el.append(Element("{jabber:client}body"))
    el[0].text = body
    return el


@pytest.mark.parley_config(modules=MODULES, module_options={"block_strangers": {"default": True, "action": "bounce"}})
async def test_bounce_answers_the_stranger_with_service_unavailable(server: Harness) -> None:
    await logged_in(server, "alice@localhost")
    stranger = await logged_in(server, "mallory@example.test")
    errors = collect(stranger, "error")
    stranger.send_message(mto="alice@localhost", mbody="buy now", mtype="chat")
    error = await asyncio.wait_for(errors.get(), 5)
    assert error.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}service-unavailable") is not None


@pytest.mark.parley_config(modules=MODULES, module_options={"block_strangers": {"default": True, "action": "hold"}})
async def test_hold_keeps_what_strangers_sent_for_the_user_to_read_once(server: Harness) -> None:
    alice = await logged_in(server, "alice@localhost")
    inbox, asked = collect(alice), subscriptions(alice)
    await strangers_then_contact(server, alice)
    assert await next_body(inbox) == ("bob@localhost", "hi, it's bob")
    assert await asyncio.wait_for(asked.get(), 5) == "bob@localhost"
    assert inbox.empty() and asked.empty()
    held = (await run_adhoc(alice, "held-from-strangers"))["form"].get_fields()["held"].get_value()
    assert [line.split(" ", 1)[1] for line in held] == [
        "message from mallory@example.test/" + held[0].split("/", 1)[1].split(":")[0] + ": buy now",
        "subscription request from mallory@example.test"]
    assert not (await run_adhoc(alice, "held-from-strangers"))["form"].get_fields()["held"].get_value()
