"""Stream management (XEP-0198) for clients: acks, resumption after a cut connection, nothing lost or doubled."""

from __future__ import annotations

import ast
import asyncio
import inspect
from collections.abc import Callable
from datetime import timedelta
from xml.etree.ElementTree import Element

import aioxmpp
import aioxmpp.dispatcher
import pytest
from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError

import extensions.stream_management as stream_management
from extensions.stream_management import NAME, Managed
from server.jid import JID
from server.sessions import Session
from tests.conftest import Harness, RawClient
from tests.test_aioxmpp import aioxmpp_client
from tests.test_basic_modules import wait_for
from tests.test_c2s import STREAMS, scram_login, stream_error_condition, tls_raw
from tests.test_mam import Archive
from tests.test_offline import DELAY, collect, send, take
from tests.test_roster_presence import befriend, online, sync

SM = "urn:xmpp:sm:3"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
MESSAGE = "{jabber:client}message"
STANZA_TAGS = (MESSAGE, "{jabber:client}presence", "{jabber:client}iq")
SHORT = pytest.mark.parley_config(module_options={"stream_management": {"resume_timeout": 0.5}})


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async def check() -> bool:
        return condition()

    await wait_for(check, timeout)


def managed(server: Harness, jid: str) -> Managed:
    session = server.server.sessions.get(JID.parse(jid))
    assert session is not None, f"no session {jid}"
    state = session.data[NAME]
    assert isinstance(state, Managed)
    return state


async def _stored_count(server: Harness, wanted: int) -> bool:
    return await server.server.storage.offline.count("localhost", "alice") == wanted


def closed_sessions(server: Harness) -> list[Session]:
    """Every session that ends from now on, in order."""
    ended: list[Session] = []
    server.server.hosts["localhost"].hooks.add("session/closed", ended.append, priority=-1000)
    return ended


async def sm_client(server: Harness, jid: str, resource: str) -> ClientXMPP:
    """A slixmpp client with XEP-0198 enabled (resumable) and available presence."""
    client = await server.client(jid, resource=resource, plugins=("xep_0198",))
    plugin = client.plugin["xep_0198"]
    await until(lambda: plugin.sm_id is not None)
    client.send_presence()
    await sync(client)
    return client


async def authenticated(server: Harness, user: str) -> RawClient:
    """A raw TLS stream, authenticated and restarted: the point where one binds or resumes."""
    raw = await tls_raw(server)
    result = await scram_login(raw, user, "secret")
    assert getattr(result, "tag", None) == "{urn:ietf:params:xml:ns:xmpp-sasl}success"
    raw.parser.reset()
    await raw.open()
    features = await raw.expect(f"{{{STREAMS}}}features")
    assert features.find(f"{{{SM}}}sm") is not None
    return raw


async def account(server: Harness, user: str) -> None:
    """Create the account, unless a test has already."""
    if not await server.server.storage.accounts.exists("localhost", user):
        await server.add_user(user)


async def bound(server: Harness, user: str, resource: str) -> RawClient:
    """A raw stream of the account (created if need be) with `resource` bound."""
    await account(server, user)
    raw = await authenticated(server, user)
    await raw.send(f"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                   f"<resource>{resource}</resource></bind></iq>")
    await raw.expect("{jabber:client}iq")
    return raw


async def enabled(raw: RawClient, presence: bool = True) -> str:
    """Enable resumable stream management (and send available presence); the resumption id."""
    await raw.send(f"<enable xmlns='{SM}' resume='true'/>")
    answer = await raw.expect(f"{{{SM}}}enabled")
    assert answer.get("resume") == "true" and int(answer.get("max")) > 0
    if presence:
        await raw.send("<presence/>")
        await raw.expect("{jabber:client}presence")  # our own presence comes back
    return answer.get("id")


async def phone(server: Harness) -> tuple[RawClient, str]:
    """alice/phone on a raw stream with resumable stream management and available presence, and its
    resumption id; bob exists."""
    await account(server, "bob")
    raw = await bound(server, "alice", "phone")
    return raw, await enabled(raw)


async def nothing_more(queue: asyncio.Queue, *clients: ClientXMPP) -> None:
    """After a round trip for each client, `queue` has nothing left: the server wrote what it had for each
    before the answer, and no duplicate came."""
    await sync(*clients)
    assert queue.empty()


async def next_stanza(raw: RawClient) -> Element:
    while True:
        event = await raw.next()
        if getattr(event, "tag", None) in STANZA_TAGS:
            return event


def cut(raw: RawClient) -> None:
    """Kill the TCP connection: no </stream:stream>, no TLS close."""
    raw.writer.transport.abort()


async def detached(server: Harness, jid: str) -> Session:
    session = server.server.sessions.get(JID.parse(jid))
    assert session is not None
    await until(lambda: session.detached)
    return session


# --- acks ------------------------------------------------------------------------------------------


async def test_acks_both_ways_count_only_stanzas(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    alice = await sm_client(server, "alice@localhost", "phone")
    plugin = alice.plugin["xep_0198"]
    inbox = server.inbox(alice)
    bob = await server.client("bob@localhost")
    for i in range(3):
        bob.send_message(mto="alice@localhost/phone", mbody=f"m{i}", mtype="chat")
    assert [(await asyncio.wait_for(inbox.get(), 5))["body"] for _ in range(3)] == ["m0", "m1", "m2"]
    await sync(alice)
    state = managed(server, "alice@localhost/phone").state
    plugin.request_ack()
    # Both sides agree on what went each way; nonzas (<r/>, <a/>) are not counted.
    await until(lambda: plugin.last_ack == plugin.seq and state.handled == plugin.seq)
    await until(lambda: state.send_count == plugin.handled and len(state) == 0)
    assert plugin.seq >= 2 and plugin.handled >= 5  # presence, ping; own presence, 3 messages, ping result


# --- resumption ------------------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_resumption_after_a_cut_connection_delivers_exactly_once(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")
    bob, bob_watch = await online(server, "bob@localhost", "desk")
    alice = await sm_client(server, "alice@localhost", "phone")
    await bob_watch.presence(from_="alice@localhost/phone")
    inbox = server.inbox(alice)
    resumed = asyncio.get_running_loop().create_future()
    alice.add_event_handler("session_resumed", lambda _: resumed.set_result(True))
    binds: list[Session] = []
    server.server.hosts["localhost"].hooks.add("session/bound", binds.append)
    queued: list[tuple[bool, str | None]] = []
    server.server.hosts["localhost"].hooks.add(
        "sm/queued", lambda s, el: queued.append((s.detached, el.findtext("{jabber:client}body"))))
    session = server.server.sessions.get(JID.parse("alice@localhost/phone"))

    alice.abort()  # the phone loses its network: no closing stream
    assert await detached(server, "alice@localhost/phone") is session
    assert server.server.sessions.available(JID.parse("alice@localhost")) == [session]
    for body in ("while away 1", "while away 2"):
        bob.send_message(mto="alice@localhost", mbody=body, mtype="chat")
    await sync(bob)
    await until(lambda: len(queued) == 2)
    assert queued == [(True, "while away 1"), (True, "while away 2")]

    alice.connect("127.0.0.1", server.port)
    await asyncio.wait_for(resumed, 10)
    got = [(await asyncio.wait_for(inbox.get(), 5))["body"] for _ in range(2)]
    assert got == ["while away 1", "while away 2"]
    await nothing_more(inbox, alice, bob)  # exactly once
    assert server.server.sessions.get(JID.parse("alice@localhost/phone")) is session and not session.detached
    assert binds == []  # the same session, no new binding
    assert not bob_watch.saw_presence("unavailable", "alice@localhost/phone")
    # The resumed session carries on both ways.
    bob.send_message(mto="alice@localhost/phone", mbody="after", mtype="chat")
    assert (await asyncio.wait_for(inbox.get(), 5))["body"] == "after"


async def test_aioxmpp_resumes_by_itself_after_the_server_side_socket_is_killed(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    alice = aioxmpp_client(server, "alice@localhost/laptop", direct=False)
    alice.backoff_start = timedelta(seconds=0.1)
    inbox: asyncio.Queue = asyncio.Queue()
    resumed = asyncio.Event()
    alice.on_stream_resumed.connect(lambda: resumed.set())
    bob = await server.client("bob@localhost")
    async with alice.connected():
        alice.summon(aioxmpp.dispatcher.SimpleMessageDispatcher).register_callback(
            aioxmpp.MessageType.CHAT, None, inbox.put_nowait)
        assert alice.stream.sm_enabled and alice.stream.sm_resumable
        conn = next(c for c in server.server.connections if c.session and c.session.jid.resource == "laptop")
        session = conn.session
        conn.transport.abort()  # the server's side of the socket dies: no closing stream either way
        await until(lambda: session.detached or resumed.is_set())
        send(bob, "while the socket was dead", to="alice@localhost/laptop")
        await asyncio.wait_for(resumed.wait(), 10)
        assert (await asyncio.wait_for(inbox.get(), 5)).body.any() == "while the socket was dead"
        assert server.server.sessions.get(JID.parse("alice@localhost/laptop")) is session
        await nothing_more(inbox, bob)


async def test_resume_on_a_new_connection_closes_the_half_open_one(server: Harness) -> None:
    old, previd = await phone(server)
    bob = await server.client("bob@localhost")
    bob.send_message(mto="alice@localhost/phone", mbody="one", mtype="chat")
    assert (await next_stanza(old)).findtext("{jabber:client}body") == "one"  # received, never acknowledged

    new = await authenticated(server, "alice")
    await new.send(f"<resume xmlns='{SM}' previd='{previd}' h='1'/>")  # it had our own presence only
    answer = await new.expect(f"{{{SM}}}resumed")
    assert answer.get("previd") == previd and answer.get("h") == "1"
    assert (await next_stanza(new)).findtext("{jabber:client}body") == "one"  # resent once
    assert stream_error_condition(await old.closed()) == "conflict"
    await new.send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert (await next_stanza(new)).get("id") == "p"


@SHORT
async def test_resumption_after_the_timeout_fails_and_a_fresh_session_binds(server: Harness) -> None:
    ended = closed_sessions(server)
    for name in ("alice", "bob"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")
    _, bob_watch = await online(server, "bob@localhost", "desk")
    raw, previd = await phone(server)
    await bob_watch.presence(from_="alice@localhost/phone")
    cut(raw)
    await until(lambda: len(ended) == 1)  # gone after resume_timeout, as any session ends
    await bob_watch.presence("unavailable", "alice@localhost/phone")
    again = await authenticated(server, "alice")
    await again.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    assert (await again.expect(f"{{{SM}}}failed")).find(f"{{{STANZAS}}}item-not-found") is not None
    await again.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    assert (await again.expect("{jabber:client}iq")).get("type") == "result"


async def test_resumption_after_a_restart_or_for_another_account_fails(server: Harness) -> None:
    await server.add_user("mallory")
    raw = await bound(server, "alice", "phone")
    previd = await enabled(raw)
    thief = await authenticated(server, "mallory")
    await thief.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    assert (await thief.expect(f"{{{SM}}}failed")).find(f"{{{STANZAS}}}item-not-found") is not None
    assert not server.server.sessions.get(JID.parse("alice@localhost/phone")).closed

    await server.restart()
    again = await authenticated(server, "alice")
    await again.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    assert (await again.expect(f"{{{SM}}}failed")).find(f"{{{STANZAS}}}item-not-found") is not None


# --- what a session that is not resumed leaves behind -------------------------------------------------


@SHORT
async def test_unacknowledged_messages_of_a_timed_out_session_go_offline_once(server: Harness) -> None:
    ended = closed_sessions(server)
    raw, _ = await phone(server)
    bob = await server.client("bob@localhost")
    send(bob, "seen but not acknowledged", to="alice@localhost/phone")
    assert (await next_stanza(raw)).findtext("{jabber:client}body") == "seen but not acknowledged"
    cut(raw)
    await detached(server, "alice@localhost/phone")
    send(bob, "sent while detached")
    await sync(bob)
    await until(lambda: len(ended) == 1)
    # What the session held goes to storage as it ends ('session/undelivered'), not before 'session/closed'.
    await wait_for(lambda: _stored_count(server, 2))

    alice = await server.client("alice@localhost")
    messages = collect(alice)
    alice.send_presence()
    delivered = await take(messages, 2)
    assert [m.findtext("{jabber:client}body") for m in delivered] == \
        ["seen but not acknowledged", "sent while detached"]
    assert all(m.find(DELAY) is not None for m in delivered)
    await nothing_more(messages, alice)
    results, fin = await Archive(alice).query()
    assert fin["count"] == 2 and [r.body for r in results] == ["seen but not acknowledged", "sent while detached"]


async def test_without_resumption_a_cut_ends_the_session_at_once_and_nothing_is_lost(server: Harness) -> None:
    await server.add_user("bob")
    ended = closed_sessions(server)
    raw = await bound(server, "alice", "phone")
    await raw.send(f"<enable xmlns='{SM}' max='60'/><presence/>")
    assert (await raw.expect(f"{{{SM}}}enabled")).get("resume") is None
    bob = await server.client("bob@localhost")
    send(bob, "unacknowledged", to="alice@localhost/phone")
    assert (await next_stanza(raw)).get("from") == "alice@localhost/phone"  # our own presence
    assert (await next_stanza(raw)).findtext("{jabber:client}body") == "unacknowledged"
    cut(raw)
    await until(lambda: len(ended) == 1)
    assert await server.server.storage.offline.count("localhost", "alice") == 1


async def test_the_client_may_ask_for_a_shorter_resumption_time(server: Harness) -> None:
    raw = await bound(server, "alice", "phone")
    await raw.send(f"<enable xmlns='{SM}' resume='true' max='42'/>")
    assert (await raw.expect(f"{{{SM}}}enabled")).get("max") == "42"


@SHORT
async def test_unacknowledged_messages_go_to_another_resource_unless_it_has_them(server: Harness) -> None:
    ended = closed_sessions(server)
    raw, _ = await phone(server)
    desk = await server.client("alice@localhost", resource="desk")
    desk_messages = collect(desk)
    desk.send_presence()
    await sync(desk)
    bob = await server.client("bob@localhost")
    send(bob, "to the phone", to="alice@localhost/phone")
    send(bob, "to both")  # the bare JID: both resources get it at once
    assert (await take(desk_messages, 1))[0].findtext("{jabber:client}body") == "to both"
    cut(raw)
    await until(lambda: len(ended) == 1)
    resent = await take(desk_messages, 1)
    assert resent[0].findtext("{jabber:client}body") == "to the phone" and resent[0].find(DELAY) is not None
    await nothing_more(desk_messages, desk)
    assert await server.server.storage.offline.count("localhost", "alice") == 0


@SHORT
async def test_a_resource_that_got_a_carbon_gets_no_second_copy(server: Harness) -> None:
    ended = closed_sessions(server)
    raw, _ = await phone(server)
    laptop = await server.client("alice@localhost", resource="laptop", plugins=("xep_0280",))
    await laptop.plugin["xep_0280"].enable()
    laptop.send_presence(ppriority=-1)  # never chosen for delivery: only carbons reach it
    everything = collect(laptop)
    await sync(laptop)
    bob = await server.client("bob@localhost")
    send(bob, "to the phone", to="alice@localhost/phone")
    carbon = (await take(everything, 1))[0]
    assert carbon.find("{urn:xmpp:carbons:2}received") is not None
    cut(raw)
    await until(lambda: len(ended) == 1)
    await nothing_more(everything, laptop)
    assert await server.server.storage.offline.count("localhost", "alice") == 0


@SHORT
async def test_an_iq_to_a_session_that_is_not_resumed_gets_an_error(server: Harness) -> None:
    raw, _ = await phone(server)
    cut(raw)
    await detached(server, "alice@localhost/phone")
    bob = await server.client("bob@localhost")
    iq = bob.Iq(stype="get", sto="alice@localhost/phone")
    iq.append(Element("{jabber:iq:version}query"))
    with pytest.raises(IqError) as caught:
        await iq.send(timeout=5)
    assert caught.value.iq["error"]["condition"] == "service-unavailable"


@pytest.mark.parley_config(module_options={"stream_management": {"max_queue": 3}})
async def test_a_detached_queue_past_its_limit_ends_the_session_into_offline_storage(server: Harness) -> None:
    await server.add_user("bob")
    ended = closed_sessions(server)
    raw = await bound(server, "alice", "phone")
    await enabled(raw, presence=False)
    await raw.send("<presence><priority>1</priority></presence>")
    await raw.expect("{jabber:client}presence")
    await raw.send(f"<a xmlns='{SM}' h='1'/><r xmlns='{SM}'/>")  # our own presence acknowledged
    await raw.expect(f"{{{SM}}}a")
    cut(raw)
    await detached(server, "alice@localhost/phone")
    bob = await server.client("bob@localhost")
    for i in range(6):
        send(bob, f"m{i}")
    await sync(bob)
    await until(lambda: len(ended) == 1)
    assert await server.server.storage.offline.count("localhost", "alice") == 6


# --- client state indication -----------------------------------------------------------------------


async def test_stanzas_held_by_csi_count_when_written(server: Harness) -> None:
    await server.add_user("bob")
    await befriend(server, "alice", "bob")
    raw = await bound(server, "alice", "phone")
    await enabled(raw, presence=False)
    await raw.send("<presence/>")
    bob, _ = await online(server, "bob@localhost", "desk")
    received = 0

    async def drain_until(condition: Callable[[Element], bool]) -> None:
        """Read up to an element that meets `condition`, counting the stanzas on the way."""
        nonlocal received
        while True:
            event = await raw.next()
            if not isinstance(event, Element):
                continue
            received += event.tag in STANZA_TAGS
            if condition(event):
                return

    def acknowledged(el: Element) -> bool:
        return el.tag == f"{{{SM}}}a"

    await drain_until(lambda el: el.get("from") == "bob@localhost/desk")  # bob's presence
    await raw.send(f"<inactive xmlns='urn:xmpp:csi:0'/><r xmlns='{SM}'/>")
    await drain_until(acknowledged)  # the server is holding from now on
    for i in range(5):
        bob.send_presence(pstatus=f"status {i}")
    bob.send_message(mto="alice@localhost/phone", mbody="urgent", mtype="chat")
    await drain_until(lambda el: el.findtext("{jabber:client}body") == "urgent")
    state = managed(server, "alice@localhost/phone").state
    assert state.send_count == received  # the held presences are not counted yet
    await raw.send("<active xmlns='urn:xmpp:csi:0'/>")
    await drain_until(lambda el: el.findtext("{jabber:client}status") == "status 4")
    await raw.send(f"<a xmlns='{SM}' h='{received}'/><r xmlns='{SM}'/>")
    await drain_until(acknowledged)
    assert state.send_count == received and len(state) == 0


# --- bad input --------------------------------------------------------------------------------------


async def test_acknowledging_more_than_was_sent_is_a_stream_error(server: Harness) -> None:
    raw = await bound(server, "alice", "phone")
    await enabled(raw)  # one stanza sent: our own presence
    await raw.send(f"<a xmlns='{SM}' h='5'/>")
    data = (await raw.closed()).decode()
    assert stream_error_condition(data.encode()) == "undefined-condition"
    assert '<handled-count-too-high xmlns="urn:xmpp:sm:3" h="5" send-count="1"/>' in data


async def test_resuming_with_more_acknowledged_than_sent_ends_the_old_session_into_offline_storage(
        server: Harness) -> None:
    ended = closed_sessions(server)
    raw, previd = await phone(server)
    cut(raw)
    await detached(server, "alice@localhost/phone")
    bob = await server.client("bob@localhost")
    send(bob, "kept")
    await sync(bob)
    again = await authenticated(server, "alice")
    await again.send(f"<resume xmlns='{SM}' previd='{previd}' h='3'/>")  # sent: own presence and 'kept'
    data = (await again.closed()).decode()
    assert '<handled-count-too-high xmlns="urn:xmpp:sm:3" h="3" send-count="2"/>' in data
    await until(lambda: len(ended) == 1)
    assert await server.server.storage.offline.count("localhost", "alice") == 1


async def test_enable_twice_or_before_binding_and_resume_before_auth_fail_cleanly(server: Harness) -> None:
    await server.add_user("mallory")
    raw = await tls_raw(server)
    await raw.open()
    await raw.expect(f"{{{STREAMS}}}features")
    await raw.send(f"<resume xmlns='{SM}' previd='x' h='0'/>")
    assert (await raw.expect(f"{{{SM}}}failed")).find(f"{{{STANZAS}}}not-authorized") is not None

    early = await authenticated(server, "mallory")
    await early.send(f"<enable xmlns='{SM}'/>")
    assert (await early.expect(f"{{{SM}}}failed")).find(f"{{{STANZAS}}}unexpected-request") is not None

    twice = await bound(server, "alice", "phone")
    await twice.send(f"<enable xmlns='{SM}'/>")
    assert (await twice.expect(f"{{{SM}}}enabled")).get("id") is None  # not resumable when not asked
    await twice.send(f"<enable xmlns='{SM}' resume='true'/>")
    assert (await twice.expect(f"{{{SM}}}failed")).find(f"{{{STANZAS}}}unexpected-request") is not None
    await twice.send(f"<resume xmlns='{SM}' previd='x' h='0'/>")
    assert (await twice.expect(f"{{{SM}}}failed")).find(f"{{{STANZAS}}}unexpected-request") is not None
    await twice.send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert (await next_stanza(twice)).get("id") == "p"  # the stream goes on


def test_stream_management_reads_no_other_module() -> None:
    """What a lost session hands on depends on where the router and other modules put a message (the
    router's chosen sessions, `Stanza.copies`), never on another module's code or session data."""
    tree = ast.parse(inspect.getsource(stream_management))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m and m.startswith("extensions.")}
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert "carbons" not in strings
