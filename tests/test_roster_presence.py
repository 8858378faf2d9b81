"""Rosters (RFC 6121 2), subscriptions (3) and presence (4) over real client connections."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from xml.etree.ElementTree import Element, fromstring

import pytest
from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError

from server.jid import JID
from server.sessions import Session
from server.storage import RosterItem
from tests.conftest import Harness

ROSTER = "jabber:iq:roster"
QUERY = f"{{{ROSTER}}}query"
ITEM = f"{{{ROSTER}}}item"


class Watch:
    """Presence stanzas and roster pushes one client received, to wait for by what they say."""

    def __init__(self, client: ClientXMPP) -> None:
        self.received: list[Any] = []
        self._arrived = asyncio.Event()
        client.add_event_handler("presence", self._add)
        client.add_event_handler("roster_update", self._roster)

    def _add(self, stanza: Any) -> None:
        self.received.append(stanza)
        self._arrived.set()

    def _roster(self, iq: Any) -> None:
        if iq["type"] == "set":
            self._add(iq)

    def find(self, match: Callable[[Any], bool]) -> Any | None:
        for stanza in self.received:
            if match(stanza):
                self.received.remove(stanza)
                return stanza
        return None

    async def wait(self, match: Callable[[Any], bool], timeout: float = 5.0) -> Any:
        async def first() -> Any:
            while (found := self.find(match)) is None:
                self._arrived.clear()
                await self._arrived.wait()
            return found

        try:
            return await asyncio.wait_for(first(), timeout)
        except TimeoutError:
            raise AssertionError(f"not received; got {[str(s) for s in self.received]}") from None

    async def presence(self, type: str = "available", from_: str | None = None) -> Any:
        return await self.wait(lambda s: is_presence(s, type, from_))

    async def push(self, jid: str) -> dict[str, Any]:
        """The item of the next roster push about `jid`: its attributes, plus 'groups' and 'ver'."""
        iq = await self.wait(lambda s: s.name == "iq" and pushed_item(s)["jid"] == jid)
        return pushed_item(iq)

    def saw_presence(self, type: str = "available", from_: str | None = None) -> bool:
        return any(is_presence(s, type, from_) for s in self.received)

    def saw_push(self, jid: str | None = None) -> bool:
        return any(s.name == "iq" and jid in (None, pushed_item(s)["jid"]) for s in self.received)


def is_presence(stanza: Any, type: str, from_: str | None) -> bool:
    # The type attribute itself: slixmpp reports <show/> as the type of available presence.
    return (stanza.name == "presence" and stanza.xml.get("type", "available") == type
            and from_ in (None, str(stanza["from"])))


def pushed_item(iq: Any) -> dict[str, Any]:
    query = iq.xml.find(QUERY)
    items = query.findall(ITEM)
    assert len(items) == 1, "a roster push carries exactly one item"
    return {**items[0].attrib, "groups": [g.text for g in items[0]], "ver": query.get("ver")}


async def online(server: Harness, jid: str, resource: str | None = None, *, roster: bool = True,
                 available: bool = True) -> tuple[ClientXMPP, Watch]:
    """A logged-in client that leaves subscription decisions to the test."""
    client = await server.client(jid, resource=resource)
    client.auto_authorize = None
    client.auto_subscribe = False
    watch = Watch(client)
    if roster:
        await roster_iq(client, "get")
    if available:
        client.send_presence()
        await watch.presence(from_=str(client.boundjid))  # our own presence comes back (RFC 6121 4.2.2)
    return client, watch


async def roster_iq(client: ClientXMPP, type: str, items: str = "", to: str | None = None,
                    ver: str | None = None) -> Element | None:
    """Send a roster get or set; return the result's query (None for an empty result)."""
    iq = client.Iq(stype=type)
    if to is not None:
        iq["to"] = to
    query = fromstring(f"<query xmlns='{ROSTER}'>{items}</query>")
    if ver is not None:
        query.set("ver", ver)
    iq.append(query)
    result = await iq.send(timeout=5)
    return result.xml.find(QUERY)


async def roster_error(client: ClientXMPP, type: str, items: str = "", to: str | None = None) -> str:
    with pytest.raises(IqError) as info:
        await roster_iq(client, type, items, to)
    return info.value.iq["error"]["condition"]


async def sync(*clients: ClientXMPP) -> None:
    """A round trip per client: the server has handled what each sent before and each got what it was sent."""
    for client in clients:
        iq = client.Iq(stype="get", sto="localhost")
        iq.append(Element("{urn:xmpp:ping}ping"))
        await iq.send(timeout=5)


async def disconnect(server: Harness, client: ClientXMPP) -> None:
    """Disconnect, and wait until the server has ended the session (its 'session/closed' hooks have run)."""
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    jid = client.boundjid.full

    def closed(session: Session) -> None:
        if str(session.jid) == jid and not ended.done():
            ended.set_result(None)

    hooks = server.server.hosts["localhost"].hooks
    hooks.add("session/closed", closed, priority=-1000)
    try:
        client.disconnect()
        await asyncio.wait_for(ended, 5)
    finally:
        hooks.remove("session/closed", closed)


async def items_of(server: Harness, user: str) -> dict[str, RosterItem]:
    return (await server.server.storage.roster.get("localhost", user))[1]


async def befriend(server: Harness, a: str, b: str) -> None:
    """Mutual 'both' subscriptions, written straight to storage."""
    for user, contact in ((a, b), (b, a)):
        item = RosterItem(f"{contact}@localhost", subscription="both")
        await server.server.storage.roster.put("localhost", user, item)


async def users(server: Harness, *names: str) -> None:
    for name in names:
        await server.add_user(name)


# --- roster management (RFC 6121 2) -----------------------------------------------------------------


async def test_roster_set_update_and_remove_push_to_every_interested_resource(server: Harness) -> None:
    await users(server, "alice", "bob")
    a1, w1 = await online(server, "alice@localhost", "one", available=False)
    a2, w2 = await online(server, "alice@localhost", "two", available=False)
    assert "rosterver" in a1.features and "preapproval" in a1.features

    assert await roster_iq(a1, "set", "<item jid='bob@localhost' name='Bob'><group>Friends</group></item>") is None
    for watch in (w1, w2):
        item = await watch.push("bob@localhost")
        assert item["name"] == "Bob" and item["subscription"] == "none" and item["groups"] == ["Friends"]
        assert "ask" not in item
    query = await roster_iq(a2, "get")
    assert [(i.get("jid"), i.get("name")) for i in query] == [("bob@localhost", "Bob")]

    await roster_iq(a2, "set", "<item jid='Bob@LOCALHOST' name='Robert'/>")
    for watch in (w1, w2):
        item = await watch.push("bob@localhost")
        assert item["name"] == "Robert" and item["groups"] == []

    await roster_iq(a1, "set", "<item jid='bob@localhost' subscription='remove'/>")
    for watch in (w1, w2):
        assert (await watch.push("bob@localhost"))["subscription"] == "remove"
    assert await items_of(server, "alice") == {}
    assert await roster_error(a1, "set", "<item jid='bob@localhost' subscription='remove'/>") == "item-not-found"


async def test_roster_push_only_to_interested_resources(server: Harness) -> None:
    await users(server, "alice")
    _, w1 = await online(server, "alice@localhost", "one")
    other, w2 = await online(server, "alice@localhost", "two", roster=False)
    await roster_iq(other, "set", "<item jid='carol@localhost'/>")
    await w1.push("carol@localhost")
    await sync(other)
    assert not w2.saw_push()


async def test_roster_versioning(server: Harness) -> None:
    await users(server, "alice")
    client, watch = await online(server, "alice@localhost", available=False)
    first = (await roster_iq(client, "get")).get("ver")
    assert first is not None
    assert await roster_iq(client, "get", ver=first) is None  # unchanged: an empty result (RFC 6121 2.6.3)

    await roster_iq(client, "set", "<item jid='bob@localhost'/>")
    pushed = (await watch.push("bob@localhost"))["ver"]
    assert pushed not in (None, first)
    stale = await roster_iq(client, "get", ver=first)
    assert stale.get("ver") == pushed and [i.get("jid") for i in stale] == ["bob@localhost"]
    assert await roster_iq(client, "get", ver=pushed) is None


async def test_roster_of_another_account_is_forbidden(server: Harness) -> None:
    await users(server, "alice", "bob")
    bob, bob_watch = await online(server, "bob@localhost", available=False)
    alice, _ = await online(server, "alice@localhost", available=False)
    assert await roster_error(alice, "get", to="bob@localhost") == "forbidden"
    assert await roster_error(alice, "set", "<item jid='mallory@localhost'/>", to="bob@localhost") == "forbidden"
    await sync(alice, bob)
    assert await items_of(server, "bob") == {} and not bob_watch.saw_push()


@pytest.mark.parametrize(("items", "condition"), [
    ("", "bad-request"),
    ("<item jid='bob@localhost'/><item jid='carol@localhost'/>", "bad-request"),
    ("<item name='no jid'/>", "bad-request"),
    ("<item jid='bob@@localhost'/>", "jid-malformed"),
    ("<item jid='bob@localhost'><group>A</group><group>A</group></item>", "bad-request"),
    ("<item jid='bob@localhost'><group/></item>", "not-acceptable"),
    (f"<item jid='bob@localhost' name='{'x' * 2000}'/>", "not-acceptable"),
])
async def test_malformed_roster_set_is_refused_and_changes_nothing(server: Harness, items: str,
                                                                   condition: str) -> None:
    await users(server, "alice")
    client, watch = await online(server, "alice@localhost", available=False)
    version = await server.server.storage.roster.version("localhost", "alice")
    assert await roster_error(client, "set", items) == condition
    await sync(client)
    assert await items_of(server, "alice") == {} and not watch.saw_push()
    assert await server.server.storage.roster.version("localhost", "alice") == version


async def test_roster_set_ignores_subscription_ask_and_approved(server: Harness) -> None:
    """RFC 6121 2.1.2: only the server changes subscription state."""
    await users(server, "alice")
    client, watch = await online(server, "alice@localhost", available=False)
    await roster_iq(client, "set", "<item jid='bob@localhost' subscription='both' ask='subscribe' approved='true'/>")
    item = await watch.push("bob@localhost")
    assert item["subscription"] == "none" and "ask" not in item and "approved" not in item


# --- subscriptions (RFC 6121 3) ---------------------------------------------------------------------


async def test_subscription_handshake_ends_in_both(server: Harness) -> None:
    await users(server, "alice", "bob")
    alice, aw = await online(server, "alice@localhost", "home")
    bob, bw = await online(server, "bob@localhost", "work")

    alice.send_presence(pto="bob@localhost", ptype="subscribe")
    assert (await aw.push("bob@localhost"))["ask"] == "subscribe"
    await bw.presence("subscribe", "alice@localhost")
    assert not bw.saw_push("alice@localhost")  # a request alone does not touch bob's roster

    bob.send_presence(pto="alice@localhost", ptype="subscribed")
    assert (await bw.push("alice@localhost"))["subscription"] == "from"
    await aw.presence("subscribed", "bob@localhost")
    item = await aw.push("bob@localhost")
    assert item["subscription"] == "to" and "ask" not in item
    await aw.presence("available", "bob@localhost/work")  # bob's current presence follows the approval

    bob.send_presence(pto="alice@localhost", ptype="subscribe")
    item = await bw.push("alice@localhost")
    assert item["subscription"] == "from" and item["ask"] == "subscribe"
    await aw.presence("subscribe", "bob@localhost")

    alice.send_presence(pto="bob@localhost", ptype="subscribed")
    assert (await aw.push("bob@localhost"))["subscription"] == "both"
    await bw.presence("subscribed", "alice@localhost")
    assert (await bw.push("alice@localhost"))["subscription"] == "both"
    await bw.presence("available", "alice@localhost/home")

    assert (await items_of(server, "alice"))["bob@localhost"].subscription == "both"
    assert (await items_of(server, "bob"))["alice@localhost"].subscription == "both"

    # Asking again once subscribed does not bother bob, and changes nothing.
    alice.send_presence(pto="bob@localhost", ptype="subscribe")
    await sync(alice, bob, alice)
    assert not bw.saw_presence("subscribe") and not aw.saw_push() and not bw.saw_push()


async def test_request_from_a_subscriber_is_approved_by_the_server(server: Harness) -> None:
    """RFC 6121 3.1.3: bob already lets alice see his presence, so his server answers for him."""
    await users(server, "alice", "bob")
    await server.server.storage.roster.put("localhost", "bob", RosterItem("alice@localhost", subscription="from"))
    alice, aw = await online(server, "alice@localhost")  # her roster lost track of bob
    bob, bw = await online(server, "bob@localhost", "work")
    alice.send_presence(pto="bob@localhost", ptype="subscribe")
    await aw.presence("subscribed", "bob@localhost")
    assert (await aw.push("bob@localhost"))["ask"] == "subscribe"
    assert (await aw.push("bob@localhost"))["subscription"] == "to"
    await sync(alice, bob)
    assert not bw.saw_presence("subscribe") and not bw.saw_push()


async def test_request_to_offline_contact_is_delivered_at_login_until_answered(server: Harness) -> None:
    await users(server, "alice", "bob")
    alice, aw = await online(server, "alice@localhost")
    alice.send_presence(pto="bob@localhost", ptype="subscribe", pstatus="hi, it's alice")
    assert (await aw.push("bob@localhost"))["ask"] == "subscribe"

    bob, bw = await online(server, "bob@localhost", "one", available=False)
    await sync(alice, bob)
    assert not bw.saw_presence("subscribe")  # only available resources get requests
    bob.send_presence()
    request = await bw.presence("subscribe", "alice@localhost")
    assert request["status"] == "hi, it's alice"

    # The same request again is not delivered twice (RFC 6121 A.3.1), but a new resource gets it.
    alice.send_presence(pto="bob@localhost", ptype="subscribe")
    _, bw2 = await online(server, "bob@localhost", "two")
    await bw2.presence("subscribe", "alice@localhost")
    await sync(alice, bob)
    assert not bw.saw_presence("subscribe")

    bob.send_presence(pto="alice@localhost", ptype="unsubscribed")  # deny
    await aw.presence("unsubscribed", "bob@localhost")
    item = await aw.push("bob@localhost")
    assert item["subscription"] == "none" and "ask" not in item
    assert await server.server.storage.roster.list_pending("localhost", "bob") == []


async def test_pre_approval(server: Harness) -> None:
    await users(server, "alice", "bob")
    alice, aw = await online(server, "alice@localhost")
    alice.send_presence(pto="bob@localhost", ptype="subscribed")  # before bob asked: a pre-approval
    item = await aw.push("bob@localhost")
    assert item["approved"] == "true" and item["subscription"] == "none"

    bob, bw = await online(server, "bob@localhost")
    bob.send_presence(pto="alice@localhost", ptype="subscribe")
    assert (await bw.push("alice@localhost"))["ask"] == "subscribe"
    await bw.presence("subscribed", "alice@localhost")  # approved by alice's server on her behalf
    assert (await bw.push("alice@localhost"))["subscription"] == "to"
    await bw.presence("available", str(alice.boundjid))
    item = await aw.push("bob@localhost")
    assert item["subscription"] == "from" and "approved" not in item
    await sync(bob, alice)
    assert not aw.saw_presence("subscribe")


async def test_pre_approval_can_be_withdrawn(server: Harness) -> None:
    await users(server, "alice", "bob")
    alice, aw = await online(server, "alice@localhost")
    alice.send_presence(pto="bob@localhost", ptype="subscribed")
    assert (await aw.push("bob@localhost"))["approved"] == "true"
    alice.send_presence(pto="bob@localhost", ptype="unsubscribed")
    assert "approved" not in await aw.push("bob@localhost")

    bob, bw = await online(server, "bob@localhost")
    bob.send_presence(pto="alice@localhost", ptype="subscribe")
    await aw.presence("subscribe", "bob@localhost")  # now alice decides
    await sync(alice, bob)
    assert not bw.saw_presence("subscribed")


async def test_unsubscribe_and_unsubscribed(server: Harness) -> None:
    await users(server, "alice", "bob")
    await befriend(server, "alice", "bob")
    alice, aw = await online(server, "alice@localhost", "home")
    bob, bw = await online(server, "bob@localhost", "work")
    await aw.presence("available", "bob@localhost/work")
    await bw.presence("available", "alice@localhost/home")

    # alice stops receiving bob's presence: bob's server sends her his resources' unavailable presence.
    alice.send_presence(pto="bob@localhost", ptype="unsubscribe")
    assert (await aw.push("bob@localhost"))["subscription"] == "from"
    await bw.presence("unsubscribe", "alice@localhost")
    assert (await bw.push("alice@localhost"))["subscription"] == "to"
    await aw.presence("unavailable", "bob@localhost/work")

    # alice cancels bob's subscription to her: he learns she is gone for him.
    alice.send_presence(pto="bob@localhost", ptype="unsubscribed")
    assert (await aw.push("bob@localhost"))["subscription"] == "none"
    await bw.presence("unsubscribed", "alice@localhost")
    assert (await bw.push("alice@localhost"))["subscription"] == "none"
    await bw.presence("unavailable", "alice@localhost/home")

    # With no subscription left, presence changes go nowhere. Bob may have had alice's initial presence
    # twice (her broadcast and the answer to his probe), so only what arrives from here on counts.
    await sync(alice, bob)
    bw.received.clear()
    alice.send_presence(pshow="away")
    await aw.presence("available", str(alice.boundjid))
    await sync(alice, bob)
    assert not bw.saw_presence("available", "alice@localhost/home")


async def test_removing_a_contact_cancels_both_subscriptions(server: Harness) -> None:
    await users(server, "alice", "bob")
    await befriend(server, "alice", "bob")
    alice, aw = await online(server, "alice@localhost", "home")
    bob, bw = await online(server, "bob@localhost", "work")

    await roster_iq(alice, "set", "<item jid='bob@localhost' subscription='remove'/>")
    assert (await aw.push("bob@localhost"))["subscription"] == "remove"
    await bw.presence("unsubscribe", "alice@localhost")
    await bw.presence("unsubscribed", "alice@localhost")
    await bw.presence("unavailable", "alice@localhost/home")
    await aw.presence("unavailable", "bob@localhost/work")
    await sync(alice, bob)
    assert (await items_of(server, "bob"))["alice@localhost"].subscription == "none"
    assert await items_of(server, "alice") == {}


async def test_subscription_to_a_missing_account_is_ignored(server: Harness) -> None:
    await users(server, "alice")
    alice, aw = await online(server, "alice@localhost")
    alice.send_presence(pto="ghost@localhost", ptype="subscribe")
    assert (await aw.push("ghost@localhost"))["ask"] == "subscribe"
    await sync(alice)
    assert await server.server.storage.roster.list_pending("localhost", "ghost") == []


async def test_subscription_to_a_remote_contact_is_recorded_then_bounced(server: Harness) -> None:
    """Until federation lands the remote server is unreachable, but the user's side is processed."""
    await users(server, "alice")
    alice, aw = await online(server, "alice@localhost")
    alice.send_presence(pto="juliet@remote.example", ptype="subscribe")
    assert (await aw.push("juliet@remote.example"))["ask"] == "subscribe"
    error = await aw.presence("error", "juliet@remote.example")
    assert error["error"]["condition"] == "remote-server-not-found"


# --- presence (RFC 6121 4) --------------------------------------------------------------------------


async def test_presence_on_login_and_logout_with_probes(server: Harness) -> None:
    await users(server, "alice", "bob", "carol")
    await befriend(server, "alice", "bob")
    await befriend(server, "alice", "carol")
    carol, _ = await online(server, "carol@localhost")
    carol.send_presence(pstatus="gone fishing", ptype="unavailable")
    await disconnect(server, carol)
    bob, bw = await online(server, "bob@localhost", "work")
    bob.send_presence(pshow="dnd", pstatus="busy")

    await sync(bob)
    initial: list[Session] = []
    host = server.server.hosts["localhost"]
    record = initial.append
    host.hooks.add("presence/initial", record)
    alice, aw = await online(server, "alice@localhost", "home")
    await sync(alice)
    host.hooks.remove("presence/initial", record)
    assert [str(s.jid) for s in initial] == [alice.boundjid.full]

    await bw.presence("available", "alice@localhost/home")
    seen = await aw.presence("available", "bob@localhost/work")  # the probe answered by bob's server
    assert seen["show"] == "dnd" and seen["status"] == "busy"
    # carol is offline: her server answers with her last unavailable presence, stamped.
    offline = await aw.wait(lambda s: is_presence(s, "unavailable", None) and s["from"].bare == "carol@localhost")
    assert offline["status"] == "gone fishing"
    assert offline.xml.find("{urn:xmpp:delay}delay") is not None

    alice.send_presence(pshow="away", ppriority=5)
    assert (await bw.presence("available", "alice@localhost/home"))["show"] == "away"
    alice.disconnect()
    await bw.presence("unavailable", "alice@localhost/home")


async def test_resources_of_one_account_see_each_other(server: Harness) -> None:
    await users(server, "alice")
    one, w1 = await online(server, "alice@localhost", "one")
    two, w2 = await online(server, "alice@localhost", "two")
    await w1.presence("available", "alice@localhost/two")
    await w2.presence("available", "alice@localhost/one")  # the older resource, shown to the new one
    two.send_presence(ptype="unavailable")
    await w1.presence("unavailable", "alice@localhost/two")
    await disconnect(server, one)
    await sync(two)
    assert not w2.saw_presence("unavailable", "alice@localhost/one")  # two is no longer available


async def test_priority(server: Harness) -> None:
    await users(server, "alice")
    client, watch = await online(server, "alice@localhost", "home")
    client.send_presence(ppriority=-5)
    await watch.presence("available", "alice@localhost/home")
    session = server.server.sessions.get(JID.parse(client.boundjid.full))
    assert session.priority == -5
    client.send_raw("<presence><priority>300</priority></presence>")
    await watch.presence("error")
    assert session.priority == -5


async def test_directed_presence_and_its_unavailable_on_disconnect(server: Harness) -> None:
    await users(server, "alice", "carol")
    carol, cw = await online(server, "carol@localhost")
    alice, _ = await online(server, "alice@localhost", "home")
    await sync(alice, carol)
    assert not cw.saw_presence("available", "alice@localhost/home")  # not subscribed

    alice.send_presence(pto="carol@localhost", pstatus="hello")
    assert (await cw.presence("available", "alice@localhost/home"))["status"] == "hello"
    alice.disconnect()
    await cw.presence("unavailable", "alice@localhost/home")


async def test_directed_unavailable_ends_tracking(server: Harness) -> None:
    await users(server, "alice", "carol")
    carol, cw = await online(server, "carol@localhost")
    alice, _ = await online(server, "alice@localhost", "home")
    alice.send_presence(pto="carol@localhost")
    await cw.presence("available", "alice@localhost/home")
    alice.send_presence(pto="carol@localhost", ptype="unavailable")
    await cw.presence("unavailable", "alice@localhost/home")
    await disconnect(server, alice)
    await sync(carol)
    assert not cw.saw_presence("unavailable")


async def test_probe_from_a_stranger_reveals_nothing(server: Harness) -> None:
    await users(server, "alice", "mallory")
    await online(server, "alice@localhost", "home")
    mallory, mw = await online(server, "mallory@localhost")
    mallory.send_presence(pto="alice@localhost", ptype="probe")
    await sync(mallory, mallory)
    assert not any(str(s["from"]).startswith("alice@") for s in mw.received)


async def test_stale_subscription_is_corrected_by_the_probe_answer(server: Harness) -> None:
    """RFC 6121 4.3.2: alice's server answers a probe from a non-subscriber with 'unsubscribed'."""
    await users(server, "alice", "mallory")
    await server.server.storage.roster.put("localhost", "mallory", RosterItem("alice@localhost", subscription="to"))
    await online(server, "alice@localhost", "home")
    mallory, mw = await online(server, "mallory@localhost")
    await mw.presence("unsubscribed", "alice@localhost")
    assert (await mw.push("alice@localhost"))["subscription"] == "none"
    await sync(mallory)
    assert not mw.saw_presence("available", "alice@localhost/home")


async def test_probes_to_an_offline_user_read_its_roster_and_presence_once_and_see_changes(
        server: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each contact that logs in probes alice, who is offline: her roster and last presence are read from
    storage once, not once per probe (presence fan-out), and what changes while she is away is answered."""
    await users(server, "alice", "bob", "carol")
    await befriend(server, "alice", "bob")
    await befriend(server, "alice", "carol")
    storage = server.server.storage
    reads: list[tuple[str, str]] = []
    roster_get, kv_get = storage.roster.get, storage.kv.get

    async def counted_roster(host: str, user: str) -> Any:
        reads.append(("roster", user))
        return await roster_get(host, user)

    async def counted_kv(host: str, user: str, store: str, key: str = "") -> Any:
        reads.append((store, user))
        return await kv_get(host, user, store, key)

    monkeypatch.setattr(storage.roster, "get", counted_roster)
    monkeypatch.setattr(storage.kv, "get", counted_kv)
    for name in ("bob", "carol"):
        client, watch = await online(server, f"{name}@localhost")
        await watch.presence("unavailable", "alice@localhost")  # never logged in: nothing stored
        await disconnect(server, client)
    assert reads.count(("roster", "alice")) == 1
    assert reads.count(("presence", "alice")) == 1

    alice, _ = await online(server, "alice@localhost")
    alice.send_presence(pstatus="gone fishing", ptype="unavailable")
    await disconnect(server, alice)
    bob, bw = await online(server, "bob@localhost")
    assert (await bw.presence("unavailable", "alice@localhost/" + alice.boundjid.resource))["status"] == \
        "gone fishing"
    bob.send_presence(pto="alice@localhost", ptype="unsubscribe")  # alice's item for bob: 'both' -> 'to'
    await sync(bob)
    assert (await roster_get("localhost", "alice"))[1]["bob@localhost"].subscription == "to"
    bob.send_presence(pto="alice@localhost", ptype="probe")  # bob no longer has a subscription: no answer
    await sync(bob, bob)
    assert not bw.saw_presence("unavailable")
    assert reads.count(("roster", "alice")) == 1


async def test_the_last_presence_is_stored_in_the_background_and_before_the_server_stops(server: Harness) -> None:
    """A session's end does not wait for the write of its last presence; the module's stop waits for it, so
    that probes after a restart are answered with it."""
    await users(server, "alice")
    alice, _ = await online(server, "alice@localhost")
    alice.send_presence(pstatus="gone fishing", ptype="unavailable")
    await disconnect(server, alice)
    await server.server.hosts["localhost"].modules["presence"].stop()
    stored = await server.server.storage.kv.get("localhost", "alice", "presence", "last-unavailable")
    assert stored is not None and "gone fishing" in stored and "urn:xmpp:delay" in stored


async def test_a_failing_session_closed_handler_does_not_keep_the_others_from_running(server: Harness) -> None:
    """One module's clean-up error (the last-activity write on a full disk) must not stop the presence
    module from telling contacts, nor stream management from handing on what it holds."""
    await users(server, "alice", "bob")
    await befriend(server, "alice", "bob")

    def broken(session: Session) -> None:
        raise OSError(28, "No space left on device")

    server.server.hosts["localhost"].hooks.add("session/closed", broken, priority=1000)
    alice, _ = await online(server, "alice@localhost", "home")
    _, bw = await online(server, "bob@localhost", "work")
    await bw.presence(from_="alice@localhost/home")
    await disconnect(server, alice)
    await bw.presence("unavailable", "alice@localhost/home")
