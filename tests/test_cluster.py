"""`parley serve --workers 2`: two processes share the port, and what users do works whichever worker each of
their sessions landed on. The server runs as a real subprocess; clients are slixmpp over real sockets. The
kernel spreads connections over the workers, so a test logs a client in again until it lands on the worker it
wants (bounded), reading the worker's session list in Redis to see where it is.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import fromstring

import pytest
import redis
import redis.asyncio as aioredis
from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from parley import build_server
from server.accounts import create_account
from server.cluster import FIELD, FRAME, Cluster, _resolve, session_state
from server.config import ClusterConfig, ConfigError, parse_config
from server.host import Host
from server.jid import JID
from server.sessions import Session
from server.storage import RosterItem, Storage, open_storage
from server.storage.kv import CachedDocuments
from tests.conftest import (
    PG_URL,
    Harness,
    drop_pg_schema,
    free_port,
    free_ports,
    make_config,
    make_pg_schema,
    unavailable,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
NODE = ClusterConfig().node_name  # the node of the workers of `parley serve --workers 2` (unnamed: the host's)
OTHER = f"{NODE}/0"  # the other member, in the tests of worker 1 alone
REPO = Path(__file__).resolve().parent.parent
ROOM = "lobby@conference.localhost"


async def redis_or_skip() -> aioredis.Redis:
    """Redis for the test; under CI a missing Redis fails the test instead of skipping it."""
    client = aioredis.from_url(REDIS_URL)
    try:
        await asyncio.wait_for(client.ping(), 3)
    except Exception:
        await client.aclose()
        unavailable("Redis at 127.0.0.1:6379 is not reachable")
    return client


class Workers(Harness):
    """A `parley serve --workers 2` subprocess, its storage and its Redis keys."""

    def __init__(self, proc: subprocess.Popen[bytes], storage: Storage, port: int, data_dir: Path,
                 redis: aioredis.Redis, prefix: str) -> None:
        super().__init__(None, port, port, data_dir)  # type: ignore[arg-type]  # no in-process server
        self.proc = proc
        self.storage = storage
        self.redis = redis
        self.prefix = prefix

    async def add_user(self, name: str, password: str = "secret", host: str = "localhost") -> str:
        await create_account(self.storage, host, name, password, 4096)
        return f"{name}@{host}"

    async def state(self, full: str) -> tuple[int, dict[str, Any]] | None:
        """(worker, shared state) of a session as its worker published it."""
        for worker in (0, 1):
            value = await self.redis.hget(f"{self.prefix}:sessions:{NODE}/{worker}", full)
            if value is not None:
                return worker, json.loads(value)
        return None

    async def until_state(self, full: str, check: Any = lambda state: True) -> tuple[int, dict[str, Any]]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = await self.state(full)
            if found is not None and check(found[1]):
                return found
            await asyncio.sleep(0.02)
        raise AssertionError(f"{full}: not published as expected; last seen {await self.state(full)}")

    async def client_on(self, worker: int, jid: str, resource: str, plugins: tuple[str, ...] = ()) -> ClientXMPP:
        """A client of `jid`/`resource` whose session is on `worker`: log in until the kernel puts it there."""
        for _ in range(40):
            client = await self.client(jid, resource=resource, plugins=plugins)
            landed, _ = await self.until_state(f"{jid}/{resource}")
            if landed == worker:
                return client
            await asyncio.wait_for(client.disconnect(wait=0.5), 3)
            await self.until_gone(f"{jid}/{resource}")
        raise AssertionError(f"{jid}/{resource} never landed on worker {worker} in 40 logins")

    async def until_gone(self, full: str) -> None:
        deadline = time.monotonic() + 5
        while await self.state(full) is not None:
            assert time.monotonic() < deadline, f"{full} still published"
            await asyncio.sleep(0.02)

    async def pid(self, worker: int) -> int:
        value = await self.redis.get(f"{self.prefix}:alive:{NODE}/{worker}")
        return int(value.split(b".")[0]) if value else 0  # the heartbeat holds "pid.instance"


def _config(data_dir: Path, url: str, port: int, prefix: str) -> str:
    return f"""\
data_dir = "{data_dir}"
[storage]
url = "{url}"
[logging]
level = "info"
[limits]
unauthenticated_timeout = 10.0
[cluster]
workers = 2
redis_url = "{REDIS_URL}"
prefix = "{prefix}"
[[listeners]]
type = "c2s"
address = "127.0.0.1"
port = {port}
tls = "starttls"
[hosts."localhost"]
"""


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(params=["sqlite", "postgresql"])
async def workers(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Workers]:
    redis = await redis_or_skip()
    schema = None
    if request.param == "postgresql":
        schema = await make_pg_schema()
        url = f"{PG_URL}?schema={schema}"
    else:
        url = f"sqlite+aiosqlite:///{tmp_path}/parley.db"
    prefix = f"parley-test-{uuid.uuid4().hex[:12]}"
    port = free_port()
    config = tmp_path / "parley.toml"
    config.write_text(_config(tmp_path, url, port, prefix))
    storage = await open_storage(url)

    async def started(harness: Workers) -> bool:
        return _listening(port) and bool(await harness.pid(0)) and bool(await harness.pid(1))

    try:
        async with run_workers([sys.executable, "-m", "parley", "serve", "--config", str(config)], tmp_path,
                               storage, port, redis, prefix, started) as harness:
            yield harness
    finally:
        if schema:
            await drop_pg_schema(schema)


async def _until_no_keys(redis: aioredis.Redis, pattern: str, timeout: float) -> None:
    """Wait up to `timeout` seconds for the keys matching `pattern` to go. A room's state hash stays, by
    design, when the last member stops with people in it (its next owner reads it and finds them gone): the
    leak check after the stop is about a cluster that everyone left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and [key async for key in redis.scan_iter(pattern)]:
        await asyncio.sleep(0.05)


@asynccontextmanager
async def run_workers(command: list[str], tmp_path: Path, storage: Storage, port: int, redis: aioredis.Redis,
                      prefix: str, started: Callable[[Workers], Awaitable[bool]],
                      own_prefix: bool = True) -> AsyncIterator[Workers]:
    """`command` (a `parley serve`) as a subprocess logging to tmp_path/server.log, until the test is done with
    it: ready once `started`, then stopped with SIGTERM (SIGKILL after 15 s); it must exit cleanly and, with a
    prefix of its own, leave nothing in Redis. The storage and Redis connections are closed afterwards."""
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    harness = Workers(proc, storage, port, tmp_path, redis, prefix)
    try:
        deadline = time.monotonic() + 30
        while not await started(harness):
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the workers did not start in 30 s"
            await asyncio.sleep(0.1)
        yield harness
    finally:
        await harness.close()
        if own_prefix:  # the rooms those clients were in empty, and their state goes, before the stop
            await _until_no_keys(redis, f"{prefix}:own:state:*", 5)
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        leftover = [key async for key in redis.scan_iter(f"{prefix}:*")] if own_prefix else []
        if leftover:
            await redis.delete(*leftover)
        fence = f"{prefix}:own:fence".encode()  # room ownership's fencing counter outlives the members by design
        leftover = [key for key in leftover if key != fence]
        await redis.aclose()
        await storage.close()
    assert proc.returncode == 0, (tmp_path / "server.log").read_text()
    assert not leftover, f"workers left {leftover} in Redis"


def presences(client: ClientXMPP) -> asyncio.Queue[tuple[str, str, str]]:
    """(from, status, priority) of every available presence `client` receives."""
    queue: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
    client.add_event_handler("presence_available",
                             lambda p: queue.put_nowait((str(p["from"]), p["status"], str(p["priority"]))))
    return queue


async def received(queue: asyncio.Queue[Any], *expected: Any, timeout: float = 5.0) -> None:
    """Wait until each of `expected` comes out of the queue, in any order (other items may come too)."""
    async def find() -> None:
        missing = set(expected)
        while missing:
            missing.discard(await queue.get())

    await asyncio.wait_for(find(), timeout)


async def only(queue: asyncio.Queue[Any], client: ClientXMPP, sender: ClientXMPP) -> list[str]:
    """Bodies `client` got until a marker that `sender` sent it after the messages under test."""
    sender.send_message(mto=client.boundjid.full, mbody="marker", mtype="chat")
    bodies = []
    while (body := (await asyncio.wait_for(queue.get(), 5))["body"]) != "marker":
        bodies.append(body)
    return bodies


async def instant_room(owner: ClientXMPP) -> None:
    """Accept the default configuration of the room the owner just created (XEP-0045 10.1.2)."""
    instant = owner.Iq(stype="set", sto=ROOM)
    instant.append(fromstring("<query xmlns='http://jabber.org/protocol/muc#owner'>"
                              "<x xmlns='jabber:x:data' type='submit'/></query>"))
    await instant.send(timeout=5)


async def bodies(queue: asyncio.Queue[Any], count: int) -> list[str]:
    return [(await asyncio.wait_for(queue.get(), 5))["body"] for _ in range(count)]


async def test_users_on_both_workers(workers: Workers) -> None:
    for name in ("alice", "bob", "carol", "dave"):
        await workers.add_user(name)
    plugins = ("xep_0045", "xep_0199", "xep_0280")
    a0 = await workers.client_on(0, "alice@localhost", "a0", plugins)
    a1 = await workers.client_on(1, "alice@localhost", "a1", plugins)
    b1 = await workers.client_on(1, "bob@localhost", "b1", plugins)
    c0 = await workers.client_on(0, "carol@localhost", "c0", plugins)
    inbox = {name: workers.inbox(c) for name, c in (("a0", a0), ("a1", a1), ("b1", b1), ("c0", c0))}

    # Roster pushes reach every resource, and subscriptions settle across workers.
    for client in (a0, a1, b1):
        await client.get_roster(timeout=5)
    await workers.until_state("alice@localhost/a1", lambda s: s["interested"])
    a0.send_presence()
    a1.send_presence(ppriority=5)
    b1.send_presence()
    c0.send_presence()
    await workers.until_state("alice@localhost/a1", lambda s: s["priority"] == 5 and s["presence"])
    await workers.until_state("bob@localhost/b1", lambda s: s["presence"])
    a0.send_presence(pto="bob@localhost", ptype="subscribe")  # slixmpp approves and subscribes back
    deadline = time.monotonic() + 5
    while not all(c.client_roster[jid]["subscription"] == "both"
                  for c, jid in ((a0, "bob@localhost"), (a1, "bob@localhost"), (b1, "alice@localhost"))):
        assert time.monotonic() < deadline, \
            f"the subscription did not reach every roster: {a0.client_roster}, {a1.client_roster}, {b1.client_roster}"
        await asyncio.sleep(0.05)

    # Presence broadcast to both of alice's workers; a probe answered from the other worker's sessions.
    seen = {"a0": presences(a0), "a1": presences(a1)}
    b1.send_presence(pstatus="busy")
    for name in ("a0", "a1"):
        await received(seen[name], ("bob@localhost/b1", "busy", "0"))
    a2 = await workers.client_on(0, "alice@localhost", "a2")
    inbox["a2"] = workers.inbox(a2)
    seen["a2"] = presences(a2)
    a2.send_presence()
    await received(seen["a2"], ("bob@localhost/b1", "busy", "0"), ("alice@localhost/a1", "", "5"))

    # Messages: priority decides among resources on both workers; full JIDs reach the other worker.
    c0.send_message(mto="alice@localhost", mbody="to the top", mtype="chat")
    assert await bodies(inbox["a1"], 1) == ["to the top"]
    assert await only(inbox["a0"], a0, c0) == []
    c0.send_message(mto="alice@localhost/a1", mbody="to a1", mtype="chat")
    b1.send_message(mto="alice@localhost/a0", mbody="to a0", mtype="chat")
    assert await bodies(inbox["a1"], 1) == ["to a1"]
    assert await bodies(inbox["a0"], 1) == ["to a0"]
    a1.send_presence(ppriority=-1)
    await workers.until_state("alice@localhost/a1", lambda s: s["priority"] == -1)
    c0.send_message(mto="alice@localhost", mbody="to the zeros", mtype="chat")
    assert await bodies(inbox["a0"], 1) == ["to the zeros"]
    assert await bodies(inbox["a2"], 1) == ["to the zeros"]
    assert await only(inbox["a1"], a1, c0) == []

    # Carbons: a message delivered on worker 1 is copied to the resource on worker 0 that enabled them.
    carbons: asyncio.Queue[Any] = asyncio.Queue()
    a0.add_event_handler("carbon_received", carbons.put_nowait)
    await a0.plugin["xep_0280"].enable()
    await workers.until_state("alice@localhost/a0", lambda s: s["data"].get("carbons"))
    b1.send_message(mto="alice@localhost/a1", mbody="copy me", mtype="chat")
    assert await bodies(inbox["a1"], 1) == ["copy me"]
    copy = await asyncio.wait_for(carbons.get(), 5)
    assert copy["carbon_received"]["body"] == "copy me"

    # An iq to a full JID on the other worker, answered back.
    await c0.plugin["xep_0199"].ping(jid="alice@localhost/a1", timeout=5)

    # A room is served by one worker, whichever worker its occupants are on.
    await a1.plugin["xep_0045"].join_muc_wait(ROOM, "alice", timeout=5)
    await instant_room(a1)
    for client, nick in ((b1, "bob"), (c0, "carol")):
        await client.plugin["xep_0045"].join_muc_wait(ROOM, nick, timeout=5)
    a1.send_message(mto=ROOM, mbody="hello room", mtype="groupchat")
    for name in ("b1", "c0"):
        assert "hello room" in await bodies(inbox[name], 1)
    ctl = await asyncio.to_thread(subprocess.run, [str(Path(sys.executable).with_name("parleyctl")), "--config",
                                  str(workers.data_dir / "parley.toml"), "muc_online_rooms", "global"],
                                  capture_output=True, text=True, timeout=30)
    assert ctl.stdout.split() == [ROOM], ctl.stderr  # from storage and the owned rooms in Redis

    # Offline storage, whichever worker the recipient comes back on.
    b1.send_message(mto="dave@localhost", mbody="while you were out", mtype="chat")
    await only(inbox["c0"], c0, b1)  # bob's message has been routed once carol hears from him
    dave = await workers.client("dave@localhost", resource="d")
    dave_inbox = workers.inbox(dave)
    dave.send_presence()
    assert await bodies(dave_inbox, 1) == ["while you were out"]


@pytest.mark.parametrize("workers", ["sqlite"], indirect=True)
async def test_a_dead_worker_is_restarted_and_its_sessions_forgotten(workers: Workers) -> None:
    for name in ("alice", "carol"):
        await workers.add_user(name)
    for user, contact in (("alice", "carol"), ("carol", "alice")):
        await workers.storage.roster.put("localhost", user, RosterItem(f"{contact}@localhost", subscription="both"))
    a0 = await workers.client_on(0, "alice@localhost", "a0")
    a1 = await workers.client_on(1, "alice@localhost", "a1", ("xep_0045",))
    c0 = await workers.client_on(0, "carol@localhost", "c0", ("xep_0045",))
    inbox = workers.inbox(a0)
    await c0.plugin["xep_0045"].join_muc_wait(ROOM, "carol", timeout=5)
    await instant_room(c0)
    await a1.plugin["xep_0045"].join_muc_wait(ROOM, "alice", timeout=5)
    gone: asyncio.Queue[str] = asyncio.Queue()
    for client in (a0, c0):
        client.register_handler(Callback("gone", MatchXPath("{jabber:client}presence"), lambda p, c=client:
                                         gone.put_nowait(f"{c.boundjid} {p['from']}") if p["type"] == "unavailable"
                                         else None))
    a0.send_presence()
    a1.send_presence(ppriority=5)
    c0.send_presence()
    await workers.until_state("alice@localhost/a1", lambda s: s["priority"] == 5)
    old = await workers.pid(1)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while await workers.pid(1) in (0, old):
        assert time.monotonic() < deadline, "worker 1 was not restarted"
        await asyncio.sleep(0.1)
    await workers.until_gone("alice@localhost/a1")
    # The new worker 1 ends what its predecessor left: carol and alice's other resource see a1 go.
    await received(gone, "carol@localhost/c0 alice@localhost/a1", "alice@localhost/a0 alice@localhost/a1",
                   f"carol@localhost/c0 {ROOM}/alice")  # the room learns it too
    c0.send_message(mto="alice@localhost/a1", mbody="are you there?", mtype="chat")
    assert await bodies(inbox, 1) == ["are you there?"]  # RFC 6121 8.5.3.2.1: as if sent to the bare JID


@pytest.mark.timeout(240)
async def test_bench_smoke_of_two_workers_next_to_one(tmp_path: Path) -> None:
    """The benchmark's two-worker Parley runs and is compared with one process; no speed is judged."""
    await (await redis_or_skip()).aclose()
    out = tmp_path / "results.json"
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "bench.run", "--smoke", "--servers", "parley,parley-2w", "--scenarios", "throughput",
        "--address", f"parley=127.0.0.1:{free_port()}", "--address", f"parley-2w=127.0.0.1:{free_port()}",
        "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in ("parley", "parley-2w"):
        assert results["servers"][name]["scenarios"]["throughput"]["counts"]["delivered"] > 0, results
    assert "parley-2w/parley" in results["table"]


def test_without_redis_the_workers_do_not_start(tmp_path: Path) -> None:
    config = tmp_path / "parley.toml"
    config.write_text(_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/parley.db", free_port(), "unused")
                      .replace(REDIS_URL, f"redis://127.0.0.1:{free_port()}/0"))
    done = subprocess.run([sys.executable, "-m", "parley", "serve", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "config key 'cluster.redis_url': cannot use Redis" in done.stderr, done.stderr


@pytest.mark.parametrize("workers", ["sqlite"], indirect=True)
async def test_a_worker_that_stalled_is_known_again_when_it_resumes(workers: Workers) -> None:
    for name in ("alice", "carol"):
        await workers.add_user(name)
    for user, contact in (("alice", "carol"), ("carol", "alice")):
        await workers.storage.roster.put("localhost", user, RosterItem(f"{contact}@localhost", subscription="both"))
    a1 = await workers.client_on(1, "alice@localhost", "a1", plugins=("xep_0199",))
    c0 = await workers.client_on(0, "carol@localhost", "c0", plugins=("xep_0199",))
    inbox = workers.inbox(a1)
    seen, gone = presences(c0), asyncio.Queue[str]()
    c0.add_event_handler("presence_unavailable", lambda p: gone.put_nowait(str(p["from"])))
    c0.send_presence()
    await workers.until_state("carol@localhost/c0", lambda s: s["presence"])
    a1.send_presence(pstatus="here")
    await received(seen, ("alice@localhost/a1", "here", "0"))
    pid = await workers.pid(1)
    os.kill(pid, signal.SIGSTOP)
    try:
        log = workers.data_dir / "server.log"
        deadline = time.monotonic() + 20
        # Its heartbeat lapsed: worker 0 forgot it and ended its sessions.
        while f"ending 1 sessions of lost member {NODE}/1" not in log.read_text():
            assert time.monotonic() < deadline, "worker 0 did not forget the stalled worker's sessions"
            await asyncio.sleep(0.2)
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 15
    while True:  # worker 0 routes to a1 again once worker 1 has told it about its sessions
        try:
            await c0.plugin["xep_0199"].ping("alice@localhost/a1", timeout=2)
            break
        except (IqError, IqTimeout):
            assert time.monotonic() < deadline, "worker 0 never learnt of the resumed worker's sessions"
    c0.send_message(mto="alice@localhost/a1", mbody="welcome back", mtype="chat")
    assert await bodies(inbox, 1) == ["welcome back"]
    # Worker 0 ended a1 as a session of a lost member; the resumed worker tells its contacts it is there.
    await received(gone, "alice@localhost/a1", timeout=10)
    await received(seen, ("alice@localhost/a1", "here", "0"), timeout=10)


def test_a_state_placeholder_takes_the_state_at_sending_time() -> None:
    states = {"alice@localhost/a": '{"priority": 1}'}
    assert _resolve(f"u{FIELD}alice@localhost/a", states) == f'u{FIELD}{{"priority": 1}}'
    assert _resolve(f"u{FIELD}alice@localhost/b", states) == f"d{FIELD}alice@localhost/b"  # ended meanwhile
    stanza = f"s{FIELD}alice@localhost/a{FIELD}<message/>"
    assert _resolve(stanza, states) == stanza
    assert FRAME not in json.dumps({"x": FRAME + FIELD})  # JSON escapes both separators


@pytest.mark.parametrize("workers", ["sqlite"], indirect=True)
async def test_a_block_made_on_one_worker_holds_on_the_other(workers: Workers) -> None:
    for name in ("alice", "bob"):
        await workers.add_user(name)
    alice = await workers.client_on(0, "alice@localhost", "a", ("xep_0191",))
    probe = await workers.client_on(1, "alice@localhost", "probe")
    bob = await workers.client_on(1, "bob@localhost", "b")
    inbox, probed = workers.inbox(alice), workers.inbox(probe)

    async def reached_worker_1() -> None:
        """Worker 0 tells worker 1 everything in order: once this arrives there, the change did too."""
        alice.send_message(mto="alice@localhost/probe", mbody="sync", mtype="chat")
        assert await bodies(probed, 1) == ["sync"]

    bob.send_message(mto="alice@localhost/a", mbody="before", mtype="chat")
    assert await bodies(inbox, 1) == ["before"]  # worker 1 has read alice's (empty) blocklist by now
    await alice.plugin["xep_0191"].block("bob@localhost", timeout=5)
    await reached_worker_1()
    bob.send_message(mto="alice@localhost/a", mbody="blocked", mtype="chat")
    ping = bob.Iq(stype="get", sto="localhost")
    ping.append(fromstring("<ping xmlns='urn:xmpp:ping'/>"))
    await ping.send(timeout=5)  # answered once worker 1 has routed bob's message, before the unblock
    await alice.plugin["xep_0191"].unblock("bob@localhost", timeout=5)
    await reached_worker_1()
    bob.send_message(mto="alice@localhost/a", mbody="after", mtype="chat")
    assert await bodies(inbox, 1) == ["after"]  # both went the same way, so "blocked" would have come first


# --- the registry and the outgoing queue, without processes or Redis ------------------------------------

@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Worker 1 of 2, its hosts made but nothing started: what it would send stays in its queue."""
    config = make_config(tmp_path, *free_ports(2), f"sqlite+aiosqlite:///{tmp_path}/parley.db")
    config.cluster = ClusterConfig(workers=2, prefix="unit")
    server = build_server(config)
    server.hosts["localhost"] = Host(server, config.hosts["localhost"])
    try:
        cluster = Cluster(server, 1, config.cluster)
        cluster._member_up(OTHER)
        cluster.sessions.known[JID.parse("alice@localhost")] = None  # as if looked up: no Redis here
        yield cluster
    finally:
        CachedDocuments.on_set = None


def local_session(cluster: Cluster, jid: str) -> Session:
    """A session of this member, whose account the other member watches."""
    session = Session(JID.parse(jid), cluster.server.hosts["localhost"], lambda data: None, lambda condition: None)
    cluster.sessions.add(session)
    cluster.sessions.homed[session.bare].add(OTHER)
    cluster._dirty.clear()
    session.priority = 0  # changed: now it goes to the watcher
    return session


def remote_state(jid: str, priority: int = 0, available: bool = True) -> dict[str, Any]:
    presence = f'<presence from="{jid}"/>' if available else None
    return {"jid": jid, "priority": priority, "interested": True, "presence": presence, "data": {"carbons": True},
            "started": 0.0, "directed": []}


def test_changes_of_a_local_session_go_out_once_per_turn_at_their_place(cluster: Cluster) -> None:
    session = local_session(cluster, "alice@localhost/a")
    session.priority = 5
    session.presence = fromstring("<presence xmlns='jabber:client'/>")
    session.data["carbons"] = True
    session.data["csi"] = "not shared"
    assert cluster._out == {OTHER: [f"u{FIELD}alice@localhost/a"]}
    state = json.loads(session_state(session))
    assert (state["priority"], state["data"], state["presence"]) == (5, {"carbons": True}, "<presence/>")
    cluster.sessions.remove(session)
    assert cluster._out[OTHER][-1] == f"d{FIELD}alice@localhost/a"


def test_remote_sessions_take_part_in_routing_but_never_replace_a_local_one(cluster: Cluster) -> None:
    local = local_session(cluster, "alice@localhost/a")
    cluster.sessions.put_remote(OTHER, remote_state("alice@localhost/a"))
    cluster.sessions.put_remote(OTHER, remote_state("alice@localhost/b", priority=3))
    assert cluster.sessions.get(JID.parse("alice@localhost/a")) is local
    remote = cluster.sessions.get(JID.parse("alice@localhost/b"))
    assert remote is not None and remote.priority == 3 and remote.data == {"carbons": True}
    assert cluster.sessions.available(JID.parse("alice@localhost")) == [remote]  # the local one has no presence
    assert cluster.sessions.all() == [local]  # what this worker ends when it stops
    remote.send(fromstring("<message xmlns='jabber:client' to='alice@localhost/b'><body>hi</body></message>"))
    message = '<message to="alice@localhost/b"><body>hi</body></message>'
    assert cluster._out[OTHER][-1] == f"s{FIELD}alice@localhost/b{FIELD}{message}"
    cluster.sessions.put_remote(OTHER, remote_state("alice@localhost/b", available=False))
    assert cluster.sessions.available(JID.parse("alice@localhost")) == []
    cluster.sessions.drop_member(OTHER)
    assert cluster.sessions.of(JID.parse("alice@localhost")) == [local] and remote.closed


def test_stanzas_from_another_worker_go_straight_to_the_local_session_of_their_address(cluster: Cluster) -> None:
    written: list[str] = []
    session = Session(JID.parse("alice@localhost/a"), cluster.server.hosts["localhost"], written.append,
                      lambda condition: None)
    cluster.sessions.add(session)
    cluster.sessions.homed[session.bare].add(OTHER)
    cluster._out[OTHER].clear()
    cluster._dirty.clear()
    session.last_active = 1.0  # set for every stanza: not shared, so nothing goes out
    assert cluster._out == {OTHER: []}
    message = '<message to="alice@localhost/a"><body>hi</body></message>'
    assert cluster._deliver(OTHER, f"s{FIELD}alice@localhost/a{FIELD}{message}")
    assert written == [message]
    assert not cluster._deliver(OTHER, f"s{FIELD}alice@localhost/b{FIELD}{message}")
    session.priority = 1
    assert cluster._out == {OTHER: [f"u{FIELD}alice@localhost/a"]}
    cluster.sessions.remove(session)
    assert not cluster._deliver(OTHER, f"s{FIELD}alice@localhost/a{FIELD}{message}") and written == [message]


# --- configuration of nodes --------------------------------------------------------------------------------

def test_a_named_node_needs_a_shared_database_and_a_name_fit_for_member_ids(tmp_path: Path) -> None:
    base = {"data_dir": str(tmp_path), "hosts": {"localhost": {}},
            "listeners": [{"type": "c2s", "address": "127.0.0.1", "port": free_port()}]}
    on_pg = parse_config({**base, "storage": {"url": PG_URL}, "cluster": {"node": "n1"}})
    assert on_pg.cluster.active and on_pg.cluster.node_name == "n1"
    assert not parse_config({**base, "storage": {"url": PG_URL}}).cluster.active
    with pytest.raises(ConfigError, match="share one database"):
        parse_config({**base, "storage": {"url": f"sqlite+aiosqlite:///{tmp_path}/p.db"}, "cluster": {"node": "n1"}})
    with pytest.raises(ConfigError, match="letters, digits"):
        parse_config({**base, "storage": {"url": PG_URL}, "cluster": {"node": "n1/0"}})


def test_a_second_node_on_sqlite_is_refused(tmp_path: Path) -> None:
    """`--node` names a node (on SQLite: refused at once); an unnamed node on SQLite that finds another node live
    in Redis is refused too."""
    config = tmp_path / "parley.toml"
    prefix = f"parley-test-{uuid.uuid4().hex[:12]}"
    config.write_text(_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/parley.db", free_port(), prefix))
    named = subprocess.run([sys.executable, "-m", "parley", "serve", "--config", str(config), "--node", "n2"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert named.returncode == 2 and "share one database" in named.stderr, named.stderr
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except Exception:
        unavailable("Redis at 127.0.0.1:6379 is not reachable")
    try:
        client.sadd(f"{prefix}:members", "elsewhere/0")
        client.set(f"{prefix}:alive:elsewhere/0", 1, ex=30)
        second = subprocess.run([sys.executable, "-m", "parley", "serve", "--config", str(config)],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "node(s) elsewhere already run" in second.stderr, second.stderr
    finally:
        client.delete(f"{prefix}:members", f"{prefix}:alive:elsewhere/0")
        client.close()
