"""Proactive takeover (server/ownership.py `Placement.take_over`, extensions/muc/placement.py): when the member
that owns a room or a pubsub node dies, the survivors take its entities over as soon as the cluster notices
(`cluster/member-lost`), before any stanza asks for them, and load them from PostgreSQL and the room's state
hash in Redis. Three nodes (`parley serve --node nK` subprocesses, one worker each, real Redis and PostgreSQL:
tests/test_cluster_rooms.py's fixture), slixmpp clients on each.

The times from the SIGKILL to the new owner in Redis, and to the room answering again, are printed (`-s`):
with the cluster's heartbeat (2 s) and time to live (6 s) they are what docs/scaling.md gives.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any
from xml.etree.ElementTree import fromstring

import pytest
import redis.asyncio as aioredis
from slixmpp import ClientXMPP

from server.accounts import create_account
from server.ownership import successor
from server.storage import Storage
from tests.conftest import Harness
from tests.test_cluster_rooms import Node, Proxy, bodies, join, nodes

__all__ = ["nodes"]  # the fixture, used by name

ROOM = "lobby@conference.localhost"  # occupants on all three nodes
QUIET = "quiet@conference.localhost"  # a temporary room owned by n1, its occupants on n2 and n3 only
SURVIVORS = ["n2/0", "n3/0"]
MANY = 40  # rooms of one owner, in the spread test
Cluster = tuple[dict[str, Node], Storage, aioredis.Redis, str, Proxy]


async def holder(redis: aioredis.Redis, prefix: str, key: str) -> str:
    """The member whose lease on an owned entity Redis holds now ('' for none)."""
    value = (await redis.get(f"{prefix}:own:owner:{{{key}}}") or b"").decode()
    return value.partition("|")[0].partition("#")[0]


async def moved(redis: aioredis.Redis, prefix: str, key: str, old: str, since: float, limit: float = 10) -> float:
    """Wait until a member other than `old` holds `key`; the seconds from `since`."""
    while (await holder(redis, prefix, key)) in ("", old):
        assert time.monotonic() - since < limit, f"{key} was not taken over within {limit} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - since


async def worker_of(redis: aioredis.Redis, prefix: str, node: str) -> int:
    return int((await redis.get(f"{prefix}:alive:{node}/0") or b"0").split(b".")[0])  # "pid.instance"


async def kill(started: dict[str, Node], redis: aioredis.Redis, prefix: str, name: str) -> float:
    """SIGKILL to a node's supervisor and worker: no goodbye, no release. The monotonic time its worker died."""
    worker = await worker_of(redis, prefix, name)
    os.killpg(started[name].proc.pid, signal.SIGKILL)
    started[name].proc.wait(5)
    while os.path.exists(f"/proc/{worker}"):
        await asyncio.sleep(0.01)
    return time.monotonic()


def departures(client: ClientXMPP, room: str) -> asyncio.Queue[tuple[str, set[str]]]:
    """(nick, status codes) of every occupant `client` sees leave `room`."""
    queue: asyncio.Queue[tuple[str, set[str]]] = asyncio.Queue()

    def left(presence: Any) -> None:
        codes = {str(status) for status in presence["muc"]["status_codes"]}
        queue.put_nowait((presence["muc"]["nick"], codes))

    client.add_event_handler(f"muc::{room}::got_offline", left)
    return queue


async def users(started: dict[str, Node], storage: Storage, **where: str) -> dict[str, ClientXMPP]:
    """An account per name, logged in on the node named, with the MUC and pubsub plugins."""
    clients = {}
    for name, node in where.items():
        await create_account(storage, "localhost", name, "secret", 4096)
        clients[name] = await started[node].client(f"{name}@localhost", resource=name[0],
                                                   plugins=("xep_0045", "xep_0060"))
    return clients


async def configure(client: ClientXMPP, room: str, **values: Any) -> None:
    form = await client.plugin["xep_0045"].get_room_config(room)
    form["values"] = values
    await client.plugin["xep_0045"].set_room_config(room, form)


async def no_more(queue: asyncio.Queue[Any], wait: float = 1.0) -> list[Any]:
    """What else arrives in `queue` within `wait` seconds."""
    await asyncio.sleep(wait)
    found = []
    while not queue.empty():
        found.append(queue.get_nowait())
    return found


@pytest.mark.timeout(150)
async def test_a_dead_owners_rooms_come_back_on_the_survivors_before_any_stanza(nodes: Cluster) -> None:
    started, storage, redis, prefix, _ = nodes
    c = await users(started, storage, alice="n1", bob="n2", carol="n3", dave="n3")
    alice, bob, carol = c["alice"], c["bob"], c["carol"]
    inbox = {name: Harness.inbox(c[name]) for name in ("bob", "carol")}

    # A persistent room created on n1 (which owns it), named, with bob as a second owner and a subject.
    await join(alice, "alice")
    await configure(alice, ROOM, **{"muc#roomconfig_persistentroom": True, "muc#roomconfig_roomname": "Lobby"})
    await alice.plugin["xep_0045"].set_affiliation(ROOM, "owner", jid="bob@localhost")
    alice.plugin["xep_0045"].set_subject(ROOM, "takeover")
    await join(bob, "bob")
    await join(carol, "carol")
    for sender, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
        sender.send_message(mto=ROOM, mbody=f"before, from {name}", mtype="groupchat")
        for queue in inbox.values():
            assert await bodies(queue, 1) == [f"before, from {name}"]
    # A temporary room owned by n1 whose occupants are all elsewhere: nothing of n1's goes to it when n1 dies.
    await alice.plugin["xep_0045"].join_muc_wait(QUIET, "alice", timeout=10)
    await configure(alice, QUIET)
    await bob.plugin["xep_0045"].join_muc_wait(QUIET, "bob", timeout=10)
    await carol.plugin["xep_0045"].join_muc_wait(QUIET, "carol", timeout=10)
    alice.plugin["xep_0045"].leave_muc(QUIET, "alice")
    while "alice" in carol.plugin["xep_0045"].get_roster(QUIET):
        await asyncio.sleep(0.05)
    assert await holder(redis, prefix, f"muc:{ROOM}") == "n1/0"
    assert await holder(redis, prefix, f"muc:{QUIET}") == "n1/0"
    gone = departures(carol, ROOM)

    killed = await kill(started, redis, prefix, "n1")
    # No client sends anything until both rooms have a live owner again.
    owned = await moved(redis, prefix, f"muc:{ROOM}", "n1/0", killed)
    quiet_owned = await moved(redis, prefix, f"muc:{QUIET}", "n1/0", killed)
    assert await holder(redis, prefix, f"muc:{ROOM}") in SURVIVORS
    # The quiet room had no stanza at all: its successor by rendezvous hashing took it.
    assert await holder(redis, prefix, f"muc:{QUIET}") == successor(f"muc:{QUIET}", SURVIVORS)
    info = await carol.plugin["xep_0030"].get_info(jid=ROOM, timeout=5)
    assert "muc_persistent" in info["disco_info"]["features"]
    answered = time.monotonic() - killed
    bob.send_message(mto=ROOM, mbody="after", mtype="groupchat")
    assert await bodies(inbox["carol"], 1) == ["after"]  # carol never rejoined
    assert await bodies(inbox["bob"], 1) == ["after"]
    delivered = time.monotonic() - killed
    print(f"\ntakeover after SIGKILL: lobby owned again after {owned:.2f} s (quiet: {quiet_owned:.2f} s), "
          f"disco#info answered after {answered:.2f} s, a message delivered after {delivered:.2f} s")
    assert delivered < 10, "the room did not come back within 10 s"

    # The survivors are still in: the occupant list, from the room itself; alice left with status 333.
    assert await asyncio.wait_for(gone.get(), 5) == ("alice", {"333"})
    items = await carol.plugin["xep_0030"].get_items(jid=ROOM, timeout=5)
    assert sorted(item[0] for item in items["disco_items"]["items"]) == [f"{ROOM}/bob", f"{ROOM}/carol"]
    assert sorted(carol.plugin["xep_0045"].get_roster(ROOM)) == ["bob", "carol"]
    carol.send_message(mto=QUIET, mbody="quiet after", mtype="groupchat")
    assert await bodies(inbox["bob"], 1) == ["quiet after"]
    assert await bodies(inbox["carol"], 1) == ["quiet after"]

    # Configuration, affiliations, subject and history came back from storage and the archive.
    form = await bob.plugin["xep_0045"].get_room_config(ROOM)
    assert form["values"]["muc#roomconfig_roomname"] == "Lobby"
    owners = await bob.plugin["xep_0045"].get_affiliation_list(ROOM, "owner")
    assert sorted(str(jid) for jid in owners) == ["alice@localhost", "bob@localhost"]
    _, subject, _, history = await c["dave"].plugin["xep_0045"].join_muc_wait(ROOM, "dave", maxstanzas=10,
                                                                              timeout=10)
    assert subject["subject"] == "takeover"
    assert [m["body"] for m in history] == [f"before, from {name}" for name in ("alice", "bob", "carol")] + \
        ["after"]


@pytest.mark.timeout(150)
async def test_a_stalled_owner_resumed_after_its_lease_does_not_serve_the_room(nodes: Cluster) -> None:
    started, storage, redis, prefix, _ = nodes
    c = await users(started, storage, alice="n1", bob="n2", carol="n3", dave="n3")
    alice, bob, carol = c["alice"], c["bob"], c["carol"]
    inbox = {name: Harness.inbox(c[name]) for name in ("bob", "carol")}
    await join(alice, "alice")
    await configure(alice, ROOM, **{"muc#roomconfig_persistentroom": True})
    await join(bob, "bob")
    await join(carol, "carol")
    assert await holder(redis, prefix, f"muc:{ROOM}") == "n1/0"
    owners: set[str] = set()

    async def watch() -> None:
        while True:
            owners.add(await holder(redis, prefix, f"muc:{ROOM}"))
            await asyncio.sleep(0.02)

    watcher = asyncio.get_running_loop().create_task(watch())
    os.killpg(started["n1"].proc.pid, signal.SIGSTOP)  # the owner stalls (a pause, a swap storm)
    try:
        stopped = time.monotonic()
        await moved(redis, prefix, f"muc:{ROOM}", "n1/0", stopped)
        new_owner = await holder(redis, prefix, f"muc:{ROOM}")
        # n1 has alice's message in its socket when it resumes, with the room still in memory.
        alice.send_message(mto=ROOM, mbody="stale?", mtype="groupchat")
        await asyncio.sleep(0.5)
    finally:
        os.killpg(started["n1"].proc.pid, signal.SIGCONT)
    bob.send_message(mto=ROOM, mbody="after", mtype="groupchat")
    got = {name: [m["body"] for m in [await asyncio.wait_for(queue.get(), 5)] + await no_more(queue, 3)]
           for name, queue in inbox.items()}
    watcher.cancel()
    # The room's messages reach bob and carol once each, from its owner. n1 no longer served the room: alice's
    # message went to the owner, which took it (alice back in) or refused it (she had left with n1's sessions).
    # Had n1 served it from its stale copy of the room, bob and carol would have it but the owner's history not.
    _, _, _, history = await c["dave"].plugin["xep_0045"].join_muc_wait(ROOM, "dave", maxstanzas=10, timeout=10)
    served = [m["body"] for m in history].count("stale?")
    assert served <= 1
    for name, found in got.items():
        assert found.count("after") == 1, (name, found)
        assert found.count("stale?") == served, (name, found, served)
    assert owners - {""} == {"n1/0", new_owner}  # never a third, and n1 never again
    assert await holder(redis, prefix, f"muc:{ROOM}") == new_owner
    assert f"room {ROOM} is no longer served here" in started["n1"].log()


@pytest.mark.timeout(150)
async def test_a_dead_owners_pubsub_node_comes_back_on_a_survivor_before_any_request(nodes: Cluster) -> None:
    started, storage, redis, prefix, _ = nodes
    c = await users(started, storage, alice="n1", bob="n2", carol="n3")
    key = "pubsub:pubsub.localhost/feed"
    await c["alice"].plugin["xep_0060"].create_node("pubsub.localhost", "feed", timeout=10)
    await c["alice"].plugin["xep_0060"].publish("pubsub.localhost", "feed", id="first",
                                                payload=fromstring("<entry xmlns='urn:example'>1</entry>"),
                                                timeout=10)
    events: asyncio.Queue[str] = asyncio.Queue()
    c["carol"].add_event_handler("pubsub_publish",
                                 lambda m: events.put_nowait(m["pubsub_event"]["items"]["item"]["id"]))
    c["carol"].send_presence()
    await c["carol"].plugin["xep_0060"].subscribe("pubsub.localhost", "feed", timeout=10)
    assert await holder(redis, prefix, key) == "n1/0"

    killed = await kill(started, redis, prefix, "n1")
    owned = await moved(redis, prefix, key, "n1/0", killed)
    print(f"\npubsub node owned again {owned:.2f} s after SIGKILL")
    assert await holder(redis, prefix, key) == successor(key, SURVIVORS)
    assert owned < 10, "the node did not come back within 10 s"

    # alice again, on a survivor: her node, its item and carol's subscription are there.
    again = await started["n2"].client("alice@localhost", resource="a2", plugins=("xep_0060",))
    items = await again.plugin["xep_0060"].get_items("pubsub.localhost", "feed", timeout=10)
    assert [item["id"] for item in items["pubsub"]["items"]] == ["first"]
    await again.plugin["xep_0060"].publish("pubsub.localhost", "feed", id="second",
                                           payload=fromstring("<entry xmlns='urn:example'>2</entry>"), timeout=10)
    assert await asyncio.wait_for(events.get(), 5) == "second"
    assert await holder(redis, prefix, key) == successor(key, SURVIVORS)


@pytest.mark.timeout(180)
async def test_a_dead_owners_many_rooms_spread_over_the_survivors(nodes: Cluster) -> None:
    started, storage, redis, prefix, _ = nodes
    c = await users(started, storage, alice="n1", bob="n2", carol="n3")
    alice, bob, carol = c["alice"], c["bob"], c["carol"]
    rooms = [f"room{i}@conference.localhost" for i in range(MANY)]

    # alice (n1) creates the rooms, so n1 owns them; bob and carol join from the other nodes and alice leaves.
    await asyncio.gather(*(alice.plugin["xep_0045"].join_muc_wait(room, "alice", timeout=30) for room in rooms))
    await asyncio.gather(*(configure(alice, room) for room in rooms))
    for client, nick in ((bob, "bob"), (carol, "carol")):
        await asyncio.gather(*(client.plugin["xep_0045"].join_muc_wait(room, nick, timeout=30) for room in rooms))
    for room in rooms:
        alice.plugin["xep_0045"].leave_muc(room, "alice")
    for room in rooms:
        while "alice" in carol.plugin["xep_0045"].get_roster(room):
            await asyncio.sleep(0.05)
        assert await holder(redis, prefix, f"muc:{room}") == "n1/0"

    killed = await kill(started, redis, prefix, "n1")
    for room in rooms:  # loading forty rooms is work: on a busy machine it may take longer than one room's 10 s
        await moved(redis, prefix, f"muc:{room}", "n1/0", killed, limit=30)
    every = time.monotonic() - killed
    print(f"\n{MANY} rooms owned again {every:.2f} s after SIGKILL")
    owners = {room: await holder(redis, prefix, f"muc:{room}") for room in rooms}
    assert owners == {room: successor(f"muc:{room}", SURVIVORS) for room in rooms}
    assert set(owners.values()) == set(SURVIVORS)  # spread, not all on one
    inbox = Harness.inbox(carol)
    for room in rooms:
        bob.send_message(mto=room, mbody=room, mtype="groupchat")
    assert sorted(await bodies(inbox, MANY)) == sorted(rooms)
