"""The session directory: the one-process registry and the cluster's (over real Redis) answer alike, the cluster
composes without changing any session's class, and what other workers need comes from the modules' declarations
and the caches' invalidation hooks, not from module names.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import fromstring

import pytest
import redis.asyncio as aioredis

from server.cluster import Cluster, shared_session_state
from server.config import ClusterConfig, Config
from server.host import Host
from server.jid import JID
from server.server import Server
from server.sessions import Session, SessionDirectory, SessionRegistry
from server.storage import RosterItem, open_storage
from server.storage.kv import CachedDocuments
from tests.conftest import Harness, free_port, make_config
from tests.test_cluster import REDIS_URL, redis_or_skip

ALICE, BOB = JID.parse("alice@localhost"), JID.parse("bob@localhost")
PRESENCE = "<presence xmlns='jabber:client'/>"


def cluster_config(tmp_path: Path, prefix: str, **overrides: Any) -> Config:
    """Worker configuration on one SQLite file, so that two workers in this process share their users."""
    config = make_config(tmp_path, free_port(), free_port(), f"sqlite+aiosqlite:///{tmp_path}/parley.db", **overrides)
    config.cluster = ClusterConfig(workers=2, redis_url=REDIS_URL, prefix=prefix)
    return config


@asynccontextmanager
async def worker(config: Config, index: int) -> AsyncIterator[Server]:
    """Worker `index` of a cluster, composed and started in this process as `parley serve` does it."""
    server = Server(config)
    cluster = Cluster(server, index, config.cluster)
    await cluster.start()
    try:
        await server.start()
        try:
            yield server
        finally:
            await server.stop()
    finally:
        await cluster.stop()


@asynccontextmanager
async def redis_prefix() -> AsyncIterator[str]:
    """A Redis prefix of the test's own; its keys are gone afterwards. Under CI, Redis must be there."""
    redis = await redis_or_skip()
    name = f"parley-directory-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        leftover = [key async for key in redis.scan_iter(f"{name}:*")]
        if leftover:
            await redis.delete(*leftover)
        await redis.aclose()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with redis_prefix() as name:
        yield name


async def until(check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 5.0) -> None:
    """Wait for `check` to hold; fail the test if it does not in time."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.02)


def new_session(host: Host, jid: str) -> Session:
    return Session(JID.parse(jid), host, lambda data: None, lambda condition: None)


# --- one contract, both implementations -------------------------------------------------------------------

@pytest.fixture(params=["one-process", "cluster"])
async def directory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[SessionDirectory, Host]]:
    """(directory, host of the sessions): the registry of a single process, or the directory of a running
    cluster worker, whose changes go to Redis."""
    if request.param == "one-process":
        server = Server(make_config(tmp_path, free_port(), free_port(), f"sqlite+aiosqlite:///{tmp_path}/p.db"))
        assert type(server.sessions) is SessionRegistry
        yield server.sessions, Host(server, server.config.hosts["localhost"])
        return
    async with redis_prefix() as name, worker(cluster_config(tmp_path, name), 1) as server:
        assert type(server.sessions) is not SessionRegistry and server.router.sessions is server.sessions
        yield server.sessions, server.hosts["localhost"]


async def test_both_directories_keep_the_same_contract(directory: tuple[SessionDirectory, Host]) -> None:
    sessions, host = directory
    assert isinstance(sessions, SessionDirectory)
    a, b, bob = (new_session(host, jid) for jid in ("alice@localhost/a", "alice@localhost/b", "bob@localhost/x"))
    for session in (a, b, bob):
        sessions.add(session)
    assert sessions.get(JID.parse("alice@localhost/a")) is a
    assert sessions.get(JID.parse("alice@localhost/c")) is None and sessions.get(JID.parse("carol@localhost/a")) is None
    assert sorted(sessions.of(ALICE), key=str) == [a, b] and sessions.of(JID.parse("carol@localhost")) == []
    assert sessions.available(ALICE) == [] and sessions.interested(ALICE) == []
    b.presence = fromstring(PRESENCE)
    b.priority = 3
    a.interested = True
    a.data["carbons"] = True
    a.directed.add(BOB)
    assert sessions.available(ALICE) == [b] and sessions.interested(ALICE) == [a]
    assert sorted(sessions.all(), key=str) == [a, b, bob] and sessions.count() == 3
    assert sorted(await sessions.users("localhost"), key=str) == [ALICE, BOB]
    assert await sessions.users("example.test") == [] and sorted(await sessions.users(), key=str) == [ALICE, BOB]
    assert sorted(map(str, await sessions.everywhere("localhost"))) == ["alice@localhost/a", "alice@localhost/b",
                                                                      "bob@localhost/x"]

    newer = new_session(host, "alice@localhost/a")  # a login that replaced `a`: removing `a` again leaves it
    sessions.remove(a)
    sessions.add(newer)
    sessions.remove(a)
    assert sessions.get(JID.parse("alice@localhost/a")) is newer and sessions.count() == 3
    for session in (newer, b, bob):
        sessions.remove(session)
    assert (sessions.of(ALICE), sessions.all(), await sessions.users(), sessions.count()) == ([], [], [], 0)
    assert {type(s) for s in (a, b, bob, newer)} == {Session}


# --- the cluster's directory -----------------------------------------------------------------------------

async def test_a_session_keeps_its_class_through_a_cluster_login(tmp_path: Path, prefix: str) -> None:
    """The cluster watches a session's shared state; it does not turn the session into another class."""
    async with worker(cluster_config(tmp_path, prefix), 1) as server:
        harness = Harness(server, server.config.listeners[0].port, server.config.listeners[1].port, tmp_path)
        try:
            await harness.add_user("alice")
            client = await harness.client("alice@localhost", resource="phone", plugins=("xep_0280",))
            session = server.sessions.get(JID.parse("alice@localhost/phone"))
            assert session is not None and type(session) is Session
            await client.get_roster(timeout=5)
            client.send_presence(ppriority=4)
            await client.plugin["xep_0280"].enable()
            redis = aioredis.from_url(REDIS_URL)
            try:
                async def published() -> bool:
                    value = await redis.hget(f"{prefix}:sessions:{server.cluster.member}", "alice@localhost/phone")
                    state = json.loads(value) if value else {}
                    return state.get("priority") == 4 and state.get("interested") is True and \
                        state.get("data") == {"carbons": True}
                await until(published, "the session's state in Redis")
            finally:
                await redis.aclose()
            assert type(session) is Session and server.sessions.get(session.jid) is session
        finally:
            await harness.close()


async def test_other_workers_see_a_session_and_the_state_modules_share(tmp_path: Path, prefix: str) -> None:
    config = cluster_config(tmp_path, prefix)
    async with worker(config, 0) as first, worker(config, 1) as second:
        alice = new_session(first.hosts["localhost"], "alice@localhost/a")
        first.sessions.add(alice)
        alice.presence = fromstring(PRESENCE)
        alice.interested = True
        alice.data["carbons"] = True  # declared shared by the carbons module
        alice.data["csi"] = object()  # client state indication is not: it acts where the connection is
        await second.sessions.ensure(ALICE)  # as routing does before it looks an account up
        await until(lambda: second.sessions.available(ALICE) != [] and second.sessions.interested(ALICE) != [],
                    "alice's presence and roster interest on the other worker")
        mirror = second.sessions.get(alice.jid)
        assert mirror is not None and type(mirror) is Session and mirror.data == {"carbons": True}
        assert await second.sessions.users("localhost") == [ALICE]
        assert second.sessions.all() == []  # what worker 1 ends when it stops: none of worker 0's
        alice.data.pop("carbons")
        await until(lambda: mirror.data == {}, "carbons disabled on the other worker")
        first.sessions.remove(alice)
        await until(lambda: second.sessions.of(ALICE) == [], "alice gone from the other worker")


async def test_a_roster_changed_on_one_worker_is_read_again_on_the_other(tmp_path: Path, prefix: str) -> None:
    config = cluster_config(tmp_path, prefix)
    async with worker(config, 0) as first, worker(config, 1) as second:
        second.sessions.add(new_session(second.hosts["localhost"], "alice@localhost/a"))  # so the roster is cached
        roster = second.hosts["localhost"].modules["roster"]
        assert await roster.item(ALICE, BOB) is None  # type: ignore[attr-defined]
        await first.hosts["localhost"].modules["roster"].update(ALICE, RosterItem("bob@localhost"))  # type: ignore[attr-defined]

        async def read_again() -> bool:
            return await roster.item(ALICE, BOB) is not None  # type: ignore[attr-defined,no-any-return]

        await until(read_again, "worker 1 reading alice's changed roster")


def test_the_cluster_shares_the_state_of_the_modules_that_declare_it(tmp_path: Path) -> None:
    config = make_config(tmp_path, free_port(), free_port(), "sqlite+aiosqlite:///:memory:")
    assert shared_session_state(config) == {"carbons", "blocking"}
    without = make_config(tmp_path, free_port(), free_port(), "sqlite+aiosqlite:///:memory:",
                          hosts={name: {"modules_disabled": ["carbons"]} for name in ("localhost", "example.test")})
    assert shared_session_state(without) == {"blocking"}


# --- cached documents ------------------------------------------------------------------------------------

async def test_cached_documents_tell_their_store_s_watchers_and_forget_on_its_word(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/kv.db"
    storage, elsewhere = await open_storage(url), await open_storage(url)
    try:
        told: list[tuple[str, str, str]] = []
        storage.kv.watch_cached(lambda *key: told.append(key))
        lists = CachedDocuments(storage.kv, "blocking", lambda doc: doc)
        other_store = CachedDocuments(storage.kv, "mam", lambda doc: doc)
        other_server = CachedDocuments(elsewhere.kv, "blocking", lambda doc: doc)
        await lists.set("localhost", "alice", ["bob@localhost"])
        assert told == [("blocking", "localhost", "alice")]
        assert await other_store.get("localhost", "alice") is None
        assert await other_server.get("localhost", "alice") == ["bob@localhost"]
        await elsewhere.kv.set("localhost", "alice", "blocking", "", [])  # as another process would
        await elsewhere.kv.set("localhost", "alice", "mam", "", {"default": "never"})
        assert await lists.get("localhost", "alice") == ["bob@localhost"]  # cached until its store is told
        storage.kv.forget_cached("blocking", "localhost", "alice")
        assert await lists.get("localhost", "alice") == []
        assert await other_store.get("localhost", "alice") is None  # another store's cache keeps its copy
        assert await other_server.get("localhost", "alice") == ["bob@localhost"]  # another store's caches too
    finally:
        await storage.close()
        await elsewhere.close()
