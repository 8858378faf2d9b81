"""What a service sends goes through the router like any other stanza: the recipients' blocklists
(XEP-0191) and client state indication (XEP-0352) apply to a room's messages and presence, in one process
and across the workers of a cluster."""

from __future__ import annotations

import asyncio
from xml.etree.ElementTree import Element

import pytest
from slixmpp import ClientXMPP

from tests import test_cluster
from tests.conftest import Harness
from tests.test_cluster import ROOM as CLUSTER_ROOM
from tests.test_cluster import Workers, instant_room
from tests.test_cluster import bodies as cluster_bodies
from tests.test_csi import everything, summary
from tests.test_muc import BODY, ROOM, create, groupchat, join
from tests.test_offline import collect
from tests.test_roster_presence import sync

cluster_workers = test_cluster.workers  # a fixture: a `parley serve --workers 2` subprocess
ALICE = f"{ROOM}/alice-nick"
BOB = f"{ROOM}/bob-nick"
CAROL = f"{ROOM}/carol-nick"


async def occupant(server: Harness, name: str, *plugins: str) -> ClientXMPP:
    """A new account's client, available, with the MUC plugin and `plugins`."""
    await server.add_user(name)
    client = await server.client(f"{name}@localhost", resource="r", plugins=("xep_0045", *plugins))
    client.send_presence()
    await sync(client)
    return client


def bodies(inbox: asyncio.Queue[Element]) -> set[tuple[str, str, str]]:
    """(from, type, body) of each message with a body the inbox holds now; empties it."""
    found = set()
    while not inbox.empty():
        el = inbox.get_nowait()
        if el.findtext(BODY) is not None:
            found.add((el.get("from"), el.get("type"), el.findtext(BODY)))
    return found


def private(sender: ClientXMPP, nick_jid: str, body: str) -> None:
    sender.send_message(mto=nick_jid, mbody=body, mtype="chat")


async def test_a_blocked_occupant_is_not_heard_by_the_blocker_only(server: Harness) -> None:
    alice = await occupant(server, "alice")
    bob = await occupant(server, "bob", "xep_0191")
    carol = await occupant(server, "carol")
    await create(alice, "alice-nick")
    await join(bob, "bob-nick")
    await join(carol, "carol-nick")
    await bob.plugin["xep_0191"].block([ALICE])
    bob_inbox, carol_inbox = collect(bob), collect(carol)

    groupchat(alice, "alice to all")
    private(alice, BOB, "alice to bob")
    private(alice, CAROL, "alice to carol")
    groupchat(carol, "carol to all")
    private(carol, BOB, "carol to bob")
    # Each sender's stanzas are handled before its ping is answered; then each recipient has read them.
    await sync(alice, carol)
    await sync(bob, carol)
    assert bodies(bob_inbox) == {(CAROL, "groupchat", "carol to all"), (CAROL, "chat", "carol to bob")}
    assert bodies(carol_inbox) == {(ALICE, "groupchat", "alice to all"), (ALICE, "chat", "alice to carol"),
                                   (CAROL, "groupchat", "carol to all")}

    await bob.plugin["xep_0191"].unblock([ALICE])
    groupchat(alice, "alice again")
    private(alice, BOB, "alice to bob again")
    await sync(alice)
    await sync(bob)
    assert bodies(bob_inbox) == {(ALICE, "groupchat", "alice again"), (ALICE, "chat", "alice to bob again")}


async def test_room_presence_to_an_inactive_client_is_held_like_any_presence(server: Harness) -> None:
    alice = await occupant(server, "alice", "xep_0352")
    bob = await occupant(server, "bob")
    await create(alice, "alice-nick")
    await join(bob, "bob-nick")
    await sync(alice)
    received = everything(alice)

    alice.plugin["xep_0352"].send_inactive()
    bob.send_presence(pto=BOB, pstatus="busy")
    groupchat(bob, "wake up")
    await sync(bob)
    await sync(alice)
    assert summary(received) == [(ROOM, "wake up")]  # the message at once, the presence held

    alice.plugin["xep_0352"].send_active()
    await sync(alice)
    assert summary(received[1:]) == [(ROOM, "busy")]


@pytest.mark.parametrize("cluster_workers", ["sqlite"], indirect=True)
async def test_a_room_on_worker_0_applies_a_block_made_on_worker_1(cluster_workers: Workers) -> None:
    workers = cluster_workers
    for name in ("alice", "bob", "carol"):
        await workers.add_user(name)
    alice = await workers.client_on(0, "alice@localhost", "a", ("xep_0045",))
    bob = await workers.client_on(1, "bob@localhost", "b", ("xep_0045", "xep_0191"))
    carol = await workers.client_on(1, "carol@localhost", "c", ("xep_0045",))
    await alice.plugin["xep_0045"].join_muc_wait(CLUSTER_ROOM, "alice", timeout=5)
    await instant_room(alice)
    for client, nick in ((bob, "bob"), (carol, "carol")):
        await client.plugin["xep_0045"].join_muc_wait(CLUSTER_ROOM, nick, timeout=5)
    inboxes = {name: workers.inbox(client) for name, client in (("alice", alice), ("bob", bob), ("carol", carol))}

    await bob.plugin["xep_0191"].block(f"{CLUSTER_ROOM}/alice", timeout=5)
    # Worker 1 tells worker 0 everything in order: once this reaches alice there, the block did too.
    bob.send_message(mto="alice@localhost/a", mbody="sync", mtype="chat")
    assert await cluster_bodies(inboxes["alice"], 1) == ["sync"]
    alice.send_message(mto=CLUSTER_ROOM, mbody="from alice", mtype="groupchat")
    assert await cluster_bodies(inboxes["carol"], 1) == ["from alice"]
    carol.send_message(mto=CLUSTER_ROOM, mbody="from carol", mtype="groupchat")
    # The room sent alice's message before carol's, so bob would have had it first.
    assert await cluster_bodies(inboxes["bob"], 1) == ["from carol"]
