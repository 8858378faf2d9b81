"""Where Parley parted ways with XEP-0045's examples (and Prosody) - issue 19, defect 9 and what a pass over
sections 7 to 10 found - each checked with real slixmpp clients over sockets."""

from __future__ import annotations

import asyncio
from xml.etree.ElementTree import Element

from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError

from tests.conftest import Harness
from tests.test_basic_modules import send_iq
from tests.test_muc import (
    BODY,
    DISCO_INFO,
    MUC_USER,
    ROOM,
    SERVICE,
    create,
    error_of,
    groupchat,
    item_of,
    join,
    join_error,
    presences,
    statuses,
    until,
    user,
)
from tests.test_muc_admin import admin, admin_error, listed, room_of_three
from tests.test_offline import collect, take
from tests.test_roster_presence import sync

MUC = "http://jabber.org/protocol/muc"
ERROR = "{jabber:client}error"
SUBJECT = "{jabber:client}subject"


def probe(client: ClientXMPP, nick: str) -> None:
    client.make_presence(pto=f"{ROOM}/{nick}", ptype="probe").send()


def rejoin(client: ClientXMPP, nick: str) -> None:
    """The join presence again, from a session already in the room (a client that lost track of it)."""
    presence = client.make_presence(pto=f"{ROOM}/{nick}")
    presence.append(Element(f"{{{MUC}}}x"))
    presence.send()


async def quiet_until_message(queue: asyncio.Queue[Element], body: str) -> list[Element]:
    """What `queue` got before the groupchat message `body`: the room sends in order, so once it arrives,
    anything sent before it has arrived too."""
    before = []
    while True:
        el = await asyncio.wait_for(queue.get(), 5)
        if el.findtext(BODY) == body:
            return before
        before.append(el)


# --- defect 9 ------------------------------------------------------------------------------------------

async def test_a_nick_change_keeps_the_occupants_role(server: Harness) -> None:
    """XEP-0045 7.6: the unavailable presence with 303 shows the role the occupant keeps, not 'none'."""
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    await join(bob, "Bob")
    alice_sees, bob_sees = presences(alice), presences(bob)
    bob.send_presence(pto=f"{ROOM}/Robert")
    for queue in (alice_sees, bob_sees):
        old = await until(queue, lambda p: p.get("from") == f"{ROOM}/Bob")
        assert old.get("type") == "unavailable" and "303" in statuses(old)
        assert item_of(old)["role"] == "participant" and item_of(old)["nick"] == "Robert"
    alice.send_presence(pto=f"{ROOM}/Alicia")
    old = await until(bob_sees, lambda p: p.get("from") == f"{ROOM}/Alice")
    assert item_of(old)["role"] == "moderator" and item_of(old)["affiliation"] == "owner"


async def test_errors_from_a_room_name_the_room_in_by(server: Harness) -> None:
    """RFC 6120 8.3.2 'by', as in every error example of XEP-0045."""
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    bob_sees = presences(bob)
    assert await join_error(bob, "Alice") == "conflict"
    refused = await until(bob_sees, lambda p: p.get("type") == "error")
    assert refused.find(ERROR).get("by") == ROOM
    try:
        await send_iq(bob, "get", "<query xmlns='http://jabber.org/protocol/muc#owner'/>", ROOM)
        raise AssertionError("a non-owner got the configuration form")
    except IqError as exc:
        assert exc.iq.xml.find(ERROR).get("by") == ROOM
    await join(bob, "Bob")
    errors = collect(bob, "error")
    bob.make_message(mto=f"{ROOM}/Nobody", mbody="hello?", mtype="chat").send()
    (error,) = await take(errors, 1)
    assert error_of(error) == "item-not-found" and error.find(ERROR).get("by") == ROOM


async def test_a_probe_of_an_occupant_gets_its_presence(server: Harness) -> None:
    alice, bob, carol = await user(server, "alice"), await user(server, "bob"), await user(server, "carol")
    await create(alice, "Alice")
    await join(bob, "Bob")
    bob_sees, carol_sees = presences(bob), presences(carol)
    probe(bob, "Alice")
    answer = await until(bob_sees, lambda p: p.get("from") == f"{ROOM}/Alice")
    assert answer.get("type") is None and answer.get("to") == "bob@localhost/r"
    assert item_of(answer) == {"affiliation": "owner", "role": "moderator"}  # no real JID: semi-anonymous
    probe(bob, "Nobody")
    gone = await until(bob_sees, lambda p: p.get("from") == f"{ROOM}/Nobody")
    assert gone.get("type") == "unavailable" and item_of(gone)["role"] == "none"
    probe(carol, "Alice")  # not in the room: may not learn who is
    refused = await until(carol_sees, lambda p: p.get("from") == f"{ROOM}/Alice")
    assert refused.get("type") == "error" and error_of(refused) == "not-acceptable"
    assert refused.find(ERROR).get("by") == ROOM


async def test_an_affiliation_change_of_someone_absent_is_announced(server: Harness) -> None:
    """XEP-0045 10.3-10.7 (and 9.1, 9.3 for those in the room): occupants who may see real JIDs learn the new
    affiliation from a message of the room, which keeps their member list (OMEMO) right."""
    alice, bob, _ = await room_of_three(server, **{"muc#roomconfig_whois": "anyone"})
    inbox = collect(bob)
    await admin(alice, {"jid": "dave@localhost", "affiliation": "member"})
    await admin(alice, {"jid": "eve@localhost", "affiliation": "outcast"}, reason="spam")
    member, banned = await take(inbox, 2)
    assert member.get("from") == ROOM and member.get("type") is None
    assert item_of(member) == {"affiliation": "member", "jid": "dave@localhost", "role": "none"}
    assert item_of(banned) == {"affiliation": "outcast", "jid": "eve@localhost", "role": "none"}
    assert banned.findtext(f"{MUC_USER}x/{MUC_USER}item/{MUC_USER}reason") == "spam"


async def test_in_a_semi_anonymous_room_only_moderators_learn_of_absent_users(server: Harness) -> None:
    alice, bob, carol = await room_of_three(server)
    await admin(alice, {"jid": "carol@localhost", "affiliation": "admin"})
    bob_inbox, carol_inbox = collect(bob), collect(carol)
    await admin(alice, {"jid": "dave@localhost", "affiliation": "member"})
    (told,) = await take(carol_inbox, 1)  # carol is a moderator now
    assert item_of(told)["jid"] == "dave@localhost"
    groupchat(alice, "after")
    assert await quiet_until_message(bob_inbox, "after") == []


# --- found in XEP-0045 7-10 ---------------------------------------------------------------------------

async def test_banning_oneself_is_a_conflict(server: Harness) -> None:
    """9.1: 'If an admin or owner attempts to ban himself, the service MUST deny the request and return a
    conflict error' - for an admin too, and an owner of a room with other owners."""
    alice, bob, _ = await room_of_three(server)
    await admin(alice, {"jid": "bob@localhost", "affiliation": "admin"})
    assert await admin_error(bob, {"jid": "bob@localhost", "affiliation": "outcast"}) == "conflict"
    await admin(alice, {"jid": "bob@localhost", "affiliation": "owner"})
    assert await admin_error(alice, {"jid": "alice@localhost", "affiliation": "outcast"}) == "conflict"


async def test_an_outcast_loses_the_nick_it_registered(server: Harness) -> None:
    """9.1: the service 'MUST remove the outcast's nickname from the list of registered nicknames'."""
    alice = await user(server, "alice")
    await create(alice, "Alice")
    await admin(alice, {"jid": "dave@localhost", "affiliation": "member", "nick": "Dave"})
    await admin(alice, {"jid": "dave@localhost", "affiliation": "outcast"})
    assert await listed(alice, affiliation="outcast") == [{"affiliation": "outcast", "jid": "dave@localhost"}]
    eve = await user(server, "eve")
    await join(eve, "Dave")


async def test_joining_again_from_a_joined_session_resynchronises_it(server: Harness) -> None:
    """7.2.1 and 17.3.3: a join presence from a session already in the room is a client that lost track, and
    gets everything a join gets: the others' presence, its own, the history and the subject."""
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    await join(bob, "Bob")
    inbox = collect(bob)
    groupchat(alice, "said before")
    await take(inbox, 1)
    bob_sees = presences(bob)
    rejoin(bob, "Bob")
    others = await until(bob_sees, lambda p: p.get("from") == f"{ROOM}/Alice")
    assert item_of(others)["role"] == "moderator"
    own = await until(bob_sees, lambda p: p.get("from") == f"{ROOM}/Bob")
    assert "110" in statuses(own)
    history, subject = await take(inbox, 2)
    assert history.findtext(BODY) == "said before" and history.find("{urn:xmpp:delay}delay") is not None
    assert subject.find(SUBJECT) is not None and subject.find(BODY) is None


async def test_the_service_and_its_rooms_say_they_reflect_message_ids(server: Harness) -> None:
    """7.4: 'muc#stable_id' on the service and on each room; the reflection keeps the sender's id."""
    alice = await user(server, "alice")
    await create(alice, "Alice")
    for jid in (SERVICE, ROOM):
        info = await send_iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", jid)
        assert f"{MUC}#stable_id" in {f.get("var") for f in info.iter(f"{{{DISCO_INFO}}}feature")}
    inbox = collect(alice)
    groupchat(alice, "mine", id="my-id-1")
    (echo,) = await take(inbox, 1)
    assert echo.get("id") == "my-id-1"


async def test_a_subject_with_a_thread_is_a_message_not_a_subject_change(server: Harness) -> None:
    """8.1: a message with a subject and a thread 'SHALL NOT be interpreted as a subject change'."""
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    await join(bob, "Bob")  # a participant, who may not change the subject
    inbox = collect(alice)
    message = bob.make_message(mto=ROOM, msubject="Re: plans", mtype="groupchat")
    message["thread"] = "t1"
    message.send()
    (got,) = await take(inbox, 1)
    assert got.get("from") == f"{ROOM}/Bob" and got.findtext(SUBJECT) == "Re: plans"
    rooms = server.server.hosts["localhost"].modules["muc"].rooms
    assert next(iter(rooms.values())).subject == ""


async def test_destroying_tells_each_occupant_only_of_its_own_departure(server: Harness) -> None:
    """10.9: the service 'SHOULD NOT broadcast presence stanzas of type unavailable from all occupants'."""
    alice, bob, _ = await room_of_three(server)
    bob_sees = presences(bob)
    await send_iq(alice, "set", "<query xmlns='http://jabber.org/protocol/muc#owner'>"
                                "<destroy><reason>done</reason></destroy></query>", ROOM)
    await sync(bob)
    got = []
    while not bob_sees.empty():
        got.append(bob_sees.get_nowait())
    assert [p.get("from") for p in got] == [f"{ROOM}/Bob"]
    assert got[0].get("type") == "unavailable" and "110" in statuses(got[0])
    assert got[0].findtext(f"{MUC_USER}x/{MUC_USER}destroy/{MUC_USER}reason") == "done"


async def test_a_refused_join_keeps_the_muc_element_and_names_the_room(server: Harness) -> None:
    """7.2.6-7.2.10: the presence error carries an empty MUC <x/> and the error is by the room."""
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    await admin(alice, {"jid": "bob@localhost", "affiliation": "outcast"})
    bob_sees = presences(bob)
    assert await join_error(bob, "Bob") == "forbidden"
    refused = await until(bob_sees, lambda p: p.get("type") == "error")
    assert refused.find(f"{{{MUC}}}x") is not None and refused.find(ERROR).get("by") == ROOM

