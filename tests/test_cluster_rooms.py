"""Rooms spread over a cluster (server/ownership.py, extensions/muc/placement.py): three nodes (`parley serve
--node nK`, one worker each, real subprocesses) sharing Redis and PostgreSQL, slixmpp clients on each. A room is
served by the member that owns it, with occupants on every node; when the owner's node is killed, another
member takes the room over and the occupants on the surviving nodes are still in it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import fromstring

import pytest
import redis.asyncio as aioredis
from slixmpp import ClientXMPP

from server.accounts import create_account
from server.storage import Storage, open_storage
from tests.conftest import PG_URL, Harness, drop_pg_schema, free_port, make_pg_schema, unavailable

REDIS_URL = "redis://127.0.0.1:6379/0"
REPO = Path(__file__).resolve().parent.parent
ROOM = "lobby@conference.localhost"
NODES = ("n1", "n2", "n3")


class Proxy:
    """n1's way to Redis, which a test can cut: a network partition of that node alone."""

    def __init__(self) -> None:
        self.links: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 6379)
        self.links += [writer, up_writer]

        async def relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
            sink.close()

        await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer), return_exceptions=True)

    def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for link in self.links:
            link.transport.abort()


class Node(Harness):
    """One node: a `parley serve --node` process group with its own port and data directory."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int, data_dir: Path) -> None:
        super().__init__(None, port, port, data_dir)  # type: ignore[arg-type]  # no in-process server
        self.name = name
        self.proc = proc

    def log(self) -> str:
        return (self.data_dir / "server.log").read_text()


def _config(data_dir: Path, url: str, port: int, prefix: str, redis_url: str) -> str:
    return f"""\
data_dir = "{data_dir}"
[storage]
url = "{url}"
[logging]
level = "info"
[cluster]
redis_url = "{redis_url}"
prefix = "{prefix}"
[[listeners]]
type = "c2s"
address = "127.0.0.1"
port = {port}
tls = "starttls"
[hosts."localhost"]
"""


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[tuple[dict[str, Node], Storage, aioredis.Redis, str, Proxy]]:
    redis = aioredis.from_url(REDIS_URL)
    try:
        await asyncio.wait_for(redis.ping(), 3)
    except Exception:
        await redis.aclose()
        unavailable("Redis at 127.0.0.1:6379 is not reachable")
    schema = await make_pg_schema()
    url = f"{PG_URL}?schema={schema}"
    prefix = f"parley-test-{uuid.uuid4().hex[:12]}"
    storage = await open_storage(url)
    started: dict[str, Node] = {}
    proxy = Proxy()
    await proxy.start()
    try:
        for name in NODES:
            data_dir = tmp_path / name
            data_dir.mkdir()
            port = free_port()
            config = data_dir / "parley.toml"
            redis_url = f"redis://127.0.0.1:{proxy.port}/0" if name == "n1" else REDIS_URL
            config.write_text(_config(data_dir, url, port, prefix, redis_url))
            with open(data_dir / "server.log", "wb") as log:
                proc = subprocess.Popen([sys.executable, "-m", "parley", "serve", "--config", str(config),
                                         "--node", name], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            started[name] = Node(name, proc, port, data_dir)
        deadline = time.monotonic() + 40
        for node in started.values():
            while not await redis.exists(f"{prefix}:alive:{node.name}/0"):
                assert node.proc.poll() is None, node.log()
                assert time.monotonic() < deadline, "the nodes did not start in 40 s"
                await asyncio.sleep(0.1)
        yield started, storage, redis, prefix, proxy
    finally:
        for node in started.values():
            await node.close()
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in started.values():
            try:
                await asyncio.to_thread(node.proc.wait, 15)
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(5)
        if proxy.server is not None:
            proxy.cut()
        keys = [key async for key in redis.scan_iter(f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        await storage.close()
        await drop_pg_schema(schema)


async def bodies(queue: asyncio.Queue[Any], count: int, timeout: float = 5) -> list[str]:
    return [(await asyncio.wait_for(queue.get(), timeout))["body"] for _ in range(count)]


async def owner(redis: aioredis.Redis, prefix: str) -> tuple[str, int]:
    """(member, fencing token) of the room's lease, as Redis holds it."""
    value = (await redis.get(f"{prefix}:own:owner:{{muc:{ROOM}}}") or b"").decode()
    holder, _, token = value.partition("|")
    return holder.partition("#")[0], int(token or 0)


async def join(client: ClientXMPP, nick: str) -> None:
    await client.plugin["xep_0045"].join_muc_wait(ROOM, nick, timeout=10)


@pytest.mark.timeout(120)
async def test_a_room_with_occupants_on_three_nodes_survives_its_owners_death(
        nodes: tuple[dict[str, Node], Storage, aioredis.Redis, str, Proxy]) -> None:
    started, storage, redis, prefix, _ = nodes
    for name in ("alice", "bob", "carol"):
        await create_account(storage, "localhost", name, "secret", 4096)
    plugins = ("xep_0045", "xep_0060")
    alice = await started["n1"].client("alice@localhost", resource="a", plugins=plugins)
    bob = await started["n2"].client("bob@localhost", resource="b", plugins=plugins)
    carol = await started["n3"].client("carol@localhost", resource="c", plugins=plugins)
    inbox = {name: Harness.inbox(c) for name, c in (("alice", alice), ("bob", bob), ("carol", carol))}

    # A persistent room created on n1, which owns it; bob and carol join from the other nodes.
    await join(alice, "alice")
    form = await alice.plugin["xep_0045"].get_room_config(ROOM)
    form["values"] = {"muc#roomconfig_persistentroom": True}
    await alice.plugin["xep_0045"].set_room_config(ROOM, form)
    assert (await owner(redis, prefix))[0] == "n1/0"
    await join(bob, "bob")
    await join(carol, "carol")
    items = await carol.plugin["xep_0030"].get_items(jid="conference.localhost", timeout=10)  # served on n3
    assert [item[0] for item in items["disco_items"]["items"]] == [ROOM]
    for sender, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
        sender.send_message(mto=ROOM, mbody=f"hello from {name}", mtype="groupchat")
        for queue in inbox.values():
            assert await bodies(queue, 1) == [f"hello from {name}"]
    first_owner, first_token = await owner(redis, prefix)

    # A pubsub node is owned by the member its first request reached; requests from elsewhere go there.
    pubsub = bob.plugin["xep_0060"]
    await pubsub.create_node("pubsub.localhost", "feed", timeout=10)
    lease = (await redis.get(f"{prefix}:own:owner:{{pubsub:pubsub.localhost/feed}}") or b"").decode()
    assert lease.startswith("n2/0#"), lease
    events: asyncio.Queue[str] = asyncio.Queue()
    carol.add_event_handler("pubsub_publish", lambda m: events.put_nowait(m["pubsub_event"]["items"]["node"]))
    carol.send_presence()  # the notification goes to the bare JID: to its available resources
    await carol.plugin["xep_0060"].subscribe("pubsub.localhost", "feed", timeout=10)
    await pubsub.publish("pubsub.localhost", "feed", payload=fromstring("<entry xmlns='urn:example'/>"), timeout=10)
    assert await asyncio.wait_for(events.get(), 5) == "feed"

    # The owner's node dies (SIGKILL to its supervisor and worker): no goodbye, no release.
    worker = int((await redis.get(f"{prefix}:alive:n1/0") or b"0").split(b".")[0])  # "pid.instance"
    os.killpg(started["n1"].proc.pid, signal.SIGKILL)
    started["n1"].proc.wait(5)
    while os.path.exists(f"/proc/{worker}"):  # what reaches a dying worker's channel is lost with it
        await asyncio.sleep(0.01)
    killed = time.monotonic()
    # Sent at once, before the dead owner's lease lapsed: it waits for the takeover, and is not lost.
    bob.send_message(mto=ROOM, mbody="anyone?", mtype="groupchat")
    assert await bodies(inbox["bob"], 1, timeout=10) == ["anyone?"]
    assert time.monotonic() - killed < 10, "the room did not come back within 10 s"
    assert await bodies(inbox["carol"], 1) == ["anyone?"]
    holder, token = await owner(redis, prefix)
    assert holder in ("n2/0", "n3/0") and token > first_token, (first_owner, holder, token)

    # Both survivors are still in the room, with their nicks; alice's session went with its node.
    carol.send_message(mto=ROOM, mbody="still here", mtype="groupchat")
    assert await bodies(inbox["bob"], 1) == ["still here"]
    assert await bodies(inbox["carol"], 1) == ["still here"]
    assert {"bob", "carol"} <= set(carol.plugin["xep_0045"].get_roster(ROOM))
    deadline = time.monotonic() + 15  # alice leaves once n1 is known lost (its heartbeat lapsed) and reaped
    while "alice" in carol.plugin["xep_0045"].get_roster(ROOM):
        assert time.monotonic() < deadline, "alice's session on the dead node stayed in the room"
        await asyncio.sleep(0.1)

    # parleyctl on a node that does not own the room: the list and the occupants from storage and Redis, and
    # a destruction run by the owner.
    other = next(name for name in ("n2", "n3") if f"{name}/0" != holder)

    async def ctl(*args: str) -> list[str]:
        done = await asyncio.to_thread(subprocess.run, [str(Path(sys.executable).with_name("parleyctl")), "--config",
                                       str(started[other].data_dir / "parley.toml"), *args],
                                       capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    assert await ctl("muc_online_rooms", "global") == [ROOM]
    assert sorted(line.split("\t")[1] for line in await ctl("get_room_occupants", "lobby", "conference.localhost")) \
        == ["bob", "carol"]
    destroyed = asyncio.Event()
    carol.add_event_handler(f"muc::{ROOM}::got_offline",
                            lambda p: destroyed.set() if p["muc"]["nick"] == "carol" else None)
    await ctl("destroy_room", "lobby", "conference.localhost")
    await asyncio.wait_for(destroyed.wait(), 5)
    deadline = time.monotonic() + 5
    while await ctl("muc_online_rooms", "global"):
        assert time.monotonic() < deadline, "the destroyed room is still listed"
        await asyncio.sleep(0.2)

def logged_at(node: Node, text: str) -> float:
    """The wall-clock time of the first log line of `node` that contains `text`."""
    for line in node.log().splitlines():
        if text in line:
            return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
    raise AssertionError(f"{node.name} never logged {text!r}")


@pytest.mark.timeout(120)
async def test_a_node_cut_off_from_redis_stops_serving_its_rooms_before_another_takes_them(
        nodes: tuple[dict[str, Node], Storage, aioredis.Redis, str, Proxy]) -> None:
    started, storage, redis, prefix, proxy = nodes
    for name in ("alice", "bob"):
        await create_account(storage, "localhost", name, "secret", 4096)
    alice = await started["n1"].client("alice@localhost", resource="a", plugins=("xep_0045",))
    bob = await started["n2"].client("bob@localhost", resource="b", plugins=("xep_0045",))
    inbox = {"alice": Harness.inbox(alice), "bob": Harness.inbox(bob)}
    errors: asyncio.Queue[str] = asyncio.Queue()
    alice.add_event_handler("message_error", lambda m: errors.put_nowait(m["error"]["condition"]))
    await join(alice, "alice")
    await alice.plugin["xep_0045"].set_room_config(ROOM, await alice.plugin["xep_0045"].get_room_config(ROOM))
    await join(bob, "bob")
    assert (await owner(redis, prefix))[0] == "n1/0"

    proxy.cut()
    cut = time.monotonic()
    bob.send_message(mto=ROOM, mbody="anyone?", mtype="groupchat")  # n2 takes the room once n1's lease lapsed
    assert await bodies(inbox["bob"], 1, timeout=10) == ["anyone?"]
    assert time.monotonic() - cut < 10, "the room did not come back within 10 s"
    holder, _ = await owner(redis, prefix)
    assert holder == "n2/0"
    # n1 gave the room up before n2 took it: never two owners.
    assert logged_at(started["n1"], f"room {ROOM} is no longer served here") < \
        logged_at(started["n2"], f"room {ROOM} taken over")
    # n1 refuses work for the room rather than serve it alone.
    alice.send_message(mto=ROOM, mbody="alone?", mtype="groupchat")
    assert await asyncio.wait_for(errors.get(), 5) == "remote-server-timeout"
