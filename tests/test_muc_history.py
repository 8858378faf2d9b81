"""Multi-user chat history and message lifecycle: discussion history on join with each XEP-0045 limit,
stanza-ids, occupant ids (XEP-0421), retraction (XEP-0424) and moderation (XEP-0425)."""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import UTC, datetime, timedelta
from xml.etree.ElementTree import Element, fromstring

import pytest
from slixmpp import JID, ClientXMPP

from extensions.muc.history import Entry
from server.jid import JID as ServerJID
from server.stream.writer import serialize
from tests.conftest import Harness
from tests.test_basic_modules import iq_error, send_iq
from tests.test_muc import BODY, ROOM, configure, create, error_of, groupchat, join, user
from tests.test_offline import collect, take

DELAY = "{urn:xmpp:delay}delay"
STANZA_ID = "{urn:xmpp:sid:0}stanza-id"
OCCUPANT_ID = "{urn:xmpp:occupant-id:0}occupant-id"
RETRACT = "urn:xmpp:message-retract:1"
MODERATE = "urn:xmpp:message-moderate:1"


def room_of(server: Harness) -> object:
    return server.server.hosts["localhost"].modules["muc"].rooms[ServerJID.parse(ROOM)]


async def talk(server: Harness, *bodies: str) -> ClientXMPP:
    """alice creates a persistent (so archived) room and says each body; returns alice once the room has them all."""
    alice = await user(server, "alice")
    await create(alice, "Alice", **{"muc#roomconfig_persistentroom": "1"})
    inbox = collect(alice)
    for body in bodies:
        groupchat(alice, body)
    await take(inbox, len(bodies))
    return alice


async def history(client: ClientXMPP, **limits: object) -> list[Element]:
    _, _, _, messages = await client.plugin["xep_0045"].join_muc_wait(JID(ROOM), "Bob", timeout=5, **limits)
    return [m.xml for m in messages]


def bodies(messages: list[Element]) -> list[str | None]:
    return [m.findtext(BODY) for m in messages]


async def test_history_on_join_is_stamped_and_limited_by_maxstanzas(server: Harness) -> None:
    await talk(server, "one", "two", "three")
    bob = await user(server, "bob")
    got = await history(bob, maxstanzas=2)
    assert bodies(got) == ["two", "three"]
    for message in got:
        assert message.get("from") == f"{ROOM}/Alice" and message.get("type") == "groupchat"
        assert message.find(DELAY).get("from") == ROOM
        assert message.find(STANZA_ID).get("by") == ROOM and message.find(OCCUPANT_ID) is not None


async def test_history_without_limits_is_what_the_room_keeps(server: Harness) -> None:
    alice = await talk(server, "one", "two", "three")
    bob = await user(server, "bob")
    assert bodies(await history(bob)) == ["one", "two", "three"]
    bob.plugin["xep_0045"].leave_muc(JID(ROOM), "Bob")
    await configure(alice, **{"muc#maxhistoryfetch": "2"})
    assert bodies(await history(bob)) == ["two", "three"]


async def test_history_limited_by_maxchars(server: Harness) -> None:
    await talk(server, "one", "two", "three")
    last = room_of(server).history.select(None, datetime.now(UTC))[-1]
    bob = await user(server, "bob")
    assert bodies(await history(bob, maxchars=0)) == []
    bob.plugin["xep_0045"].leave_muc(JID(ROOM), "Bob")
    assert bodies(await history(bob, maxchars=len(serialize(last)) + 5)) == ["three"]


async def test_history_limited_by_seconds_and_since(server: Harness) -> None:
    await talk(server, "old", "new", "newer")
    room = room_of(server)
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    first, *rest = room.history.entries
    room.history.entries = deque([Entry(hour_ago, first.el), *rest], maxlen=room.history.entries.maxlen)
    bob = await user(server, "bob")
    assert bodies(await history(bob, seconds=600)) == ["new", "newer"]
    bob.plugin["xep_0045"].leave_muc(JID(ROOM), "Bob")
    assert bodies(await history(bob, since=hour_ago - timedelta(minutes=1))) == ["old", "new", "newer"]
    bob.plugin["xep_0045"].leave_muc(JID(ROOM), "Bob")
    assert bodies(await history(bob, since=hour_ago + timedelta(minutes=1))) == ["new", "newer"]


async def test_occupant_ids_are_stable_across_nicks_and_not_forgeable(server: Harness) -> None:
    alice = await talk(server)
    bob = await user(server, "bob")
    await join(bob, "Bob")
    inbox = collect(alice)
    msg = bob.make_message(mto=ROOM, mbody="hi", mtype="groupchat")
    msg.append(Element(OCCUPANT_ID, {"id": "forged"}))
    msg.send()
    (first,) = await take(inbox, 1)
    ids = [o.get("id") for o in first.iter(OCCUPANT_ID)]
    assert len(ids) == 1 and ids[0] != "forged"
    bob.send_presence(pto=f"{ROOM}/Robert")
    groupchat(bob, "renamed")
    (second,) = await take(inbox, 1)
    assert second.get("from") == f"{ROOM}/Robert" and second.find(OCCUPANT_ID).get("id") == ids[0]


async def test_retracting_ones_own_message(server: Harness) -> None:
    alice = await talk(server, "oops")
    original = room_of(server).history.entries[-1].el.find(STANZA_ID).get("id")
    bob = await user(server, "bob")
    await join(bob, "Bob")
    errors = collect(bob, "error")
    retraction = f"<retract xmlns='{RETRACT}' id='{original}'/>"
    _groupchat_with(bob, "This person attempted to retract a previous message", retraction)
    assert error_of((await take(errors, 1))[0]) == "forbidden"  # not bob's message

    inbox = collect(bob)
    _groupchat_with(alice, "This person attempted to retract a previous message", retraction)
    (reflected,) = await take(inbox, 1)
    assert reflected.find(f"{{{RETRACT}}}retract").get("id") == original
    carol = await user(server, "carol")
    late = collect(carol)
    await join(carol, "Carol")
    tombstone, fallback, _ = await take(late, 3)  # the subject comes last
    assert tombstone.find(STANZA_ID).get("id") == original and tombstone.find(BODY) is None
    assert tombstone.find(f"{{{RETRACT}}}retracted") is not None
    assert fallback.find(f"{{{RETRACT}}}retract").get("id") == original


def _groupchat_with(client: ClientXMPP, body: str, *extra: str) -> None:
    msg = client.make_message(mto=ROOM, mbody=body, mtype="groupchat")
    for xml in extra:
        msg.append(fromstring(xml))
    msg.send()


async def test_a_moderator_retracts_a_message(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice")
    bob = await user(server, "bob")
    await join(bob, "Bob")
    inbox = collect(alice)
    groupchat(bob, "spam spam spam")
    (spam,) = await take(inbox, 1)
    uid = spam.find(STANZA_ID).get("id")
    request = f"<moderate xmlns='{MODERATE}' id='{uid}'><retract xmlns='{RETRACT}'/><reason>spam</reason></moderate>"
    condition, _ = await iq_error(bob, "set", request, ROOM)
    assert condition == "forbidden"
    condition, _ = await iq_error(alice, "set", request.replace(uid, "no-such-id"), ROOM)
    assert condition == "item-not-found"
    bob_inbox = collect(bob)
    await send_iq(alice, "set", request, ROOM)
    (notice,) = await take(bob_inbox, 1)
    assert notice.get("from") == ROOM
    retract = notice.find(f"{{{RETRACT}}}retract")
    assert retract.get("id") == uid and retract.findtext(f"{{{RETRACT}}}reason") == "spam"
    assert retract.find(f"{{{MODERATE}}}moderated").get("by") == f"{ROOM}/Alice"
    stone = room_of(server).history.find(uid)
    assert stone.find(BODY) is None and stone.find(f"{{{RETRACT}}}retracted/{{{MODERATE}}}moderated") is not None


# --- the room's archive (XEP-0313 on the room JID) ---------------------------------------------------

MAM = "urn:xmpp:mam:2"
RSM = "http://jabber.org/protocol/rsm"
FORWARDED = "{urn:xmpp:forward:0}forwarded/{jabber:client}message"


async def mam_page(client: ClientXMPP, query: str = "", rsm: str = "") -> tuple[list[Element], Element]:
    """The forwarded messages and the <fin/> of one query of the room's archive."""
    results = collect(client)
    paging = f"<set xmlns='{RSM}'>{rsm}</set>" if rsm else ""
    fin = await send_iq(client, "set", f"<query xmlns='{MAM}' queryid='q'>{query}{paging}</query>", ROOM)
    fin_el = fin.find(f"{{{MAM}}}fin")
    count = len(list(fin_el.iter(f"{{{RSM}}}last")))
    messages = []
    if count:
        last = fin_el.findtext(f"{{{RSM}}}set/{{{RSM}}}last")
        while True:
            message = await asyncio.wait_for(results.get(), 5)
            result = message.find(f"{{{MAM}}}result")
            if result is None:
                continue
            assert message.get("from") == ROOM and result.get("queryid") == "q"
            messages.append(result.find(FORWARDED))
            if result.get("id") == last:
                break
    return messages, fin_el


async def test_the_room_archive_pages_through_the_discussion(server: Harness) -> None:
    alice = await talk(server, "one", "two", "three", "four", "five")
    bob = await user(server, "bob")
    await join(bob, "Bob")
    info = await send_iq(bob, "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>", ROOM)
    assert MAM in {f.get("var") for f in info.iter("{http://jabber.org/protocol/disco#info}feature")}
    page, fin = await mam_page(bob, rsm="<max>2</max>")
    assert bodies(page) == ["one", "two"] and fin.get("complete") is None
    assert page[0].get("from") == f"{ROOM}/Alice" and page[0].find(STANZA_ID).get("by") == ROOM
    last = fin.findtext(f"{{{RSM}}}set/{{{RSM}}}last")
    page, fin = await mam_page(bob, rsm=f"<max>10</max><after>{last}</after>")
    assert bodies(page) == ["three", "four", "five"] and fin.get("complete") == "true"
    page, _ = await mam_page(bob, rsm="<max>1</max><before/>")
    assert bodies(page) == ["five"]
    with_alice = f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>{MAM}</value></field>" \
                 f"<field var='with'><value>{ROOM}/Alice</value></field></x>"
    page, _ = await mam_page(alice, with_alice)
    assert len(page) == 5


async def test_who_may_read_the_archive(server: Harness) -> None:
    alice = await talk(server, "members only")
    await configure(alice, **{"muc#roomconfig_membersonly": "1"})
    bob = await user(server, "bob")
    condition, _ = await iq_error(bob, "set", f"<query xmlns='{MAM}'/>", ROOM)
    assert condition == "forbidden"
    await send_iq(alice, "set", "<query xmlns='http://jabber.org/protocol/muc#admin'>"
                                "<item jid='bob@localhost' affiliation='member'/></query>", ROOM)
    page, _ = await mam_page(bob)  # a member reads it without joining
    assert bodies(page) == ["members only"]


async def test_unarchived_rooms(server: Harness) -> None:
    """Archiving is on unless the room's 'mam' field turns it off (temporary rooms: test_muc_archive_all.py)."""
    alice = await talk(server)
    bob = await user(server, "bob")
    joined = await join(bob, "Bob")
    assert "170" in statuses_of(joined)
    notices = collect(bob)
    await configure(alice, **{"mam": "0"})
    (notice,) = await take(notices, 1)
    assert statuses_of(notice) == {"104", "171"}
    groupchat(alice, "off the record")
    await take(notices, 1)
    page, _ = await mam_page(bob)
    assert page == []


def statuses_of(el: Element) -> set[str]:
    return {s.get("code") for s in el.iter("{http://jabber.org/protocol/muc#user}status")}


async def test_a_destroyed_room_takes_its_archive_along(server: Harness) -> None:
    alice = await talk(server, "gone with the room")
    await alice.plugin["xep_0045"].destroy(ROOM)
    await create(alice, "Alice", **{"muc#roomconfig_persistentroom": "1"})
    page, _ = await mam_page(alice)
    assert page == []
    assert bodies(await history(await user(server, "bob"))) == []


async def test_moderated_messages_leave_the_archive(server: Harness) -> None:
    alice = await talk(server, "keep this", "remove this secret")
    uid = room_of(server).history.entries[-1].el.find(STANZA_ID).get("id")
    await send_iq(alice, "set", f"<moderate xmlns='{MODERATE}' id='{uid}'><retract xmlns='{RETRACT}'/></moderate>",
                  ROOM)
    page, _ = await mam_page(alice)
    assert bodies(page) == ["keep this", None, None]  # the tombstone, then the moderation notice
    assert page[1].find(f"{{{RETRACT}}}retracted") is not None
    assert page[2].find(f"{{{RETRACT}}}retract").get("id") == uid
    search = f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>{MAM}</value></field>" \
             f"<field var='{{urn:xmpp:fulltext:0}}fulltext'><value>secret</value></field></x>"
    page, _ = await mam_page(alice, search)
    assert page == []


async def test_an_old_message_is_retracted_through_the_archive(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice", **{"muc#maxhistoryfetch": "1", "muc#roomconfig_persistentroom": "1"})
    inbox = collect(alice)
    groupchat(alice, "old news")
    groupchat(alice, "newer")
    first, _ = await take(inbox, 2)
    uid = first.find(STANZA_ID).get("id")
    assert room_of(server).history.find(uid) is None
    _groupchat_with(alice, "retracted", f"<retract xmlns='{RETRACT}' id='{uid}'/>")
    await take(inbox, 1)
    page, _ = await mam_page(alice)
    assert bodies(page) == [None, "newer", "retracted"]


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_history_of_a_persistent_room_survives_a_restart(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice", **{"muc#roomconfig_persistentroom": "1"})
    inbox = collect(alice)
    for body in ("before", "the", "restart"):
        groupchat(alice, body)
    await take(inbox, 3)
    await server.restart()
    bob = await user(server, "bob")
    got = await history(bob)
    assert bodies(got) == ["before", "the", "restart"]
    assert all(m.find(STANZA_ID).get("by") == ROOM for m in got)
