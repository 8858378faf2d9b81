"""Offline messages (XEP-0160): stored with a delay stamp, delivered in order, bounded by a quota."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from xml.etree.ElementTree import Element, fromstring

from slixmpp import ClientXMPP
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.conftest import Harness
from tests.test_basic_modules import wait_for
from tests.test_roster_presence import sync

DELAY = "{urn:xmpp:delay}delay"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
CHATSTATES = "http://jabber.org/protocol/chatstates"


def collect(client: ClientXMPP, kind: str = "message") -> asyncio.Queue[Element]:
    """Queue the XML of every message (`kind` 'message', bodyless ones too) or error the client receives."""
    queue: asyncio.Queue[Element] = asyncio.Queue()
    path = "{jabber:client}message" if kind == "message" else "{jabber:client}message/{jabber:client}error"
    client.register_handler(Callback(kind, MatchXPath(path), lambda msg: queue.put_nowait(msg.xml)))
    return queue


async def take(queue: asyncio.Queue[Element], count: int) -> list[Element]:
    return [await asyncio.wait_for(queue.get(), 5) for _ in range(count)]


def send(client: ClientXMPP, body: str | None, *extra: str, to: str = "alice@localhost") -> None:
    msg = client.make_message(mto=to, mbody=body, mtype="chat")
    if body:
        msg["id"] = body
    for xml in extra:
        msg.append(fromstring(xml))
    msg.send()


async def stored(server: Harness, user: str = "alice") -> int:
    return await server.server.storage.offline.count("localhost", user)


async def wait_stored(server: Harness, count: int, timeout: float = 5.0) -> None:
    async def reached() -> bool:
        return await stored(server) == count

    await wait_for(reached, timeout)


async def come_online(server: Harness, priority: int = 0) -> asyncio.Queue[Element]:
    """Log alice in and send initial presence; returns the queue her messages arrive in."""
    alice = await server.client("alice@localhost")
    inbox = collect(alice)
    alice.send_presence(ppriority=priority)
    return inbox


async def test_offline_messages_are_delivered_in_order_with_a_delay_stamp(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    bob = await server.client("bob@localhost")
    before = datetime.now(UTC).replace(microsecond=0)
    for body in ("one", "two", "three"):
        send(bob, body)
    await wait_stored(server, 3)

    inbox = await come_online(server)
    messages = await take(inbox, 3)
    assert [m.findtext("{jabber:client}body") for m in messages] == ["one", "two", "three"]
    for message in messages:
        assert message.get("from").startswith("bob@localhost/")
        delay = message.find(DELAY)
        assert delay is not None and delay.get("from") == "localhost"
        stamp = datetime.fromisoformat(delay.get("stamp").replace("Z", "+00:00"))
        assert before <= stamp <= datetime.now(UTC)
    assert await stored(server) == 0


async def test_full_offline_storage_bounces_and_loses_nothing(server: Harness) -> None:
    server.server.config.limits.offline_quota = 2
    await server.add_user("alice")
    await server.add_user("bob")
    bob = await server.client("bob@localhost")
    errors = collect(bob, "error")
    for body in ("one", "two", "three"):
        send(bob, body)
    [error] = await take(errors, 1)
    assert error.get("id") == "three"
    condition = error.find("{jabber:client}error")
    assert condition.get("type") == "wait"
    assert condition.find(f"{{{STANZAS}}}resource-constraint") is not None
    assert condition.findtext(f"{{{STANZAS}}}text") == "offline storage full"

    inbox = await come_online(server)
    assert [m.findtext("{jabber:client}body") for m in await take(inbox, 2)] == ["one", "two"]
    assert await stored(server) == 0


async def test_storage_hints_and_chat_states(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    bob = await server.client("bob@localhost")
    errors = collect(bob, "error")
    send(bob, "secret", "<no-store xmlns='urn:xmpp:hints'/>")
    [error] = await take(errors, 1)
    assert error.find(f"{{jabber:client}}error/{{{STANZAS}}}service-unavailable") is not None

    send(bob, None, f"<composing xmlns='{CHATSTATES}'/>")
    send(bob, "off the record", "<no-permanent-store xmlns='urn:xmpp:hints'/>")
    send(bob, None, f"<active xmlns='{CHATSTATES}'/>", "<store xmlns='urn:xmpp:hints'/>")
    await wait_stored(server, 2)

    inbox = await come_online(server)
    first, second = await take(inbox, 2)
    assert first.findtext("{jabber:client}body") == "off the record"
    assert second.find(f"{{{CHATSTATES}}}active") is not None
    assert errors.empty()


async def test_negative_priority_does_not_take_offline_messages(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    bob = await server.client("bob@localhost")
    send(bob, "hello")
    await wait_stored(server, 1)

    alice = await server.client("alice@localhost")
    inbox = collect(alice)
    alice.send_presence(ppriority=-1)
    await sync(alice)  # the initial presence has been handled, with what it would deliver
    assert inbox.empty()
    assert await stored(server) == 1

