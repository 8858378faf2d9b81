"""BOSH in a cluster without sticky sessions: two members in this process on one PostgreSQL schema, each with
its own http listener. A session made on the first goes on with its requests sent alternately to both: the
second passes those it gets to the first, which holds them as usual and answers through it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from xml.etree.ElementTree import Element

import aiohttp
import pytest

from server.config import ClusterConfig, ListenerConfig
from tests.conftest import PG_URL, Harness, drop_pg_schema, free_port, make_config, make_pg_schema
from tests.test_bosh import Bosh, C, stanzas
from tests.test_cluster_outage import two_members
from tests.test_session_directory import REDIS_URL, redis_prefix


class Alternating(Bosh):
    """A client whose requests go to each member in turn, as a load balancer without stickiness sends them."""

    def __init__(self, urls: list[str], http: aiohttp.ClientSession) -> None:
        super().__init__(urls[0], http)
        self.urls = urls
        self.turn = 0

    async def post(self, text: str) -> Element:
        self.url = self.urls[self.turn % len(self.urls)]
        self.turn += 1
        return await super().post(text)


@pytest.fixture
async def members(tmp_path: Path) -> AsyncIterator[tuple[list[str], Harness, Harness]]:
    """The BOSH URLs of the two members, and the members."""
    schema = await make_pg_schema()
    try:
        async with redis_prefix() as prefix:
            configs, urls = [], []
            for _ in range(2):
                config = make_config(tmp_path, free_port(), free_port(), f"{PG_URL}?schema={schema}")
                config.cluster = ClusterConfig(workers=2, redis_url=REDIS_URL, prefix=prefix)
                port = free_port()
                config.listeners.append(ListenerConfig("http", "127.0.0.1", port, "none"))
                for host in config.hosts.values():
                    host.modules.append("bosh")
                configs.append(config)
                urls.append(f"http://127.0.0.1:{port}/http-bind")
            async with two_members(configs[0], configs[1], tmp_path) as (first, second):
                yield urls, first, second
    finally:
        await drop_pg_schema(schema)


async def test_a_session_goes_on_through_either_member(members: tuple[list[str], Harness, Harness]) -> None:
    urls, first, second = members
    await first.add_user("web")
    await first.add_user("tcp")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        bosh = Alternating(urls, http)
        jid = await bosh.login("web")  # created on the first member, then every other request on the second
        assert bosh.turn > 4 and jid == "web@localhost/web"
        await bosh.send("<presence xmlns='jabber:client'/>")
        tcp = await second.client("tcp@localhost")
        inbox = second.inbox(tcp)
        for member in (0, 1):
            bosh.turn = member
            poll = asyncio.ensure_future(bosh.send())  # held by the first member, whichever the client asked
            done, _ = await asyncio.wait([poll], timeout=0.5)
            assert not done
            tcp.send_message(mto=jid, mbody=f"wake up {member}", mtype="chat")
            answer = await asyncio.wait_for(poll, 5)
            assert answer.findtext(f"{C}message/{C}body") == f"wake up {member}"
        held = []
        for member in (0, 1):  # each request is held in its turn, and answered when the next one comes
            bosh.turn = member
            held.append(asyncio.ensure_future(bosh.send(
                f"<message xmlns='jabber:client' to='{tcp.boundjid}' type='chat'><body>from the web {member}</body>"
                "</message>")))
            got = await asyncio.wait_for(inbox.get(), 5)
            assert (got["body"], str(got["from"])) == (f"from the web {member}", jid)
        tcp.send_message(mto=jid, mbody="and again", mtype="chat")
        message = await stanzas(bosh, f"{C}message")
        assert message.findtext(f"{C}body") == "and again"
        await asyncio.wait_for(asyncio.gather(*held), 5)
        bosh.turn = 1
        answer = await bosh.send("<presence xmlns='jabber:client' type='unavailable'/>", type="terminate")
        assert answer.get("type") == "terminate" and answer.get("condition") is None
        for member in (0, 1):  # ended on the first member: neither knows it any more
            bosh.turn = member
            assert (await bosh.send()).get("condition") == "item-not-found"


async def test_unknown_sessions_and_sessions_of_a_member_that_is_gone(
        members: tuple[list[str], Harness, Harness]) -> None:
    urls, first, _ = members
    assert first.server.cluster is not None
    async with aiohttp.ClientSession() as http:
        bosh = Bosh(urls[1], http)
        for sid in ("no-such-session",  # not one of the cluster's
                    f"{first.server.cluster.member.encode().hex()}.nothing",  # passed to the first, which has none
                    f"{b'gone/7'.hex()}.nothing"):  # of a member that is not live
            bosh.sid = sid
            answer = await bosh.send()
            assert (answer.get("type"), answer.get("condition")) == ("terminate", "item-not-found"), sid


async def test_a_request_held_for_a_member_that_goes_ends_the_session(
        members: tuple[list[str], Harness, Harness]) -> None:
    urls, first, _ = members
    await first.add_user("web")
    async with aiohttp.ClientSession() as http:
        bosh = Alternating(urls, http)
        await bosh.login("web")
        bosh.turn = 1
        poll = asyncio.ensure_future(bosh.send())  # passed by the second member to the first, which holds it
        done, _ = await asyncio.wait([poll], timeout=0.5)
        assert not done
        assert first.server.cluster is not None
        await first.server.cluster.stop()  # the first member leaves the cluster: the second hears its goodbye
        answer = await asyncio.wait_for(poll, 5)
        assert (answer.get("type"), answer.get("condition")) == ("terminate", "item-not-found")
