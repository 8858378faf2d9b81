"""The cluster's session directory is sharded: a member keeps in memory the sessions of its own users and of the
accounts it routes to, not every session of every other member. What it has not cached it looks up in Redis when
a stanza needs it; the members holding an account's sessions tell the members watching it of every change.
"""

from __future__ import annotations

from xml.etree.ElementTree import fromstring

from server.jid import JID
from server.sessions import Session
from tests.conftest import Harness
from tests.test_cluster_resumption import members  # noqa: F401 - the fixture: two members of a cluster
from tests.test_roster_presence import befriend, online, sync
from tests.test_session_directory import PRESENCE, until

OTHERS = 300


async def test_a_member_keeps_only_the_sessions_its_users_need(members: tuple[Harness, Harness]) -> None:  # noqa: F811
    first, second = members
    for name in ("alice", "bob"):
        await first.add_user(name)
    await befriend(first, "alice", "bob")
    written: dict[str, list[str]] = {}
    host = second.server.hosts["localhost"]
    for i in range(OTHERS):  # users of the second member that none of the first member's users knows
        jid = f"user{i}@localhost/r"
        session = Session(JID.parse(jid), host, written.setdefault(jid, []).append, lambda condition: None)
        second.server.sessions.add(session)
        session.presence = fromstring(PRESENCE)
    alice, _ = await online(first, "alice@localhost", "phone")
    bob, bob_watch = await online(second, "bob@localhost", "laptop")
    await bob_watch.presence(from_="alice@localhost/phone")  # a contact of a user of the first member: known there
    directory = first.server.sessions
    await until(lambda: directory.get(JID.parse("bob@localhost/laptop")) is not None, "bob known on the first member")
    assert [str(session.jid) for _, session in directory.remote.values()] == ["bob@localhost/laptop"]

    alice.send_message(mto="user150@localhost", mbody="hello")  # a stranger's: looked up as it is routed
    await until(lambda: any("hello" in data for data in written["user150@localhost/r"]), "the message delivered")
    assert sorted(str(session.jid) for _, session in directory.remote.values()) == \
        ["bob@localhost/laptop", "user150@localhost/r"]

    online_here = {str(jid) for jid in await directory.everywhere("localhost")}
    assert online_here == {f"user{i}@localhost/r" for i in range(OTHERS)} | {"alice@localhost/phone",
                                                                              "bob@localhost/laptop"}
    assert len(await directory.users("localhost")) == OTHERS + 2
    await until(lambda: directory.count() == OTHERS + 2, "the count of the cluster's sessions", timeout=6)

    # What the first member caches of the accounts that no user of its own has is bounded.
    directory.limit = 1
    for i in range(5):
        alice.send_message(mto=f"user{i}@localhost", mbody="again")
    await sync(alice)
    await until(lambda: all(any("again" in data for data in written[f"user{i}@localhost/r"]) for i in range(5)),
                "the messages delivered")
    cached = {session.bare for _, session in directory.remote.values()}
    assert len(cached - {JID.parse("bob@localhost")}) <= 1 and JID.parse("alice@localhost") in directory.known
    await sync(bob)
