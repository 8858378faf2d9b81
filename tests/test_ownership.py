"""Leases on owned entities (server/ownership.py) against real Redis: two members sharing a key prefix, one
of them reaching Redis through a proxy the test can cut (a partition)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from xml.etree.ElementTree import Element

import pytest
import redis.asyncio as aioredis

from server.hooks import Hooks
from server.jid import JID
from server.ownership import Lease, NotOwner, Ownership, Placement, successor
from server.stanza import Stanza
from server.stream.errors import StanzaError
from tests.conftest import unavailable

REDIS = ("127.0.0.1", 6379)
LEASE = 0.6


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    client = aioredis.from_url(f"redis://{REDIS[0]}:{REDIS[1]}/0")
    try:
        await asyncio.wait_for(client.ping(), 3)
    except Exception:
        await client.aclose()
        unavailable("Redis at 127.0.0.1:6379 is not reachable")
    name = f"parley-test-own-{uuid.uuid4().hex[:12]}"
    yield name
    keys = [key async for key in client.scan_iter(f"{name}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def member(prefix: str, name: str, port: int = REDIS[1]) -> tuple[Ownership, list[str]]:
    lost: list[str] = []
    client = aioredis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3, socket_connect_timeout=0.3)
    return Ownership(client, prefix, name, lease=LEASE, on_lost=lost.append), lost


async def test_one_owner_at_a_time_with_a_larger_token_at_each_takeover(prefix: str) -> None:
    a, lost_a = member(prefix, "n1/0")
    b, _ = member(prefix, "n2/0")
    c, lost_c = member(prefix, "n3/0")
    try:
        lease_a, _ = await a.claim("room")
        assert lease_a is not None
        assert await b.claim("room") == (None, "n1/0")
        await a.record(lease_a, {"occupant": "alice"})
        await asyncio.sleep(LEASE * 1.5)  # renewed meanwhile: still A's
        assert a.holds("room") is lease_a and (await b.claim("room"))[0] is None
        again, _ = await a.claim("room")
        assert again is not None and again.token == lease_a.token  # renewal, not a takeover

        await a.stop()  # released: B takes it at once, with a larger token, and finds A's state
        with pytest.raises(ConnectionError):  # a stopped member takes nothing more: it would outlive it
            await a.claim("room")
        lease_b, _ = await b.claim("room")
        assert lease_b is not None and lease_b.token > lease_a.token
        assert await b.state("room") == {"occupant": "alice"}
        with pytest.raises(NotOwner):
            await a.record(lease_a, {"occupant": "mallory"})

        b._task.cancel()  # type: ignore[union-attr]  # B stalls: its lease lapses, C takes over
        await asyncio.sleep(LEASE + 0.1)
        assert b.holds("room") is None
        lease_c, _ = await c.claim("room")
        assert lease_c is not None and lease_c.token > lease_b.token
        b.held["room"] = lease_b  # as if B had not noticed: Redis refuses its writes all the same
        lease_b.deadline = time.monotonic() + 5
        with pytest.raises(NotOwner):
            await b.guard(lease_b)
        assert "room" not in b.held and lost_a == [] and lost_c == []
        await c.guard(lease_c)
    finally:
        for m in (a, b, c):
            await m.stop()
            await m.redis.aclose()


async def test_a_restarted_member_takes_over_what_its_dead_predecessor_held(prefix: str) -> None:
    old, _ = member(prefix, "n1/0")
    new, _ = member(prefix, "n1/0")
    try:
        first, _ = await old.claim("room")
        old._task.cancel()  # type: ignore[union-attr]  # killed: no release
        second, _ = await new.claim("room")
        assert first is not None and second is not None and second.token > first.token
        with pytest.raises(NotOwner):
            await old.guard(first)
    finally:
        for m in (old, new):
            await m.stop()
            await m.redis.aclose()


async def test_a_member_cut_off_from_redis_stops_serving_before_another_takes_over(prefix: str) -> None:
    links: list[asyncio.StreamWriter] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*REDIS)
        links.extend((writer, upstream_writer))
        await asyncio.gather(relay(reader, upstream_writer), relay(upstream_reader, writer),
                             return_exceptions=True)

    proxy = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    a, lost_a = member(prefix, "n1/0", port)
    b, _ = member(prefix, "n2/0")
    observer = aioredis.from_url(f"redis://{REDIS[0]}:{REDIS[1]}/0")
    try:
        lease_a, _ = await a.claim("room")
        assert lease_a is not None
        proxy.close()
        for link in links:  # the partition: A's connection to Redis is cut, and no new one gets through
            link.transport.abort()
        deadline = time.monotonic() + LEASE * 2
        while not lost_a:
            assert time.monotonic() < deadline, "A kept serving without Redis"
            await asyncio.sleep(0.01)
        # A gave the room up while Redis still names it: the two never overlap.
        assert await observer.pttl(a.owner_key("room")) > 0
        assert a.holds("room") is None and not a.healthy
        assert (await b.claim("room"))[0] is None
        await asyncio.sleep(LEASE)
        lease_b, _ = await b.claim("room")
        assert lease_b is not None and lease_b.token > lease_a.token
    finally:
        for m in (a, b):
            await m.stop()
            await m.redis.aclose()
        await observer.aclose()


# --- Placement: where a stanza for an owned entity is served, with stand-ins for the cluster and a service ---

class StubCluster:
    """The cluster API as Placement uses it: this member, the live members, and what was forwarded where."""

    def __init__(self, member: str, prefix: str, live: list[str]) -> None:
        self.member = member
        self.prefix = prefix
        self.live = live
        self.forwarded: list[tuple[str, str]] = []

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def members(self) -> list[str]:
        return self.live

    def on(self, kind: str, handler: object) -> None:
        pass

    def route_elsewhere(self, member: str, st: Stanza) -> None:
        self.forwarded.append((member, st.el.get("to") or ""))


class StubServer:
    """What Placement reads of a server: its cluster and the Redis URL."""

    def __init__(self, cluster: StubCluster) -> None:
        self.cluster = cluster
        self.config = SimpleNamespace(cluster=SimpleNamespace(redis_url=f"redis://{REDIS[0]}:{REDIS[1]}/0"))
        self.hooks = Hooks()


class Entities:
    """A service whose entities are named by the stanza's 'to', loaded on takeover."""

    domain = "svc.localhost"

    def __init__(self, idle_release: float | None = None) -> None:
        self.idle_release = idle_release
        self.taken: list[tuple[str, int]] = []
        self.refused: list[str] = []

    def owner_key(self, st: Stanza) -> str | None:
        return st.el.get("to")

    async def take(self, lease: Lease) -> bool:
        self.taken.append((lease.key, lease.token))
        return True

    def lost(self, key: str) -> None:
        pass

    async def act(self, key: str, action: str, argument: str) -> None:
        pass

    async def refuse(self, st: Stanza, error: StanzaError) -> None:
        self.refused.append(error.condition)


def placement(prefix: str, member: str, live: list[str]) -> tuple[Placement, StubCluster]:
    cluster = StubCluster(member, prefix, live)
    found = Placement(StubServer(cluster))  # type: ignore[arg-type]
    found.ownership.lease = LEASE
    return found, cluster


def stanza(to: str) -> Stanza:
    el = Element("message", {"to": to, "from": "alice@localhost/a"})
    return Stanza(el, "message", JID.parse("alice@localhost/a"), JID.parse(to))


async def test_a_stanza_is_served_by_the_owner_forwarded_to_it_or_taken_over_from_a_dead_one(prefix: str) -> None:
    live = ["n1/0", "n2/0"]
    one, _ = placement(prefix, "n1/0", live)
    two, cluster_two = placement(prefix, "n2/0", live)
    service_one, service_two = Entities(), Entities(idle_release=0.1)
    try:
        assert await one.admit(service_one, stanza("room@svc.localhost"))  # free: taken and served here
        assert [key for key, _ in service_one.taken] == ["room@svc.localhost"]
        assert not await two.admit(service_two, stanza("room@svc.localhost"))  # owned by a live member
        assert cluster_two.forwarded == [("n1/0", "room@svc.localhost")] and service_two.taken == []

        one.ownership._task.cancel()  # type: ignore[union-attr]  # n1 dies: no renewal, no release
        live.remove("n1/0")
        started = time.monotonic()
        assert await two.admit(service_two, stanza("room@svc.localhost"))  # waits for the lease to lapse
        assert LEASE * 0.5 < time.monotonic() - started < LEASE + 1
        assert service_two.taken[0][1] > service_one.taken[0][1]

        await asyncio.sleep(LEASE * 2 + 0.1)  # an entity of a service with idle_release goes once unused
        assert two.holds("room@svc.localhost") is None
        assert await two.ownership.owner("room@svc.localhost") is None
    finally:
        for found, service in ((one, service_one), (two, service_two)):
            found.services[service.domain] = service
            await found.remove(service)


def test_a_lost_members_entities_spread_over_the_survivors_and_only_its_move() -> None:
    keys = [f"muc:room{i}@conference.localhost" for i in range(600)]
    three = ["n1/0", "n2/0", "n3/0"]
    first = {key: successor(key, three) for key in keys}
    shares = {member: sum(1 for owner in first.values() if owner == member) for member in three}
    assert all(150 < share < 250 for share in shares.values()), shares
    after = {key: successor(key, ["n1/0", "n3/0"]) for key in keys}
    assert {key for key in keys if after[key] != first[key]} == {key for key in keys if first[key] == "n2/0"}


async def test_the_survivors_take_a_lost_members_entities_at_once_each_its_share(prefix: str) -> None:
    live = ["n1/0", "n2/0", "n3/0"]
    found = {name: placement(prefix, name, live) for name in live}
    services = {name: Entities() for name in live}
    one, two, three = (found[name][0] for name in live)
    keys = [f"room{i}@svc.localhost" for i in range(40)]
    for name, (survivor, _) in found.items():
        survivor.add(services[name])
    try:
        for key in keys:
            assert await one.admit(services["n1/0"], stanza(key))
        assert set(await one.ownership.held_by("n1/0")) == set(keys)
        one.ownership._task.cancel()  # type: ignore[union-attr]  # n1 dies: no renewal, no release
        live.remove("n1/0")
        two.rescue_after = three.rescue_after = 30.0
        for survivor in (two, three):
            survivor.server.hooks.notify("cluster/member-lost", "n1/0")
        deadline = time.monotonic() + LEASE + 2
        while len(services["n2/0"].taken) + len(services["n3/0"].taken) < len(keys):
            assert time.monotonic() < deadline, "the lost member's entities were not taken over without a stanza"
            await asyncio.sleep(0.05)
        for name, survivor in (("n2/0", two), ("n3/0", three)):
            mine = sorted(key for key, _ in services[name].taken)
            assert mine == sorted(key for key in keys if successor(key, live) == name)
            assert all(survivor.holds(key) for key in mine)
            assert set(await survivor.ownership.held_by(name)) == set(mine)
        assert 10 < len(services["n2/0"].taken) < 30
        deadline = time.monotonic() + 2
        while await one.ownership.held_by("n1/0"):  # struck off the lost member's list
            assert time.monotonic() < deadline, "the lost member's list kept what was taken over"
            await asyncio.sleep(0.05)
    finally:
        for name, (survivor, _) in found.items():
            await survivor.remove(services[name])


async def test_what_a_lost_members_successor_did_not_take_is_taken_by_another(prefix: str) -> None:
    live = ["n1/0", "n2/0", "n3/0"]
    one, _ = placement(prefix, "n1/0", live)
    two, _ = placement(prefix, "n2/0", live)
    service_one, service_two = Entities(), Entities()
    keys = [f"room{i}@svc.localhost" for i in range(12)]
    one.add(service_one)
    two.add(service_two)
    try:
        for key in keys:
            assert await one.admit(service_one, stanza(key))
        one.ownership._task.cancel()  # type: ignore[union-attr]
        live.remove("n1/0")  # n3 is listed but never takes its share: it died too, unnoticed yet
        two.rescue_after = LEASE * 2
        two.server.hooks.notify("cluster/member-lost", "n1/0")
        deadline = time.monotonic() + LEASE * 4 + 2
        while len(service_two.taken) < len(keys):
            assert time.monotonic() < deadline, sorted(service_two.taken)
            await asyncio.sleep(0.05)
        assert sorted(key for key, _ in service_two.taken) == sorted(keys)
    finally:
        for found, service in ((one, service_one), (two, service_two)):
            await found.remove(service)


async def test_a_member_restarted_in_place_of_a_dead_one_takes_back_what_it_held_at_once(prefix: str) -> None:
    live = ["n1/0", "n2/0"]
    old, _ = placement(prefix, "n1/0", live)
    service_old, service_new = Entities(), Entities()
    old.add(service_old)
    keys = [f"room{i}@svc.localhost" for i in range(5)]
    new = None
    try:
        for key in keys:
            assert await old.admit(service_old, stanza(key))
        old.ownership._task.cancel()  # type: ignore[union-attr]  # n1 dies, and is started again at once
        new, _ = placement(prefix, "n1/0", live)
        new.add(service_new)
        await new.server.hooks.fire("server/started", new.server)
        deadline = time.monotonic() + LEASE / 2  # well before the dead one's leases lapse
        while len(service_new.taken) < len(keys):
            assert time.monotonic() < deadline, service_new.taken
            await asyncio.sleep(0.01)
        assert set(await new.ownership.held_by("n1/0")) == set(keys)  # still listed: held by the new one
        assert all(new.holds(key) for key in keys)
    finally:
        old.ownership.held.clear()  # the dead one releases nothing
        await old.remove(service_old)
        if new is not None:
            await new.remove(service_new)
