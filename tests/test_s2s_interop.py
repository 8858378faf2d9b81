"""Federation with real Prosody and ejabberd, both ways (see tests/s2s_peers.py for how they run).

Prosody's certificate comes from a CA both sides trust: the pair authenticates with SASL EXTERNAL.
ejabberd's is self-signed, which Parley accepts for that domain only (accept_self_signed) and ejabberd
does not accept of Parley's: the pair authenticates with Server Dialback.
These tests need root and the Debian packages; under CI=true they fail when the peers cannot run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from slixmpp import ClientXMPP

from server.registry import available
from tests.conftest import disconnect_all, needs_module, unavailable
from tests.s2s_peers import (
    EJABBERD,
    PARLEY,
    PROSODY,
    Ejabberd,
    Peer,
    PeerUnavailable,
    Prosody,
    check_environment,
    ensure_hosts_entries,
    peer_client,
)
from tests.s2s_support import Inbox, Parley, TestCA, online, start_parley, until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def ca() -> Iterator[TestCA]:
    directory = Path(tempfile.mkdtemp(prefix="parley-s2s-ca-"))
    try:
        yield TestCA(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run(peer: Peer) -> Iterator[Peer]:
    try:
        check_environment()
        ensure_hosts_entries()
        peer.start()
    except PeerUnavailable as exc:
        peer.stop()
        peer.cleanup()
        unavailable(f"federation peers cannot run: {exc}")
    try:
        yield peer
    finally:
        peer.stop()
        peer.cleanup()


@pytest.fixture(scope="module")
def prosody(ca: TestCA) -> Iterator[Peer]:
    yield from _run(Prosody(*PROSODY, ca))


@pytest.fixture(scope="module")
def ejabberd(ca: TestCA) -> Iterator[Peer]:
    yield from _run(Ejabberd(*EJABBERD, ca))


@pytest.fixture(params=["prosody", "ejabberd"])
def peer(request: pytest.FixtureRequest) -> Peer:
    return request.getfixturevalue(request.param)


MUC = "muc" in available()
PEP = "pep" in available()
OMEMO = "urn:xmpp:omemo:2"
OMEMO_DEVICES = f"{OMEMO}:devices"


@pytest.fixture
async def parley(peer: Peer, ca: TestCA, tmp_path: Path) -> AsyncIterator[Parley]:
    address, domain = PARLEY
    crt, key = ca.issue(domain, tmp_path)
    extras = [name for name, present in (("muc", MUC), ("pep", PEP)) if present]
    host = {"certificate": str(crt), "key": str(key), "modules_enabled": extras}
    server = await start_parley(tmp_path / "parley", {domain: host}, address,
                                s2s_port=5269, s2s={"ca_bundle": str(ca.path), "accept_self_signed": [EJABBERD[1]]},
                                unauthenticated_timeout=15.0)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def clients() -> AsyncIterator[list[ClientXMPP]]:
    """Peer-side clients, disconnected after the test."""
    opened: list[ClientXMPP] = []
    yield opened
    await disconnect_all(opened)


async def remote_user(peer: Peer, clients: list[ClientXMPP], *, plugins: tuple[str, ...] = (),
                      available: bool = True) -> ClientXMPP:
    jid = await peer.new_user()
    client = await peer_client(jid, "secret", peer.address, plugins)
    clients.append(client)
    if available:
        reflected = Inbox(client, "presence")
        client.send_presence()
        await reflected.wait(lambda p: p["from"] == client.boundjid)
    return client


def incoming_pairs(parley: Parley) -> dict[tuple[str, str], str]:
    return {pair: method for stream in parley.manager.incoming for pair, method in stream.methods.items()}


@pytest.mark.parametrize("first", ["parley", "peer"])
async def test_messages_both_ways(parley: Parley, peer: Peer, clients: list[ClientXMPP], first: str) -> None:
    """Whoever writes first opens the connection; the other direction reuses it if the peer does XEP-0288."""
    alice = await parley.user(f"alice@{PARLEY[1]}")
    remote = await remote_user(peer, clients)
    alice_inbox, remote_inbox = Inbox(alice), Inbox(remote)
    turns = [(alice, remote.boundjid.bare, remote_inbox), (remote, alice.boundjid.bare, alice_inbox)]
    for sender, to, inbox in turns if first == "parley" else reversed(turns):
        sender.send_message(mto=to, mbody=f"hello from {sender.boundjid.domain}", mtype="chat")
        got = await inbox.wait(lambda m, s=sender: m["body"] == f"hello from {s.boundjid.domain}")
        assert got["from"] == sender.boundjid and got["type"] == "chat"
    ours, theirs = (PARLEY[1], peer.domain), (peer.domain, PARLEY[1])
    link = parley.manager.links.get(ours)
    if not peer.bidi:
        assert link.methods == {ours: peer.method} and incoming_pairs(parley) == {theirs: peer.method}
    elif first == "parley":
        assert link.bidi and link.methods == {ours: peer.method} and not incoming_pairs(parley)
    else:
        assert link is None and incoming_pairs(parley) == {theirs: peer.method} and ours in parley.manager.bidi
    # Where the peer does XEP-0198 on server-to-server streams, whatever carries Parley's stanzas to it
    # manages the stream (the peer may enable it a little after the first stanzas) and gets acknowledgements.
    carrier = link or parley.manager.bidi[ours]
    if not peer.stream_management:
        assert carrier.sm is None
        return
    await until(lambda: carrier.sm is not None)
    alice.send_message(mto=remote.boundjid.bare, mbody="managed", mtype="chat")
    await remote_inbox.wait(lambda m: m["body"] == "managed")
    await until(lambda: carrier.sm.send_count > 0 and not len(carrier.sm))
    assert carrier.sm.acknowledged == carrier.sm.send_count


async def befriend(parley: Parley, alice: ClientXMPP, remote: ClientXMPP) -> None:
    """Alice asks for remote's presence; slixmpp accepts and asks back: the whole handshake, across servers.
    Returns once both rosters say 'both' with nothing pending and each side saw the other's presence."""
    contact, user = remote.boundjid.bare, alice.boundjid.bare
    alice_presence, remote_presence = Inbox(alice, "presence"), Inbox(remote, "presence")
    alice.send_presence(pto=contact, ptype="subscribe")
    await alice_presence.wait(lambda p: p["from"].bare == contact and p["type"] == "available", timeout=15)
    await remote_presence.wait(lambda p: p["from"].bare == user and p["type"] == "available", timeout=15)

    async def settled() -> bool:
        item = await parley.server.storage.roster.get_item(alice.boundjid.domain, alice.boundjid.user, contact)
        await remote.get_roster(timeout=10)
        theirs = remote.client_roster[user]
        return item is not None and item.subscription == "both" and not item.ask and \
            theirs["subscription"] == "both" and not theirs["pending_out"]

    for _ in range(30):
        if await settled():
            return
        await asyncio.sleep(0.1)
    assert await settled()


async def test_subscription_handshake_ends_in_both_and_presence_flows(parley: Parley, peer: Peer,
                                                                      clients: list[ClientXMPP]) -> None:
    alice = await parley.user(f"alice@{PARLEY[1]}")
    remote = await remote_user(peer, clients)
    await befriend(parley, alice, remote)
    alice_presence, remote_presence = Inbox(alice, "presence"), Inbox(remote, "presence")
    remote.send_presence(pshow="dnd", pstatus="in a meeting")
    got = await alice_presence.wait(lambda p: p["status"] == "in a meeting")
    assert got["show"] == "dnd" and got["from"] == remote.boundjid
    alice.send_presence(pshow="away", pstatus="gone fishing")
    got = await remote_presence.wait(lambda p: p["status"] == "gone fishing")
    assert got["from"] == alice.boundjid


PEP_PLUGINS = ("xep_0030", "xep_0060", "xep_0115", "xep_0163")


async def interested(client: ClientXMPP) -> Inbox:
    """Advertise '+notify' for OMEMO device lists in caps, go online; the inbox of PEP notifications."""
    client.plugin["xep_0030"].add_feature(f"{OMEMO_DEVICES}+notify")
    await client.plugin["xep_0115"].update_caps(broadcast=False)
    notifications = Inbox(client, "pubsub_publish")
    await online(client)
    return notifications


async def devices_arrive(owner: ClientXMPP, notifications: Inbox) -> list[str | None]:
    """Publish the owner's device list until a notification brings it: the owner's server learns of the
    contact's interest asynchronously (a disco#info of its caps, itself over s2s), and a publication that
    comes first is not resent by every server; that race is the PEP service's, not federation's."""
    for attempt in range(5):
        devices = ET.Element(f"{{{OMEMO}}}devices")
        ET.SubElement(devices, f"{{{OMEMO}}}device", {"id": str(1000 + attempt)})
        await owner.plugin["xep_0060"].publish(owner.boundjid.bare, OMEMO_DEVICES, id="current", payload=devices,
                                               timeout=10)
        try:
            got = await notifications.wait(lambda m: m["pubsub_event"]["items"]["node"] == OMEMO_DEVICES, timeout=3)
        except AssertionError:
            continue
        assert got["from"] == owner.boundjid.bare
        return [d.get("id") for d in got["pubsub_event"]["items"]["item"]["payload"].iter(f"{{{OMEMO}}}device")]
    raise AssertionError("no PEP notification reached the contact")


async def test_pep_devicelist_reaches_a_contact_on_parley(parley: Parley, peer: Peer,
                                                         clients: list[ClientXMPP]) -> None:
    """An OMEMO device list published on the peer's PEP service reaches a Parley contact that asked for it
    with '+notify' in its caps, which the peer looked up by asking the contact's client over s2s."""
    alice = await parley.user(f"alice@{PARLEY[1]}", plugins=PEP_PLUGINS, available=False)
    notifications = await interested(alice)
    remote = await remote_user(peer, clients, plugins=PEP_PLUGINS)
    await befriend(parley, alice, remote)
    assert len(await devices_arrive(remote, notifications)) == 1


async def test_pep_devicelist_reaches_a_contact_on_the_peer(parley: Parley, peer: Peer,
                                                           clients: list[ClientXMPP]) -> None:
    """The other way: Parley's PEP service asks the peer's client over s2s whether it wants the node."""
    needs_module("pep")
    alice = await parley.user(f"alice@{PARLEY[1]}", plugins=PEP_PLUGINS)
    remote = await remote_user(peer, clients, plugins=PEP_PLUGINS, available=False)
    notifications = await interested(remote)
    await befriend(parley, alice, remote)
    assert len(await devices_arrive(alice, notifications)) == 1


async def test_vcard_fetch_both_ways(parley: Parley, peer: Peer, clients: list[ClientXMPP]) -> None:
    alice = await parley.user(f"alice@{PARLEY[1]}", plugins=("xep_0054",))
    remote = await remote_user(peer, clients, plugins=("xep_0054",))
    for client, name in ((alice, "Alice of Parley"), (remote, f"Someone at {peer.name}")):
        card = client.plugin["xep_0054"].make_vcard()
        card["FN"] = name
        await client.plugin["xep_0054"].publish_vcard(card, timeout=10)
    got: Any = await alice.plugin["xep_0054"].get_vcard(remote.boundjid.bare, timeout=15)
    assert got["vcard_temp"]["FN"] == f"Someone at {peer.name}"
    got = await remote.plugin["xep_0054"].get_vcard(alice.boundjid.bare, timeout=15)
    assert got["vcard_temp"]["FN"] == "Alice of Parley"


async def test_parley_user_joins_a_room_on_the_peer(parley: Parley, peer: Peer, clients: list[ClientXMPP]) -> None:
    """The room lives at conference.<peer>, a domain of its own: another link, through /etc/hosts."""
    alice = await parley.user(f"alice@{PARLEY[1]}", plugins=("xep_0045",))
    remote = await remote_user(peer, clients, plugins=("xep_0045",))
    room = f"lobby@conference.{peer.domain}"
    await remote.plugin["xep_0045"].join_muc_wait(room, "host", timeout=15)
    joined, _, occupants, _ = await alice.plugin["xep_0045"].join_muc_wait(room, "alice", timeout=15)
    assert joined["from"] == f"{room}/alice"
    assert {str(p["from"]) for p in occupants} == {f"{room}/host", f"{room}/alice"}
    alice_inbox, remote_inbox = Inbox(alice, "groupchat_message"), Inbox(remote, "groupchat_message")
    remote.send_message(mto=room, mbody="welcome", mtype="groupchat")
    got = await alice_inbox.wait(lambda m: m["body"] == "welcome")
    assert got["from"] == f"{room}/host"
    alice.send_message(mto=room, mbody="thanks", mtype="groupchat")
    got = await remote_inbox.wait(lambda m: m["body"] == "thanks")
    assert got["from"] == f"{room}/alice"


async def test_peer_user_joins_a_room_on_parley(parley: Parley, peer: Peer, clients: list[ClientXMPP]) -> None:
    """conference.parley.test is a service domain: it authenticates on its own, multiplexed where it can."""
    alice = await parley.user(f"alice@{PARLEY[1]}", plugins=("xep_0045", "xep_0004"))
    remote = await remote_user(peer, clients, plugins=("xep_0045",))
    room = f"garden@conference.{PARLEY[1]}"
    await alice.plugin["xep_0045"].join_muc_wait(room, "alice", timeout=15)
    # An empty configuration form makes it an instant room, open to others.
    await alice.plugin["xep_0045"].set_room_config(room, alice.plugin["xep_0004"].make_form(), timeout=10)
    joined, _, occupants, _ = await remote.plugin["xep_0045"].join_muc_wait(room, "visitor", timeout=15)
    assert joined["from"] == f"{room}/visitor"
    assert {str(p["from"]) for p in occupants} == {f"{room}/alice", f"{room}/visitor"}
    alice_inbox, remote_inbox = Inbox(alice, "groupchat_message"), Inbox(remote, "groupchat_message")
    alice.send_message(mto=room, mbody="welcome to parley", mtype="groupchat")
    got = await remote_inbox.wait(lambda m: m["body"] == "welcome to parley")
    assert got["from"] == f"{room}/alice"
    remote.send_message(mto=room, mbody="nice room", mtype="groupchat")
    got = await alice_inbox.wait(lambda m: m["body"] == "nice room")
    assert got["from"] == f"{room}/visitor"


async def test_ping_and_disco_across_servers(parley: Parley, peer: Peer, clients: list[ClientXMPP]) -> None:
    alice = await parley.user(f"alice@{PARLEY[1]}", plugins=("xep_0030", "xep_0199"))
    remote = await remote_user(peer, clients, plugins=("xep_0030", "xep_0199"))
    assert await alice.plugin["xep_0199"].ping(peer.domain, timeout=10) >= 0
    assert await remote.plugin["xep_0199"].ping(PARLEY[1], timeout=10) >= 0
    assert await remote.plugin["xep_0199"].ping(alice.boundjid, timeout=10) >= 0
    info = await remote.plugin["xep_0030"].get_info(PARLEY[1], timeout=10)
    assert "urn:xmpp:ping" in info["disco_info"]["features"]
    info = await alice.plugin["xep_0030"].get_info(peer.domain, timeout=10)
    assert "urn:xmpp:ping" in info["disco_info"]["features"]


async def test_parley_carries_the_peers_other_domain_over_its_link(parley: Parley, peer: Peer,
                                                                  clients: list[ClientXMPP]) -> None:
    """conference.<peer> is named by the peer's certificate and resolves to the same address: XEP-0220
    target multiplexing on the link Parley opened, instead of a second connection."""
    needs_module("muc")
    alice = await parley.user(f"alice@{PARLEY[1]}", plugins=("xep_0030",))
    remote = await remote_user(peer, clients)
    inbox = Inbox(remote)
    alice.send_message(mto=remote.boundjid.bare, mbody="first", mtype="chat")
    await inbox.wait(lambda m: m["body"] == "first")
    info = await alice.plugin["xep_0030"].get_info(f"conference.{peer.domain}", timeout=15)
    assert "http://jabber.org/protocol/muc" in info["disco_info"]["features"]
    link = parley.manager.links[PARLEY[1], peer.domain]
    assert parley.manager.links[PARLEY[1], f"conference.{peer.domain}"] is link
    assert link.methods[PARLEY[1], f"conference.{peer.domain}"] == "dialback"


async def test_parley_room_piggybacks_on_the_hosts_link(parley: Parley, peer: Peer, clients: list[ClientXMPP]) -> None:
    """A room's invitation goes from conference.parley.test over the link parley.test opened: XEP-0220
    sender multiplexing, authenticated by dialback on that link."""
    alice = await parley.user(f"alice@{PARLEY[1]}", plugins=("xep_0045", "xep_0004"))
    remote = await remote_user(peer, clients)
    inbox = Inbox(remote)
    alice.send_message(mto=remote.boundjid.bare, mbody="first", mtype="chat")
    await inbox.wait(lambda m: m["body"] == "first")
    room = f"porch@conference.{PARLEY[1]}"
    await alice.plugin["xep_0045"].join_muc_wait(room, "alice", timeout=15)
    await alice.plugin["xep_0045"].set_room_config(room, alice.plugin["xep_0004"].make_form(), timeout=10)
    alice.plugin["xep_0045"].invite(room, remote.boundjid.bare, "come in")
    invitation = await inbox.wait(lambda m: m["from"] == room)
    assert invitation["muc"]["invite"]["from"].bare == alice.boundjid.bare
    link = parley.manager.links[PARLEY[1], peer.domain]
    assert parley.manager.links[f"conference.{PARLEY[1]}", peer.domain] is link
    assert link.methods[f"conference.{PARLEY[1]}", peer.domain] == "dialback"


@pytest.mark.parametrize("peer", ["prosody"], indirect=True)  # ejabberd has no s2s stream management
async def test_a_message_the_frozen_peer_never_acknowledged_arrives_over_a_new_link(
        parley: Parley, peer: Peer, clients: list[ClientXMPP]) -> None:
    """Prosody stops (SIGSTOP) with a message of Parley's unread: Parley gives up on the link when its
    <r/> goes unanswered and sends the message again over a new one once Prosody runs again."""
    needs_module("muc")
    alice = await parley.user(f"alice@{PARLEY[1]}")
    remote = await remote_user(peer, clients)
    inbox = Inbox(remote)
    alice.send_message(mto=remote.boundjid.bare, mbody="before", mtype="chat")
    await inbox.wait(lambda m: m["body"] == "before")
    link = parley.manager.links[PARLEY[1], peer.domain]
    await until(lambda: link.sm is not None and link.sm.send_count > 0 and not len(link.sm))
    parley.server.config.s2s.ack_timeout = 1.0
    assert peer.proc is not None
    os.kill(peer.proc.pid, signal.SIGSTOP)
    try:
        alice.send_message(mto=remote.boundjid.bare, mbody="while frozen", mtype="chat")
        await until(lambda: link.closing, timeout=15)
    finally:
        os.kill(peer.proc.pid, signal.SIGCONT)
    await inbox.wait(lambda m: m["body"] == "while frozen", timeout=20)
    assert parley.manager.links[PARLEY[1], peer.domain] is not link
