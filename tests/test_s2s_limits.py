"""Federation limits over real sockets: a remote domain's read rate over all its connections, the queue
of stanzas waiting for a domain, and caps on incoming connections."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.config import StaticRoute
from tests.s2s_support import (
    B_ADDR,
    Inbox,
    Parley,
    RawPeer,
    authenticated_raw_peer,
    chat,
    linked,
    options,
    servers_fixture,
    until,
)

pytestmark = pytest.mark.timeout(60)

FLOOD_RATE, FLOOD_BURST = 10000, 2000  # bytes/s and burst allowed to a2.test on B
FLOOD_MESSAGES, FLOOD_SIZE = 10, 1000  # per flooding connection
STANZA_RATE, STANZA_BURST, STANZAS = 20, 5, 45  # stanzas/s and burst allowed to a2.test, and how many it sends


servers = servers_fixture


def flood(sender: str, count: int, size: int) -> str:
    body = "x" * (size - 100)
    return "".join(f"<message from='{sender}' to='bob@b.test' type='chat' id='f{i}'><body>{body}</body></message>"
                   for i in range(count))


@options(a_domains=("a.test", "a2.test"),
         b_s2s={"domains": {"a2.test": {"rate": FLOOD_RATE, "burst": FLOOD_BURST}}})
async def test_a_flooding_domain_is_slowed_over_all_its_connections_and_nobody_else_is(
        servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, bob, carol = await a.user("alice@a.test"), await b.user("bob@b.test"), await b.user("carol@b.test")
    inbox = Inbox(bob)
    await chat(alice, inbox, "bob@b.test", "the a.test link is up")
    floods = [await authenticated_raw_peer(a, b, "a2.test") for _ in range(2)]
    try:
        started = time.monotonic()
        for peer in floods:
            await peer.send(flood("mallory@a2.test/x", FLOOD_MESSAGES, FLOOD_SIZE))
        # Meanwhile a.test's link and B's own users are served at once.
        await chat(alice, inbox, "bob@b.test", "from a.test during the flood")
        await chat(carol, inbox, "bob@b.test", "from carol during the flood")
        flooded = [m for m in inbox.received if m["from"].domain == "a2.test"]
        assert len(flooded) < 2 * FLOOD_MESSAGES
        for _ in range(2 * FLOOD_MESSAGES):
            await inbox.wait(lambda m: m["from"].domain == "a2.test", timeout=15)
        elapsed = time.monotonic() - started
    finally:
        for peer in floods:
            peer.close()
    # One budget for both connections: a budget each would have let them through in half the time.
    assert elapsed >= 0.9 * (2 * FLOOD_MESSAGES * FLOOD_SIZE - FLOOD_BURST) / FLOOD_RATE


@options(a_domains=("a.test", "a2.test"),
         b_s2s={"domains": {"a2.test": {"stanza_rate": STANZA_RATE, "stanza_burst": STANZA_BURST}}})
async def test_a_domain_sending_many_small_stanzas_is_held_to_its_stanza_rate(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, _, inbox = await linked(a, b)
    peer = await authenticated_raw_peer(a, b, "a2.test")
    try:
        started = time.monotonic()
        await peer.send(flood("mallory@a2.test/x", STANZAS, 200))
        await chat(alice, inbox, "bob@b.test", "from a.test meanwhile")
        assert len([m for m in inbox.received if m["from"].domain == "a2.test"]) < STANZAS
        for _ in range(STANZAS):
            await inbox.wait(lambda m: m["from"].domain == "a2.test", timeout=15)
        elapsed = time.monotonic() - started
    finally:
        peer.close()
    assert elapsed >= 0.9 * (STANZAS - STANZA_BURST) / STANZA_RATE


@options(a_s2s={"domains": {"silent.test": {"max_queue": 3}}}, unauthenticated_timeout=1.0)
async def test_stanzas_past_a_domains_queue_are_bounced_and_the_rest_when_the_link_fails(
        servers: tuple[Parley, Parley]) -> None:
    a, _ = servers
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.7", 0)
    a.server.config.s2s.static["silent.test"] = StaticRoute("127.0.0.7", silent.sockets[0].getsockname()[1])
    try:
        alice = await a.user("alice@a.test")
        errors = Inbox(alice, "message_error")
        for i in range(5):
            alice.send_message(mto="x@silent.test", mbody=f"m{i}", mtype="chat")
        bounced = [await errors.wait(timeout=5) for _ in range(5)]
    finally:
        silent.close()
    conditions = sorted(error["error"]["condition"] for error in bounced)
    assert conditions == ["remote-server-timeout"] * 3 + ["resource-constraint"] * 2


async def refused(source: str, b: Parley) -> bytes:
    peer = await RawPeer.connect(B_ADDR, b.s2s_port, source)
    try:
        return await peer.closed()
    finally:
        peer.close()


@options(b_s2s={"max_incoming": 3, "max_incoming_per_ip": 2})
async def test_incoming_connections_are_capped_per_address_and_in_total(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    bob = await b.user("bob@b.test")
    inbox = Inbox(bob)
    first = [await authenticated_raw_peer(a, b, source="127.0.0.9") for _ in range(2)]
    assert b"policy-violation" in await refused("127.0.0.9", b)
    first.append(await authenticated_raw_peer(a, b, source="127.0.0.10"))
    assert b"resource-constraint" in await refused("127.0.0.11", b)
    try:
        # The refusals took nothing from the connections already there.
        await first[0].send("<message from='alice@a.test/x' to='bob@b.test'><body>still served</body></message>")
        await inbox.wait(lambda m: m["body"] == "still served")
        first.pop().close()
        await until(lambda: len(b.manager.incoming) < 3)
        first.append(await authenticated_raw_peer(a, b, source="127.0.0.11"))
    finally:
        for peer in first:
            peer.close()


async def test_incoming_server_connections_share_the_connection_budget_with_clients(
        servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    await b.user("bob@b.test")
    b.server.max_connections -= b.manager.descriptors_left()  # bob's connection took the last one
    assert b"resource-constraint" in await refused("127.0.0.9", b)
    b.server.max_connections += 1
    peer = await authenticated_raw_peer(a, b, source="127.0.0.9")
    peer.close()
