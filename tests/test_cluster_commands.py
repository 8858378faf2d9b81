"""Admin commands that end sessions act on the whole cluster: run on a member that has never looked the account
up (none of its users has contact with it), end-user-session and delete-user still end the sessions the
account holds on another member."""

from __future__ import annotations

import asyncio

from slixmpp import ClientXMPP

from parley import COMMANDS
from server.commands import Context
from server.jid import JID
from tests.conftest import Harness
from tests.test_cluster_offline import members  # noqa: F401  (the fixture)


def ended(client: ClientXMPP) -> asyncio.Future[bool]:
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    client.add_event_handler("disconnected", lambda _: future.done() or future.set_result(True))
    return future


async def test_commands_end_sessions_held_by_another_member(
        members: tuple[Harness, Harness]) -> None:  # noqa: F811
    first, second = members
    for declared in COMMANDS:  # what build_server gives `parley serve`; the members here are bare servers
        first.server.commands.add(declared)
    for name in ("alice", "bob"):
        await first.add_user(name)
    alice = await second.client("alice@localhost", resource="phone")
    bob = await second.client("bob@localhost", resource="desk")
    host = first.server.hosts["localhost"]
    admin = Context(host, JID.parse("admin@localhost"), operator=True)
    assert not list(first.server.sessions.of(JID.parse("alice@localhost")))  # the first member never looked

    gone = ended(alice)
    await first.server.commands.run("end-user-session", admin, {"accountjids": [JID.parse("alice@localhost")]})
    assert await asyncio.wait_for(gone, 10)

    gone = ended(bob)
    await first.server.commands.run("delete-user", admin, {"accountjids": [JID.parse("bob@localhost")]})
    assert await asyncio.wait_for(gone, 10)
    assert not await first.server.storage.accounts.exists("localhost", "bob")
