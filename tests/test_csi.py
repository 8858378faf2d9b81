"""Client State Indication (XEP-0352): an inactive client gets messages at once and presence later, collapsed."""

from __future__ import annotations

from xml.etree.ElementTree import Element

from slixmpp import ClientXMPP
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.conftest import Harness
from tests.test_roster_presence import Watch, befriend, online, sync, users

CHATSTATES = "http://jabber.org/protocol/chatstates"


def everything(client: ClientXMPP) -> list[Element]:
    """Every message and presence the client receives, in order."""
    received: list[Element] = []
    for kind in ("message", "presence"):
        client.register_handler(Callback(f"all {kind}", MatchXPath(f"{{jabber:client}}{kind}"),
                                         lambda stanza: received.append(stanza.xml)))
    return received


def state(client: ClientXMPP, to: str, name: str) -> None:
    msg = client.make_message(mto=to, mtype="chat")
    msg.append(Element(f"{{{CHATSTATES}}}{name}"))
    msg.send()


def summary(stanzas: list[Element]) -> list[tuple[str, str | None]]:
    """(sender, status, body or chat state) of each stanza."""
    out = []
    for el in stanzas:
        what = el.findtext("{jabber:client}status") or el.findtext("{jabber:client}body")
        if what is None and len(el):
            what = el[0].tag.split("}")[1]
        out.append((el.get("from").split("/")[0], what or el.get("type")))
    return out


async def test_inactive_client_gets_messages_at_once_and_collapsed_presence_on_active(server: Harness) -> None:
    await users(server, "alice", "bob", "carol")
    await befriend(server, "alice", "bob")
    await befriend(server, "alice", "carol")
    bob, _ = await online(server, "bob@localhost", "desk")
    carol, _ = await online(server, "carol@localhost", "home")
    alice = await server.client("alice@localhost", resource="phone", plugins=("xep_0352",))
    watch = Watch(alice)
    alice.send_presence()
    for contact in ("bob@localhost/desk", "carol@localhost/home"):
        await watch.presence(from_=contact)  # the probe answers are in
    await sync(alice, bob, carol)
    assert alice.plugin["xep_0352"].enabled  # the server offered the stream feature
    received = everything(alice)

    alice.plugin["xep_0352"].send_inactive()
    for i in range(50):
        bob.send_presence(pstatus=f"bob {i}")
        carol.send_presence(pstatus=f"carol {i}")
    state(bob, "alice@localhost", "composing")
    state(carol, "alice@localhost", "composing")
    state(carol, "alice@localhost", "paused")
    await sync(bob, carol, alice)
    assert received == []  # a hundred presence updates and three chat states, all held

    bob.send_message(mto="alice@localhost", mbody="wake up", mtype="chat")
    await sync(bob, alice)
    assert summary(received) == [("bob@localhost", "wake up")]

    alice.plugin["xep_0352"].send_active()
    await sync(alice)
    # The latest of each; bob's composing was superseded by his message. (The two senders interleave.)
    assert sorted(summary(received[1:])) == [
        ("bob@localhost", "bob 49"), ("carol@localhost", "carol 49"), ("carol@localhost", "paused"),
    ]


async def test_subscription_requests_and_iqs_are_not_held(server: Harness) -> None:
    await users(server, "alice", "bob")
    bob, _ = await online(server, "bob@localhost", "desk")
    alice = await server.client("alice@localhost", resource="phone", plugins=("xep_0352",))
    alice.send_presence()
    await sync(alice)
    received = everything(alice)
    alice.plugin["xep_0352"].send_inactive()
    alice.plugin["xep_0352"].send_inactive()  # twice is no error
    bob.send_presence(pto="alice@localhost", ptype="subscribe")
    await sync(bob, alice)
    assert summary(received) == [("bob@localhost", "subscribe")]


async def test_room_presence_is_held_and_room_messages_are_not(server: Harness) -> None:
    from tests.test_muc import ROOM, create, join

    await users(server, "alice", "bob")
    bob = await server.client("bob@localhost", resource="desk", plugins=("xep_0045",))
    alice = await server.client("alice@localhost", resource="phone", plugins=("xep_0045", "xep_0352"))
    bob.send_presence()
    alice.send_presence()
    await create(alice, "Alice")
    await join(bob, "Bob")
    await sync(alice, bob)
    received = everything(alice)
    alice.plugin["xep_0352"].send_inactive()
    for i in range(20):
        bob.send_presence(pto=f"{ROOM}/Bob", pstatus=f"away {i}")
    await sync(bob, alice)
    assert received == []  # the room's presence flood, held
    bob.send_message(mto=ROOM, mbody="meeting now", mtype="groupchat")
    await sync(bob, alice)
    assert summary(received) == [(ROOM, "meeting now")]
    alice.plugin["xep_0352"].send_active()
    await sync(alice)
    assert summary(received[1:]) == [(ROOM, "away 19")]
