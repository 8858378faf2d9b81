"""Three nodes of a cluster, as three machines would run them: `parley serve --node nK` subprocesses listening on
127.0.0.1, 127.0.0.2 and 127.0.0.3, sharing one Redis prefix and one PostgreSQL schema. Clients (slixmpp) spread
over the nodes chat, see each other's presence, get roster pushes and carbons; `parleyctl status` and
`connected_users` on any node show the whole cluster; a node killed with SIGKILL is noticed: its users' contacts
see them go within 10 s and messages to them go to offline storage.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from slixmpp import ClientXMPP

from server.accounts import create_account
from server.storage import RosterItem, Storage, open_storage
from tests.conftest import PG_URL, Harness, drop_pg_schema, free_port, make_pg_schema
from tests.test_cluster import REDIS_URL, bodies, received, redis_or_skip

REPO = Path(__file__).resolve().parent.parent
NODES = ("n1", "n2", "n3")


class Node(Harness):
    """One node: a `parley serve --node NAME` process group on its own loopback address."""

    def __init__(self, name: str, address: str, port: int, data_dir: Path, storage: Storage) -> None:
        super().__init__(None, port, port, data_dir)  # type: ignore[arg-type]  # no in-process server
        self.name = name
        self.address = address
        self.storage = storage
        self.config = data_dir / "parley.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.redis: Any = None  # the test's Redis client
        self.channel = ""  # the Redis channel of the node's worker

    async def add_user(self, name: str, password: str = "secret", host: str = "localhost") -> str:
        await create_account(self.storage, host, name, password, 4096)
        return f"{name}@{host}"

    def start(self) -> None:
        with open(self.data_dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "parley", "serve", "--config", str(self.config),
                                          "--node", self.name], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex((self.address, self.port)) == 0

    def log(self) -> str:
        return (self.data_dir / "server.log").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL to the node's supervisor and workers at once: the machine is gone."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    async def ctl(self, *args: str) -> str:
        done = await asyncio.to_thread(subprocess.run, [str(Path(sys.executable).with_name("parleyctl")),
                                       "--config", str(self.config), *args], capture_output=True, text=True,
                                       timeout=30)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout


def node_config(node: Node, url: str, prefix: str) -> str:
    return f"""\
data_dir = "{node.data_dir}"
[storage]
url = "{url}"
[limits]
unauthenticated_timeout = 10.0
[cluster]
redis_url = "{REDIS_URL}"
prefix = "{prefix}"
[[listeners]]
type = "c2s"
address = "{node.address}"
port = {node.port}
tls = "starttls"
[hosts."localhost"]
"""


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[dict[str, Node]]:
    redis = await redis_or_skip()
    schema = await make_pg_schema()
    url = f"{PG_URL}?schema={schema}"
    prefix = f"parley-nodes-{uuid.uuid4().hex[:12]}"
    storage = await open_storage(url)  # the schema made once, before the nodes start
    cluster: dict[str, Node] = {}
    for k, name in enumerate(NODES, start=1):
        data_dir = tmp_path / name
        data_dir.mkdir()
        node = cluster[name] = Node(name, f"127.0.0.{k}", free_port(), data_dir, storage)
        node.config.write_text(node_config(node, url, prefix))
        node.redis, node.channel = redis, f"{prefix}:m:{name}/0"
    try:
        for node in cluster.values():
            node.start()
        deadline = time.monotonic() + 40
        while not (all(node.listening() for node in cluster.values())
                   and len(await redis.smembers(f"{prefix}:members")) == len(NODES)):
            for node in cluster.values():
                assert node.proc is not None and node.proc.poll() is None, node.log()
            assert time.monotonic() < deadline, "the nodes did not start in 40 s"
            await asyncio.sleep(0.1)
        yield cluster
    finally:
        for node in cluster.values():
            await node.close()
        for node in cluster.values():
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in cluster.values():
            if node.proc is not None:
                try:
                    await asyncio.to_thread(node.proc.wait, 15)
                except subprocess.TimeoutExpired:
                    os.killpg(node.proc.pid, signal.SIGKILL)
        leftover = [key async for key in redis.scan_iter(f"{prefix}:*")]
        if leftover:
            await redis.delete(*leftover)
        await redis.aclose()
        await storage.close()
        await drop_pg_schema(schema)


async def until_available(node: Node, full: str) -> None:
    """Wait until the session's member has published it available, and a moment for the others to read it."""
    prefix = node.channel.rpartition(":m:")[0]
    deadline = time.monotonic() + 5
    while True:
        states = [await node.redis.hget(f"{prefix}:sessions:{name}/0", full) or b"" for name in NODES]
        if any(b'"presence": "<presence' in state for state in states):
            break
        assert time.monotonic() < deadline, f"{full} never published available"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)


def unavailable_presences(client: ClientXMPP) -> asyncio.Queue[str]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    client.add_event_handler("presence_unavailable", lambda p: queue.put_nowait(str(p["from"])))
    return queue


def available_presences(client: ClientXMPP) -> asyncio.Queue[str]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    client.add_event_handler("presence_available", lambda p: queue.put_nowait(str(p["from"])))
    return queue


async def befriend(storage: Storage, a: str, b: str) -> None:
    for user, contact in ((a, b), (b, a)):
        await storage.roster.put("localhost", user, RosterItem(f"{contact}@localhost", subscription="both"))


@pytest.mark.timeout(120)
async def test_three_nodes_serve_one_set_of_users(nodes: dict[str, Node]) -> None:
    n1, n2, n3 = (nodes[name] for name in NODES)
    for name in ("alice", "bob", "carol", "dave"):
        await n1.add_user(name)
    await befriend(n1.storage, "alice", "bob")
    await befriend(n1.storage, "alice", "carol")
    plugins = ("xep_0280", "xep_0199")
    a1 = await n1.client("alice@localhost", resource="a1", plugins=plugins)
    a2 = await n2.client("alice@localhost", resource="a2", plugins=plugins)
    bob = await n3.client("bob@localhost", resource="b", plugins=plugins)
    carol = await n2.client("carol@localhost", resource="c", plugins=plugins)
    inbox: dict[str, asyncio.Queue[Any]] = {name: Harness.inbox(c) for name, c in
                                            (("a1", a1), ("a2", a2), ("bob", bob), ("carol", carol))}
    seen = {name: available_presences(c) for name, c in (("a1", a1), ("bob", bob))}
    gone = unavailable_presences(a1)
    for client in (a1, a2):
        await client.get_roster(timeout=5)

    # Presence across nodes, both ways. One after the other: two contacts whose initial presences cross are a
    # race the cluster does not settle yet (each node answers the other's probe from what it knows).
    for client, full in ((a1, "alice@localhost/a1"), (a2, "alice@localhost/a2"), (bob, "bob@localhost/b"),
                         (carol, "carol@localhost/c")):
        client.send_presence()
        await until_available(n1, full)
    await received(seen["a1"], "bob@localhost/b", "carol@localhost/c", "alice@localhost/a2", timeout=10)
    await received(seen["bob"], "alice@localhost/a1", "alice@localhost/a2", timeout=10)

    # Chat across nodes, to full and bare JIDs.
    bob.send_message(mto="alice@localhost/a2", mbody="n3 to n2", mtype="chat")
    assert await bodies(inbox["a2"], 1) == ["n3 to n2"]
    a1.send_message(mto="bob@localhost", mbody="n1 to n3", mtype="chat")
    assert await bodies(inbox["bob"], 1) == ["n1 to n3"]
    await a1.plugin["xep_0199"].ping(jid="bob@localhost/b", timeout=5)

    # A roster push from a change made on n2 reaches alice's resource on n1.
    await a2.update_roster("dave@localhost", name="Dave", timeout=5)
    deadline = time.monotonic() + 5
    while "dave@localhost" not in a1.client_roster:
        assert time.monotonic() < deadline, "the roster push did not reach n1"
        await asyncio.sleep(0.05)

    # Carbons: a message to alice's resource on n2 is copied to the one on n1 that enabled them.
    carbons: asyncio.Queue[Any] = asyncio.Queue()
    a1.add_event_handler("carbon_received", carbons.put_nowait)
    await a1.plugin["xep_0280"].enable()
    await asyncio.sleep(0.3)  # the enabling reaches the other nodes with the session's state
    bob.send_message(mto="alice@localhost/a2", mbody="copy me", mtype="chat")
    assert await bodies(inbox["a2"], 1) == ["copy me"]
    assert (await asyncio.wait_for(carbons.get(), 5))["carbon_received"]["body"] == "copy me"

    # Every node shows the cluster and every user.
    status = await n2.ctl("status")
    assert "Cluster of 3 node(s) (n1, n2, n3), 3 member(s)" in status, status
    assert "n2/0 (this one): 2 sessions" in status, status
    connected = (await n3.ctl("connected_users")).split()
    assert connected == ["alice@localhost/a1", "alice@localhost/a2", "bob@localhost/b", "carol@localhost/c"]
    assert (await n1.ctl("list_cluster")).split() == ["parley@n1", "parley@n2", "parley@n3"]

    # n3 dies: alice sees bob go within 10 s, and what is sent to him waits in offline storage.
    killed = time.monotonic()
    n3.kill()
    # Redis saw n3's connections close; its heartbeat has not lapsed yet: a stanza for its users finds its
    # channel unheard, and goes where it would had bob's session ended.
    while (await n3.redis.pubsub_numsub(n3.channel))[0][1]:
        await asyncio.sleep(0.01)
    a1.send_message(mto="bob@localhost/b", mbody="as the node died", mtype="chat")
    await received(gone, "bob@localhost/b", timeout=10)
    assert time.monotonic() - killed < 10
    a1.send_message(mto="bob@localhost", mbody="while your node was down", mtype="chat")
    await a1.plugin["xep_0199"].ping(jid="localhost", timeout=5)
    again = await n1.client("bob@localhost", resource="b2")
    bob_inbox = Harness.inbox(again)
    again.send_presence()
    assert sorted(await bodies(bob_inbox, 2)) == ["as the node died", "while your node was down"]
    status = await n1.ctl("status")
    assert "Cluster of 2 node(s) (n1, n2)" in status, status
