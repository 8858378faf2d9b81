"""Every room is archived (issue 19, defects 5 and 6): temporary rooms too, as Prosody and ejabberd do, so that
Gajim - which joins with maxchars='0' and catches up from the room's archive - shows their discussion; the
archive keeps what users' archives keep (reactions, markers, retractions and other fastenings, store hints),
one rule for both (server/archiving.py); and a temporary room's archive goes with the room."""

from __future__ import annotations

from datetime import UTC, datetime
from xml.etree.ElementTree import Element, fromstring

import pytest
from slixmpp import JID, ClientXMPP

from server.archiving import worth_archiving
from server.jid import JID as ServerJID
from server.storage.archive import ArchiveFilter, NewMessage
from tests.conftest import Harness
from tests.test_basic_modules import send_iq, wait_for
from tests.test_mam import Archive, chat
from tests.test_muc import BODY, ROOM, config_values, configure, create, join, user
from tests.test_muc_history import mam_page, statuses_of
from tests.test_offline import collect, take
from tests.test_roster_presence import sync

MAM = "urn:xmpp:mam:2"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
SERVICE = "conference.localhost"


def muc(server: Harness) -> object:
    return server.server.hosts["localhost"].modules["muc"]


async def features(client: ClientXMPP, room: str = ROOM) -> set[str]:
    info = await send_iq(client, "get", f"<query xmlns='{DISCO_INFO}'/>", room)
    return {f.get("var") for f in info.iter(f"{{{DISCO_INFO}}}feature")}


def say(client: ClientXMPP, body: str | None, *extra: str) -> None:
    msg = client.make_message(mto=ROOM, mbody=body, mtype="groupchat")
    for xml in extra:
        msg.append(fromstring(xml))
    msg.send()


async def stored(server: Harness, name: str = "room") -> list[str]:
    """The serialized messages in the archive of room `name`, read from storage."""
    page = await server.server.storage.archive.query(SERVICE, name, ArchiveFilter(), 100)
    return [m.stanza_xml for m in page.messages]


# --- defect 5: temporary rooms are archived ----------------------------------------------------------

async def test_a_temporary_room_is_archived_for_clients_that_catch_up_from_the_archive(server: Harness) -> None:
    """Profanity's instant room (persistent is off by default); Gajim joins without history and reads MAM."""
    alice = await user(server, "alice")
    await create(alice, "Alice")
    assert MAM in await features(alice)
    inbox = collect(alice)
    say(alice, "before gajim came")
    await take(inbox, 1)
    gajim = await user(server, "gajim")
    pres, _, _, history = await gajim.plugin["xep_0045"].join_muc_wait(JID(ROOM), "Gajim", timeout=5, maxchars=0)
    assert "170" in statuses_of(pres.xml) and history == []
    page, fin = await mam_page(gajim)
    assert [m.findtext(BODY) for m in page] == ["before gajim came"] and fin.get("complete") == "true"


async def test_a_temporary_room_takes_its_archive_along_when_the_last_occupant_leaves(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice")
    inbox = collect(alice)
    say(alice, "soon forgotten")
    await take(inbox, 1)
    service = muc(server)
    await service.rooms[ServerJID.parse(ROOM)].recorder.flush()
    assert len(await stored(server)) == 1
    alice.plugin["xep_0045"].leave_muc(ROOM, "Alice")
    await wait_for(lambda: _gone(service))
    assert await stored(server) == []
    await create(alice, "Alice")  # a new room of the same name starts with nothing
    page, _ = await mam_page(alice)
    assert page == []


async def _gone(service: object) -> bool:
    return ServerJID.parse(ROOM) not in service.rooms and not service.clearing  # type: ignore[attr-defined]


async def test_a_new_room_does_not_inherit_what_an_earlier_one_of_its_name_left(server: Harness) -> None:
    """A temporary room's archive left behind by a server that stopped while the room existed."""
    leftover = "<message xmlns='jabber:client' from='room@conference.localhost/Eve' type='groupchat'>" \
               "<body>not yours</body></message>"
    await server.server.storage.archive.append_many(SERVICE, "room", [
        NewMessage("old-1", datetime.now(UTC), ROOM, "Eve", "not yours", leftover)])
    alice = await user(server, "alice")
    await create(alice, "Alice")
    inbox = collect(alice)
    say(alice, "fresh start")
    await take(inbox, 1)
    page, _ = await mam_page(alice)
    assert [m.findtext(BODY) for m in page] == ["fresh start"]


async def test_archiving_is_an_owner_choice_per_room(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice")
    assert (await config_values(alice))["muc#roomconfig_enablearchiving"] == "1"
    bob = await user(server, "bob")
    await join(bob, "Bob")
    notices = collect(bob)
    await configure(alice, **{"muc#roomconfig_enablearchiving": "0"})
    (notice,) = await take(notices, 1)
    assert statuses_of(notice) == {"104", "171"}
    assert MAM not in await features(bob)
    await configure(alice, mam="1")  # ejabberd's name for the field is understood too
    assert MAM in await features(bob)


@pytest.mark.parley_config(module_options={"muc": {"archive": False}})
async def test_a_service_can_leave_new_rooms_unarchived(server: Harness) -> None:
    alice = await user(server, "alice")
    created = await create(alice, "Alice")
    assert "170" not in statuses_of(created)
    assert MAM not in await features(alice)
    assert (await config_values(alice))["muc#roomconfig_enablearchiving"] == "0"
    inbox = collect(alice)
    say(alice, "off the record")
    await take(inbox, 1)
    await sync(alice)
    assert await stored(server) == []


# --- defect 6: what the room's archive keeps ---------------------------------------------------------

REACTIONS = "<reactions xmlns='urn:xmpp:reactions:0' id='{id}'><reaction>👍</reaction></reactions>"
STORE = "<store xmlns='urn:xmpp:hints'/>"


async def test_the_room_archive_keeps_reactions_markers_and_retractions(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice")
    inbox = collect(alice)
    say(alice, "hello")
    (hello,) = await take(inbox, 1)
    uid = hello.find("{urn:xmpp:sid:0}stanza-id").get("id")
    say(alice, None, REACTIONS.format(id=uid), STORE)
    say(alice, None, REACTIONS.format(id=uid))  # Conversations and Dino send no hint
    say(alice, None, f"<displayed xmlns='urn:xmpp:chat-markers:0' id='{uid}'/>", STORE)
    say(alice, None, f"<apply-to xmlns='urn:xmpp:fasten:0' id='{uid}'>"
                     "<retract xmlns='urn:xmpp:message-retract:0'/></apply-to>")
    say(alice, "secret", "<no-store xmlns='urn:xmpp:hints'/>")
    say(alice, None, REACTIONS.format(id=uid), "<no-permanent-store xmlns='urn:xmpp:hints'/>")
    say(alice, None, "<composing xmlns='http://jabber.org/protocol/chatstates'/>")
    await take(inbox, 7)
    page, _ = await mam_page(alice)
    kinds = [[child.tag for child in m if child.tag.split("}")[0] not in ("{urn:xmpp:sid:0", "{urn:xmpp:occupant-id:0")]
             for m in page]
    assert kinds == [
        [BODY],
        ["{urn:xmpp:reactions:0}reactions", "{urn:xmpp:hints}store"],
        ["{urn:xmpp:reactions:0}reactions"],
        ["{urn:xmpp:chat-markers:0}displayed", "{urn:xmpp:hints}store"],
        ["{urn:xmpp:fasten:0}apply-to"],
    ]


async def test_a_reaction_in_a_chat_is_archived_by_the_same_rule(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    alice = await server.client("alice@localhost", resource="phone")
    bob = await server.client("bob@localhost", resource="desk")
    chat(bob, "alice@localhost", None, REACTIONS.format(id="m1"))
    chat(bob, "alice@localhost", None, "<displayed xmlns='urn:xmpp:chat-markers:0' id='m1'/>")
    await sync(bob)
    results, fin = await Archive(alice).query()
    assert fin["count"] == 2 and [r.body for r in results] == [None, None]


def _message(*children: str) -> Element:
    return fromstring(f"<message xmlns='jabber:client'>{''.join(children)}</message>")


def test_the_rule() -> None:
    assert worth_archiving(_message("<body>hi</body>"))
    assert worth_archiving(_message(STORE))
    assert worth_archiving(_message(REACTIONS.format(id="x")))
    assert worth_archiving(_message("<received xmlns='urn:xmpp:chat-markers:0' id='x'/>"))
    assert worth_archiving(_message("<retract xmlns='urn:xmpp:message-retract:1' id='x'/>"))
    assert worth_archiving(_message("<apply-to xmlns='urn:xmpp:fasten:0' id='x'/>"))
    assert not worth_archiving(_message("<body>hi</body>", "<no-store xmlns='urn:xmpp:hints'/>"))
    assert not worth_archiving(_message(STORE, "<no-permanent-store xmlns='urn:xmpp:hints'/>"))
    assert not worth_archiving(_message("<active xmlns='http://jabber.org/protocol/chatstates'/>"))
    assert not worth_archiving(_message("<markable xmlns='urn:xmpp:chat-markers:0'/>"))
