"""IQs between occupants and with the room: self-ping (XEP-0410), private IQs, vCards of occupants, room ping,
and removing an occupant whose client or server answers with an error."""

from __future__ import annotations

from tests.conftest import Harness
from tests.test_basic_modules import iq_error, send_iq
from tests.test_muc import DISCO_INFO, ROOM, create, join, presences, statuses, until, user

PING = "<ping xmlns='urn:xmpp:ping'/>"


async def test_self_ping_says_whether_the_client_is_still_joined(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice", **{"muc#roomconfig_persistentroom": "1"})
    await send_iq(alice, "get", PING, f"{ROOM}/Alice")
    alice.plugin["xep_0045"].leave_muc(ROOM, "Alice")
    condition, _ = await iq_error(alice, "get", PING, f"{ROOM}/Alice")
    assert condition == "not-acceptable"


async def test_self_ping_from_a_session_that_is_not_joined(server: Harness) -> None:
    alice = await user(server, "alice")
    other = await user(server, "alice", resource="other")
    await create(alice, "Alice")
    condition, _ = await iq_error(other, "get", PING, f"{ROOM}/Alice")
    assert condition == "not-acceptable"


async def test_the_room_answers_ping_and_advertises_its_extensions(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice")
    await send_iq(alice, "get", PING, ROOM)
    info = await send_iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", ROOM)
    features = {f.get("var") for f in info.iter(f"{{{DISCO_INFO}}}feature")}
    assert {"urn:xmpp:ping", "http://jabber.org/protocol/muc#self-ping-optimization", "urn:xmpp:occupant-id:0",
            "urn:xmpp:sid:0", "urn:xmpp:message-retract:1", "urn:xmpp:message-moderate:1"} <= features


async def test_private_iq_between_occupants(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    await join(bob, "Bob")
    result = await send_iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", f"{ROOM}/Bob")
    assert result.get("from") == f"{ROOM}/Bob"
    assert result.find(f"{{{DISCO_INFO}}}query") is not None
    condition, _ = await iq_error(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", f"{ROOM}/Nobody")
    assert condition == "item-not-found"
    carol = await user(server, "carol")
    condition, _ = await iq_error(carol, "get", f"<query xmlns='{DISCO_INFO}'/>", f"{ROOM}/Bob")
    assert condition == "not-acceptable"


async def test_the_vcard_of_an_occupant_comes_from_its_account(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await send_iq(bob, "set", "<vCard xmlns='vcard-temp'><FN>Bob the Builder</FN></vCard>")
    await create(alice, "Alice")
    await join(bob, "Bob")
    card = await send_iq(alice, "get", "<vCard xmlns='vcard-temp'/>", f"{ROOM}/Bob")
    assert card.get("from") == f"{ROOM}/Bob"
    assert card.findtext("{vcard-temp}vCard/{vcard-temp}FN") == "Bob the Builder"


async def test_an_error_from_an_occupant_removes_it(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    await join(bob, "Bob")
    alice_sees = presences(alice)
    bob.send_raw(f"<presence type='error' to='{ROOM}/Bob'><error type='cancel'>"
                 "<remote-server-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></presence>")
    gone = await until(alice_sees, lambda p: p.get("type") == "unavailable")
    assert gone.get("from") == f"{ROOM}/Bob" and statuses(gone) == {"333"}
