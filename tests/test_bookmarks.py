"""Private XML storage (XEP-0049), private PEP data (XEP-0223) and bookmarks across XEP-0048 and XEP-0402
(#compat, #compat-pep, XEP-0411)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from xml.etree.ElementTree import Element

from slixmpp import ClientXMPP

from tests.conftest import Harness
from tests.test_basic_modules import features_of, query_of, send_iq
from tests.test_pep import EVENT, INFO, PUBSUB, error_of, pep_client
from tests.test_roster_presence import befriend, sync

PRIVATE = "jabber:iq:private"
NATIVE = "urn:xmpp:bookmarks:1"
LEGACY = "storage:bookmarks"
NATIVE_OPTIONS = (
    "<publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
    f"<value>{PUBSUB}#publish-options</value></field><field var='pubsub#persist_items'><value>true</value></field>"
    "<field var='pubsub#max_items'><value>max</value></field><field var='pubsub#send_last_published_item'>"
    "<value>never</value></field><field var='pubsub#access_model'><value>whitelist</value></field></x>"
    "</publish-options>")


async def private_get(client: ClientXMPP, inner: str, to: str | None = None) -> Element:
    result = await send_iq(client, "get", f"<query xmlns='{PRIVATE}'>{inner}</query>", to)
    query = result.find(f"{{{PRIVATE}}}query")
    assert query is not None and len(query) == 1
    return query[0]


async def private_set(client: ClientXMPP, inner: str) -> None:
    await send_iq(client, "set", f"<query xmlns='{PRIVATE}'>{inner}</query>")


async def native_items(client: ClientXMPP, owner: str = "alice@localhost") -> dict[str, Element]:
    result = await send_iq(client, "get", f"<pubsub xmlns='{PUBSUB}'><items node='{NATIVE}'/></pubsub>", owner)
    return {item.get("id", ""): item.find(f"{{{NATIVE}}}conference")  # type: ignore[misc]
            for item in result.iter(f"{{{PUBSUB}}}item")}


def legacy_rooms(storage: Element) -> dict[str, tuple[str | None, str | None, str | None]]:
    return {c.get("jid", ""): (c.get("name"), c.get("autojoin"), c.findtext(f"{{{LEGACY}}}nick"))
            for c in storage.iterfind(f"{{{LEGACY}}}conference")}


async def test_private_storage_keeps_documents_for_the_account_only(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    alice = await server.client("alice@localhost")
    bob = await server.client("bob@localhost")
    empty = await private_get(alice, "<prefs xmlns='urn:example:prefs'/>")
    assert empty.tag == "{urn:example:prefs}prefs" and len(empty) == 0
    await private_set(alice, "<prefs xmlns='urn:example:prefs'><theme>dark</theme></prefs>")
    stored = await private_get(alice, "<prefs xmlns='urn:example:prefs'/>")
    assert stored.findtext("{urn:example:prefs}theme") == "dark"
    assert await error_of(bob, "get", f"<query xmlns='{PRIVATE}'><prefs xmlns='urn:example:prefs'/></query>",
                          "alice@localhost") == ("forbidden", None)
    assert await error_of(alice, "set", f"<query xmlns='{PRIVATE}'><x xmlns='{PRIVATE}'/></query>") == \
        ("not-acceptable", None)
    assert (await private_get(bob, "<prefs xmlns='urn:example:prefs'/>")).find("{urn:example:prefs}theme") is None


async def test_private_pep_data_is_whitelisted(server: Harness) -> None:
    """XEP-0223: publish-options make a node only the owner reads; contacts get no notification."""
    for name in ("alice", "bob"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")
    alice, alice_inbox = await pep_client(server, "alice@localhost", "urn:example:secret")
    bob, bob_inbox = await pep_client(server, "bob@localhost", "urn:example:secret")
    options = NATIVE_OPTIONS.replace("<field var='pubsub#max_items'><value>max</value></field>", "")
    await send_iq(alice, "set", f"<pubsub xmlns='{PUBSUB}'><publish node='urn:example:secret'><item id='current'>"
                                f"<secret xmlns='urn:example:secret'>42</secret></item></publish>{options}</pubsub>")
    assert await error_of(bob, "get", f"<pubsub xmlns='{PUBSUB}'><items node='urn:example:secret'/></pubsub>",
                          "alice@localhost") == ("not-allowed", "closed-node")
    message = await asyncio.wait_for(alice_inbox.get(), 5)  # the owner's own resource is notified
    assert message.find(f".//{{{EVENT}}}item") is not None
    await sync(alice, bob)
    assert bob_inbox.empty()


async def test_account_advertises_bookmark_conversions(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    features = features_of(query_of(await send_iq(alice, "get", f"<query xmlns='{INFO}'/>", "alice@localhost"), INFO))
    for feature in (f"{NATIVE}#compat", f"{NATIVE}#compat-pep", "urn:xmpp:bookmarks-conversion:0"):
        assert feature in features


async def test_bookmarks_of_a_legacy_client_reach_a_xep_0402_client(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")
    legacy = await server.client("alice@localhost", resource="old")
    modern, inbox = await pep_client(server, "alice@localhost", NATIVE, resource="new")
    bob = await server.client("bob@localhost")
    await private_set(legacy, f"<storage xmlns='{LEGACY}'>"
                              "<conference jid='tea@conference.localhost' name='Tea' autojoin='true'><nick>Al</nick>"
                              "</conference><conference jid='chess@conference.localhost' autojoin='false'/>"
                              "<url name='Home' url='https://example.org/'/></storage>")
    items = await native_items(modern)
    assert set(items) == {"tea@conference.localhost", "chess@conference.localhost"}
    tea = items["tea@conference.localhost"]
    assert tea.get("name") == "Tea" and tea.get("autojoin") == "true" and tea.findtext(f"{{{NATIVE}}}nick") == "Al"
    notified = set()
    while len(notified) < 2:
        message = await asyncio.wait_for(inbox.get(), 5)
        notified |= {item.get("id") for item in message.iter(f"{{{EVENT}}}item")}
    assert notified == set(items)

    # The node is private (XEP-0223), as XEP-0402 asks.
    assert await error_of(bob, "get", f"<pubsub xmlns='{PUBSUB}'><items node='{NATIVE}'/></pubsub>",
                          "alice@localhost") == ("not-allowed", "closed-node")
    # XEP-0411: the same list in the legacy PEP node; the URL bookmark stays in the legacy views.
    result = await send_iq(modern, "get", f"<pubsub xmlns='{PUBSUB}'><items node='{LEGACY}'/></pubsub>")
    storage = result.find(f".//{{{LEGACY}}}storage")
    assert storage is not None and set(legacy_rooms(storage)) == set(items)
    assert (await private_get(legacy, f"<storage xmlns='{LEGACY}'/>")).find(f"{{{LEGACY}}}url") is not None


async def test_xep_0402_changes_show_in_legacy_storage_and_back(server: Harness) -> None:
    await server.add_user("alice")
    legacy = await server.client("alice@localhost", resource="old")
    modern, inbox = await pep_client(server, "alice@localhost", NATIVE, resource="new")
    await send_iq(modern, "set", f"<pubsub xmlns='{PUBSUB}'><publish node='{NATIVE}'>"
                                 "<item id='garden@conference.localhost'><conference xmlns='urn:xmpp:bookmarks:1' "
                                 "name='Garden' autojoin='1'><nick>alice</nick><extensions><pinned "
                                 "xmlns='urn:example:pin'/></extensions></conference></item></publish>"
                                 f"{NATIVE_OPTIONS}</pubsub>")
    await send_iq(modern, "set", f"<pubsub xmlns='{PUBSUB}'><publish node='{NATIVE}'>"
                                 "<item id='lab@conference.localhost'><conference xmlns='urn:xmpp:bookmarks:1' "
                                 f"name='Lab'/></item></publish>{NATIVE_OPTIONS}</pubsub>")
    storage = await private_get(legacy, f"<storage xmlns='{LEGACY}'/>")
    assert legacy_rooms(storage) == {"garden@conference.localhost": ("Garden", "true", "alice"),
                                     "lab@conference.localhost": ("Lab", "false", None)}

    await send_iq(modern, "set", f"<pubsub xmlns='{PUBSUB}'><retract node='{NATIVE}' notify='true'>"
                                 "<item id='lab@conference.localhost'/></retract></pubsub>")
    storage = await private_get(legacy, f"<storage xmlns='{LEGACY}'/>")
    assert set(legacy_rooms(storage)) == {"garden@conference.localhost"}

    # A legacy client renames the garden and adds a room: the XEP-0402 extensions survive.
    while not inbox.empty():
        inbox.get_nowait()
    await private_set(legacy, f"<storage xmlns='{LEGACY}'><conference jid='garden@conference.localhost' "
                              "name='Secret Garden' autojoin='true'><nick>alice</nick></conference></storage>")
    garden = (await native_items(modern))["garden@conference.localhost"]
    assert garden.get("name") == "Secret Garden"
    assert garden.find(f"{{{NATIVE}}}extensions/{{urn:example:pin}}pinned") is not None
    # Leaving a room out of the legacy list retracts it for XEP-0402 clients.
    await private_set(legacy, f"<storage xmlns='{LEGACY}'/>")
    assert await native_items(modern) == {}
    retracted = set()
    while "garden@conference.localhost" not in retracted:
        message = await asyncio.wait_for(inbox.get(), 5)
        retracted |= {r.get("id") for r in message.iter(f"{{{EVENT}}}retract")}


async def test_imported_xep0048_bookmarks_become_pep_bookmarks_at_the_next_start(server: Harness,
                                                                                 tmp_path: Path) -> None:
    """ejabberd's and Prosody's XEP-0227 exports carry bookmarks as a private storage document."""
    from ejabberd_compat.piefxis import import_piefxis

    export = tmp_path / "export.xml"
    export.write_text(
        "<server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'><user name='alice' password='secret'>"
        f"<query xmlns='{PRIVATE}'><storage xmlns='{LEGACY}'><conference jid='tea@conference.localhost' "
        "name='Tea' autojoin='true'><nick>Al</nick></conference><url name='Home' url='https://example.org'/>"
        "</storage></query></user></host></server-data>")
    report = await import_piefxis(server.server.storage, export, ["localhost"])
    assert (report.users, report.private) == (1, 1)
    await server.restart()
    alice, _ = await pep_client(server, "alice@localhost")
    conference = (await native_items(alice))["tea@conference.localhost"]
    assert (conference.get("name"), conference.get("autojoin"), conference.findtext(f"{{{NATIVE}}}nick")) == \
        ("Tea", "true", "Al")
    storage = await private_get(alice, f"<storage xmlns='{LEGACY}'/>")
    assert legacy_rooms(storage) == {"tea@conference.localhost": ("Tea", "true", "Al")}
    assert storage.find(f"{{{LEGACY}}}url").get("url") == "https://example.org"
