"""Offline delivery under stream management's flow control, and what a session that ends leaves behind.

Clients such as Conversations, Gajim and Dino enable XEP-0198 before their initial presence, so an offline
backlog larger than 'max_queue' must reach them in pages as they acknowledge, and nothing may be lost or
doubled when a session cannot be resumed.
"""

from __future__ import annotations

import asyncio
from xml.etree.ElementTree import Element, SubElement

import pytest
from slixmpp import ClientXMPP

from server.jid import JID
from server.stanza import parse_stored
from tests.conftest import Harness
from tests.test_offline import collect, send, take, wait_stored
from tests.test_roster_presence import sync
from tests.test_stream_management import SM, STANZAS, authenticated, bound, cut, detached, enabled, next_stanza, until

BACKLOG = 300  # six times the queue below, so that delivery overflows it many times over without flow control
SMALL_QUEUE = pytest.mark.parley_config(
    limits={"offline_quota": 2 * BACKLOG},
    module_options={"stream_management": {"max_queue": 50, "resume_timeout": 30}},
)

BOTH_BACKENDS = pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)


async def fill(server: Harness, count: int) -> ClientXMPP:
    """bob sends alice (offline) `count` numbered messages; returns bob once all are stored."""
    await server.add_user("alice")
    await server.add_user("bob")
    bob = await server.client("bob@localhost", resource="desk")
    for i in range(count):
        send(bob, f"m{i}")
    await wait_stored(server, count, timeout=30)  # one transaction each, on a machine that may be busy
    return bob


def bodies(messages: list[Element]) -> list[str]:
    return [m.findtext("{jabber:client}body") for m in messages]


@SMALL_QUEUE
async def test_a_backlog_larger_than_max_queue_reaches_a_stream_management_client_once_in_order(
        server: Harness) -> None:
    await fill(server, BACKLOG)
    alice = await server.client("alice@localhost", resource="phone", plugins=("xep_0198",))
    plugin = alice.plugin["xep_0198"]
    await until(lambda: plugin.sm_id is not None)  # enabled before the initial presence, as Conversations does
    inbox = collect(alice)
    alice.send_presence()
    received = await take(inbox, BACKLOG)
    assert bodies(received) == [f"m{i}" for i in range(BACKLOG)]
    await sync(alice)
    assert inbox.empty()
    assert await server.server.storage.offline.count("localhost", "alice") == 0
    assert not server.server.sessions.get(JID.parse("alice@localhost/phone")).closed


@SMALL_QUEUE
@BOTH_BACKENDS
async def test_a_backlog_stays_stored_in_order_when_the_client_stops_acknowledging(server: Harness) -> None:
    await fill(server, BACKLOG)
    raw = await bound(server, "alice", "phone")
    previd = await enabled(raw, presence=False)
    await raw.send("<presence/>")
    received: list[str] = []
    while len(received) < 20:  # a part of the first page, never acknowledged
        stanza = await next_stanza(raw)
        if stanza.findtext("{jabber:client}body"):
            received.append(stanza.findtext("{jabber:client}body"))
    cut(raw)
    session = await detached(server, "alice@localhost/phone")
    session.close()  # as when 'resume_timeout' passes
    again = await authenticated(server, "alice")
    await again.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    answer = await again.expect(f"{{{SM}}}failed")
    assert answer.find(f"{{{STANZAS}}}item-not-found") is not None
    assert answer.get("h") == "1"  # alice's presence was handled
    await wait_stored(server, BACKLOG)
    stored = await server.server.storage.offline.pop_all("localhost", "alice")
    assert [_body(x) for _, x in stored] == [f"m{i}" for i in range(BACKLOG)]


def _body(xml: str) -> str:
    return parse_stored(xml).findtext("{jabber:client}body") or ""


@pytest.mark.parley_config(
    limits={"offline_quota": 2 * BACKLOG},
    module_options={"stream_management": {"max_queue": 5, "resume_timeout": 30}},
)
@BOTH_BACKENDS
async def test_a_failed_resumption_tells_h_and_stores_what_was_not_acknowledged_once_in_order(
        server: Harness) -> None:
    await server.add_user("bob")
    raw = await bound(server, "alice", "phone")
    previd = await enabled(raw)  # h 1: alice's presence
    bob = await server.client("bob@localhost", resource="desk")
    for i in range(3):
        send(bob, f"m{i}", to="alice@localhost/phone")
    for i in range(3):
        assert (await next_stanza(raw)).findtext("{jabber:client}body") == f"m{i}"  # seen, never acknowledged
    cut(raw)
    await detached(server, "alice@localhost/phone")
    for i in range(3, 40):  # the queue overflows at once: the session ends, the rest goes straight offline
        send(bob, f"m{i}")
    await sync(bob)
    await wait_stored(server, 40)
    again = await authenticated(server, "alice")
    await again.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    answer = await again.expect(f"{{{SM}}}failed")
    assert answer.find(f"{{{STANZAS}}}item-not-found") is not None
    assert answer.get("h") == "1"
    stored = await server.server.storage.offline.pop_all("localhost", "alice")
    assert [_body(x) for _, x in stored] == [f"m{i}" for i in range(40)]


async def test_messages_sent_to_a_closing_session_without_stream_management_are_handed_on(server: Harness) -> None:
    await server.add_user("bob")
    raw = await bound(server, "alice", "phone")
    await raw.send("<presence/>")
    await raw.expect("{jabber:client}presence")
    session = server.server.sessions.get(JID.parse("alice@localhost/phone"))
    ended = asyncio.get_running_loop().create_future()
    server.server.hosts["localhost"].hooks.add("session/closed", lambda s: ended.done() or ended.set_result(s))
    session.close("policy-violation")  # the stream is closing; the session is not ended yet
    for i in range(5):
        session.send(_message(f"m{i}"))
    await asyncio.wait_for(ended, 5)
    await wait_stored(server, 5)
    stored = await server.server.storage.offline.pop_all("localhost", "alice")
    assert [_body(x) for _, x in stored] == [f"m{i}" for i in range(5)]


def _message(body: str) -> Element:
    el = Element("{jabber:client}message", {"from": "bob@localhost/desk", "to": "alice@localhost/phone",
                                           "type": "chat"})
    SubElement(el, "{jabber:client}body").text = body
    return el
