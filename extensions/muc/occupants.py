"""Occupants and their nicknames.

A nickname is the resourcepart of the occupant's room JID. XEP-0045 7.2.1 asks services to prepare
it with the PRECIS Nickname profile (RFC 8266): a nick that only differs in width or spacing is stored
prepared (and the joining client told so with status 210), and nicks that differ only in case name
the same occupant, so 'Alice' and 'alice' conflict.

One occupant may be several sessions of the same user under one nick, which XEP-0045 allows so that a
user's phone and laptop share one place in the room; the room shows the presence of whichever session
spoke last.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element

import precis_i18n

from server.jid import JID
from server.service import Prepared
from server.stream.errors import StanzaError

_PRESERVED = precis_i18n.get_profile("NicknameCasePreserved")
_MAPPED = precis_i18n.get_profile("NicknameCaseMapped")
MAX_NICK = 64  # characters; long enough for any real nick, short enough to keep presence small


def prepare_nick(nick: str | None) -> str:
    """The nick as the room uses it; jid-malformed when there is none or it is not a valid nickname."""
    if not nick:
        raise StanzaError("jid-malformed", "a room nickname is required")
    try:
        prepared = _PRESERVED.enforce(nick)
    except UnicodeError as exc:
        raise StanzaError("jid-malformed", f"invalid nickname: {exc}") from None
    if not prepared or len(prepared) > MAX_NICK:
        raise StanzaError("jid-malformed", f"a nickname has 1 to {MAX_NICK} characters")
    return prepared


def nick_key(nick: str) -> str:
    """What two nicks are compared by: equal keys are the same occupant."""
    return _MAPPED.enforce(nick)


class Occupant:
    """One nick in the room, held by one or more sessions of one user."""

    __slots__ = ("id", "jid", "key", "nick", "role", "room_jid", "sessions", "shown")

    def __init__(self, room: JID, nick: str, jid: JID, role: str, occupant_id: str) -> None:
        self.id = occupant_id  # XEP-0421: the same for this user in this room whatever the nick
        self.nick = nick
        self.key = nick_key(nick)
        self.room_jid = room.with_resource(nick)
        self.jid = jid  # the user's bare JID
        self.role = role
        self.sessions: dict[JID, Element] = {}  # full JID -> its last presence, the most recent last
        self.shown: dict[bool, tuple[tuple[object, ...], Prepared]] = {}  # see Room.current_presence

    @property
    def presence(self) -> Element:
        return next(reversed(self.sessions.values()))

    @property
    def real_jid(self) -> JID:
        """The full JID whose presence the room shows."""
        return next(reversed(self.sessions))

    def update(self, session: JID, presence: Element) -> None:
        self.sessions.pop(session, None)
        self.sessions[session] = presence

    def __repr__(self) -> str:
        return f"<Occupant {self.nick} {self.jid} {self.role}>"
