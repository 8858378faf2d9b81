"""Multi-user chat roles and affiliations (XEP-0045 8-10): kick, ban, voice, membership, admins and owners,
members-only, password-protected, moderated and full rooms, destroy, invitations and voice requests."""

from __future__ import annotations

from xml.etree.ElementTree import Element, SubElement, fromstring

import pytest
from slixmpp import JID, ClientXMPP

from tests.conftest import Harness
from tests.test_basic_modules import iq_error, send_iq
from tests.test_muc import (
    ADMIN,
    BODY,
    MUC_USER,
    ROOM,
    XDATA,
    configure,
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
from tests.test_offline import collect, take


def items(*attrs: dict[str, str], reason: str | None = None) -> str:
    """A muc#admin query with one item per attribute set."""
    body = "".join(
        "<item " + " ".join(f"{k}='{v}'" for k, v in a.items()) + ">" + (f"<reason>{reason}</reason>" if reason else "")
        + "</item>" for a in attrs)
    return f"<query xmlns='{ADMIN}'>{body}</query>"


async def admin(client: ClientXMPP, *attrs: dict[str, str], reason: str | None = None) -> None:
    await send_iq(client, "set", items(*attrs, reason=reason), ROOM)


async def admin_error(client: ClientXMPP, *attrs: dict[str, str]) -> str:
    condition, _ = await iq_error(client, "set", items(*attrs), ROOM)
    return condition


async def listed(client: ClientXMPP, **query: str) -> list[dict[str, str]]:
    result = await send_iq(client, "get", items(query), ROOM)
    return [dict(i.attrib) for i in result.iter(f"{{{ADMIN}}}item")]


async def room_of_three(server: Harness, **config: str) -> tuple[ClientXMPP, ClientXMPP, ClientXMPP]:
    """alice owns the room, bob and carol are in it."""
    alice, bob, carol = await user(server, "alice"), await user(server, "bob"), await user(server, "carol")
    await create(alice, "Alice", **config)
    await join(bob, "Bob")
    await join(carol, "Carol")
    return alice, bob, carol


# --- roles --------------------------------------------------------------------------------------------

async def test_kick(server: Harness) -> None:
    alice, bob, carol = await room_of_three(server)
    bob_sees, carol_sees = presences(bob), presences(carol)
    await admin(alice, {"nick": "Bob", "role": "none"}, reason="be nice")
    own = await until(bob_sees, lambda p: p.get("type") == "unavailable")
    assert statuses(own) == {"307", "110"}
    kicked = own.find(f"{MUC_USER}x/{MUC_USER}item")
    assert kicked.find(f"{MUC_USER}actor").get("nick") == "Alice" and kicked.findtext(f"{MUC_USER}reason") == "be nice"
    seen = await until(carol_sees, lambda p: p.get("type") == "unavailable")
    assert (seen.get("from"), statuses(seen)) == (f"{ROOM}/Bob", {"307"})
    errors = collect(bob, "error")
    groupchat(bob, "am I still here?")
    assert error_of((await take(errors, 1))[0]) == "not-acceptable"
    await join(bob, "Bob")  # a kick is not a ban


async def test_who_may_kick_whom(server: Harness) -> None:
    alice, bob, _ = await room_of_three(server)
    assert await admin_error(bob, {"nick": "Carol", "role": "none"}) == "forbidden"  # bob is a participant
    await admin(alice, {"jid": "bob@localhost", "affiliation": "admin"})
    assert await admin_error(bob, {"nick": "Alice", "role": "none"}) == "not-allowed"  # an owner
    await admin(alice, {"jid": "carol@localhost", "affiliation": "admin"})
    assert await admin_error(bob, {"nick": "Carol", "role": "none"}) == "not-allowed"  # an admin
    assert await admin_error(alice, {"nick": "Nobody", "role": "none"}) == "item-not-found"
    assert await admin_error(alice, {"nick": "Carol", "role": "emperor"}) == "bad-request"


async def test_voice_in_a_moderated_room(server: Harness) -> None:
    alice, bob, _ = await room_of_three(server, **{"muc#roomconfig_moderatedroom": "1"})
    bob_sees = presences(bob)
    assert bob.plugin["xep_0045"].get_jid_property(JID(ROOM), "Bob", "role") == "visitor"
    errors = collect(bob, "error")
    groupchat(bob, "can I speak?")
    assert error_of((await take(errors, 1))[0]) == "forbidden"

    await admin(alice, {"nick": "Bob", "role": "participant"})
    granted = await until(bob_sees, lambda p: p.get("from") == f"{ROOM}/Bob")
    assert item_of(granted)["role"] == "participant"
    inbox = collect(alice)
    groupchat(bob, "thank you")
    assert (await take(inbox, 1))[0].findtext(BODY) == "thank you"

    await admin(alice, {"nick": "Bob", "role": "visitor"})
    revoked = await until(bob_sees, lambda p: p.get("from") == f"{ROOM}/Bob")
    assert item_of(revoked)["role"] == "visitor"
    assert sorted(i["nick"] for i in await listed(alice, role="visitor")) == ["Bob", "Carol"]


async def test_voice_request_approved_by_a_moderator(server: Harness) -> None:
    alice, bob, _ = await room_of_three(server, **{"muc#roomconfig_moderatedroom": "1"})
    requests, bob_sees = collect(alice), presences(bob)
    bob.plugin["xep_0045"].request_voice(ROOM, "participant")
    (request,) = await take(requests, 1)
    form = request.find(f"{{{XDATA}}}x")
    values = {f.get("var"): f.findtext(f"{{{XDATA}}}value") for f in form.iter(f"{{{XDATA}}}field")}
    assert (values["muc#roomnick"], values["muc#jid"], values["muc#request_allow"]) == \
        ("Bob", "bob@localhost/r", "false")
    answer = alice.make_message(mto=ROOM)
    answer.append(_submitted(values | {"muc#request_allow": "true"}))
    answer.send()
    granted = await until(bob_sees, lambda p: p.get("from") == f"{ROOM}/Bob")
    assert item_of(granted)["role"] == "participant"


def _submitted(values: dict[str, str | None]) -> Element:
    x = Element(f"{{{XDATA}}}x", {"type": "submit"})
    for var, value in values.items():
        SubElement(SubElement(x, f"{{{XDATA}}}field", {"var": var}), f"{{{XDATA}}}value").text = value
    return x


# --- affiliations -------------------------------------------------------------------------------------

async def test_ban_and_unban(server: Harness) -> None:
    alice, bob, carol = await room_of_three(server)
    bob_sees, carol_sees = presences(bob), presences(carol)
    await admin(alice, {"jid": "bob@localhost", "affiliation": "outcast"}, reason="spam")
    own = await until(bob_sees, lambda p: p.get("type") == "unavailable")
    assert statuses(own) == {"301", "110"} and item_of(own)["affiliation"] == "outcast"
    seen = await until(carol_sees, lambda p: p.get("type") == "unavailable")
    assert statuses(seen) == {"301"}
    assert await join_error(bob, "Bob") == "forbidden"
    assert await join_error(bob, "Someone else") == "forbidden"
    assert await listed(alice, affiliation="outcast") == [{"affiliation": "outcast", "jid": "bob@localhost"}]
    await admin(alice, {"jid": "bob@localhost", "affiliation": "none"})
    await join(bob, "Bob")
    inbox = collect(carol)
    groupchat(bob, "back")
    assert (await take(inbox, 1))[0].findtext(BODY) == "back"


async def test_a_user_not_in_the_room_is_told_of_a_new_affiliation(server: Harness) -> None:
    alice, dave = await user(server, "alice"), await user(server, "dave")
    await create(alice, "Alice")
    inbox = collect(dave)
    await admin(alice, {"jid": "dave@localhost", "affiliation": "member"})
    (told,) = await take(inbox, 1)
    assert told.get("from") == ROOM and statuses(told) == {"101"}
    assert item_of(told) == {"affiliation": "member", "jid": "dave@localhost"}


async def test_admins_and_owners(server: Harness) -> None:
    alice, bob, carol = await room_of_three(server)
    bob_sees = presences(bob)
    assert await admin_error(bob, {"jid": "carol@localhost", "affiliation": "member"}) == "forbidden"
    await admin(alice, {"jid": "bob@localhost", "affiliation": "admin"})
    promoted = await until(bob_sees, lambda p: p.get("from") == f"{ROOM}/Bob")
    assert (item_of(promoted)["affiliation"], item_of(promoted)["role"]) == ("admin", "moderator")
    assert await admin_error(bob, {"jid": "carol@localhost", "affiliation": "owner"}) == "forbidden"
    assert await admin_error(bob, {"jid": "alice@localhost", "affiliation": "outcast"}) == "not-allowed"
    await admin(bob, {"jid": "carol@localhost", "affiliation": "member"})
    assert await admin_error(alice, {"jid": "alice@localhost", "affiliation": "admin"}) == "conflict"
    # Several items are applied together: a new owner makes it fine for alice to step down.
    await admin(alice, {"jid": "carol@localhost", "affiliation": "owner"}, {"jid": "alice@localhost",
                                                                          "affiliation": "admin"})
    assert await listed(carol, affiliation="owner") == [{"affiliation": "owner", "jid": "carol@localhost"}]
    assert await listed(carol, affiliation="admin") == [
        {"affiliation": "admin", "jid": "alice@localhost"}, {"affiliation": "admin", "jid": "bob@localhost"}]
    # A refused request changes nothing, not even its valid items.
    assert await admin_error(bob, {"jid": "dave@localhost", "affiliation": "member"},
                             {"jid": "carol@localhost", "affiliation": "none"}) == "not-allowed"
    assert await listed(carol, affiliation="member") == []


async def test_members_only_room(server: Harness) -> None:
    alice, _, carol = await room_of_three(server)
    await admin(alice, {"jid": "bob@localhost", "affiliation": "member", "nick": "Bob"})
    carol_sees = presences(carol)
    await configure(alice, **{"muc#roomconfig_membersonly": "1"})
    removed = await until(carol_sees, lambda p: p.get("type") == "unavailable" and "110" in statuses(p))
    assert statuses(removed) == {"322", "110"}
    assert await join_error(carol, "Carol") == "registration-required"
    await admin(alice, {"jid": "carol@localhost", "affiliation": "member"})
    await join(carol, "Carol")
    members = await listed(alice, affiliation="member")
    assert members == [{"affiliation": "member", "jid": "bob@localhost", "nick": "Bob"},
                       {"affiliation": "member", "jid": "carol@localhost"}]
    await admin(alice, {"jid": "carol@localhost", "affiliation": "none"})
    removed = await until(carol_sees, lambda p: p.get("type") == "unavailable" and "110" in statuses(p))
    assert statuses(removed) == {"321", "110"}


async def test_a_registered_nick_is_reserved(server: Harness) -> None:
    alice = await user(server, "alice")
    await create(alice, "Alice")
    await admin(alice, {"jid": "dave@localhost", "affiliation": "member", "nick": "Dave"})
    dave, eve = await user(server, "dave"), await user(server, "eve")
    assert await join_error(eve, "dave") == "conflict"
    await join(dave, "Dave")


async def test_member_lists_for_encrypted_rooms(server: Harness) -> None:
    """OMEMO clients in a members-only, non-anonymous room fetch the member list to encrypt to everyone."""
    alice, bob, _ = await room_of_three(server, **{"muc#roomconfig_whois": "anyone"})
    await admin(alice, {"jid": "bob@localhost", "affiliation": "member"})
    assert await listed(bob, affiliation="member") == [{"affiliation": "member", "jid": "bob@localhost"}]
    assert await listed(bob, affiliation="owner") == [{"affiliation": "owner", "jid": "alice@localhost"}]
    condition, _ = await iq_error(bob, "get", items({"affiliation": "outcast"}), ROOM)
    assert condition == "forbidden"
    await configure(alice, **{"muc#roomconfig_whois": "moderators"})
    condition, _ = await iq_error(bob, "get", items({"affiliation": "member"}), ROOM)
    assert condition == "forbidden"


# --- room types ---------------------------------------------------------------------------------------

async def test_password_protected_room(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice", **{"muc#roomconfig_passwordprotectedroom": "1", "muc#roomconfig_roomsecret": "s3"})
    assert await join_error(bob, "Bob") == "not-authorized"
    assert await join_error(bob, "Bob", password="wrong") == "not-authorized"
    await join(bob, "Bob", password="s3")
    condition, _ = await iq_error(alice, "set", f"<query xmlns='http://jabber.org/protocol/muc#owner'>"
                                  f"<x xmlns='{XDATA}' type='submit'><field var='muc#roomconfig_roomsecret'/>"
                                  f"<field var='muc#roomconfig_passwordprotectedroom'><value>1</value></field>"
                                  f"</x></query>", ROOM)
    assert condition == "not-acceptable"


async def test_a_full_room_refuses_newcomers_but_not_admins(server: Harness) -> None:
    alice, bob, carol = await room_of_three(server, **{"muc#roomconfig_maxusers": "3"})
    dave, eve = await user(server, "dave"), await user(server, "eve")
    assert await join_error(dave, "Dave") == "service-unavailable"
    await admin(alice, {"jid": "eve@localhost", "affiliation": "admin"})
    await join(eve, "Eve")
    bob.plugin["xep_0045"].leave_muc(JID(ROOM), "Bob")
    carol.plugin["xep_0045"].leave_muc(JID(ROOM), "Carol")
    await send_iq(alice, "get", items({"role": "moderator"}), ROOM)
    await join(dave, "Dave")


async def test_destroy_with_an_alternate_venue(server: Harness) -> None:
    alice, bob, _ = await room_of_three(server, **{"muc#roomconfig_persistentroom": "1"})
    bob_sees = presences(bob)
    condition, _ = await iq_error(bob, "set", "<query xmlns='http://jabber.org/protocol/muc#owner'><destroy/></query>",
                                  ROOM)
    assert condition == "forbidden"
    await alice.plugin["xep_0045"].destroy(ROOM, reason="moving", altroom="new@conference.localhost")
    gone = await until(bob_sees, lambda p: p.get("type") == "unavailable")
    destroy = gone.find(f"{MUC_USER}x/{MUC_USER}destroy")
    assert destroy.get("jid") == "new@conference.localhost" and destroy.findtext(f"{MUC_USER}reason") == "moving"
    muc = server.server.hosts["localhost"].modules["muc"]
    assert not muc.rooms and await muc.store.rooms("conference.localhost") == []


# --- invitations --------------------------------------------------------------------------------------

async def test_mediated_invitation_to_a_members_only_room_and_a_decline(server: Harness) -> None:
    alice, bob, _ = await room_of_three(server)
    await admin(alice, {"jid": "bob@localhost", "affiliation": "member"})
    await configure(alice, **{"muc#roomconfig_membersonly": "1"})
    dave = await user(server, "dave")
    invites = collect(dave)
    alice.plugin["xep_0045"].invite(ROOM, "dave@localhost", reason="join us")
    (invitation,) = await take(invites, 1)
    invite = invitation.find(f"{MUC_USER}x/{MUC_USER}invite")
    assert invitation.get("from") == ROOM and invite.get("from") == "alice@localhost/r"
    assert invite.findtext(f"{MUC_USER}reason") == "join us"
    await join(dave, "Dave")  # the invitation made dave a member

    eve = await user(server, "eve")
    errors = collect(bob, "error")
    bob.plugin["xep_0045"].invite(ROOM, "eve@localhost")  # bob is no admin, and invites are not open
    assert error_of((await take(errors, 1))[0]) == "forbidden"

    declines = collect(alice)
    eve.plugin["xep_0045"].decline(ROOM, "alice@localhost/r", reason="busy")
    (declined,) = await take(declines, 1)
    decline = declined.find(f"{MUC_USER}x/{MUC_USER}decline")
    assert (declined.get("from"), decline.get("from"), decline.findtext(f"{MUC_USER}reason")) == \
        (ROOM, "eve@localhost", "busy")


async def test_direct_invitation(server: Harness) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    await create(alice, "Alice")
    inbox = collect(bob)
    msg = alice.make_message(mto="bob@localhost/r")
    msg.append(fromstring(f"<x xmlns='jabber:x:conference' jid='{ROOM}' reason='come'/>"))
    msg.send()
    (received,) = await take(inbox, 1)
    assert received.find("{jabber:x:conference}x").get("jid") == ROOM
    await join(bob, "Bob")


# --- persistence --------------------------------------------------------------------------------------

@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_affiliations_survive_a_restart(server: Harness) -> None:
    alice, _, _ = await room_of_three(server, **{"muc#roomconfig_persistentroom": "1"})
    await admin(alice, {"jid": "bob@localhost", "affiliation": "member", "nick": "Bob"},
                {"jid": "carol@localhost", "affiliation": "outcast"}, reason="spam")
    await admin(alice, {"jid": "bob@localhost", "affiliation": "admin"})
    await server.restart()
    alice, bob, carol = await user(server, "alice"), await user(server, "bob"), await user(server, "carol")
    assert await join_error(carol, "Carol") == "forbidden"
    joined = await join(bob, "Bob")
    assert (item_of(joined)["affiliation"], item_of(joined)["role"]) == ("admin", "moderator")
    assert await listed(bob, affiliation="outcast") == [
        {"affiliation": "outcast", "jid": "carol@localhost"}]
