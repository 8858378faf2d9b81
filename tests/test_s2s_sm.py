"""Stream management (XEP-0198) on server-to-server streams between two Parleys and with a raw peer:
acknowledgements, and stanzas a lost link never had acknowledged sent over a new link or bounced."""

from __future__ import annotations

from typing import Any

import pytest

from server.stream import sm
from tests.s2s_support import (
    B_ADDR,
    Inbox,
    Parley,
    RawPeer,
    authenticated_raw_peer,
    chat,
    linked,
    options,
    servers_fixture,
    until,
)

pytestmark = pytest.mark.timeout(60)


servers = servers_fixture


def incoming_from(server: Parley, remote: str) -> Any:
    (stream,) = [s for s in server.manager.incoming if any(pair[0] == remote for pair in s.pairs)]
    return stream


async def test_links_enable_stream_management_and_the_peer_acknowledges(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
    inbox = Inbox(bob)
    for i in range(3):
        await chat(alice, inbox, "bob@b.test", f"counted {i}")
    link = a.manager.links["a.test", "b.test"]
    assert link.sm is not None and link.sm_receiving
    await until(lambda: len(link.sm) == 0)
    assert link.sm.send_count == link.sm.acknowledged >= 3
    assert incoming_from(b, "a.test").sm.handled == link.sm.send_count


async def stall_and_send(a: Parley, b: Parley, alice: Any, bodies: list[str]) -> Any:
    """Make B stop reading the link from A, then send: the stanzas stay unacknowledged."""
    incoming = incoming_from(b, "a.test")
    incoming.transport.pause_reading()
    link = a.manager.links["a.test", "b.test"]
    for body in bodies:
        message = alice.make_message(mto="bob@b.test", mbody=body, mtype="chat")
        message["id"] = body
        message.send()
    await until(lambda: len(link.sm) == len(bodies))
    return incoming


async def test_stanzas_a_lost_link_never_had_acknowledged_go_over_a_new_one(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, _, inbox = await linked(a, b)
    first = a.manager.links["a.test", "b.test"]
    incoming = await stall_and_send(a, b, alice, ["one", "two", "three"])
    incoming.transport.abort()  # the connection dies with the three stanzas unread
    for body in ("one", "two", "three"):
        await inbox.wait(lambda m, body=body: m["body"] == body)
    assert a.manager.links["a.test", "b.test"] is not first


@options(a_s2s={"ack_timeout": 0.5})
async def test_a_link_whose_peer_stops_acknowledging_is_replaced(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, _, inbox = await linked(a, b)
    first = a.manager.links["a.test", "b.test"]
    await stall_and_send(a, b, alice, ["into the void"])  # the connection stays open, nobody reads
    await inbox.wait(lambda m: m["body"] == "into the void")
    assert first.closing and a.manager.links["a.test", "b.test"] is not first


async def test_unacknowledged_stanzas_are_bounced_when_no_new_link_comes_up(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, _, _ = await linked(a, b)
    errors = Inbox(alice, "message_error")
    await stall_and_send(a, b, alice, ["lost", "bounced"])
    await b.stop()
    bounced = [await errors.wait() for _ in range(2)]
    assert sorted(error["id"] for error in bounced) == ["bounced", "lost"]
    assert {error["error"]["condition"] for error in bounced} == {"remote-server-timeout"}


async def test_incoming_stream_management_with_a_raw_peer(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    bob = await b.user("bob@b.test")
    inbox = Inbox(bob)
    early = await RawPeer.connect(B_ADDR, b.s2s_port)
    try:
        features = await early.starttls("a.test", "b.test")
        assert features.find(sm.FEATURE) is not None
        await early.send("<enable xmlns='urn:xmpp:sm:3'/>")
        refusal = await early.expect(sm.FAILED)
        assert refusal.find("{urn:ietf:params:xml:ns:xmpp-stanzas}unexpected-request") is not None
    finally:
        early.close()
    peer = await authenticated_raw_peer(a, b)
    try:
        await peer.send("<enable xmlns='urn:xmpp:sm:3'/>")
        await peer.expect(sm.ENABLED)
        await peer.send("<message from='alice@a.test/x' to='bob@b.test'><body>managed</body></message>"
                        "<message from='mallory@evil.test' to='bob@b.test'><body>forged</body></message>"
                        "<r xmlns='urn:xmpp:sm:3'/>")
        ack = await peer.expect(sm.ACK)
        assert ack.get("h") == "2"  # the forged stanza was handled too: dropped
        await inbox.wait(lambda m: m["body"] == "managed")
        await peer.send("<a xmlns='urn:xmpp:sm:3' h='5'/>")  # B never sent a stanza on this stream
        closing = await peer.closed()
        assert b"handled-count-too-high" in closing and b"undefined-condition" in closing
    finally:
        peer.close()
