"""PEP notifications across the members of a cluster (OMEMO device lists among them): the presence that tells
a PEP service who wants its notifications is seen where it was routed, on the contact's member, so a
publication on one member must reach the interested resources on the others.
"""

from __future__ import annotations

from tests.conftest import Harness
from tests.test_cluster_resumption import members  # noqa: F401 - the fixture: two members of a cluster
from tests.test_pep import events, next_event, notify_known, pep_client, publish
from tests.test_roster_presence import befriend, sync

DEVICES = "eu.siacs.conversations.axolotl.devicelist"  # OMEMO's device list node


async def test_a_publication_reaches_the_interested_resources_on_every_member(
        members: tuple[Harness, Harness]) -> None:  # noqa: F811
    first, second = members
    for name in ("alice", "bob", "carol", "dave"):
        await first.add_user(name)
    await befriend(first, "alice", "bob")
    await befriend(first, "alice", "carol")
    alice, alice_inbox = await pep_client(first, "alice@localhost", DEVICES, resource="phone")
    laptop, laptop_inbox = await pep_client(second, "alice@localhost", DEVICES, resource="laptop")
    bob, bob_inbox = await pep_client(second, "bob@localhost", DEVICES)
    carol, carol_inbox = await pep_client(first, "carol@localhost", DEVICES)
    dave, dave_inbox = await pep_client(second, "dave@localhost", DEVICES)  # interested, but not a contact
    await notify_known(second, "alice@localhost", "bob@localhost/r")
    await notify_known(second, "alice@localhost", "alice@localhost/laptop")
    await notify_known(first, "alice@localhost", "carol@localhost/r")

    await publish(alice, DEVICES, "current", "1 2 3")  # published on the first member
    for inbox in (bob_inbox, laptop_inbox, carol_inbox, alice_inbox):
        assert (await next_event(inbox))[:2] == ("alice@localhost", "current")
    await sync(alice, laptop, bob, carol, dave)
    assert events(dave_inbox) == []
    for inbox in (bob_inbox, laptop_inbox, carol_inbox, alice_inbox):
        assert events(inbox) == []  # exactly once: next_event took the only one

    await publish(laptop, DEVICES, "current", "1 2 3 4")  # and from the second member
    for inbox in (bob_inbox, carol_inbox, alice_inbox):
        assert (await next_event(inbox))[:2] == ("alice@localhost", "current")
