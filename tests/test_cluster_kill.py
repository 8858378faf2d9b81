"""A node of a three-node cluster killed with SIGKILL in the middle of a burst of chat messages, with the archive
(XEP-0313) on: whatever the sending client's stream management (XEP-0198) acknowledged is in the sender's and
the recipient's archives, once each, and the recipient gets it when he logs in again on a surviving node.

Two cases: the recipient's node dies (the sender's node goes on acknowledging, and what it sends to the dead
node goes to offline storage), and the sender's node dies (what it acknowledged before dying was committed).
The nodes are `parley serve --node nK` subprocesses on 127.0.0.1-3 with real Redis and PostgreSQL
(tests/test_cluster_nodes.py); the burst is tests/test_faults.py's.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from xml.etree.ElementTree import Element

import pytest
from slixmpp import ClientXMPP
from sqlalchemy import func, select

from server.storage import Storage
from server.storage.schema import archive, offline
from tests.test_cluster_nodes import Node, befriend, nodes, until_available
from tests.test_faults import bodies, send_burst, until
from tests.test_mam import Archive
from tests.test_offline import collect
from tests.test_roster_presence import sync

__all__ = ["nodes"]  # the fixture, used by name

BURST = 300  # messages alice sends; a node dies once KILL_AFTER of them are acknowledged
KILL_AFTER = 60


async def archived(storage: Storage, user: str) -> list[str]:
    """Bodies in `user`'s archive, oldest row first (through the nodes' shared storage, not a pool per look)."""
    async with storage.engine.connect() as conn:
        rows = await conn.execute(select(archive.c.body).where(archive.c.username == user).order_by(archive.c.id))
        return [row.body for row in rows]


async def waiting_offline(storage: Storage, user: str) -> int:
    async with storage.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(offline).where(offline.c.username == user))
                   or 0)


def twice(found: list[str]) -> list[str]:
    return sorted(body for body, count in Counter(found).items() if count > 1)


async def chatting(sender: Node, recipient: Node) -> tuple[ClientXMPP, ClientXMPP, asyncio.Queue[Element]]:
    """alice with stream management on `sender`, bob available on `recipient` (with his inbox)."""
    await sender.add_user("alice")
    await sender.add_user("bob")
    await befriend(sender.storage, "alice", "bob")
    bob = await recipient.client("bob@localhost", resource="b")
    inbox = collect(bob)
    bob.send_presence()
    await until_available(sender, "bob@localhost/b")
    alice = await sender.client("alice@localhost", resource="phone", plugins=("xep_0198",))
    plugin = alice.plugin["xep_0198"]
    plugin.window = 5  # ask for an acknowledgement every 5 stanzas
    await until(lambda: plugin.sm_id is not None, "stream management enabled")
    return alice, bob, inbox


async def burst(alice: ClientXMPP, victim: Node, until_acked: bool) -> list[str]:
    """alice sends BURST messages to bob, at most IN_FLIGHT unacknowledged; `victim` is killed with SIGKILL once
    KILL_AFTER are acknowledged. Returns the bodies acknowledged: all of them when `until_acked` (alice's
    node survives), else those acknowledged before the kill."""
    plugin = alice.plugin["xep_0198"]
    first = plugin.seq
    sender = asyncio.get_running_loop().create_task(send_burst(alice, "bob@localhost", BURST))
    try:
        await until(lambda: plugin.last_ack - first >= KILL_AFTER, "acknowledgements")
        acked = plugin.last_ack - first
        victim.kill()
        assert not sender.done(), "the burst ended before the node was killed: make it longer"
        if until_acked:
            await asyncio.wait_for(sender, 30)
            plugin.request_ack()
            await until(lambda: plugin.last_ack == plugin.seq, "the last acknowledgement", timeout=15)
            acked = plugin.last_ack - first
            assert acked == BURST
    finally:
        sender.cancel()
    return [f"m{i}" for i in range(acked)]


@pytest.mark.timeout(120)
async def test_the_recipients_node_killed_mid_burst(nodes: dict[str, Node]) -> None:
    n1, n2, n3 = nodes["n1"], nodes["n2"], nodes["n3"]
    alice, bob, before = await chatting(n1, n2)
    acked = await burst(alice, n2, until_acked=True)
    bob.abort()
    got = bodies(before)
    assert 0 < len(got) < BURST, len(got)  # bob was getting them when his node died

    sent, kept = await archived(n1.storage, "alice"), await archived(n1.storage, "bob")
    assert not twice(sent), f"archived twice in alice's archive: {twice(sent)}"
    assert not twice(kept), f"archived twice in bob's archive: {twice(kept)}"
    assert set(acked) <= set(sent), sorted(set(acked) - set(sent))
    assert set(acked) <= set(kept), sorted(set(acked) - set(kept))

    # bob again, on a surviving node: offline storage hands him what went there, his archive has the rest.
    again = await n3.client("bob@localhost", resource="b2")
    after = collect(again)
    again.send_presence()

    async def all_taken() -> bool:
        return not await waiting_offline(n1.storage, "bob")

    await until(all_taken, "bob's offline messages delivered")
    await sync(again)  # what was taken has reached him
    stored = bodies(after)
    assert f"m{BURST - 1}" in stored, "what was sent after the node died did not wait in offline storage"
    got += stored
    assert not twice(got), f"delivered twice: {twice(got)}"
    history = [result.body for result in await Archive(again).all(page=250)]
    assert not twice(history), f"twice in bob's archive: {twice(history)}"
    assert set(acked) <= set(got) | set(history), sorted(set(acked) - set(got) - set(history))


@pytest.mark.timeout(120)
async def test_the_senders_node_killed_mid_burst(nodes: dict[str, Node]) -> None:
    n1, n2 = nodes["n1"], nodes["n2"]
    alice, bob, inbox = await chatting(n1, n2)
    acked = await burst(alice, n1, until_acked=False)
    alice.abort()
    await sync(bob)  # what n1 forwarded before dying is in
    got = bodies(inbox)
    sent, kept = await archived(n2.storage, "alice"), await archived(n2.storage, "bob")
    assert not twice(sent), f"archived twice in alice's archive: {twice(sent)}"
    assert not twice(kept), f"archived twice in bob's archive: {twice(kept)}"
    assert not twice(got), f"delivered twice: {twice(got)}"
    assert set(got) <= set(kept), "delivered without being archived"
    assert set(acked) <= set(sent), sorted(set(acked) - set(sent))
    assert set(acked) <= set(kept), sorted(set(acked) - set(kept))
