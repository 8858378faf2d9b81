"""PEP (XEP-0163) over the shared pubsub core: publish-options, access models, +notify, last item, restarts."""

from __future__ import annotations

import asyncio
from xml.etree.ElementTree import Element

import pytest
from slixmpp import ClientXMPP

from parley import build_server
from server.jid import JID
from tests.conftest import Harness
from tests.test_basic_modules import features_of, identities_of, query_of, send_iq, wait_for
from tests.test_offline import collect
from tests.test_roster_presence import befriend, sync

PUBSUB = "http://jabber.org/protocol/pubsub"
OWNER = f"{PUBSUB}#owner"
EVENT = f"{PUBSUB}#event"
ERRORS = f"{PUBSUB}#errors"
INFO = "http://jabber.org/protocol/disco#info"
ITEMS = "http://jabber.org/protocol/disco#items"
MOOD = "urn:test:mood"
PLUGINS = ("xep_0030", "xep_0060", "xep_0163", "xep_0115")


def options(**fields: str) -> str:
    """A publish-options form with pubsub#<name> fields."""
    body = "".join(f"<field var='pubsub#{k}'><value>{v}</value></field>" for k, v in fields.items())
    return (f"<publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
            f"<value>{PUBSUB}#publish-options</value></field>{body}</x></publish-options>")


def publish_xml(node: str, item_id: str, text: str, publish_options: str = "") -> str:
    return (f"<pubsub xmlns='{PUBSUB}'><publish node='{node}'><item id='{item_id}'>"
            f"<mood xmlns='{MOOD}'>{text}</mood></item></publish>{publish_options}</pubsub>")


async def publish(client: ClientXMPP, node: str, item_id: str, text: str, publish_options: str = "") -> Element:
    return await send_iq(client, "set", publish_xml(node, item_id, text, publish_options))


async def items(client: ClientXMPP, owner: str, node: str, extra: str = "") -> list[tuple[str, str]]:
    result = await send_iq(client, "get", f"<pubsub xmlns='{PUBSUB}'><items node='{node}' {extra}/></pubsub>", owner)
    return [(i.get("id"), i.findtext(f"{{{MOOD}}}mood")) for i in result.iter(f"{{{PUBSUB}}}item")]


async def configuration(client: ClientXMPP, node: str) -> dict[str, str | None]:
    result = await send_iq(client, "get", f"<pubsub xmlns='{OWNER}'><configure node='{node}'/></pubsub>")
    return {f.get("var"): f.findtext("{jabber:x:data}value") for f in result.iter("{jabber:x:data}field")}


async def pep_client(server: Harness, jid: str, *notify: str, resource: str = "r",
                     available: bool = True) -> tuple[ClientXMPP, asyncio.Queue[Element]]:
    """A client advertising '<ns>+notify' for each of `notify` in its caps; its queue of received messages."""
    client = await server.client(jid, resource=resource, plugins=PLUGINS)
    for namespace in notify:
        client.plugin["xep_0030"].add_feature(f"{namespace}+notify")
    await client.plugin["xep_0115"].update_caps(broadcast=False)
    inbox = collect(client)
    if available:
        client.send_presence()
        await sync(client)
    return client, inbox


async def notify_known(server: Harness, owner: str, full: str) -> None:
    """Wait until the owner's PEP service has resolved the caps of `full` (a disco#info round trip)."""
    seen = server.server.hosts["localhost"].modules["pep"].seen  # type: ignore[attr-defined]

    async def known() -> bool:
        return bool(seen.get(JID.parse(owner), {}).get(JID.parse(full)))

    await wait_for(known)


def events(queue: asyncio.Queue[Element]) -> list[tuple[str | None, str | None, str | None]]:
    """(from, item id, mood) of each PEP notification received so far."""
    found = []
    while not queue.empty():
        message = queue.get_nowait()
        for item in message.iter(f"{{{EVENT}}}item"):
            found.append((message.get("from"), item.get("id"), item.findtext(f"{{{MOOD}}}mood")))
    return found


async def next_event(queue: asyncio.Queue[Element]) -> tuple[str | None, str | None, str | None]:
    message = await asyncio.wait_for(queue.get(), 5)
    queue.put_nowait(message)
    return events(queue)[0]


def pubsub_condition(error: Element) -> str | None:
    found = [child.tag.split("}")[1] for child in error.iter() if child.tag.startswith(f"{{{ERRORS}}}")]
    return found[0] if found else None


async def error_of(client: ClientXMPP, type_: str, payload: str, to: str | None = None) -> tuple[str, str | None]:
    """(stanza condition, pubsub condition) of the error an iq gets."""
    from slixmpp.exceptions import IqError

    try:
        await send_iq(client, type_, payload, to)
    except IqError as exc:
        return exc.iq["error"]["condition"], pubsub_condition(exc.iq.xml)
    raise AssertionError("the iq succeeded")


async def test_account_advertises_pep_and_exactly_what_is_implemented(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    query = query_of(await send_iq(alice, "get", f"<query xmlns='{INFO}'/>", "alice@localhost"), INFO)
    assert ("pubsub", "pep", None) in identities_of(query)
    features = set(features_of(query))
    for name in ("publish", "publish-options", "auto-create", "config-node", "multi-items", "access-presence",
                 "access-open", "access-roster", "access-whitelist", "persistent-items", "filtered-notifications",
                 "retrieve-items", "retract-items", "purge-nodes", "delete-nodes", "create-and-configure"):
        assert f"{PUBSUB}#{name}" in features, name
    for name in ("instant-nodes", "collections", "subscription-options", "access-authorize", "get-pending"):
        assert f"{PUBSUB}#{name}" not in features, name


async def test_publish_options_auto_create_match_and_conflict(server: Harness) -> None:
    for name in ("alice", "dave"):
        await server.add_user(name)
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    dave = await server.client("dave@localhost", plugins=PLUGINS)

    # Auto-create: the node does not exist, so it is created with the options as its configuration.
    result = await publish(alice, MOOD, "current", "happy", options(access_model="open", max_items="max"))
    assert result.find(f"{{{PUBSUB}}}pubsub/{{{PUBSUB}}}publish/{{{PUBSUB}}}item").get("id") == "current"
    config = await configuration(alice, MOOD)
    assert config["pubsub#access_model"] == "open" and config["pubsub#max_items"] == "max"
    assert await items(dave, "alice@localhost", MOOD) == [("current", "happy")]  # open: a stranger reads it

    # Matching options: published ('true' and '1' are the same boolean).
    await publish(alice, MOOD, "other", "calm", options(access_model="open", persist_items="true"))
    assert await items(alice, "alice@localhost", MOOD) == [("current", "happy"), ("other", "calm")]

    # Conflicting options: precondition-not-met, nothing published, configuration unchanged.
    assert await error_of(alice, "set", publish_xml(MOOD, "x", "angry", options(access_model="whitelist"))) == \
        ("conflict", "precondition-not-met")
    assert await error_of(alice, "set", publish_xml(MOOD, "x", "angry", options(unknown_option="1"))) == \
        ("conflict", "precondition-not-met")
    assert await items(alice, "alice@localhost", MOOD) == [("current", "happy"), ("other", "calm")]
    assert (await configuration(alice, MOOD))["pubsub#access_model"] == "open"


async def test_auto_create_without_options_uses_presence_access_and_one_item(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    await publish(alice, MOOD, "1", "a")
    await publish(alice, MOOD, "2", "b")
    config = await configuration(alice, MOOD)
    assert config["pubsub#access_model"] == "presence" and config["pubsub#max_items"] == "1"
    assert await items(alice, "alice@localhost", MOOD) == [("2", "b")]


async def test_disco_items_of_an_account_list_the_nodes_the_requester_may_see(server: Harness) -> None:
    for name in ("alice", "bob", "dave"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    bob = await server.client("bob@localhost", plugins=PLUGINS)
    dave = await server.client("dave@localhost", plugins=PLUGINS)
    await publish(alice, MOOD, "1", "a")  # presence access
    await publish(alice, "urn:test:open", "1", "b", options(access_model="open"))

    async def nodes(client: ClientXMPP) -> list[str | None]:
        result = await send_iq(client, "get", f"<query xmlns='{ITEMS}'/>", "alice@localhost")
        return [item.get("node") for item in query_of(result, ITEMS)]

    assert await nodes(alice) == await nodes(bob) == ["urn:test:mood", "urn:test:open"]
    assert await nodes(dave) == ["urn:test:open"]


async def test_create_and_configure_then_items_by_id(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    await send_iq(alice, "set", f"<pubsub xmlns='{PUBSUB}'><create node='{MOOD}'/><configure><x xmlns='jabber:x:data' "
                                "type='submit'><field var='FORM_TYPE' type='hidden'><value>"
                                f"{PUBSUB}#node_config</value></field><field var='pubsub#max_items'><value>5</value>"
                                "</field></x></configure></pubsub>")
    assert await error_of(alice, "set", f"<pubsub xmlns='{PUBSUB}'><create node='{MOOD}'/></pubsub>") == \
        ("conflict", None)
    for n in range(3):
        await publish(alice, MOOD, f"i{n}", f"m{n}")
    picked = f"<pubsub xmlns='{PUBSUB}'><items node='{MOOD}'><item id='i1'/><item id='nope'/></items></pubsub>"
    result = await send_iq(alice, "get", picked)
    assert [i.get("id") for i in result.iter(f"{{{PUBSUB}}}item")] == ["i1"]
    assert await items(alice, "alice@localhost", MOOD, "max_items='2'") == [("i1", "m1"), ("i2", "m2")]


async def test_only_the_owner_publishes_and_configures(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    bob = await server.client("bob@localhost", plugins=PLUGINS)
    await publish(alice, MOOD, "1", "a")
    assert (await error_of(bob, "set", publish_xml(MOOD, "2", "b"), "alice@localhost"))[0] == "forbidden"
    assert (await error_of(bob, "get", f"<pubsub xmlns='{OWNER}'><configure node='{MOOD}'/></pubsub>",
                           "alice@localhost"))[0] == "forbidden"


async def test_presence_access_node_is_not_readable_by_a_stranger(server: Harness) -> None:
    for name in ("alice", "bob", "dave"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    bob = await server.client("bob@localhost", plugins=PLUGINS)
    dave = await server.client("dave@localhost", plugins=PLUGINS)
    await publish(alice, MOOD, "1", "secret")
    assert await items(bob, "alice@localhost", MOOD) == [("1", "secret")]
    assert await error_of(dave, "get", f"<pubsub xmlns='{PUBSUB}'><items node='{MOOD}'/></pubsub>",
                          "alice@localhost") == ("not-authorized", "presence-subscription-required")
    assert await error_of(dave, "set", f"<pubsub xmlns='{PUBSUB}'><subscribe node='{MOOD}' jid='dave@localhost'/>"
                          "</pubsub>", "alice@localhost") == ("not-authorized", "presence-subscription-required")


async def test_whitelist_and_roster_access_models(server: Harness) -> None:
    for name in ("alice", "bob", "carol"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")
    await befriend(server, "alice", "carol")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    bob = await server.client("bob@localhost", plugins=PLUGINS)
    carol = await server.client("carol@localhost", plugins=PLUGINS)
    await publish(alice, MOOD, "1", "x", options(access_model="whitelist"))
    assert await error_of(bob, "get", f"<pubsub xmlns='{PUBSUB}'><items node='{MOOD}'/></pubsub>",
                          "alice@localhost") == ("not-allowed", "closed-node")
    await send_iq(alice, "set", f"<pubsub xmlns='{OWNER}'><affiliations node='{MOOD}'>"
                                f"<affiliation jid='bob@localhost' affiliation='member'/></affiliations></pubsub>")
    assert await items(bob, "alice@localhost", MOOD) == [("1", "x")]

    await send_iq(alice, "set", f"<pubsub xmlns='{OWNER}'><configure node='{MOOD}'><x xmlns='jabber:x:data' "
                                f"type='submit'><field var='pubsub#access_model'><value>roster</value></field>"
                                f"<field var='pubsub#roster_groups_allowed'><value>Friends</value></field>"
                                f"</x></configure></pubsub>")
    await send_iq(alice, "set", "<query xmlns='jabber:iq:roster'><item jid='carol@localhost'>"
                                "<group>Friends</group></item></query>")
    assert await items(carol, "alice@localhost", MOOD) == [("1", "x")]
    assert await error_of(bob, "get", f"<pubsub xmlns='{PUBSUB}'><items node='{MOOD}'/></pubsub>",
                          "alice@localhost") == ("not-authorized", "not-in-roster-group")


async def test_notifications_follow_notify_caps(server: Harness) -> None:
    for name in ("alice", "bob", "carol", "dave"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")
    await befriend(server, "alice", "carol")
    alice, alice_inbox = await pep_client(server, "alice@localhost", MOOD)
    bob, bob_inbox = await pep_client(server, "bob@localhost", MOOD)
    carol, carol_inbox = await pep_client(server, "carol@localhost")
    dave, dave_inbox = await pep_client(server, "dave@localhost", MOOD)  # interested, but not a contact
    for jid in ("alice@localhost/r", "bob@localhost/r"):
        await notify_known(server, "alice@localhost", jid)
    await publish(alice, MOOD, "current", "sunny")
    assert await next_event(bob_inbox) == ("alice@localhost", "current", "sunny")
    assert await next_event(alice_inbox) == ("alice@localhost", "current", "sunny")
    await sync(alice, bob, carol, dave)
    assert events(carol_inbox) == []
    assert events(dave_inbox) == []


async def test_last_item_is_sent_on_available_presence(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    await publish(alice, MOOD, "1", "old")
    await publish(alice, MOOD, "2", "newest")
    _, inbox = await pep_client(server, "bob@localhost", MOOD)
    assert await next_event(inbox) == ("alice@localhost", "2", "newest")


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_items_survive_a_restart(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    await publish(alice, MOOD, "a", "one", options(max_items="3"))
    await publish(alice, MOOD, "b", "two", options(max_items="3"))
    config = server.server.config
    await server.close()
    await server.server.stop()
    restarted = build_server(config)
    await restarted.start()
    server.server = restarted
    try:
        alice = await server.client("alice@localhost", plugins=PLUGINS)
        assert await items(alice, "alice@localhost", MOOD) == [("a", "one"), ("b", "two")]
        assert await items(alice, "alice@localhost", MOOD, "max_items='1'") == [("b", "two")]
        assert (await configuration(alice, MOOD))["pubsub#max_items"] == "3"
    finally:
        await server.close()
        await restarted.stop()


async def test_retract_purge_and_delete(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    bob, inbox = await pep_client(server, "bob@localhost", MOOD)
    await publish(alice, MOOD, "a", "one", options(max_items="10"))
    await publish(alice, MOOD, "b", "two", options(max_items="10"))
    await send_iq(alice, "set", f"<pubsub xmlns='{PUBSUB}'><retract node='{MOOD}' notify='true'>"
                                f"<item id='a'/></retract></pubsub>")
    assert await items(alice, "alice@localhost", MOOD) == [("b", "two")]
    assert await error_of(alice, "set", f"<pubsub xmlns='{PUBSUB}'><retract node='{MOOD}'><item id='a'/>"
                                        f"</retract></pubsub>") == ("item-not-found", None)
    await send_iq(alice, "set", f"<pubsub xmlns='{OWNER}'><purge node='{MOOD}'/></pubsub>")
    assert await items(alice, "alice@localhost", MOOD) == []
    await send_iq(alice, "set", f"<pubsub xmlns='{OWNER}'><delete node='{MOOD}'/></pubsub>")
    assert await error_of(alice, "get", f"<pubsub xmlns='{PUBSUB}'><items node='{MOOD}'/></pubsub>") == \
        ("item-not-found", None)
    await sync(alice, bob)
    received = []
    while not inbox.empty():
        event = inbox.get_nowait().find(f"{{{EVENT}}}event")
        received += [child.tag.split("}")[1] for child in event.iter() if child is not event]
    assert "retract" in received and "purge" in received and "delete" in received
