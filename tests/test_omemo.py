"""OMEMO end to end through Parley, with real key material published and fetched through PEP.

urn:xmpp:omemo:2 between two slixmpp-omemo clients (python-omemo's twomemo backend), and
eu.siacs.conversations.axolotl between slixmpp-omemo and omemo-dr (Gajim's library), each with the
receiver online and with the receiver offline, so that the sender fetches its keys from PEP while it is
away and the message waits in offline storage.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from xml.etree.ElementTree import Element

import pytest
import twomemo
from slixmpp import JID, ClientXMPP
from slixmpp.stanza import Message
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from server.pubsub import NodeConfig
from tests.conftest import Harness, unavailable
from tests.omemo_clients import AXOLOTL, DEVICELIST, KEYS, GajimOmemo
from tests.test_basic_modules import send_iq, wait_for
from tests.test_roster_presence import befriend, disconnect, sync

OMEMO2 = twomemo.twomemo.NAMESPACE
SLIX_PLUGINS = ("xep_0030", "xep_0060", "xep_0163", "xep_0115", "xep_0280", "xep_0334", "xep_0384")
HINT_STORE = "{urn:xmpp:hints}store"


@pytest.fixture(autouse=True)
def fresh_keys() -> AsyncIterator[None]:
    KEYS.clear()
    yield
    KEYS.clear()


async def slix(server: Harness, jid: str, resource: str) -> ClientXMPP:
    """A slixmpp-omemo client whose device lists and bundles are published."""
    client = await server.client(jid, resource=resource, plugins=SLIX_PLUGINS)
    await asyncio.wait_for(client.plugin["xep_0384"].get_session_manager(), 30)
    return client


async def gajim(server: Harness, jid: str, resource: str) -> tuple[ClientXMPP, GajimOmemo]:
    client = await server.client(jid, resource=resource, plugins=("xep_0030", "xep_0060"))
    omemo = GajimOmemo(client)
    await omemo.publish()
    return client, omemo


def encrypted_inbox(client: ClientXMPP) -> asyncio.Queue[Message]:
    """The OMEMO messages `client` receives, in either namespace."""
    queue: asyncio.Queue[Message] = asyncio.Queue()

    def received(message: Message) -> None:
        if message.xml.find(f"{{{OMEMO2}}}encrypted") is not None or \
                message.xml.find(f"{{{AXOLOTL}}}encrypted") is not None:
            queue.put_nowait(message)

    # slixmpp's 'message' event needs a body; an OMEMO 2 message has none.
    client.register_handler(Callback("omemo", MatchXPath("{jabber:client}message"), received))
    return queue


async def come_back(server: Harness, jid: str, resource: str) -> tuple[ClientXMPP, asyncio.Queue[Message]]:
    """Log in again with the same keys; the inbox is ready before the initial presence brings offline messages."""
    client = await slix(server, jid, resource)
    inbox = encrypted_inbox(client)
    client.send_presence()
    return client, inbox


async def pep_config(server: Harness, user: str, node: str) -> NodeConfig:
    stored = await server.server.storage.pubsub.node("localhost", user, node)
    assert stored is not None, f"{user} has no node {node}"
    return NodeConfig.from_json(stored)


async def learns_devices(client: ClientXMPP, jid: str) -> None:
    """Wait until the client's session manager knows devices of `jid`, which only a +notify event tells it."""
    manager = await client.plugin["xep_0384"].get_session_manager()

    async def known() -> bool:
        return bool(await manager.get_device_information(jid))

    await wait_for(known)


def sce(text: str) -> bytes:
    """A minimal XEP-0420 envelope, what OMEMO 2 encrypts."""
    return (f"<envelope xmlns='urn:xmpp:sce:1'><content><body xmlns='jabber:client'>{text}</body></content>"
            f"<rpad>pad</rpad></envelope>").encode()


async def send_omemo2(sender: ClientXMPP, to: str, text: str) -> None:
    """Encrypt with the sender's session manager, which downloads the recipient's devices and bundles via PEP."""
    await sender.plugin["xep_0384"].refresh_device_lists({JID(to)})
    manager = await sender.plugin["xep_0384"].get_session_manager()
    messages, errors = await manager.encrypt(frozenset({to}), {OMEMO2: sce(text)}, [OMEMO2])
    assert not errors and len(messages) == 1
    stanza = sender.make_message(mto=to, mtype="chat")
    stanza.append(twomemo.etree.serialize_message(next(iter(messages))))
    stanza.enable("store")
    stanza.send()


async def read_omemo2(receiver: ClientXMPP, inbox: asyncio.Queue[Message]) -> bytes:
    """The next plaintext; empty messages, which the library sends to complete a key exchange, are skipped."""
    manager = await receiver.plugin["xep_0384"].get_session_manager()
    while True:
        message = await asyncio.wait_for(inbox.get(), 10)
        element = message.xml.find(f"{{{OMEMO2}}}encrypted")
        plaintext, _, _ = await manager.decrypt(twomemo.etree.parse_message(element, message["from"].bare))
        if plaintext is not None:
            return plaintext


async def send_slix_legacy(sender: ClientXMPP, to: str, text: str) -> None:
    """slixmpp-omemo's own encryption: legacy OMEMO for a recipient that only has an axolotl device list."""
    plain = sender.make_message(mto=to, mtype="chat", mbody=text)
    encrypted, errors = await sender.plugin["xep_0384"].encrypt_message(plain, JID(to))
    assert not errors and encrypted is not None
    assert encrypted.xml.find(f"{{{AXOLOTL}}}encrypted") is not None
    encrypted.send()


async def read_slix(receiver: ClientXMPP, inbox: asyncio.Queue[Message]) -> str:
    message = await asyncio.wait_for(inbox.get(), 10)
    decrypted, _device = await receiver.plugin["xep_0384"].decrypt_message(message)
    return str(decrypted["body"])


def send_gajim(client: ClientXMPP, omemo: GajimOmemo, to: str, text: str) -> None:
    stanza = client.make_message(mto=to, mtype="chat", mbody="I sent you an OMEMO encrypted message")
    stanza.append(omemo.encrypt(to, text))
    stanza.enable("store")
    stanza.send()


async def test_omemo2_keys_are_published_through_pep_with_open_access(server: Harness) -> None:
    await server.add_user("alice")
    alice = await slix(server, "alice@localhost", "phone")
    manager: Any = await alice.plugin["xep_0384"].get_session_manager()
    own, _ = await manager.get_own_device_information()
    for node in ("urn:xmpp:omemo:2:devices", "urn:xmpp:omemo:2:bundles", DEVICELIST,
                 f"{AXOLOTL}.bundles:{own.device_id}"):
        config = await pep_config(server, "alice", node)
        assert config.access_model == "open" and config.persist_items, node
    assert (await pep_config(server, "alice", "urn:xmpp:omemo:2:bundles")).max_items is None  # 'max'
    assert (await pep_config(server, "alice", DEVICELIST)).max_items == 1


async def test_omemo2_message_to_an_online_contact_and_back(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")  # contacts: device list updates reach each other through +notify
    alice = await slix(server, "alice@localhost", "phone")
    bob = await slix(server, "bob@localhost", "laptop")
    alice_inbox, bob_inbox = encrypted_inbox(alice), encrypted_inbox(bob)
    alice.send_presence()
    bob.send_presence()
    await learns_devices(alice, "bob@localhost")  # from PEP notifications, never asked for
    await learns_devices(bob, "alice@localhost")
    await send_omemo2(alice, "bob@localhost", "hi bob, over omemo:2")
    assert b"hi bob, over omemo:2" in await read_omemo2(bob, bob_inbox)
    await send_omemo2(bob, "alice@localhost", "hi alice")
    assert b"hi alice" in await read_omemo2(alice, alice_inbox)


async def test_omemo2_carbon_copy_is_decrypted_by_the_other_device(server: Harness) -> None:
    """The server forwards the encrypted element untouched: the laptop decrypts the copy of a message to the phone."""
    for name in ("alice", "bob"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")
    phone = await slix(server, "alice@localhost", "phone")
    laptop = await slix(server, "alice@localhost", "laptop")
    bob = await slix(server, "bob@localhost", "desk")
    await laptop.plugin["xep_0280"].enable()
    copies: asyncio.Queue[Message] = asyncio.Queue()
    laptop.add_event_handler("carbon_received", lambda m: copies.put_nowait(m["carbon_received"]))
    for client in (phone, laptop, bob):
        client.send_presence()
    await learns_devices(bob, "alice@localhost")
    manager = await bob.plugin["xep_0384"].get_session_manager()
    messages, errors = await manager.encrypt(frozenset({"alice@localhost"}), {OMEMO2: sce("for every device")},
                                             [OMEMO2])
    assert not errors
    stanza = bob.make_message(mto="alice@localhost/phone", mtype="chat")
    stanza.append(twomemo.etree.serialize_message(next(iter(messages))))
    stanza.send()
    forwarded = await asyncio.wait_for(copies.get(), 10)
    element = forwarded.xml.find(f"{{{OMEMO2}}}encrypted")
    assert element is not None
    laptop_manager = await laptop.plugin["xep_0384"].get_session_manager()
    plaintext, _, _ = await laptop_manager.decrypt(twomemo.etree.parse_message(element, "bob@localhost"))
    assert plaintext is not None and b"for every device" in plaintext


async def test_omemo2_message_to_an_offline_contact(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    bob = await slix(server, "bob@localhost", "laptop")  # publishes its keys, then leaves
    await disconnect(server, bob)
    alice = await slix(server, "alice@localhost", "phone")
    await send_omemo2(alice, "bob@localhost", "while you were away")
    await sync(alice)
    bob, inbox = await come_back(server, "bob@localhost", "laptop")
    assert b"while you were away" in await read_omemo2(bob, inbox)


async def test_legacy_omemo_between_slixmpp_omemo_and_omemo_dr_online(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    bob_client, bob = await gajim(server, "bob@localhost", "gajim")
    bob_inbox = encrypted_inbox(bob_client)
    bob_client.send_presence()
    alice = await slix(server, "alice@localhost", "phone")
    alice_inbox = encrypted_inbox(alice)
    alice.send_presence()
    await sync(alice, bob_client)

    await send_slix_legacy(alice, "bob@localhost", "hello Gajim")  # alice fetched bob's bundle from PEP
    message = await asyncio.wait_for(bob_inbox.get(), 10)
    assert message.xml.find(HINT_STORE) is not None
    assert bob.decrypt(message.xml) == "hello Gajim"

    send_gajim(bob_client, bob, "alice@localhost", "hello slixmpp")
    assert await read_slix(alice, alice_inbox) == "hello slixmpp"


async def test_legacy_omemo_from_omemo_dr_to_an_offline_slixmpp_omemo(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    alice = await slix(server, "alice@localhost", "phone")  # publishes its keys, then leaves
    await disconnect(server, alice)
    bob_client, bob = await gajim(server, "bob@localhost", "gajim")
    await bob.fetch("alice@localhost")  # alice's device list and bundles, from PEP, while she is offline
    send_gajim(bob_client, bob, "alice@localhost", "read me when you are back")
    await sync(bob_client)
    assert await server.server.storage.offline.count("localhost", "alice") == 1
    alice, inbox = await come_back(server, "alice@localhost", "phone")
    assert await read_slix(alice, inbox) == "read me when you are back"


async def test_legacy_omemo_from_slixmpp_omemo_to_an_offline_omemo_dr(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    bob_client, bob = await gajim(server, "bob@localhost", "gajim")
    await disconnect(server, bob_client)
    alice = await slix(server, "alice@localhost", "phone")
    await send_slix_legacy(alice, "bob@localhost", "stored for Gajim")
    await sync(alice)
    bob_client = await server.client("bob@localhost", resource="gajim", plugins=("xep_0030", "xep_0060"))
    bob = GajimOmemo(bob_client)
    inbox = encrypted_inbox(bob_client)
    bob_client.send_presence()
    message = await asyncio.wait_for(inbox.get(), 10)
    assert message.xml.find("{urn:xmpp:delay}delay") is not None
    assert bob.decrypt(message.xml) == "stored for Gajim"


async def test_legacy_omemo_message_read_from_the_archive(server: Harness) -> None:
    """A device that was away reads the encrypted message from its archive (XEP-0313) and decrypts it."""
    if "mam" not in server.server.hosts["localhost"].modules:
        unavailable("no archive (XEP-0313) module on this server")
    for name in ("alice", "bob"):
        await server.add_user(name)
    bob_client, bob = await gajim(server, "bob@localhost", "gajim")
    await disconnect(server, bob_client)
    alice = await slix(server, "alice@localhost", "phone")
    await send_slix_legacy(alice, "bob@localhost", "kept in the archive")
    await sync(alice)
    bob_client = await server.client("bob@localhost", resource="gajim", plugins=("xep_0030", "xep_0060"))
    bob = GajimOmemo(bob_client)
    results: asyncio.Queue[Element] = asyncio.Queue()
    bob_client.register_handler(Callback("mam", MatchXPath("{jabber:client}message/{urn:xmpp:mam:2}result"),
                                         lambda m: results.put_nowait(m.xml)))
    await send_iq(bob_client, "set", "<query xmlns='urn:xmpp:mam:2' queryid='q'/>")
    result = await asyncio.wait_for(results.get(), 10)
    archived = result.find("{urn:xmpp:mam:2}result/{urn:xmpp:forward:0}forwarded/{jabber:client}message")
    assert archived is not None and archived.find(f"{{{AXOLOTL}}}encrypted") is not None
    assert bob.decrypt(archived) == "kept in the archive"
