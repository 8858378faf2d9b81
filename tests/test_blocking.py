"""Blocking Command (XEP-0191) end to end: the list and its pushes, messages, iqs and presence."""

from __future__ import annotations

import asyncio
from xml.etree.ElementTree import Element

import pytest
from slixmpp import ClientXMPP

from extensions.blocking import matches
from server.jid import JID
from tests.conftest import Harness
from tests.test_basic_modules import iq_error, send_iq
from tests.test_offline import collect
from tests.test_roster_presence import befriend, online, sync, users

BLOCKING = "urn:xmpp:blocking"


def jids(*texts: str) -> frozenset[JID]:
    return frozenset(JID.parse(t) for t in texts)


@pytest.mark.parametrize(("item", "blocked", "free"), [
    ("bob@example.org/phone", ["bob@example.org/phone"], ["bob@example.org", "bob@example.org/desk"]),
    ("bob@example.org", ["bob@example.org", "bob@example.org/phone"], ["carol@example.org", "example.org"]),
    ("example.org/bot", ["example.org/bot"], ["example.org", "bob@example.org/bot"]),
    ("example.org", ["example.org", "bob@example.org/x", "muc.example.org", "a@muc.example.org"],
     ["example.com", "bob@badexample.org"]),
])
def test_jid_matching_follows_xep_0191_section_4(item: str, blocked: list[str], free: list[str]) -> None:
    for jid in blocked:
        assert matches(jids(item), JID.parse(jid)), jid
    for jid in free:
        assert not matches(jids(item), JID.parse(jid)), jid


def pushes(client: ClientXMPP) -> asyncio.Queue[Element]:
    queue: asyncio.Queue[Element] = asyncio.Queue()
    for event in ("blocked", "unblocked"):
        client.add_event_handler(event, lambda iq: queue.put_nowait(iq.xml))
    return queue


def push_of(iq: Element) -> tuple[str, list[str]]:
    payload = iq[0]
    return payload.tag.split("}")[1], [item.get("jid") for item in payload]


async def test_blocklist_block_unblock_and_pushes(server: Harness) -> None:
    await users(server, "alice")
    phone = await server.client("alice@localhost", resource="phone", plugins=("xep_0191",))
    laptop = await server.client("alice@localhost", resource="laptop", plugins=("xep_0191",))
    silent = await server.client("alice@localhost", resource="silent", plugins=("xep_0191",))
    silent_pushes = pushes(silent)
    laptop_pushes = pushes(laptop)
    assert await phone.plugin["xep_0191"].get_blocked_jids() == set()
    await laptop.plugin["xep_0191"].get_blocked_jids()

    await phone.plugin["xep_0191"].block(["bob@localhost", "spam.example", "carol@localhost/bot"])
    assert push_of(await asyncio.wait_for(laptop_pushes.get(), 5)) == \
        ("block", ["bob@localhost", "carol@localhost/bot", "spam.example"])
    await phone.plugin["xep_0191"].unblock(["bob@localhost", "nobody@localhost"])
    assert push_of(await asyncio.wait_for(laptop_pushes.get(), 5)) == ("unblock", ["bob@localhost"])
    assert {str(j) for j in await laptop.plugin["xep_0191"].get_blocked_jids()} == \
        {"carol@localhost/bot", "spam.example"}

    # The list outlives the sessions.
    phone.disconnect()
    again = await server.client("alice@localhost", resource="again", plugins=("xep_0191",))
    assert len(await again.plugin["xep_0191"].get_blocked_jids()) == 2
    await send_iq(again, "set", f"<unblock xmlns='{BLOCKING}'/>")
    assert push_of(await asyncio.wait_for(laptop_pushes.get(), 5)) == ("unblock", [])
    assert await again.plugin["xep_0191"].get_blocked_jids() == set()
    await sync(silent)
    assert silent_pushes.empty()  # it never asked for the list


async def test_malformed_and_foreign_requests_are_refused(server: Harness) -> None:
    await users(server, "alice", "bob")
    alice = await server.client("alice@localhost")
    bob = await server.client("bob@localhost")
    assert (await iq_error(alice, "set", f"<block xmlns='{BLOCKING}'/>"))[0] == "bad-request"
    bad = f"<block xmlns='{BLOCKING}'><item jid='a@b@c'/></block>"
    assert (await iq_error(alice, "set", bad))[0] == "jid-malformed"
    foreign = f"<blocklist xmlns='{BLOCKING}'/>"
    assert (await iq_error(bob, "get", foreign, "alice@localhost"))[0] == "forbidden"


async def test_messages_and_iqs_across_a_block(server: Harness) -> None:
    await users(server, "alice", "bob")
    alice = await server.client("alice@localhost", resource="home", plugins=("xep_0191",))
    bob = await server.client("bob@localhost", resource="desk")
    alice.send_presence()
    bob.send_presence()
    alice_inbox, bob_inbox = collect(alice), collect(bob)
    await alice.plugin["xep_0191"].block(["bob@localhost"])

    bob.send_message(mto="alice@localhost", mbody="let me in", mtype="chat")
    await sync(bob, alice)
    assert alice_inbox.empty() and bob_inbox.empty()  # dropped, without an error by default
    server.server.hosts["localhost"].config_options["blocking.bounce"] = True
    bob.send_message(mto="alice@localhost/home", mbody="let me in", mtype="chat")
    bounced = await asyncio.wait_for(bob_inbox.get(), 5)
    assert bounced.get("type") == "error"
    assert bounced.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}service-unavailable") is not None

    alice.send_message(mto="bob@localhost", mbody="go away", mtype="chat")
    refused = await asyncio.wait_for(alice_inbox.get(), 5)
    assert refused.get("type") == "error" and refused.get("from") == "bob@localhost"
    error = refused.find("{jabber:client}error")
    assert error.find("{urn:ietf:params:xml:ns:xmpp-stanzas}not-acceptable") is not None
    assert error.find("{urn:xmpp:blocking:errors}blocked") is not None

    ping = "<ping xmlns='urn:xmpp:ping'/>"
    assert (await iq_error(bob, "get", ping, "alice@localhost/home"))[0] == "service-unavailable"
    assert (await iq_error(alice, "get", ping, "bob@localhost/desk"))[0] == "not-acceptable"
    await sync(bob, alice)
    assert alice_inbox.empty() and bob_inbox.empty()

    await alice.plugin["xep_0191"].unblock(["bob@localhost"])
    bob.send_message(mto="alice@localhost", mbody="friends again", mtype="chat")
    assert (await asyncio.wait_for(alice_inbox.get(), 5)).findtext("{jabber:client}body") == "friends again"


async def test_presence_across_a_block(server: Harness) -> None:
    await users(server, "alice", "bob")
    await befriend(server, "alice", "bob")
    bob, bob_watch = await online(server, "bob@localhost", "desk")
    await sync(bob)  # his broadcast is done: alice gets his presence once, from her probe
    alice, alice_watch = await online(server, "alice@localhost", "home")
    alice.register_plugin("xep_0191")
    await alice_watch.presence("available", "bob@localhost/desk")
    await bob_watch.presence("available", "alice@localhost/home")

    await alice.plugin["xep_0191"].block(["bob@localhost"])
    await bob_watch.presence("unavailable", "alice@localhost/home")
    await alice_watch.presence("unavailable", "bob@localhost/desk")

    bob.send_presence(pstatus="still here")
    alice.send_presence(pstatus="not for bob")
    await sync(bob, alice)
    await sync(bob, alice)  # each side's broadcast has been routed and delivered
    assert not alice_watch.saw_presence("available", "bob@localhost/desk")
    assert not bob_watch.saw_presence("available", "alice@localhost/home")

    await alice.plugin["xep_0191"].unblock(["bob@localhost"])
    assert (await bob_watch.presence("available", "alice@localhost/home"))["status"] == "not for bob"
    assert (await alice_watch.presence("available", "bob@localhost/desk"))["status"] == "still here"
