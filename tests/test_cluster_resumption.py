"""XEP-0198 resumption on another member of a cluster: a phone whose session was detached on one member (node)
comes back on another, which takes the session over from the first (its state and unacknowledged queue); the
first drops it without ending it, so contacts see no change and nothing is delivered twice or lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from extensions.stream_management import NAME, Managed
from server.jid import JID
from server.sessions import Session
from tests.conftest import PG_URL, Harness, drop_pg_schema, make_pg_schema
from tests.test_cluster_outage import two_members
from tests.test_roster_presence import befriend, online, sync
from tests.test_session_directory import cluster_config, redis_prefix, until
from tests.test_stream_management import authenticated, sm_client

PHONE = JID.parse("alice@localhost/phone")


@pytest.fixture(params=["sqlite", "postgresql"])
async def members(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Harness, Harness]]:
    """Two members of a cluster in this process, each with its own listeners (as two nodes), on SQLite and on
    PostgreSQL (whose commits of the archive and offline storage take turns differently)."""
    schema = await make_pg_schema() if request.param == "postgresql" else None
    try:
        async with redis_prefix() as prefix:
            configs = [cluster_config(tmp_path, prefix) for _ in range(2)]
            if schema is not None:
                for config in configs:
                    config.storage.url = f"{PG_URL}?schema={schema}"
            async with two_members(configs[0], configs[1], tmp_path) as pair:
                yield pair
    finally:
        if schema is not None:
            await drop_pg_schema(schema)


def managed(server: Harness) -> Managed:
    session = server.server.sessions.get(PHONE)
    assert session is not None
    found = session.data.get(NAME)
    assert isinstance(found, Managed)
    return found


async def test_a_session_detached_on_one_member_resumes_on_another(members: tuple[Harness, Harness]) -> None:
    first, second = members
    for name in ("alice", "bob"):
        await first.add_user(name)
    await befriend(first, "alice", "bob")
    bob, bob_watch = await online(second, "bob@localhost", "desk")
    alice = await sm_client(first, "alice@localhost", "phone")
    await bob_watch.presence(from_="alice@localhost/phone")
    inbox = first.inbox(alice)
    resumed = asyncio.get_running_loop().create_future()
    alice.add_event_handler("session_resumed", lambda _: resumed.set_result(True))
    old = first.server.sessions.get(PHONE)
    assert old is not None and old.host.server is first.server

    alice.abort()
    await until(lambda: old.detached, "alice's session detached on the first member")
    for body in ("while away 1", "while away 2"):
        bob.send_message(mto="alice@localhost", mbody=body, mtype="chat")
    await sync(bob)
    await until(lambda: len(managed(first).state) >= 2, "the messages queued on the first member")
    previd = managed(first).id
    assert previd is not None and first.server.cluster is not None and first.server.cluster.member in previd

    alice.connect("127.0.0.1", second.port)  # the phone comes back through the other node
    await asyncio.wait_for(resumed, 10)
    got = [(await asyncio.wait_for(inbox.get(), 5))["body"] for _ in range(2)]
    assert got == ["while away 1", "while away 2"]
    await sync(alice, bob)
    assert inbox.empty()  # exactly once
    new = second.server.sessions.get(PHONE)
    assert isinstance(new, Session) and new is not old and new.host.server is second.server
    assert new.available and not new.detached and managed(second).id == previd
    assert old.closed and first.server.sessions.get(PHONE) is not old
    assert not bob_watch.saw_presence("unavailable", "alice@localhost/phone")  # no change seen by contacts
    # The session carries on both ways from the second member, and the first routes to it there.
    bob.send_message(mto="alice@localhost/phone", mbody="after", mtype="chat")
    assert (await asyncio.wait_for(inbox.get(), 5))["body"] == "after"
    await until(lambda: first.server.sessions.get(PHONE) is not None, "the first member seeing the session there")
    carol = await first.add_user("carol")
    carol_client = await first.client(carol, resource="c")
    carol_client.send_message(mto="alice@localhost/phone", mbody="via the first member", mtype="chat")
    assert (await asyncio.wait_for(inbox.get(), 5))["body"] == "via the first member"

    # Cut again: the client comes back on the first member, which finds where the session went.
    resumed_again = asyncio.get_running_loop().create_future()
    alice.add_event_handler("session_resumed", lambda _: resumed_again.set_result(True)
                            if not resumed_again.done() else None)
    alice.abort()
    await until(lambda: new.detached, "alice's session detached on the second member")
    alice.connect("127.0.0.1", first.port)
    await asyncio.wait_for(resumed_again, 10)
    back = first.server.sessions.get(PHONE)
    assert back is not None and back.host.server is first.server and back.available


async def test_an_unknown_id_naming_another_member_fails_cleanly(members: tuple[Harness, Harness]) -> None:
    first, second = members
    await first.add_user("alice")
    raw_id = f"nothing~{first.server.cluster.member if first.server.cluster else ''}"
    raw = await authenticated(second, "alice")
    await raw.send(f"<resume xmlns='urn:xmpp:sm:3' previd='{raw_id}' h='0'/>")
    answer = await raw.expect("{urn:xmpp:sm:3}failed")
    assert answer.find("{urn:ietf:params:xml:ns:xmpp-stanzas}item-not-found") is not None
