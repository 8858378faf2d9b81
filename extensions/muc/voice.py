"""Voice requests in moderated rooms (XEP-0045 7.13 and 8.6).

A visitor submits a muc#request form to the room; the room asks every moderator with a form of its own,
and a moderator who submits it back with 'muc#request_allow' set gives the visitor voice, exactly as a
role change through muc#admin would (so the same rights are checked).
"""

from __future__ import annotations

from xml.etree.ElementTree import Element

from extensions.muc.admin import actor_of, check_role, set_role
from extensions.muc.occupants import Occupant
from extensions.muc.protocol import REQUEST
from extensions.muc.room import Room
from server.forms import Field, build_form, first_value, read_form
from server.stanza import Stanza, element
from server.stream.errors import StanzaError


async def handle(room: Room, sender: Occupant | None, st: Stanza, form: Element) -> None:
    if sender is None:
        raise StanzaError("not-acceptable", "only occupants may ask for voice")
    values = read_form(form)
    if "muc#request_allow" in values:
        await decide(room, st, values)
    elif first_value(values, "muc#role") == "participant":
        await ask_moderators(room, sender, st)
    else:
        raise StanzaError("bad-request", "only voice (the participant role) can be requested")


async def ask_moderators(room: Room, sender: Occupant, st: Stanza) -> None:
    if sender.role != "visitor":
        return  # already has voice
    msg = element("message", from_=str(room.jid))
    msg.append(build_form("form", [
        Field("muc#role", "list-single", "Requested role", ("participant",), options=("participant",)),
        Field("muc#jid", "jid-single", "User ID", (str(st.from_),)),
        Field("muc#roomnick", "text-single", "Room nickname", (sender.nick,)),
        Field("muc#request_allow", "boolean", "Grant voice to this person?", ("false",)),
    ], form_type=REQUEST, title="Voice request"))
    await room.flush([(msg, [s for m in room.moderators() for s in m.sessions])])


async def decide(room: Room, st: Stanza, values: dict[str, list[str]]) -> None:
    if first_value(values, "muc#request_allow") not in ("1", "true"):
        return
    target = room.find(first_value(values, "muc#roomnick") or "")
    if target is None:
        raise StanzaError("item-not-found", "that occupant has left")
    if target.role != "visitor":
        return
    check_role(room, actor_of(room, st), target, "participant")
    await room.flush(set_role(room, target, "participant", None, room.by_session[st.from_].nick))
