"""Multi-user chat (XEP-0045): rooms, joining, presence, messages, nicks, configuration and persistence,
with real slixmpp clients over sockets. The helpers here are shared by the other test_muc_* files."""

from __future__ import annotations

import asyncio
from xml.etree.ElementTree import Element

import pytest
from slixmpp import JID, ClientXMPP
from slixmpp.exceptions import IqError, PresenceError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from server.jid import JID as ServerJID
from tests.conftest import Harness
from tests.test_basic_modules import iq_error, send_iq
from tests.test_offline import collect, take
from tests.test_roster_presence import sync

SERVICE = "conference.localhost"
ROOM = f"room@{SERVICE}"
MUC_USER = "{http://jabber.org/protocol/muc#user}"
OWNER = "http://jabber.org/protocol/muc#owner"
ADMIN = "http://jabber.org/protocol/muc#admin"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
XDATA = "jabber:x:data"
BODY = "{jabber:client}body"


# --- helpers ------------------------------------------------------------------------------------------

async def user(server: Harness, name: str, resource: str = "r") -> ClientXMPP:
    """A logged-in client of a new account `name`, available, with the MUC plugin."""
    if not await server.server.storage.accounts.exists("localhost", name):
        await server.add_user(name)
    client = await server.client(f"{name}@localhost", resource=resource, plugins=("xep_0045",))
    client.send_presence()
    await sync(client)  # available before anyone sends to it, or it would go to offline storage
    return client


def presences(client: ClientXMPP) -> asyncio.Queue[Element]:
    """Queue the XML of every presence `client` receives from the MUC service."""
    queue: asyncio.Queue[Element] = asyncio.Queue()
    client.register_handler(Callback("muc presences", MatchXPath("{jabber:client}presence"),
                                     lambda p: queue.put_nowait(p.xml) if p["from"].domain == SERVICE else None))
    return queue


def statuses(el: Element) -> set[str]:
    return {s.get("code") for s in el.iterfind(f"{MUC_USER}x/{MUC_USER}status")}


def item_of(el: Element) -> dict[str, str]:
    found = el.find(f"{MUC_USER}x/{MUC_USER}item")
    assert found is not None, "no muc#user item"
    return dict(found.attrib)


async def join(client: ClientXMPP, nick: str, room: str = ROOM, **kwargs: object) -> Element:
    """Join and wait for the self-presence and subject; return the self-presence's XML."""
    pres, _, _, _ = await client.plugin["xep_0045"].join_muc_wait(JID(room), nick, timeout=5, **kwargs)
    return pres.xml


async def config_values(client: ClientXMPP, room: str = ROOM) -> dict[str, str | None]:
    """The values of the room's configuration form, as its owner gets it."""
    result = await send_iq(client, "get", f"<query xmlns='{OWNER}'/>", room)
    return {f.get("var"): f.findtext(f"{{{XDATA}}}value") for f in result.iter(f"{{{XDATA}}}field")}


async def join_error(client: ClientXMPP, nick: str, room: str = ROOM, **kwargs: object) -> str:
    with pytest.raises(PresenceError) as info:
        await join(client, nick, room, **kwargs)
    return info.value.condition


async def configure(client: ClientXMPP, room: str = ROOM, **values: str | list[str]) -> None:
    """Submit the room configuration form with the given fields (an empty form makes an instant room)."""
    fields = "".join(f"<field var='{var}'>{''.join(f'<value>{v}</value>' for v in _listed(value))}</field>"
                     for var, value in values.items())
    await send_iq(client, "set", f"<query xmlns='{OWNER}'><x xmlns='{XDATA}' type='submit'>{fields}</x></query>", room)


def _listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


async def create(client: ClientXMPP, nick: str = "owner", room: str = ROOM, **values: str | list[str]) -> Element:
    """Create a room with the MUC protocol and configure it; return the creation self-presence."""
    pres = await join(client, nick, room)
    await configure(client, room, **values)
    return pres


def groupchat(client: ClientXMPP, body: str, room: str = ROOM, **attrs: str) -> None:
    msg = client.make_message(mto=room, mbody=body, mtype="groupchat")
    for key, value in attrs.items():
        msg[key] = value
    msg.send()


async def until(queue: asyncio.Queue[Element], predicate: object, timeout: float = 5.0) -> Element:
    """The first element of `queue` that satisfies `predicate` (earlier ones are dropped)."""
    async def find() -> Element:
        while True:
            el = await queue.get()
            if predicate(el):  # type: ignore[operator]
                return el
    return await asyncio.wait_for(find(), timeout)


def error_of(el: Element) -> str | None:
    """The condition of an error stanza."""
    error = el.find("{jabber:client}error")
    if error is None:
        return None
    stanzas = "{urn:ietf:params:xml:ns:xmpp-stanzas}"
    return next(c.tag[len(stanzas):] for c in error if c.tag.startswith(stanzas) and c.tag != f"{stanzas}text")


# --- service discovery --------------------------------------------------------------------------------

async def test_the_service_is_listed_by_the_host_and_describes_itself(server: Harness) -> None:
    alice = await user(server, "alice")
    items = await send_iq(alice, "get", f"<query xmlns='{DISCO_ITEMS}'/>", "localhost")
    assert SERVICE in [i.get("jid") for i in items.iter(f"{{{DISCO_ITEMS}}}item")]
    info = await send_iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", SERVICE)
    identity = info.find(f"{{{DISCO_INFO}}}query/{{{DISCO_INFO}}}identity")
    assert (identity.get("category"), identity.get("type")) == ("conference", "text")
    features = {f.get("var") for f in info.iter(f"{{{DISCO_INFO}}}feature")}
    assert "http://jabber.org/protocol/muc" in features


# --- creating, joining, talking, leaving --------------------------------------------------------------

async def test_create_instant_room_join_talk_and_leave(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    created = await create(alice, "Alice")
    assert {"110", "201"} <= statuses(created)
    assert item_of(created)["affiliation"] == "owner" and item_of(created)["role"] == "moderator"
    alice_sees = presences(alice)
    bob_joined = await join(bob, "Bob")
    assert statuses(bob_joined) == {"110", "170"}  # archived, as every room by default
    assert item_of(bob_joined) == {"affiliation": "none", "role": "participant", "jid": "bob@localhost/r"}
    # Alice is a moderator of a semi-anonymous room, so she sees Bob's real JID.
    seen = await until(alice_sees, lambda p: p.get("from") == f"{ROOM}/Bob")
    assert item_of(seen)["jid"] == "bob@localhost/r"
    assert sorted(bob.plugin["xep_0045"].get_roster(JID(ROOM))) == ["Alice", "Bob"]

    alice_inbox, bob_inbox = collect(alice), collect(bob)
    groupchat(bob, "hello room", id="m1")
    for inbox, to in ((alice_inbox, "alice@localhost/r"), (bob_inbox, "bob@localhost/r")):
        (msg,) = await take(inbox, 1)
        assert (msg.get("to"), msg.get("from"), msg.get("type"), msg.get("id"), msg.findtext(BODY)) == \
            (to, f"{ROOM}/Bob", "groupchat", "m1", "hello room")  # serialized once, addressed to each

    bob.plugin["xep_0045"].leave_muc(JID(ROOM), "Bob", "bye")
    gone = await until(alice_sees, lambda p: p.get("type") == "unavailable")
    assert gone.get("from") == f"{ROOM}/Bob" and item_of(gone)["role"] == "none"
    assert gone.findtext("{jabber:client}status") == "bye"


async def test_a_participant_does_not_see_real_jids_in_a_semi_anonymous_room(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    bob_sees = presences(bob)
    await join(bob, "Bob")
    alice_seen = await until(bob_sees, lambda p: p.get("from") == f"{ROOM}/Alice")
    assert "jid" not in item_of(alice_seen)


async def test_non_anonymous_room_says_so_and_shows_jids_to_all(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice", **{"muc#roomconfig_whois": "anyone"})
    bob_sees = presences(bob)
    joined = await join(bob, "Bob")
    assert statuses(joined) == {"110", "100", "170"}
    alice_seen = await until(bob_sees, lambda p: p.get("from") == f"{ROOM}/Alice")
    assert item_of(alice_seen)["jid"] == "alice@localhost/r"


async def test_a_room_being_created_is_locked_until_configured(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await join(alice, "Alice")
    assert await join_error(bob, "Bob") == "item-not-found"
    assert (await config_values(alice))["muc#roomconfig_persistentroom"] == "0"
    await configure(alice, **{"muc#roomconfig_roomname": "Our room"})
    await join(bob, "Bob")
    info = await send_iq(bob, "get", f"<query xmlns='{DISCO_INFO}'/>", ROOM)
    identity = info.find(f"{{{DISCO_INFO}}}query/{{{DISCO_INFO}}}identity")
    assert identity.get("name") == "Our room"


async def test_cancelling_the_initial_configuration_destroys_the_room(server: Harness) -> None:
    alice = await user(server, "alice")
    alice_sees = presences(alice)
    await join(alice, "Alice")
    await alice.plugin["xep_0045"].cancel_config(ROOM)
    gone = await until(alice_sees, lambda p: p.get("type") == "unavailable")
    assert gone.find(f"{MUC_USER}x/{MUC_USER}destroy") is not None
    assert ROOM not in [str(j) for j in server.server.hosts["localhost"].modules["muc"].rooms]


async def test_a_client_without_the_muc_protocol_gets_an_instant_room(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    alice_sees = presences(alice)
    alice.send_presence(pto=f"{ROOM}/Alice")  # groupchat 1.0: no <x xmlns='...muc'/>
    created = await until(alice_sees, lambda p: "110" in statuses(p))
    assert "201" in statuses(created)
    await join(bob, "Bob")


async def test_a_temporary_room_goes_when_its_last_occupant_leaves(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice")
    muc = server.server.hosts["localhost"].modules["muc"]
    assert len(muc.rooms) == 1
    alice.plugin["xep_0045"].leave_muc(JID(ROOM), "Alice")
    await send_iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", SERVICE)
    assert not muc.rooms


async def test_disconnecting_leaves_the_room(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    await join(bob, "Bob")
    alice_sees = presences(alice)
    bob.abort()
    gone = await until(alice_sees, lambda p: p.get("type") == "unavailable")
    assert gone.get("from") == f"{ROOM}/Bob"


async def test_rooms_are_listed_unless_hidden(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice", room=f"open@{SERVICE}", **{"muc#roomconfig_roomname": "Open"})
    await create(alice, "Alice", room=f"secret@{SERVICE}", **{"muc#roomconfig_publicroom": "0"})
    items = await send_iq(alice, "get", f"<query xmlns='{DISCO_ITEMS}'/>", SERVICE)
    listed = [(i.get("jid"), i.get("name")) for i in items.iter(f"{{{DISCO_ITEMS}}}item")]
    assert listed == [(f"open@{SERVICE}", "Open")]
    info = await send_iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", f"secret@{SERVICE}")
    features = {f.get("var") for f in info.iter(f"{{{DISCO_INFO}}}feature")}
    assert {"muc_hidden", "muc_temporary", "muc_semianonymous", "muc_open", "muc_unsecured"} <= features


# --- nicks --------------------------------------------------------------------------------------------

async def test_nick_conflicts_and_nick_change(server: Harness) -> None:
    alice, bob, carol = await user(server, "alice"), await user(server, "bob"), await user(server, "carol")
    await create(alice, "Alice")
    await join(bob, "Bob")
    assert await join_error(carol, "alice") == "conflict"  # nicks differ only in case: the same nick
    await join(carol, "Carol")
    alice_sees, bob_sees, carol_sees = presences(alice), presences(bob), presences(carol)

    bob.send_presence(pto=f"{ROOM}/Robert")
    for queue, own in ((alice_sees, False), (bob_sees, True), (carol_sees, False)):
        old = await until(queue, lambda p: p.get("from") == f"{ROOM}/Bob")
        assert old.get("type") == "unavailable" and item_of(old)["nick"] == "Robert"
        assert statuses(old) == ({"303", "110"} if own else {"303"})
        new = await until(queue, lambda p: p.get("from") == f"{ROOM}/Robert")
        assert new.get("type") is None and item_of(new)["role"] == "participant"

    bob.send_presence(pto=f"{ROOM}/Carol")
    refused = await until(bob_sees, lambda p: p.get("type") == "error")
    assert refused.get("from") == f"{ROOM}/Carol" and error_of(refused) == "conflict"
    groupchat(bob, "still Robert")
    msg = await until(collect(carol), lambda m: m.findtext(BODY) == "still Robert")
    assert msg.get("from") == f"{ROOM}/Robert"


async def test_invalid_nicks_are_refused_and_odd_spacing_is_fixed(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    bob_sees = presences(bob)
    bob.send_presence(pto=f"{ROOM}/   ")
    refused = await until(bob_sees, lambda p: p.get("type") == "error")
    assert error_of(refused) == "jid-malformed"
    bob.send_presence(pto=ROOM)  # no nick at all
    refused = await until(bob_sees, lambda p: p.get("type") == "error")
    assert error_of(refused) == "jid-malformed"
    bob.send_presence(pto=f"{ROOM}/Bob   the  builder")
    joined = await until(bob_sees, lambda p: "110" in statuses(p))
    assert joined.get("from") == f"{ROOM}/Bob the builder" and "210" in statuses(joined)


async def test_two_sessions_share_one_nick(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    phone = await user(server, "bob", resource="phone")
    await create(alice, "Alice")
    await join(bob, "Bob")
    await join(phone, "Bob")
    assert len(server.server.hosts["localhost"].modules["muc"].rooms[ServerJID.parse(ROOM)].occupants) == 2
    inbox = collect(phone)
    groupchat(alice, "to both of bob's sessions")
    (msg,) = await take(inbox, 1)
    assert msg.findtext(BODY) == "to both of bob's sessions"
    alice_sees = presences(alice)
    phone.plugin["xep_0045"].leave_muc(JID(ROOM), "Bob")
    still = await until(alice_sees, lambda p: p.get("from") == f"{ROOM}/Bob")
    assert still.get("type") is None and item_of(still)["jid"] == "bob@localhost/r"


async def test_one_of_two_sessions_sharing_a_nick_changes_it_alone(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    phone = await user(server, "bob", resource="phone")
    await create(alice, "Alice")
    await join(bob, "Bob")
    await join(phone, "Bob")
    alice_sees, phone_sees, bob_sees = presences(alice), presences(phone), presences(bob)
    phone.send_presence(pto=f"{ROOM}/Bobby")
    gone = await until(phone_sees, lambda p: p.get("from") == f"{ROOM}/Bob")
    assert gone.get("type") == "unavailable" and {"303", "110"} <= statuses(gone)
    assert item_of(gone)["nick"] == "Bobby"
    arrived = await until(phone_sees, lambda p: p.get("from") == f"{ROOM}/Bobby")
    assert arrived.get("type") is None and "110" in statuses(arrived)
    newcomer = await until(alice_sees, lambda p: p.get("from") == f"{ROOM}/Bobby")
    assert newcomer.get("type") is None and item_of(newcomer)["jid"] == "bob@localhost/phone"
    assert await until(bob_sees, lambda p: p.get("from") == f"{ROOM}/Bobby")
    occupants = server.server.hosts["localhost"].modules["muc"].rooms[ServerJID.parse(ROOM)].occupants
    assert {o.nick: sorted(map(str, o.sessions)) for o in occupants.values()} == {
        "Alice": ["alice@localhost/r"], "Bob": ["bob@localhost/r"], "Bobby": ["bob@localhost/phone"]}
    inbox = collect(phone)
    bob.send_message(mto=ROOM, mbody="from the laptop", mtype="groupchat")
    (msg,) = await take(inbox, 1)
    assert msg.get("from") == f"{ROOM}/Bob"


# --- messages -----------------------------------------------------------------------------------------

async def test_a_message_from_a_non_occupant_is_refused_and_the_room_goes_on(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    errors = collect(bob, "error")
    groupchat(bob, "let me in")
    (error,) = await take(errors, 1)
    assert error.get("from") == ROOM and error_of(error) == "not-acceptable"
    inbox = collect(alice)
    groupchat(alice, "still here")
    (msg,) = await take(inbox, 1)
    assert msg.findtext(BODY) == "still here"


async def test_private_messages_between_occupants(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    await join(bob, "Bob")
    inbox = collect(bob)
    alice.send_message(mto=f"{ROOM}/Bob", mbody="psst", mtype="chat")
    (msg,) = await take(inbox, 1)
    assert (msg.get("from"), msg.get("type"), msg.findtext(BODY)) == (f"{ROOM}/Alice", "chat", "psst")
    assert msg.find(f"{MUC_USER}x") is not None
    errors = collect(alice, "error")
    alice.send_message(mto=f"{ROOM}/Nobody", mbody="hello?", mtype="chat")
    alice.send_message(mto=f"{ROOM}/Bob", mbody="wrong type", mtype="groupchat")
    first, second = await take(errors, 2)
    assert (error_of(first), error_of(second)) == ("item-not-found", "bad-request")


async def test_subject_is_sent_on_join_and_changed_by_moderators(server: Harness) -> None:
    alice, bob, carol = await user(server, "alice"), await user(server, "bob"), await user(server, "carol")
    await create(alice, "Alice")
    await join(bob, "Bob")
    inbox = collect(bob)
    alice.plugin["xep_0045"].set_subject(ROOM, "Today: testing")
    (msg,) = await take(inbox, 1)
    assert (msg.get("from"), msg.findtext("{jabber:client}subject")) == (f"{ROOM}/Alice", "Today: testing")
    errors = collect(bob, "error")
    bob.plugin["xep_0045"].set_subject(ROOM, "mine now")
    (error,) = await take(errors, 1)
    assert error_of(error) == "forbidden"
    _, subject, _, _ = await carol.plugin["xep_0045"].join_muc_wait(JID(ROOM), "Carol", timeout=5)
    assert subject["subject"] == "Today: testing" and subject["from"] == JID(f"{ROOM}/Alice")


# --- configuration ------------------------------------------------------------------------------------

async def test_a_config_form_with_wrong_field_types_is_not_acceptable(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice", **{"muc#roomconfig_roomname": "Before"})
    for field, value in (("muc#roomconfig_persistentroom", "maybe"), ("muc#roomconfig_maxusers", "lots"),
                         ("muc#roomconfig_whois", "everybody")):
        payload = f"<query xmlns='{OWNER}'><x xmlns='{XDATA}' type='submit'>" \
                  f"<field var='muc#roomconfig_roomname'><value>After</value></field>" \
                  f"<field var='{field}'><value>{value}</value></field></x></query>"
        condition, _ = await iq_error(alice, "set", payload, ROOM)
        assert condition == "not-acceptable"
    assert (await config_values(alice))["muc#roomconfig_roomname"] == "Before"


async def test_only_owners_configure(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    await join(bob, "Bob")
    condition, _ = await iq_error(bob, "get", f"<query xmlns='{OWNER}'/>", ROOM)
    assert condition == "forbidden"


async def test_a_config_change_is_announced(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    await join(bob, "Bob")
    inbox = collect(bob)
    await configure(alice, **{"muc#roomconfig_whois": "anyone"})
    (msg,) = await take(inbox, 1)
    assert msg.get("from") == ROOM and statuses(msg) == {"104", "172"}


async def test_rooms_need_not_exist_for_an_error(server: Harness) -> None:
    alice = await user(server, "alice")
    errors = collect(alice, "error")
    groupchat(alice, "anyone?", room=f"nowhere@{SERVICE}")
    (error,) = await take(errors, 1)
    assert error_of(error) == "item-not-found"
    with pytest.raises(IqError):
        await send_iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", f"nowhere@{SERVICE}")


async def test_only_local_users_create_rooms(server: Harness) -> None:
    await server.add_user("dave", host="example.test")
    dave = await server.client("dave@example.test", resource="r", plugins=("xep_0045",))
    assert await join_error(dave, "Dave") == "not-allowed"


# --- persistence --------------------------------------------------------------------------------------

@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_a_persistent_room_survives_a_restart(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice", **{"muc#roomconfig_persistentroom": "1", "muc#roomconfig_roomname": "Kept",
                                    "muc#roomconfig_membersonly": "1", "muc#roomconfig_whois": "anyone"})
    alice.plugin["xep_0045"].set_subject(ROOM, "still here after a restart")
    await create(alice, "Alice", room=f"temporary@{SERVICE}")
    await send_iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", ROOM)
    await server.restart()

    alice, bob = await user(server, "alice"), await user(server, "bob")
    assert await join_error(bob, "Bob") == "registration-required"  # still members-only
    joined = await join(alice, "Alice")
    assert "201" not in statuses(joined) and item_of(joined)["affiliation"] == "owner"
    config = await config_values(alice)
    assert (config["muc#roomconfig_roomname"], config["muc#roomconfig_whois"]) == ("Kept", "anyone")
    info = await send_iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", ROOM)
    subject = [f for f in info.iter(f"{{{XDATA}}}field") if f.get("var") == "muc#roominfo_subject"]
    assert subject[0].findtext(f"{{{XDATA}}}value") == "still here after a restart"
    with pytest.raises(IqError):
        await send_iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", f"temporary@{SERVICE}")


async def test_making_a_room_temporary_forgets_it(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice", **{"muc#roomconfig_persistentroom": "1"})
    muc = server.server.hosts["localhost"].modules["muc"]
    assert [r.name for r in await muc.store.rooms(SERVICE)] == ["room"]
    await configure(alice, **{"muc#roomconfig_persistentroom": "0"})
    assert await muc.store.rooms(SERVICE) == []
