"""A client's archived messages share group commits: its connection reads on while earlier messages wait for
their archive rows (server/archiving.py's Turn), and still delivers, archives and acknowledges them in order.

(`kill -9` in the middle of such a burst: tests/test_faults.py.)
"""

from __future__ import annotations

from xml.etree.ElementTree import Element

import pytest
from sqlalchemy import select

from server.storage.schema import archive
from tests.conftest import Harness
from tests.test_shutdown import BODY, login

SM = "urn:xmpp:sm:3"
COUNT = 60


def commits(server: Harness) -> int:
    return sum(server.server.storage.archive.commits.counts)


async def archived(server: Harness, user: str) -> list[str]:
    """Bodies of `user`'s archive, oldest row first."""
    async with server.server.storage.engine.connect() as conn:
        rows = await conn.execute(select(archive.c.body).where(archive.c.username == user).order_by(archive.c.id))
        return [row.body for row in rows]


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_one_connection_s_burst_shares_commits_in_order(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name, "pw")
    bob = await login(server, "bob", "desk")
    alice = await login(server, "alice", "phone")
    await alice.send(f"<enable xmlns='{SM}'/>")
    await alice.expect(f"{{{SM}}}enabled")
    sent = [f"m{i}" for i in range(COUNT)]
    before = commits(server)
    # The whole burst and a request for an acknowledgement in one write, as a client with a full window sends.
    await alice.send("".join(f"<message to='bob@localhost' type='chat' id='{b}'><body>{b}</body></message>"
                             for b in sent) + f"<r xmlns='{SM}'/>")
    ack = await alice.expect(f"{{{SM}}}a")
    assert ack.get("h") == str(COUNT)
    # Acknowledged only once committed: every row is there when the <a/> arrives.
    assert await archived(server, "alice") == sent
    assert await archived(server, "bob") == sent
    # Waiting for each commit before reading the next message took one commit per message.
    assert commits(server) - before <= COUNT // 4, commits(server) - before
    received: list[str] = []
    while len(received) < COUNT:
        event = await bob.next()
        if isinstance(event, Element) and event.findtext(BODY):
            received.append(event.findtext(BODY) or "")
    assert received == sent


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
async def test_an_iq_after_parked_messages_is_answered_after_them(server: Harness) -> None:
    """What is not a chat message to a local account waits for the messages before it to be done."""
    for name in ("alice", "bob"):
        await server.add_user(name, "pw")
    await login(server, "bob", "desk")
    alice = await login(server, "alice", "phone")
    await alice.send("".join(f"<message to='bob@localhost' type='chat'><body>m{i}</body></message>"
                             for i in range(20)) + "<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>")
    await alice.expect("{jabber:client}iq")
    assert await archived(server, "bob") == [f"m{i}" for i in range(20)]
