"""Presence between contacts on different members of a cluster when both go available at the same moment: each
member answers the other's probe, and broadcasts its user's presence, from what it knows of the other member's
sessions, which may not yet include the contact that has just become available. Neither may miss the other.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.jid import JID
from tests.conftest import Harness
from tests.test_cluster_resumption import members  # noqa: F401 - the fixture: two members of a cluster
from tests.test_roster_presence import befriend, online, sync
from tests.test_session_directory import until

ROUNDS = 6


def last_presence(watch: Any, sender: str) -> str | None:
    """The type of the last presence `watch`'s client got from `sender` ('available', 'unavailable'), if any."""
    found = [s.xml.get("type", "available") for s in watch.received
             if s.name == "presence" and str(s["from"]) == sender]
    return found[-1] if found else None


async def settled(watch: Any, sender: str, wanted: str, timeout: float = 5.0) -> None:
    """Until the last presence from `sender` is of the `wanted` type (and stays so for a moment)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if last_presence(watch, sender) == wanted:
            await asyncio.sleep(0.3)  # a late stanza of another type would show now
            if last_presence(watch, sender) == wanted:
                return
        if asyncio.get_running_loop().time() > deadline:
            got = [(str(s["from"]), s.xml.get("type", "available")) for s in watch.received if s.name == "presence"]
            raise AssertionError(f"last presence from {sender} is not {wanted}; got {got}")
        await asyncio.sleep(0.02)


async def test_contacts_going_available_together_on_two_members_see_each_other(
        members: tuple[Harness, Harness]) -> None:  # noqa: F811
    first, second = members
    for name in ("alice", "bob"):
        await first.add_user(name)
    await befriend(first, "alice", "bob")
    alice, alice_watch = await online(first, "alice@localhost", "phone", available=False)
    bob, bob_watch = await online(second, "bob@localhost", "laptop", available=False)
    for _ in range(ROUNDS):
        alice_watch.received.clear()
        bob_watch.received.clear()
        alice.send_presence()
        bob.send_presence()
        await settled(alice_watch, "bob@localhost/laptop", "available")
        await settled(bob_watch, "alice@localhost/phone", "available")
        alice.send_presence(ptype="unavailable")
        bob.send_presence(ptype="unavailable")
        await sync(alice, bob)
        # Going unavailable together, neither need hear of the other's; each member must know both have gone.
        await until(lambda: all(server.server.sessions.available(JID.parse(user)) == []
                                for server in members for user in ("alice@localhost", "bob@localhost")),
                    "both unavailable on both members")
