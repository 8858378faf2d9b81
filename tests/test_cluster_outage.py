"""A Redis outage, ridden out: two members (two servers in this process, each with its own listeners, as two
nodes) on a private redis-server that the test kills and starts again. Users of one member keep chatting and
logging in; stanzas for the other member bounce with remote-server-timeout; once Redis is back each member
announces its sessions again and the two route to each other as before.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from slixmpp.exceptions import IqError

from server.config import Config
from server.jid import JID
from server.server import Server
from tests.conftest import Harness, free_port, unavailable
from tests.test_session_directory import cluster_config, until, worker


class PrivateRedis:
    """A redis-server of the test's own, without persistence, that the test can kill and start again."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.dir = tmp_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def until_redis(redis: PrivateRedis) -> None:
    async def answers() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", redis.port)
        except OSError:
            return False
        writer.close()
        return True

    await until(answers, "the private redis-server listening")


def harness(server: Server, tmp_path: Path) -> Harness:
    return Harness(server, server.config.listeners[0].port, server.config.listeners[1].port, tmp_path)


@asynccontextmanager
async def two_members(first_config: Config, second_config: Config,
                      tmp_path: Path) -> AsyncIterator[tuple[Harness, Harness]]:
    """Members 0 and 1 of a cluster, started in this process, as harnesses whose clients close afterwards."""
    async with worker(first_config, 0) as first, worker(second_config, 1) as second:
        pair = harness(first, tmp_path), harness(second, tmp_path)
        try:
            yield pair
        finally:
            for h in pair:
                await h.close()


@pytest.fixture
async def members(tmp_path: Path, private_redis: PrivateRedis) -> AsyncIterator[tuple[Harness, Harness]]:
    await until_redis(private_redis)
    prefix = f"parley-outage-{uuid.uuid4().hex[:8]}"
    first_config, second_config = cluster_config(tmp_path, prefix), cluster_config(tmp_path, prefix)
    for config in (first_config, second_config):
        config.cluster.redis_url = private_redis.url
    async with two_members(first_config, second_config, tmp_path) as pair:
        yield pair


async def body(queue: asyncio.Queue[Any]) -> str:
    return str((await asyncio.wait_for(queue.get(), 5))["body"])


async def test_an_outage_is_ridden_out_and_the_members_resynchronise(
        members: tuple[Harness, Harness], private_redis: PrivateRedis) -> None:
    first, second = members
    for name in ("alice", "bob", "carol", "dave"):
        await first.add_user(name)
    alice = await first.client("alice@localhost", resource="a", plugins=("xep_0199",))
    bob = await first.client("bob@localhost", resource="b")
    carol = await second.client("carol@localhost", resource="c")
    inbox = {"bob": first.inbox(bob), "carol": second.inbox(carol), "alice": first.inbox(alice)}
    carol_jid = JID.parse("carol@localhost/c")
    await first.server.sessions.ensure(carol_jid.bare)  # as routing does before it looks an account up
    await until(lambda: first.server.sessions.get(carol_jid) is not None, "carol known on the first member")
    alice.send_message(mto="carol@localhost/c", mbody="before", mtype="chat")
    assert await body(inbox["carol"]) == "before"

    private_redis.kill()
    await until(lambda: not first.server.cluster.connected and not second.server.cluster.connected,  # type: ignore[union-attr]
                "both members noticing the outage")
    # Users of one member go on: messages, and a new login.
    alice.send_message(mto="bob@localhost/b", mbody="during", mtype="chat")
    assert await body(inbox["bob"]) == "during"
    dave = await first.client("dave@localhost", resource="d")
    dave.send_message(mto="alice@localhost/a", mbody="logged in during the outage", mtype="chat")
    assert await body(inbox["alice"]) == "logged in during the outage"
    # What is for the other member bounces.
    with pytest.raises(IqError) as bounced:
        await alice.plugin["xep_0199"].ping(jid="carol@localhost/c", timeout=5)
    assert bounced.value.condition == "remote-server-timeout"
    assert first.server.cluster is not None and first.server.cluster.member in first.server.cluster.members()

    private_redis.start()  # empty: every key is gone
    await until(lambda: first.server.cluster.connected and second.server.cluster.connected,  # type: ignore[union-attr]
                "both members back on Redis", timeout=10)
    await first.server.sessions.ensure(carol_jid.bare)
    await second.server.sessions.ensure(JID.parse("dave@localhost"))
    await until(lambda: first.server.sessions.get(carol_jid) is not None
                and second.server.sessions.get(JID.parse("dave@localhost/d")) is not None,
                "each member knowing the other's sessions again", timeout=10)
    alice.send_message(mto="carol@localhost/c", mbody="after", mtype="chat")
    assert await body(inbox["carol"]) == "after"
    carol.send_message(mto="dave@localhost/d", mbody="hello dave", mtype="chat")
    dave_inbox = first.inbox(dave)
    assert await body(dave_inbox) == "hello dave"
