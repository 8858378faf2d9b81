"""Federation between in-process Parley servers over loopback (s2s/), and hostile peers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from slixmpp.exceptions import IqError

from s2s.dialback import make_key
from server.jid import JID
from tests.s2s_support import (
    B_ADDR,
    Inbox,
    Parley,
    RawPeer,
    authenticated_raw_peer,
    chat,
    incoming_methods,
    linked,
    options,
    servers_fixture,
)

pytestmark = pytest.mark.timeout(60)


servers = servers_fixture


async def test_messages_both_ways_with_sasl_external(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
    alice_inbox, bob_inbox = Inbox(alice), Inbox(bob)
    got = await chat(alice, bob_inbox, "bob@b.test", "hello from a")
    assert got["from"].bare == "alice@a.test" and got["type"] == "chat"
    got = await chat(bob, alice_inbox, "alice@a.test", "hello from b")
    assert got["from"].bare == "bob@b.test"
    assert a.manager.links["a.test", "b.test"].methods == {("a.test", "b.test"): "external"}
    assert b.manager.links["b.test", "a.test"].methods == {("b.test", "a.test"): "external"}
    assert incoming_methods(b) == {("a.test", "b.test"): "external"}


@options(bidi=True)
async def test_bidirectional_link_carries_both_ways(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
    alice_inbox, bob_inbox = Inbox(alice), Inbox(bob)
    await chat(alice, bob_inbox, "bob@b.test", "one connection")
    await chat(bob, alice_inbox, "alice@a.test", "answered on it")
    assert a.manager.links["a.test", "b.test"].bidi and not a.manager.incoming
    assert not b.manager.links and set(b.manager.bidi) == {("b.test", "a.test")}


@options(bidi=True, certs="self-signed", a_s2s={"accept_self_signed": ["b.test"]},
         b_s2s={"accept_self_signed": ["a.test"]})
async def test_bidirectional_link_with_dialback(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
    alice_inbox, bob_inbox = Inbox(alice), Inbox(bob)
    await chat(bob, alice_inbox, "alice@a.test", "b starts")
    await chat(alice, bob_inbox, "bob@b.test", "a answers on b's connection")
    assert b.manager.links["b.test", "a.test"].methods == {("b.test", "a.test"): "dialback"}
    # A connected to B only to check B's dialback key; A's stanzas take B's connection.
    assert set(a.manager.bidi) == {("a.test", "b.test")}


async def test_stanzas_queued_while_the_link_comes_up_arrive_in_order(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
    bob_inbox = Inbox(bob)
    for i in range(20):
        alice.send_message(mto="bob@b.test", mbody=f"m{i}")
    await bob_inbox.wait(lambda m: m["body"] == "m19")
    assert [m["body"] for m in bob_inbox.received] == [f"m{i}" for i in range(19)]
    assert len({id(link) for link in a.manager.links.values()}) == 1  # one connection carried them all


@options(certs="self-signed", a_s2s={"accept_self_signed": ["b.test"]},
                  b_s2s={"accept_self_signed": ["a.test"]})
async def test_dialback_when_certificates_cannot_be_verified(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
    alice_inbox, bob_inbox = Inbox(alice), Inbox(bob)
    await chat(alice, bob_inbox, "bob@b.test", "over dialback")
    await chat(bob, alice_inbox, "alice@a.test", "and back")
    assert a.manager.links["a.test", "b.test"].methods == {("a.test", "b.test"): "dialback"}
    assert b.manager.links["b.test", "a.test"].methods == {("b.test", "a.test"): "dialback"}
    assert incoming_methods(a) == {("b.test", "a.test"): "dialback"}


@options(certs="self-signed", a_s2s={"require_valid_certificates": False},
                  b_s2s={"require_valid_certificates": False})
async def test_dialback_without_certificate_checks(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
    await chat(alice, Inbox(bob), "bob@b.test", "unchecked")
    assert a.manager.links["a.test", "b.test"].methods == {("a.test", "b.test"): "dialback"}


@options(certs="self-signed")
async def test_untrusted_certificate_is_refused_and_the_stanza_bounced(servers: tuple[Parley, Parley]) -> None:
    a, _ = servers
    alice = await a.user("alice@a.test")
    errors = Inbox(alice, "message_error")
    alice.send_message(mto="bob@b.test", mbody="not trusted")
    error = await errors.wait(lambda m: m["type"] == "error")
    assert error["error"]["condition"] == "remote-server-timeout" and error["from"] == "bob@b.test"
    assert not a.manager.links


async def test_subscription_handshake_and_presence_across_servers(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
    alice_presence, bob_presence = Inbox(alice, "presence"), Inbox(bob, "presence")
    # slixmpp answers a subscription request with 'subscribed' and subscribes back: the full handshake.
    alice.send_presence(pto="bob@b.test", ptype="subscribe")
    await alice_presence.wait(lambda p: p["from"].bare == "bob@b.test" and p["type"] == "available")
    await bob_presence.wait(lambda p: p["from"].bare == "alice@a.test" and p["type"] == "available")

    async def subscription(server: Parley, user: str, contact: str) -> str | None:
        local, _, domain = user.partition("@")
        item = await server.server.storage.roster.get_item(domain, local, contact)
        return item.subscription if item else None

    for _ in range(50):
        if await subscription(a, "alice@a.test", "bob@b.test") == "both" and \
                await subscription(b, "bob@b.test", "alice@a.test") == "both":
            break
        await asyncio.sleep(0.1)
    assert await subscription(a, "alice@a.test", "bob@b.test") == "both"
    assert await subscription(b, "bob@b.test", "alice@a.test") == "both"
    alice.send_presence(pstatus="away for lunch", pshow="away")
    got = await bob_presence.wait(lambda p: p["status"] == "away for lunch")
    assert got["show"] == "away" and got["from"] == alice.boundjid


async def test_vcard_fetch_across_servers(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice = await a.user("alice@a.test", plugins=("xep_0054",))
    bob = await b.user("bob@b.test", plugins=("xep_0054",))
    card = bob.plugin["xep_0054"].make_vcard()
    card["FN"] = "Bob of B"
    await bob.plugin["xep_0054"].publish_vcard(card)
    result = await alice.plugin["xep_0054"].get_vcard(JID.parse("bob@b.test").__str__(), timeout=10)
    assert result["vcard_temp"]["FN"] == "Bob of B"
    with pytest.raises(IqError) as info:
        await alice.plugin["xep_0054"].get_vcard("nobody@b.test", timeout=10)
    assert info.value.condition == "service-unavailable"


async def test_unreachable_peer_bounces_remote_server_timeout(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice = await a.user("alice@a.test")
    await b.stop()
    errors = Inbox(alice, "message_error")
    alice.send_message(mto="bob@b.test", mbody="anyone there?")
    error = await errors.wait(lambda m: m["type"] == "error")
    assert error["error"]["condition"] == "remote-server-timeout"
    assert error["error"]["type"] == "wait"


async def test_unknown_domain_bounces_remote_server_not_found(servers: tuple[Parley, Parley]) -> None:
    a, _ = servers
    alice = await a.user("alice@a.test")
    errors = Inbox(alice, "message_error")
    alice.send_message(mto="someone@nowhere.invalid", mbody="hello?")
    error = await errors.wait(lambda m: m["type"] == "error")
    assert error["error"]["condition"] == "remote-server-not-found"
    assert error["from"] == "someone@nowhere.invalid"


@options(unauthenticated_timeout=1.0)
async def test_silent_peer_bounces_remote_server_timeout(servers: tuple[Parley, Parley], tmp_path: Path) -> None:
    a, _ = servers
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.7", 0)
    port = silent.sockets[0].getsockname()[1]
    a.server.config.s2s.static["silent.test"] = type(a.server.config.s2s.static["b.test"])("127.0.0.7", port)
    try:
        alice = await a.user("alice@a.test")
        errors = Inbox(alice, "message_error")
        alice.send_message(mto="x@silent.test", mbody="hello?")
        error = await errors.wait(lambda m: m["type"] == "error", timeout=5)
        assert error["error"]["condition"] == "remote-server-timeout"
    finally:
        silent.close()


@options(a_s2s={"deny": ["b.test"]})
async def test_denied_domain(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
    errors = Inbox(alice, "message_error")
    alice.send_message(mto="bob@b.test", mbody="blocked")
    error = await errors.wait(lambda m: m["type"] == "error")
    assert error["error"]["condition"] == "not-allowed"
    bob_errors = Inbox(bob, "message_error")
    bob.send_message(mto="alice@a.test", mbody="refused at a's door")
    error = await bob_errors.wait(lambda m: m["type"] == "error")
    assert error["error"]["condition"] == "remote-server-timeout"


@options(a_domains=("a.test", "a2.test"))
async def test_second_domain_multiplexed_on_the_same_link(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, carol = await a.user("alice@a.test"), await a.user("carol@a2.test")
    bob = await b.user("bob@b.test")
    bob_inbox = Inbox(bob)
    await chat(alice, bob_inbox, "bob@b.test", "from a.test")
    await chat(carol, bob_inbox, "bob@b.test", "from a2.test")
    link = a.manager.links["a.test", "b.test"]
    assert a.manager.links["a2.test", "b.test"] is link
    assert link.methods == {("a.test", "b.test"): "external", ("a2.test", "b.test"): "dialback"}
    assert incoming_methods(b) == {("a.test", "b.test"): "external", ("a2.test", "b.test"): "dialback"}


async def disco_info(client: Any, to: str) -> Any:
    return await client.make_iq_get(queryxmlns="http://jabber.org/protocol/disco#info", ito=to).send(timeout=10)


async def test_second_remote_domain_multiplexed_when_the_certificate_names_it(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    a.server.config.s2s.static["conference.b.test"] = a.server.config.s2s.static["b.test"]
    alice, _, _ = await linked(a, b)
    info = await disco_info(alice, "conference.b.test")
    assert info["type"] == "result" and info.xml.find("{http://jabber.org/protocol/disco#info}query/"
                                                      "{http://jabber.org/protocol/disco#info}identity") is not None
    link = a.manager.links["a.test", "b.test"]
    assert a.manager.links["a.test", "conference.b.test"] is link
    assert link.methods == {("a.test", "b.test"): "external", ("a.test", "conference.b.test"): "dialback"}
    assert incoming_methods(b) == {("a.test", "b.test"): "external", ("a.test", "conference.b.test"): "dialback"}


async def test_a_remote_domain_the_peer_refuses_on_the_link_gets_its_own_and_the_link_carries_on(
        servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    # Named by B's certificate (*.b.test) and resolving to B, but not served there.
    a.server.config.s2s.static["nobody.b.test"] = a.server.config.s2s.static["b.test"]
    alice, _, inbox = await linked(a, b)
    link = a.manager.links["a.test", "b.test"]
    errors = Inbox(alice, "message_error")
    alice.send_message(mto="x@nobody.b.test", mbody="anyone?")
    error = await errors.wait()
    assert error["error"]["condition"] == "remote-server-not-found"
    assert link.refused == {"nobody.b.test"} and not link.closing
    await chat(alice, inbox, "bob@b.test", "still up")
    assert a.manager.links["a.test", "b.test"] is link


@options(certs="self-signed", a_s2s={"accept_self_signed": ["b.test"]}, b_s2s={"accept_self_signed": ["a.test"]},
         unauthenticated_timeout=1.0)
async def test_a_dialback_request_left_unanswered_holds_the_domains_stanzas_only_for_a_while(
        servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    a.server.config.s2s.static["conference.b.test"] = a.server.config.s2s.static["b.test"]
    alice, _, inbox = await linked(a, b)
    checks = b.manager.verify
    asked: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def silent_for_the_room_service(local: str, remote: str, stream_id: str, key: str) -> str:
        if local == "conference.b.test":
            if not asked.done():
                asked.set_result(None)
            await asyncio.Event().wait()
        return await checks(local, remote, stream_id, key)

    b.manager.verify = silent_for_the_room_service  # B never answers A's request for conference.b.test
    lookup = asyncio.ensure_future(disco_info(alice, "conference.b.test"))
    await asyncio.wait_for(asked, 10)  # A's request for conference.b.test is pending at B
    # a.test's stanzas wait while its request is pending (Prosody forgets a.test meanwhile), then go.
    await chat(alice, inbox, "bob@b.test", "held for a while")
    with pytest.raises(IqError) as info:
        await lookup
    assert info.value.condition == "remote-server-timeout"


@options(certs="self-signed", a_s2s={"require_valid_certificates": False},
         b_s2s={"require_valid_certificates": False})
async def test_no_second_remote_domain_on_a_link_whose_certificate_was_not_checked(
        servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    a.server.config.s2s.static["conference.b.test"] = a.server.config.s2s.static["b.test"]
    alice, _, _ = await linked(a, b)
    await disco_info(alice, "conference.b.test")
    assert a.manager.links["a.test", "conference.b.test"] is not a.manager.links["a.test", "b.test"]


@options(a_s2s={"idle_timeout": 0.5})
async def test_idle_link_is_closed_and_reopened(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
    bob_inbox = Inbox(bob)
    await chat(alice, bob_inbox, "bob@b.test", "first")
    first = a.manager.links["a.test", "b.test"]
    for _ in range(50):  # closing first, then removed from the links: wait for both
        if first.closing and ("a.test", "b.test") not in a.manager.links:
            break
        await asyncio.sleep(0.1)
    assert first.closing and ("a.test", "b.test") not in a.manager.links
    await chat(alice, bob_inbox, "bob@b.test", "second")
    assert a.manager.links["a.test", "b.test"] is not first


@options(certs="self-signed", b_listener="direct", a_s2s={"accept_self_signed": ["b.test"]},
                  b_s2s={"accept_self_signed": ["a.test"]})
async def test_direct_tls(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
    await chat(alice, Inbox(bob), "bob@b.test", "xep-0368")
    link = a.manager.links["a.test", "b.test"]
    assert link.secure and link.methods == {("a.test", "b.test"): "dialback"}


async def test_forged_from_is_rejected_and_the_link_carries_on(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    bob = await b.user("bob@b.test")
    inbox = Inbox(bob)
    peer = await authenticated_raw_peer(a, b)
    try:
        await peer.send("<message from='alice@a.test/x' to='bob@b.test' type='chat'><body>one</body></message>")
        await inbox.wait(lambda m: m["body"] == "one")
        await peer.send("<message from='mallory@evil.test' to='bob@b.test' type='chat'><body>forged</body></message>"
                        "<message from='x@a.test' to='bob@elsewhere.test'><body>relay</body></message>"
                        "<message from='alice@a.test/x' to='bob@b.test' type='chat'><body>two</body></message>")
        await inbox.wait(lambda m: m["body"] == "two")
        assert [m["body"] for m in inbox.received] == []
        (stream,) = [s for s in b.manager.incoming if s.rejected]
        assert stream.rejected == 2 and not stream.closing
    finally:
        peer.close()


async def test_bad_dialback_key_ends_the_stream(servers: tuple[Parley, Parley]) -> None:
    _, b = servers
    peer = await RawPeer.connect(B_ADDR, b.s2s_port)
    try:
        await peer.starttls("a.test", "b.test")
        await peer.send("<db:result from='a.test' to='b.test'>0123456789abcdef</db:result>")
        result = await peer.expect("{jabber:server:dialback}result")
        assert result.get("type") == "invalid"
        await peer.closed()
    finally:
        peer.close()


async def test_garbage_ends_only_that_stream(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
    inbox = Inbox(bob)
    peer = await authenticated_raw_peer(a, b)
    try:
        await peer.send("<message from='alice@a.test/x' to='bob@b.test'><body>fine</body></message>")
        await inbox.wait(lambda m: m["body"] == "fine")
        await peer.send("<message from='alice@a.test/x' to='bob@b.test'><body>broken</bod></message>")
        assert b"not-well-formed" in await peer.closed()
    finally:
        peer.close()
    await chat(alice, inbox, "bob@b.test", "the real link still works")


async def test_stanzas_before_authentication_end_the_stream(servers: tuple[Parley, Parley]) -> None:
    _, b = servers
    peer = await RawPeer.connect(B_ADDR, b.s2s_port)
    try:
        await peer.starttls("a.test", "b.test")
        await peer.send("<message from='alice@a.test' to='bob@b.test'><body>sneaky</body></message>")
        assert b"not-authorized" in await peer.closed()
    finally:
        peer.close()


async def test_encryption_is_required_before_dialback(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    peer = await RawPeer.connect(B_ADDR, b.s2s_port)
    try:
        features = await peer.open("a.test", "b.test")
        assert features.find("{urn:ietf:params:xml:ns:xmpp-tls}starttls/{urn:ietf:params:xml:ns:xmpp-tls}required") \
            is not None
        key = make_key(a.manager.secret("a.test"), "b.test", "a.test", peer.stream_id)
        await peer.send(f"<db:result from='a.test' to='b.test'>{key}</db:result>")
        result = await peer.expect("{jabber:server:dialback}result")
        assert result.get("type") == "error"
        assert result.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}policy-violation") is not None
    finally:
        peer.close()


async def test_unknown_target_domain_is_a_dialback_error(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    bob = await b.user("bob@b.test")
    inbox = Inbox(bob)
    peer = await authenticated_raw_peer(a, b)
    try:
        key = make_key(a.manager.secret("a.test"), "c.test", "a.test", peer.stream_id)
        await peer.send(f"<db:result from='a.test' to='c.test'>{key}</db:result>")
        result = await peer.expect("{jabber:server:dialback}result")
        assert result.get("type") == "error" and result.get("from") == "c.test"
        assert result.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}item-not-found") is not None
        # A dialback error is not a stream error: the pair authenticated before still works.
        await peer.send("<message from='alice@a.test/x' to='bob@b.test'><body>still here</body></message>")
        await inbox.wait(lambda m: m["body"] == "still here")
    finally:
        peer.close()


async def test_dialback_checks_per_stream_are_capped(servers: tuple[Parley, Parley]) -> None:
    from s2s.incoming import MAX_CHECKS

    _, b = servers
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.8", 0)
    port = silent.sockets[0].getsockname()[1]
    peer = await RawPeer.connect(B_ADDR, b.s2s_port)
    try:
        await peer.starttls("a.test", "b.test")
        # Each claimed domain's server accepts the connection and says nothing: every check hangs.
        route = type(b.server.config.s2s.static["a.test"])
        b.server.config.s2s.static.update({f"x{i}.test": route("127.0.0.8", port) for i in range(MAX_CHECKS + 1)})
        await peer.send("".join(f"<db:result from='x{i}.test' to='b.test'>00</db:result>"
                                for i in range(MAX_CHECKS + 1)))
        refused = await peer.expect("{jabber:server:dialback}result")
        assert refused.get("from") == "b.test" and refused.get("to") == f"x{MAX_CHECKS}.test"
        assert refused.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}resource-constraint") is not None
    finally:
        peer.close()
        silent.close()
