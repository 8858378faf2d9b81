"""Disco, caps, version, time, last activity and vCard, over real sockets with slixmpp clients."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from xml.etree.ElementTree import Element, fromstring

import pytest
from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError

from extensions.caps import NODE, info_hash
from extensions.version import parley_version
from server.jid import JID
from server.storage import RosterItem
from tests.conftest import Harness, RawClient

INFO = "http://jabber.org/protocol/disco#info"
ITEMS = "http://jabber.org/protocol/disco#items"
STREAMS = "http://etherx.jabber.org/streams"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
CAPS = "http://jabber.org/protocol/caps"
VCARD = "vcard-temp"


# --- helpers shared with test_offline and test_register -----------------------------------------------

async def send_iq(client: ClientXMPP, type_: str, payload: str, to: str | None = None) -> Element:
    """Send an iq carrying the XML `payload`; return the result iq's element (IqError on an error)."""
    iq = client.Iq()
    iq["type"] = type_
    if to:
        iq["to"] = to
    iq.append(fromstring(payload))
    result = await iq.send(timeout=5)
    return result.xml


async def iq_error(client: ClientXMPP, type_: str, payload: str, to: str | None = None) -> tuple[str, str]:
    """The (condition, text) of the error an iq gets."""
    with pytest.raises(IqError) as info:
        await send_iq(client, type_, payload, to)
    error = info.value.iq["error"]
    return error["condition"], error["text"]


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll an async predicate until it is true, for effects that reach the server asynchronously."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def is_available(server: Harness, jid: str) -> bool:
    """Whether the server has seen available presence from a session of `jid`."""
    return bool(server.server.sessions.available(JID.parse(jid)))


def query_of(result: Element, ns: str) -> Element:
    found = result.find(f"{{{ns}}}query")
    assert found is not None, result
    return found


def features_of(query: Element) -> list[str]:
    return [f.get("var") for f in query.iter(f"{{{INFO}}}feature")]


def identities_of(query: Element) -> list[tuple[str | None, str | None, str | None]]:
    return [(i.get("category"), i.get("type"), i.get("name")) for i in query.iter(f"{{{INFO}}}identity")]


# --- disco ---------------------------------------------------------------------------------------------

async def test_disco_info_of_the_host(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    query = query_of(await send_iq(alice, "get", f"<query xmlns='{INFO}'/>", "localhost"), INFO)
    assert identities_of(query) == [("server", "im", "Parley")]
    features = features_of(query)
    assert features == sorted(set(features))
    for feature in (INFO, ITEMS, "msgoffline", "jabber:iq:version", "urn:xmpp:time", "jabber:iq:last",
                    "urn:xmpp:ping", "jabber:iq:register", VCARD):
        assert feature in features


async def test_disco_items_of_the_host_come_from_the_registry(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")

    async def listed() -> list[tuple[str | None, str | None]]:
        query = query_of(await send_iq(alice, "get", f"<query xmlns='{ITEMS}'/>", "localhost"), ITEMS)
        return [(i.get("jid"), i.get("name")) for i in query]

    services = await listed()  # what the default modules registered, e.g. pubsub.localhost
    disco = server.server.hosts["localhost"].modules["disco"]
    disco.add_item("news.localhost", "News")
    assert await listed() == [*services, ("news.localhost", "News")]
    disco.remove_item("news.localhost")
    assert await listed() == services


async def test_disco_unknown_node_is_item_not_found(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    for ns in (INFO, ITEMS):
        condition, _ = await iq_error(alice, "get", f"<query xmlns='{ns}' node='nope'/>", "localhost")
        assert condition == "item-not-found"


async def test_disco_of_an_account_is_answered_by_the_server(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    alice = await server.client("alice@localhost")
    for who in ("alice@localhost", "bob@localhost"):
        query = query_of(await send_iq(alice, "get", f"<query xmlns='{INFO}'/>", who), INFO)
        assert ("account", "registered", None) in identities_of(query)
        features = features_of(query)
        assert features == sorted(set(features))
        assert INFO in features and ITEMS in features
        items = query_of(await send_iq(alice, "get", f"<query xmlns='{ITEMS}'/>", who), ITEMS)
        assert len(items) == 0
    condition, _ = await iq_error(alice, "get", f"<query xmlns='{INFO}'/>", "nobody@localhost")
    assert condition == "service-unavailable"


# --- caps ----------------------------------------------------------------------------------------------

def test_verification_string_matches_the_xep_0115_examples() -> None:
    simple = fromstring(f"""
        <query xmlns='{INFO}'>
          <identity category='client' name='Exodus 0.9.1' type='pc'/>
          <feature var='http://jabber.org/protocol/caps'/>
          <feature var='http://jabber.org/protocol/disco#info'/>
          <feature var='http://jabber.org/protocol/disco#items'/>
          <feature var='http://jabber.org/protocol/muc'/>
        </query>""")
    assert info_hash(simple) == "QgayPKawpkPSDYmwT/WM94uAlu0="
    complex_ = fromstring(f"""
        <query xmlns='{INFO}'>
          <identity xml:lang='en' category='client' name='Psi 0.11' type='pc'/>
          <identity xml:lang='el' category='client' name='Ψ 0.11' type='pc'/>
          <feature var='http://jabber.org/protocol/caps'/>
          <feature var='http://jabber.org/protocol/disco#info'/>
          <feature var='http://jabber.org/protocol/disco#items'/>
          <feature var='http://jabber.org/protocol/muc'/>
          <x xmlns='jabber:x:data' type='result'>
            <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo</value></field>
            <field var='ip_version'><value>ipv4</value><value>ipv6</value></field>
            <field var='os'><value>Mac</value></field>
            <field var='os_version'><value>10.5.1</value></field>
            <field var='software'><value>Psi</value></field>
            <field var='software_version'><value>0.11</value></field>
          </x>
        </query>""")
    assert info_hash(complex_) == "q07IKJEyjvHSyhy//CH0CxmKi8w="


def caps_of(features: Element) -> Element:
    caps = features.find(f"{{{CAPS}}}c")
    assert caps is not None, "no caps in stream features"
    assert caps.get("hash") == "sha-1" and caps.get("node") == NODE
    return caps


async def plain_login(raw: RawClient, user: str, password: str) -> Element:
    """Authenticate a raw TLS stream with PLAIN and open the new stream; returns its features."""
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    await raw.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>")
    await raw.expect(f"{{{SASL}}}success")
    raw.parser.reset()
    await raw.open()
    return await raw.expect(f"{{{STREAMS}}}features")


async def test_caps_in_stream_features_match_disco_info(server: Harness) -> None:
    await server.add_user("alice")
    raw = await server.raw()
    await raw.starttls()
    await raw.open()
    ver = caps_of(await raw.expect(f"{{{STREAMS}}}features")).get("ver")
    assert caps_of(await plain_login(raw, "alice", "secret")).get("ver") == ver

    alice = await server.client("alice@localhost")
    info = query_of(await send_iq(alice, "get", f"<query xmlns='{INFO}'/>", "localhost"), INFO)
    assert info_hash(info) == ver
    node = f"{NODE}#{ver}"
    by_node = query_of(await send_iq(alice, "get", f"<query xmlns='{INFO}' node='{node}'/>", "localhost"),
                       INFO)
    assert by_node.get("node") == node
    assert features_of(by_node) == features_of(info) and identities_of(by_node) == identities_of(info)
    condition, _ = await iq_error(alice, "get", f"<query xmlns='{INFO}' node='{NODE}#stale'/>", "localhost")
    assert condition == "item-not-found"


# --- version, time, last -------------------------------------------------------------------------------

async def test_software_version(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    query = query_of(await send_iq(alice, "get", "<query xmlns='jabber:iq:version'/>", "localhost"),
                     "jabber:iq:version")
    assert query.findtext("{jabber:iq:version}name") == "Parley"
    assert query.findtext("{jabber:iq:version}version") == parley_version()
    assert query.find("{jabber:iq:version}os") is None


async def test_entity_time(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    result = await send_iq(alice, "get", "<time xmlns='urn:xmpp:time'/>", "localhost")
    answer = result.find("{urn:xmpp:time}time")
    assert re.fullmatch(r"[+-]\d\d:\d\d", answer.findtext("{urn:xmpp:time}tzo"))
    utc = answer.findtext("{urn:xmpp:time}utc")
    assert utc.endswith("Z")
    when = datetime.fromisoformat(utc.replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - when).total_seconds()) < 5


async def last_of(client: ClientXMPP, who: str) -> Element:
    return query_of(await send_iq(client, "get", "<query xmlns='jabber:iq:last'/>", who), "jabber:iq:last")


async def test_last_activity_of_the_server_is_its_uptime(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    query = await last_of(alice, "localhost")
    assert 0 <= int(query.get("seconds")) <= time.time() - server.server.started + 1


async def test_last_activity_of_a_user(server: Harness) -> None:
    for name in ("alice", "bob", "eve"):
        await server.add_user(name)
    storage = server.server.storage
    await storage.roster.put("localhost", "alice", RosterItem("bob@localhost", subscription="from"))
    await storage.roster.put("localhost", "alice", RosterItem("eve@localhost", subscription="to"))
    bob = await server.client("bob@localhost")
    eve = await server.client("eve@localhost")

    alice = await server.client("alice@localhost")
    alice.send_presence(pstatus="gone fishing")
    await wait_for(lambda: is_available(server, "alice@localhost"))
    assert (await last_of(bob, "alice@localhost")).get("seconds") == "0"

    alice.disconnect()
    await alice.disconnected

    async def logged_out() -> bool:
        account = await storage.accounts.get("localhost", "alice")
        return account.last_logout is not None

    await wait_for(logged_out)
    query = await last_of(bob, "alice@localhost")
    assert 0 <= int(query.get("seconds")) < 5
    assert query.text == "gone fishing"
    condition, _ = await iq_error(eve, "get", "<query xmlns='jabber:iq:last'/>", "alice@localhost")
    assert condition == "forbidden"
    alice = await server.client("alice@localhost")
    assert int((await last_of(alice, "alice@localhost")).get("seconds")) < 5


# --- vCard ---------------------------------------------------------------------------------------------

async def test_vcard_set_and_get(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    alice = await server.client("alice@localhost")
    bob = await server.client("bob@localhost")

    empty = (await send_iq(alice, "get", f"<vCard xmlns='{VCARD}'/>")).find(f"{{{VCARD}}}vCard")
    assert empty is not None and len(empty) == 0

    vcard = f"<vCard xmlns='{VCARD}'><FN>Alice Liddell</FN><NICKNAME>al</NICKNAME></vCard>"
    await send_iq(alice, "set", vcard)
    for client, to in ((alice, None), (bob, "alice@localhost")):
        vcard = (await send_iq(client, "get", f"<vCard xmlns='{VCARD}'/>", to)).find(f"{{{VCARD}}}vCard")
        assert vcard.findtext(f"{{{VCARD}}}FN") == "Alice Liddell"
        assert vcard.findtext(f"{{{VCARD}}}NICKNAME") == "al"


async def test_vcard_set_for_someone_else_is_forbidden(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    bob = await server.client("bob@localhost")
    vcard = f"<vCard xmlns='{VCARD}'><FN>Bob</FN></vCard>"
    condition, _ = await iq_error(bob, "set", vcard, "alice@localhost")
    assert condition == "forbidden"
    condition, _ = await iq_error(bob, "get", f"<vCard xmlns='{VCARD}'/>", "nobody@localhost")
    assert condition == "service-unavailable"


async def test_vcard_size_limit(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    huge = "x" * 70_000
    condition, _ = await iq_error(alice, "set", f"<vCard xmlns='{VCARD}'><DESC>{huge}</DESC></vCard>")
    assert condition == "not-acceptable"

