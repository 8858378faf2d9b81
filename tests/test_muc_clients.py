"""Group chat with a second client library: aioxmpp's MUC client joins a room made by slixmpp, talks, is
given voice, changes nick and leaves; plus the room's vCard avatar and registered nicknames."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import aioxmpp
import aioxmpp.muc

from tests.conftest import Harness
from tests.test_aioxmpp import aioxmpp_client
from tests.test_basic_modules import iq_error, send_iq
from tests.test_muc import (
    BODY,
    DISCO_INFO,
    ROOM,
    XDATA,
    configure,
    create,
    groupchat,
    item_of,
    join,
    join_error,
    presences,
    until,
    user,
)
from tests.test_offline import collect, take

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJ"
                       "RU5ErkJggg==")


async def test_an_aioxmpp_client_takes_part(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice", **{"muc#roomconfig_moderatedroom": "1"})
    await server.add_user("bob")
    bob = aioxmpp_client(server, "bob@localhost", direct=False)
    async with bob.connected():
        muc = bob.summon(aioxmpp.muc.MUCClient)
        room, future = muc.join(aioxmpp.JID.fromstr(ROOM), "Bob")
        await asyncio.wait_for(future, 5)
        assert {o.nick for o in room.members} == {"Alice", "Bob"}
        assert room.me.role == "visitor"
        voiced = asyncio.get_running_loop().create_future()
        room.on_muc_role_changed.connect(lambda presence, member, **kwargs: voiced.set_result(member.role)
                                         if member is room.me and not voiced.done() else None)
        await send_iq(alice, "set", "<query xmlns='http://jabber.org/protocol/muc#admin'>"
                                    "<item nick='Bob' role='participant'/></query>", ROOM)
        assert await asyncio.wait_for(voiced, 5) == "participant"

        heard = collect(alice)
        msg = aioxmpp.Message(type_=aioxmpp.MessageType.GROUPCHAT, to=aioxmpp.JID.fromstr(ROOM))
        msg.body[None] = "hello from aioxmpp"
        await room.send_message(msg)
        (got,) = await take(heard, 1)
        assert (got.get("from"), got.findtext(BODY)) == (f"{ROOM}/Bob", "hello from aioxmpp")

        said: asyncio.Queue = asyncio.Queue()
        room.on_message.connect(lambda message, member, source, **kwargs: said.put_nowait((message, member)))
        groupchat(alice, "hello from slixmpp")
        while True:  # bob's own message, reflected, may come first
            message, member = await asyncio.wait_for(said.get(), 5)
            if member is not room.me:
                break
        assert (message.body.any(), member.nick) == ("hello from slixmpp", "Alice")

        alice_sees = presences(alice)
        await asyncio.wait_for(room.set_nick("Robert"), 5)
        renamed = await until(alice_sees, lambda p: p.get("from") == f"{ROOM}/Robert")
        assert item_of(renamed)["role"] == "participant"
        await asyncio.wait_for(room.leave(), 5)
        gone = await until(alice_sees, lambda p: p.get("type") == "unavailable")
        assert gone.get("from") == f"{ROOM}/Robert"


async def test_the_room_avatar(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice", **{"muc#roomconfig_persistentroom": "1"})
    await join(bob, "Bob")
    card = f"<vCard xmlns='vcard-temp'><PHOTO><TYPE>image/png</TYPE><BINVAL>{base64.b64encode(PNG).decode()}" \
           "</BINVAL></PHOTO></vCard>"
    condition, _ = await iq_error(bob, "set", card, ROOM)
    assert condition == "forbidden"
    notices = collect(bob)
    await send_iq(alice, "set", card, ROOM)
    (notice,) = await take(notices, 1)
    assert notice.get("from") == ROOM
    got = await send_iq(bob, "get", "<vCard xmlns='vcard-temp'/>", ROOM)
    assert base64.b64decode(got.findtext("{vcard-temp}vCard/{vcard-temp}PHOTO/{vcard-temp}BINVAL")) == PNG
    info = await send_iq(bob, "get", f"<query xmlns='{DISCO_INFO}'/>", ROOM)
    assert "vcard-temp" in {f.get("var") for f in info.iter(f"{{{DISCO_INFO}}}feature")}
    fields = {f.get("var"): f.findtext(f"{{{XDATA}}}value") for f in info.iter(f"{{{XDATA}}}field")}
    assert fields["muc#roominfo_avatarhash"] == hashlib.sha1(PNG).hexdigest()
    await server.restart()
    carol = await user(server, "carol")
    info = await send_iq(carol, "get", f"<query xmlns='{DISCO_INFO}'/>", ROOM)
    fields = {f.get("var"): f.findtext(f"{{{XDATA}}}value") for f in info.iter(f"{{{XDATA}}}field")}
    assert fields["muc#roominfo_avatarhash"] == hashlib.sha1(PNG).hexdigest()
    alice = await user(server, "alice")
    await send_iq(alice, "set", "<vCard xmlns='vcard-temp'/>", ROOM)
    info = await send_iq(carol, "get", f"<query xmlns='{DISCO_INFO}'/>", ROOM)
    assert "muc#roominfo_avatarhash" not in {f.get("var") for f in info.iter(f"{{{XDATA}}}field")}


REGISTER = "jabber:iq:register"


def registration(nick: str) -> str:
    return f"<query xmlns='{REGISTER}'><x xmlns='{XDATA}' type='submit'>" \
           f"<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field>" \
           f"<field var='muc#register_roomnick'><value>{nick}</value></field></x></query>"


async def test_registering_a_nickname(server: Harness) -> None:
    alice, bob, carol = await user(server, "alice"), await user(server, "bob"), await user(server, "carol")
    await create(alice, "Alice")
    form = await send_iq(bob, "get", f"<query xmlns='{REGISTER}'/>", ROOM)
    assert "muc#register_roomnick" in {f.get("var") for f in form.iter(f"{{{XDATA}}}field")}
    await send_iq(bob, "set", registration("Bobby"), ROOM)
    registered = await send_iq(bob, "get", f"<query xmlns='{REGISTER}'/>", ROOM)
    assert registered.findtext(f"{{{REGISTER}}}query/{{{REGISTER}}}username") == "Bobby"
    node = await send_iq(bob, "get", f"<query xmlns='{DISCO_INFO}' node='x-roomuser-item'/>", ROOM)
    identity = node.find(f"{{{DISCO_INFO}}}query/{{{DISCO_INFO}}}identity")
    assert identity.get("name") == "Bobby"
    condition, _ = await iq_error(carol, "set", registration("bobby"), ROOM)
    assert condition == "conflict"
    assert await join_error(carol, "Bobby") == "conflict"
    joined = await join(bob, "Bobby")
    assert item_of(joined)["affiliation"] == "member"
    await send_iq(bob, "set", f"<query xmlns='{REGISTER}'><remove/></query>", ROOM)
    await configure(alice, **{"muc#roomconfig_membersonly": "1"})
    condition, _ = await iq_error(carol, "set", registration("Carol"), ROOM)
    assert condition == "not-allowed"
