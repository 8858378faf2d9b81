"""A message that goes to offline storage at the moment its recipient comes online on another member of a
cluster: the sender's member does not know yet that the recipient is available, and the recipient's initial
presence has taken the stored backlog just before the message was added to it. It must reach the recipient's
new session now, not at the next login.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from slixmpp import ClientXMPP

from server.config import ClusterConfig
from server.jid import JID
from tests.conftest import PG_URL, Harness, drop_pg_schema, free_port, make_config, make_pg_schema
from tests.test_cluster_outage import two_members
from tests.test_roster_presence import sync
from tests.test_session_directory import REDIS_URL, redis_prefix, until

ROUNDS = 8


@pytest.fixture
async def members(tmp_path: Path) -> AsyncIterator[tuple[Harness, Harness]]:
    """Two members of a cluster in this process on one PostgreSQL schema (two members in one process on one
    SQLite file would wait for each other's write lock with the event loop blocked)."""
    schema = await make_pg_schema()
    try:
        async with redis_prefix() as prefix:
            configs = [make_config(tmp_path, free_port(), free_port(), f"{PG_URL}?schema={schema}")
                       for _ in range(2)]
            for config in configs:
                config.cluster = ClusterConfig(workers=2, redis_url=REDIS_URL, prefix=prefix)
            async with two_members(configs[0], configs[1], tmp_path) as pair:
                yield pair
    finally:
        await drop_pg_schema(schema)


async def send_until(bob: ClientXMPP, prefix: str, stop: asyncio.Event) -> list[str]:
    """bob writes alice a few messages every millisecond until `stop`; the bodies sent."""
    sent: list[str] = []
    while not stop.is_set():
        for _ in range(4):
            sent.append(f"{prefix}-{len(sent)}")
            bob.send_message(mto="alice@localhost", mbody=sent[-1], mtype="chat")
        await asyncio.sleep(0.001)
    return sent


async def test_messages_stored_while_the_recipient_comes_online_elsewhere_reach_it(
        members: tuple[Harness, Harness]) -> None:
    first, second = members
    for name in ("alice", "bob"):
        await first.add_user(name)
    bob = await second.client("bob@localhost", resource="desk")
    for round_ in range(ROUNDS):
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(send_until(bob, str(round_), stop))
        await asyncio.sleep(0.05)
        alice = await first.client("alice@localhost", resource=f"r{round_}")
        inbox = first.inbox(alice)
        alice.send_presence()
        await asyncio.sleep(0.1)
        stop.set()
        sent = await task
        await sync(bob)
        received: set[str] = set()
        try:
            while len(received) < len(sent):
                received.add((await asyncio.wait_for(inbox.get(), 5))["body"])
        except TimeoutError:
            stored = await first.server.storage.offline.count("localhost", "alice")
            raise AssertionError(f"round {round_}: {len(sent) - len(received)} of {len(sent)} messages did not "
                                 f"reach alice's session; {stored} stay in offline storage") from None
        assert received == set(sent)
        alice.disconnect()
        await until(lambda: all(not server.server.sessions.available(JID.parse("alice@localhost"))
                                for server in members), "alice gone on both members")
