"""The generic XEP-0060 service on pubsub.localhost, with slixmpp's pubsub client."""

from __future__ import annotations

import asyncio

import pytest
from slixmpp.exceptions import IqError
from slixmpp.xmlstream import ET

from tests.conftest import Harness
from tests.test_basic_modules import features_of, identities_of, query_of, send_iq
from tests.test_offline import collect
from tests.test_pep import EVENT, OWNER, PUBSUB, error_of
from tests.test_roster_presence import sync

SERVICE = "pubsub.localhost"
ITEMS = "http://jabber.org/protocol/disco#items"
INFO = "http://jabber.org/protocol/disco#info"


def entry(text: str) -> ET.Element:
    el = ET.Element("{urn:test:feed}entry")
    el.text = text
    return el


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_create_subscribe_publish_items(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    alice = await server.client("alice@localhost", plugins=("xep_0060",))
    bob = await server.client("bob@localhost", plugins=("xep_0060",))
    bob_inbox = collect(bob)
    bob.send_presence()  # notifications to a bare JID go to its available resources
    ps_a, ps_b = alice.plugin["xep_0060"], bob.plugin["xep_0060"]

    info = query_of(await send_iq(alice, "get", f"<query xmlns='{INFO}'/>", "localhost"), INFO)
    assert info is not None
    items = query_of(await send_iq(alice, "get", f"<query xmlns='{ITEMS}'/>", "localhost"), ITEMS)
    assert SERVICE in [i.get("jid") for i in items]
    info = query_of(await send_iq(alice, "get", f"<query xmlns='{INFO}'/>", SERVICE), INFO)
    assert ("pubsub", "service", "Publish-Subscribe") in identities_of(info)
    assert f"{PUBSUB}#create-nodes" in features_of(info) and f"{PUBSUB}#access-presence" not in features_of(info)

    await ps_a.create_node(SERVICE, "news")
    with pytest.raises(IqError) as exists:
        await ps_a.create_node(SERVICE, "news")
    assert exists.value.iq["error"]["condition"] == "conflict"
    sub = await ps_b.subscribe(SERVICE, "news")
    assert sub["pubsub"]["subscription"]["subscription"] == "subscribed"

    await ps_a.publish(SERVICE, "news", id="first", payload=entry("hello"))
    message = await asyncio.wait_for(bob_inbox.get(), 5)
    item = message.find(f"{{{EVENT}}}event/{{{EVENT}}}items/{{{EVENT}}}item")
    assert message.get("from") == SERVICE and item.get("id") == "first"
    assert item.findtext("{urn:test:feed}entry") == "hello"

    result = await ps_b.get_items(SERVICE, "news")
    assert [i["id"] for i in result["pubsub"]["items"]] == ["first"]
    nodes = query_of(await send_iq(bob, "get", f"<query xmlns='{ITEMS}'/>", SERVICE), ITEMS)
    assert [i.get("node") for i in nodes] == ["news"]

    subs = await send_iq(bob, "get", f"<pubsub xmlns='{PUBSUB}'><subscriptions/></pubsub>", SERVICE)
    assert [(s.get("node"), s.get("jid")) for s in subs.iter(f"{{{PUBSUB}}}subscription")] == \
        [("news", "bob@localhost")]
    affs = await send_iq(alice, "get", f"<pubsub xmlns='{PUBSUB}'><affiliations/></pubsub>", SERVICE)
    assert [(a.get("node"), a.get("affiliation")) for a in affs.iter(f"{{{PUBSUB}}}affiliation")] == \
        [("news", "owner")]

    await ps_b.unsubscribe(SERVICE, "news")
    await ps_a.publish(SERVICE, "news", id="second", payload=entry("again"))
    await sync(alice, bob)
    assert bob_inbox.empty()


async def test_owner_manages_configuration_affiliations_and_subscriptions(server: Harness) -> None:
    for name in ("alice", "bob", "carol"):
        await server.add_user(name)
    alice = await server.client("alice@localhost", plugins=("xep_0060",))
    bob = await server.client("bob@localhost", plugins=("xep_0060",))
    ps_a = alice.plugin["xep_0060"]
    await ps_a.create_node(SERVICE, "private")

    form = await send_iq(alice, "get", f"<pubsub xmlns='{OWNER}'><configure node='private'/></pubsub>", SERVICE)
    fields = {f.get("var") for f in form.iter("{jabber:x:data}field")}
    assert {"pubsub#access_model", "pubsub#max_items", "pubsub#publish_model"} <= fields
    await send_iq(alice, "set", f"<pubsub xmlns='{OWNER}'><configure node='private'><x xmlns='jabber:x:data' "
                                "type='submit'><field var='pubsub#access_model'><value>whitelist</value></field>"
                                "</x></configure></pubsub>", SERVICE)
    assert await error_of(bob, "set", f"<pubsub xmlns='{PUBSUB}'><subscribe node='private' jid='bob@localhost'/>"
                                      "</pubsub>", SERVICE) == ("not-allowed", "closed-node")
    assert await error_of(bob, "get", f"<pubsub xmlns='{OWNER}'><configure node='private'/></pubsub>",
                          SERVICE) == ("forbidden", None)
    assert await error_of(alice, "set", f"<pubsub xmlns='{OWNER}'><configure node='private'>"
                                        "<x xmlns='jabber:x:data' type='submit'><field var='pubsub#access_model'>"
                                        "<value>presence</value></field></x></configure></pubsub>",
                          SERVICE) == ("not-acceptable", None)

    await send_iq(alice, "set", f"<pubsub xmlns='{OWNER}'><affiliations node='private'>"
                                "<affiliation jid='bob@localhost' affiliation='publisher'/></affiliations></pubsub>",
                  SERVICE)
    await bob.plugin["xep_0060"].publish(SERVICE, "private", id="b", payload=entry("from bob"))
    await send_iq(alice, "set", f"<pubsub xmlns='{OWNER}'><subscriptions node='private'>"
                                "<subscription jid='carol@localhost' subscription='subscribed'/>"
                                "</subscriptions></pubsub>", SERVICE)
    subs = await send_iq(alice, "get", f"<pubsub xmlns='{OWNER}'><subscriptions node='private'/></pubsub>", SERVICE)
    assert [s.get("jid") for s in subs.iter(f"{{{OWNER}}}subscription")] == ["carol@localhost"]
    affs = await send_iq(alice, "get", f"<pubsub xmlns='{OWNER}'><affiliations node='private'/></pubsub>", SERVICE)
    assert sorted((a.get("jid"), a.get("affiliation")) for a in affs.iter(f"{{{OWNER}}}affiliation")) == \
        [("alice@localhost", "owner"), ("bob@localhost", "publisher")]

    assert await error_of(alice, "get", f"<pubsub xmlns='{OWNER}'><subscriptions/></pubsub>", SERVICE) == \
        ("bad-request", "nodeid-required")
    await send_iq(alice, "set", f"<pubsub xmlns='{OWNER}'><delete node='private'/></pubsub>", SERVICE)
    assert await error_of(alice, "get", f"<pubsub xmlns='{PUBSUB}'><items node='private'/></pubsub>",
                          SERVICE) == ("item-not-found", None)


async def test_only_local_accounts_create_nodes_and_publish_options_apply(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("eve", host="example.test")
    alice = await server.client("alice@localhost", plugins=("xep_0060",))
    eve = await server.client("eve@example.test", plugins=("xep_0060",))
    assert await error_of(eve, "set", f"<pubsub xmlns='{PUBSUB}'><create node='spam'/></pubsub>",
                          SERVICE) == ("forbidden", None)
    publish = (f"<pubsub xmlns='{PUBSUB}'><publish node='auto'><item><entry xmlns='urn:test:feed'/></item>"
               "</publish><publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' "
               f"type='hidden'><value>{PUBSUB}#publish-options</value></field><field var='pubsub#max_items'>"
               "<value>{}</value></field></x></publish-options></pubsub>")
    await send_iq(alice, "set", publish.format(3), SERVICE)
    await send_iq(alice, "set", publish.format(3), SERVICE)
    assert await error_of(alice, "set", publish.format(4), SERVICE) == ("conflict", "precondition-not-met")
    items = await send_iq(eve, "get", f"<pubsub xmlns='{PUBSUB}'><items node='auto'/></pubsub>", SERVICE)
    assert len(list(items.iter(f"{{{PUBSUB}}}item"))) == 2  # open access; generated item ids
