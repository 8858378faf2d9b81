"""Profiles across generations: vCard avatars (XEP-0153) and User Avatar (XEP-0084) converted both ways
(XEP-0398), the avatar hash in presence, and vcard-temp kept in step with vCard4 over PEP (XEP-0292)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from xml.etree.ElementTree import Element

from slixmpp import ClientXMPP

from tests.conftest import Harness
from tests.test_basic_modules import features_of, query_of, send_iq
from tests.test_pep import EVENT, INFO, PUBSUB, pep_client
from tests.test_roster_presence import befriend, sync

DATA = "urn:xmpp:avatar:data"
METADATA = "urn:xmpp:avatar:metadata"
VCARD4 = "urn:ietf:params:xml:ns:vcard-4.0"
UPDATE = "vcard-temp:x:update"
IMAGE = b"\x89PNG\r\n\x1a\n" + os.urandom(600)
IMAGE_ID = hashlib.sha1(IMAGE).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def get_vcard(client: ClientXMPP, jid: str) -> Element:
    result = await send_iq(client, "get", "<vCard xmlns='vcard-temp'/>", jid)
    vcard = result.find("{vcard-temp}vCard")
    assert vcard is not None
    return vcard


async def set_vcard(client: ClientXMPP, inner: str) -> None:
    await send_iq(client, "set", f"<vCard xmlns='vcard-temp'>{inner}</vCard>")


async def pep_items(client: ClientXMPP, owner: str, node: str, item_id: str | None = None) -> list[Element]:
    ids = f"<item id='{item_id}'/>" if item_id else ""
    result = await send_iq(client, "get", f"<pubsub xmlns='{PUBSUB}'><items node='{node}'>{ids}</items></pubsub>",
                           owner)
    return list(result.iter(f"{{{PUBSUB}}}item"))


async def publish_avatar(client: ClientXMPP, image: bytes | None) -> None:
    """What a XEP-0084 client does: the data first, then the metadata pointing at it."""
    if image is None:
        metadata = f"<metadata xmlns='{METADATA}'/>"
    else:
        image_id = hashlib.sha1(image).hexdigest()
        await send_iq(client, "set", f"<pubsub xmlns='{PUBSUB}'><publish node='{DATA}'><item id='{image_id}'>"
                                     f"<data xmlns='{DATA}'>{b64(image)}</data></item></publish></pubsub>")
        metadata = (f"<metadata xmlns='{METADATA}'><info id='{image_id}' bytes='{len(image)}' type='image/png'/>"
                    "</metadata>")
    await send_iq(client, "set", f"<pubsub xmlns='{PUBSUB}'><publish node='{METADATA}'><item>{metadata}</item>"
                                 "</publish></pubsub>")


def photo_hash(presence: Element) -> str | None:
    return presence.findtext(f"{{{UPDATE}}}x/{{{UPDATE}}}photo")


async def test_account_advertises_the_conversion(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    query = query_of(await send_iq(alice, "get", f"<query xmlns='{INFO}'/>", "alice@localhost"), INFO)
    assert "urn:xmpp:pep-vcard-conversion:0" in features_of(query)


async def test_vcard_photo_becomes_xep_0084_avatar(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")
    alice = await server.client("alice@localhost")
    bob, inbox = await pep_client(server, "bob@localhost", METADATA)
    await set_vcard(alice, f"<FN>Alice</FN><PHOTO><TYPE>image/png</TYPE><BINVAL>{b64(IMAGE)}</BINVAL></PHOTO>")

    message = await asyncio.wait_for(inbox.get(), 5)  # bob advertises metadata+notify
    info = message.find(f"{{{EVENT}}}event/{{{EVENT}}}items/{{{EVENT}}}item/{{{METADATA}}}metadata/{{{METADATA}}}info")
    assert info is not None and message.get("from") == "alice@localhost"
    assert (info.get("id"), info.get("type"), info.get("bytes")) == (IMAGE_ID, "image/png", str(len(IMAGE)))
    [item] = await pep_items(bob, "alice@localhost", DATA, IMAGE_ID)
    assert base64.b64decode(item.findtext(f"{{{DATA}}}data") or "") == IMAGE


async def test_xep_0084_avatar_becomes_vcard_photo_and_presence_hash(server: Harness) -> None:
    for name in ("alice", "bob", "carol"):
        await server.add_user(name)
    await befriend(server, "alice", "bob")
    alice = await server.client("alice@localhost", resource="phone")
    bob = await server.client("bob@localhost", resource="desk")
    carol = await server.client("carol@localhost")  # not a contact: vCards are public
    await publish_avatar(alice, IMAGE)
    photo = (await get_vcard(carol, "alice@localhost")).find("{vcard-temp}PHOTO")
    assert photo is not None and photo.findtext("{vcard-temp}TYPE") == "image/png"
    assert base64.b64decode(photo.findtext("{vcard-temp}BINVAL") or "") == IMAGE

    presences: asyncio.Queue[Element] = asyncio.Queue()
    bob.add_event_handler("presence_available",
                          lambda p: p["from"].bare == "alice@localhost" and presences.put_nowait(p.xml))
    bob.send_presence()
    alice.send_presence()  # no vcard-temp:x:update: the server adds the hash
    received = await asyncio.wait_for(presences.get(), 5)
    assert received.get("from") == "alice@localhost/phone" and photo_hash(received) == IMAGE_ID

    directed: asyncio.Queue[Element] = asyncio.Queue()  # a directed presence (a room join...) gets it too
    carol.add_event_handler("presence_available",
                            lambda p: p["from"].bare == "alice@localhost" and directed.put_nowait(p.xml))
    carol.send_presence()
    await sync(carol)
    alice.make_presence(pto="carol@localhost").send()
    assert photo_hash(await asyncio.wait_for(directed.get(), 5)) == IMAGE_ID

    # A client saying it has no avatar right now (<photo/>) is left alone.
    no_photo = alice.make_presence()
    no_photo.append(Element(f"{{{UPDATE}}}x"))
    no_photo.xml.find(f"{{{UPDATE}}}x").append(Element(f"{{{UPDATE}}}photo"))
    no_photo.send()
    while True:
        received = await asyncio.wait_for(presences.get(), 5)
        if received.find(f"{{{UPDATE}}}x/{{{UPDATE}}}photo") is not None and not photo_hash(received):
            break
        assert photo_hash(received) == IMAGE_ID

    await publish_avatar(alice, None)  # avatar disabled: the vCard loses its photo
    assert (await get_vcard(carol, "alice@localhost")).find("{vcard-temp}PHOTO") is None


async def test_vcard_temp_and_vcard4_stay_in_step(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    await set_vcard(alice, "<FN>Alice Liddell</FN><NICKNAME>al</NICKNAME><EMAIL><INTERNET/>"
                           "<USERID>alice@example.org</USERID></EMAIL><ADR><CTRY>UK</CTRY></ADR>")
    [item] = await pep_items(alice, "alice@localhost", "urn:xmpp:vcard4")
    vcard4 = item.find(f"{{{VCARD4}}}vcard")
    assert vcard4 is not None
    assert vcard4.findtext(f"{{{VCARD4}}}fn/{{{VCARD4}}}text") == "Alice Liddell"
    assert vcard4.findtext(f"{{{VCARD4}}}email/{{{VCARD4}}}text") == "alice@example.org"

    await send_iq(alice, "set", f"<pubsub xmlns='{PUBSUB}'><publish node='urn:xmpp:vcard4'><item id='current'>"
                                f"<vcard xmlns='{VCARD4}'><fn><text>Alice</text></fn><nickname><text>ally</text>"
                                "</nickname><note><text>down the rabbit hole</text></note></vcard></item></publish>"
                                "</pubsub>")
    vcard = await get_vcard(alice, "alice@localhost")
    assert vcard.findtext("{vcard-temp}FN") == "Alice"
    assert vcard.findtext("{vcard-temp}NICKNAME") == "ally"
    assert vcard.findtext("{vcard-temp}NOTE") == "down the rabbit hole"
    assert vcard.findtext("{vcard-temp}ADR/{vcard-temp}CTRY") == "UK"  # vCard4 did not say, so it stays
    assert vcard.find("{vcard-temp}EMAIL") is None
