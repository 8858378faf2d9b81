"""The messaging API other parts of Parley use between the members of a cluster (CLUSTER-API.md): member ids,
membership with its hooks, frames of a part's own kind, stanzas routed on another member, keys and locks.
Two members run in this process on real Redis.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from xml.etree.ElementTree import fromstring

import pytest

from server.cluster import Cluster
from server.jid import JID
from server.stanza import Stanza
from tests.conftest import Harness
from tests.test_cluster import NODE
from tests.test_session_directory import cluster_config, prefix, until, worker  # noqa: F401 - prefix: a fixture


def cluster_of(server: object) -> Cluster:
    cluster = getattr(server, "cluster", None)
    assert isinstance(cluster, Cluster)
    return cluster


async def test_members_frames_hooks_and_routing_elsewhere(tmp_path: Path, prefix: str) -> None:  # noqa: F811
    config = cluster_config(tmp_path, prefix)
    async with worker(config, 0) as first:
        one = cluster_of(first)
        assert (one.member, one.node) == (f"{NODE}/0", NODE) and one.members() == [one.member]
        ups: list[str] = []
        losses: list[str] = []
        first.hooks.add("cluster/member-up", ups.append)
        first.hooks.add("cluster/member-lost", losses.append)
        heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

        async def echo(sender: str, payload: str) -> None:
            await heard.put((sender, payload))

        one.on("echo", echo)
        with pytest.raises(ValueError):
            one.on("e", echo)  # single letters are the cluster's own
        async with worker(cluster_config(tmp_path, prefix), 1) as second:
            two = cluster_of(second)
            await until(lambda: one.members() == [f"{NODE}/0", f"{NODE}/1"], "the second member seen by the first")
            assert ups == [f"{NODE}/1"] and two.members() == one.members()
            assert one.key("rooms") == f"{prefix}:rooms" and await two.redis.ping()
            for n in range(3):  # in order, batched
                two.send(one.member, "echo", f"payload {n} <x/> \u00e9")
            assert [await asyncio.wait_for(heard.get(), 5) for _ in range(3)] == \
                [(two.member, f"payload {n} <x/> \u00e9") for n in range(3)]
            two.send(f"{NODE}/9", "echo", "nobody")  # not a member: dropped
            # A stanza handed to the first member is routed there: to alice's session on that member.
            harness = Harness(first, first.config.listeners[0].port, first.config.listeners[1].port, tmp_path)
            try:
                await harness.add_user("alice")
                alice = await harness.client("alice@localhost", resource="a")
                inbox = harness.inbox(alice)
                el = fromstring("<message xmlns='jabber:client' from='localhost' to='alice@localhost/a' "
                                "type='chat'><body>from the other member</body></message>")
                two.route_elsewhere(one.member, Stanza(el, "message", JID.parse("localhost"),
                                                       JID.parse("alice@localhost/a")))
                assert (await asyncio.wait_for(inbox.get(), 5))["body"] == "from the other member"
            finally:
                await harness.close()
            async with one.lock("test"):  # cluster-wide: the other member waits
                other = asyncio.create_task(_take(two, "test"))
                await asyncio.sleep(0.1)
                assert not other.done()
            await asyncio.wait_for(other, 5)
        await until(lambda: losses == [f"{NODE}/1"], "the second member's goodbye")
        assert one.members() == [one.member] and heard.empty()


async def _take(cluster: Cluster, name: str) -> None:
    async with cluster.lock(name):
        pass
