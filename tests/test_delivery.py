"""RFC 6121 8.5: where a message goes, by its type, its address and the recipient's resources' priorities."""

from __future__ import annotations

import asyncio

import pytest
from slixmpp import ClientXMPP

from server.jid import JID
from tests.conftest import Harness
from tests.test_basic_modules import wait_for


async def online(server: Harness, jid: str, resource: str, priority: int) -> tuple[ClientXMPP, asyncio.Queue]:
    client = await server.client(jid, resource=resource)
    inbox = server.inbox(client)
    client.add_event_handler("message_error", inbox.put_nowait)
    client.send_presence(ppriority=priority)
    session = server.server.sessions.get(JID.parse(f"{jid}/{resource}"))
    assert session is not None

    async def announced() -> bool:
        return session.available and session.priority == priority

    await wait_for(announced)
    return client, inbox


async def nothing(queue: asyncio.Queue, wait: float = 0.4) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(queue.get(), wait)


@pytest.fixture
async def alice_two_resources(server: Harness) -> tuple[ClientXMPP, asyncio.Queue, asyncio.Queue, asyncio.Queue]:
    await server.add_user("alice")
    await server.add_user("bob")
    _, high = await online(server, "alice@localhost", "high", 10)
    _, low = await online(server, "alice@localhost", "low", 1)
    bob, bob_inbox = await online(server, "bob@localhost", "r", 0)
    return bob, high, low, bob_inbox


@pytest.mark.parametrize("mtype", ["chat", "normal"])
async def test_bare_chat_and_normal_go_to_the_highest_priority(alice_two_resources, mtype: str) -> None:
    bob, high, low, _ = alice_two_resources
    bob.send_message(mto="alice@localhost", mbody=f"a {mtype}", mtype=mtype)
    assert (await asyncio.wait_for(high.get(), 5))["body"] == f"a {mtype}"
    await nothing(low)


async def test_bare_headline_goes_to_every_non_negative_resource(alice_two_resources) -> None:
    bob, high, low, _ = alice_two_resources
    bob.send_message(mto="alice@localhost", mbody="news", mtype="headline")
    assert (await asyncio.wait_for(high.get(), 5))["body"] == "news"
    assert (await asyncio.wait_for(low.get(), 5))["body"] == "news"


async def test_full_jid_goes_to_that_resource_only(alice_two_resources) -> None:
    bob, high, low, _ = alice_two_resources
    bob.send_message(mto="alice@localhost/low", mbody="just you", mtype="chat")
    assert (await asyncio.wait_for(low.get(), 5))["body"] == "just you"
    await nothing(high)


async def test_offline_resource_is_treated_as_bare(alice_two_resources) -> None:
    bob, high, low, _ = alice_two_resources
    bob.send_message(mto="alice@localhost/gone", mbody="to whoever", mtype="chat")
    assert (await asyncio.wait_for(high.get(), 5))["body"] == "to whoever"
    await nothing(low)


async def test_groupchat_to_a_user_is_refused(alice_two_resources) -> None:
    bob, high, low, bob_inbox = alice_two_resources
    bob.send_message(mto="alice@localhost", mbody="not a room", mtype="groupchat")
    error = await asyncio.wait_for(bob_inbox.get(), 5)
    assert error["type"] == "error" and error["error"]["condition"] == "service-unavailable"
    await nothing(high, 0.1)
    await nothing(low, 0.1)


async def test_equal_priorities_both_get_it(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    _, one = await online(server, "alice@localhost", "one", 5)
    _, two = await online(server, "alice@localhost", "two", 5)
    bob, _ = await online(server, "bob@localhost", "r", 0)
    bob.send_message(mto="alice@localhost", mbody="tie", mtype="chat")
    assert (await asyncio.wait_for(one.get(), 5))["body"] == "tie"
    assert (await asyncio.wait_for(two.get(), 5))["body"] == "tie"


async def test_only_negative_priorities_means_offline_storage(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    _, shy = await online(server, "alice@localhost", "shy", -1)
    bob, _ = await online(server, "bob@localhost", "r", 0)
    bob.send_message(mto="alice@localhost", mbody="for later", mtype="chat")
    await nothing(shy)
    assert await server.server.storage.offline.count("localhost", "alice") == 1
    _, later = await online(server, "alice@localhost", "later", 0)
    assert (await asyncio.wait_for(later.get(), 5))["body"] == "for later"


async def test_message_to_unknown_user_is_refused(server: Harness) -> None:
    await server.add_user("bob")
    bob, inbox = await online(server, "bob@localhost", "r", 0)
    bob.send_message(mto="nobody@localhost", mbody="hello?", mtype="chat")
    error = await asyncio.wait_for(inbox.get(), 5)
    assert error["error"]["condition"] == "service-unavailable"
    assert str(error["from"]) == "nobody@localhost"


async def test_iq_to_an_offline_full_jid_is_refused(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    bob, _ = await online(server, "bob@localhost", "r", 0)
    iq = bob.make_iq_get(queryxmlns="jabber:iq:version", ito="alice@localhost/nowhere")
    with pytest.raises(Exception) as err:
        await iq.send(timeout=5)
    assert "service-unavailable" in str(err.value.iq["error"]["condition"])


async def test_iq_between_resources_is_routed(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    alice, _ = await online(server, "alice@localhost", "desk", 0)
    alice.register_plugin("xep_0092")
    bob, _ = await online(server, "bob@localhost", "r", 0)
    bob.register_plugin("xep_0092")
    result = await bob.plugin["xep_0092"].get_version("alice@localhost/desk")
    assert result["software_version"]["name"]
