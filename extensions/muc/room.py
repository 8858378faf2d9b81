"""A room's state (configuration, affiliations, occupants, subject) and what it sends its occupants.

Handlers change the state synchronously, before their first await, and only then send: a stanza the
room sends may come straight back (a bounce, a remote error) and find the room consistent, and no two
joins can both pass the nick check. That is why presence is built as batches - (element, recipients) -
and delivered by `flush` afterwards.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, SubElement

from extensions.muc import archive
from extensions.muc.config import RoomConfig
from extensions.muc.fanout import fan_out
from extensions.muc.history import History
from extensions.muc.occupant_iq import OccupantIqs
from extensions.muc.occupants import Occupant, nick_key
from extensions.muc.protocol import OCCUPANT_ID, ROOM_ONLY, SELF, STANZA_ID, SUBJECT, USER, item, user_x
from server import ns
from server.archiving import worth_archiving
from server.jid import JID
from server.ownership import NotOwner
from server.service import Prepared
from server.stanza import element
from server.storage.muc import Affiliation, StoredRoom
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from extensions.muc.service import Muc
    from server.ownership import Lease

Batch = tuple[Element | Prepared, list[JID]]


class Room:
    def __init__(self, service: Muc, jid: JID, config: RoomConfig, created: datetime,
                 affiliations: dict[JID, Affiliation] | None = None, subject: str = "", subject_from: str = "",
                 vcard: str = "") -> None:
        self.service = service
        self.jid = jid
        self.config = config
        self.created = created
        self.affiliations: dict[JID, Affiliation] = affiliations or {}
        self.subject = subject
        self.subject_from = subject_from  # the nick that set it
        self.vcard = vcard  # serialized vcard-temp (the room's avatar), '' for none
        self.occupants: dict[str, Occupant] = {}  # by nick_key
        self.by_session: dict[JID, Occupant] = {}  # by the full JID of each joined session
        self.locked = False  # created with the MUC protocol and not configured yet (XEP-0045 10.1)
        self.destroyed = False  # being destroyed: nobody enters any more
        self.history = History(str(jid), config.max_history)
        self.iqs = OccupantIqs()
        self.recorder = archive.Recorder(self)
        # In a cluster (extensions/muc/placement.py): this member's lease on the room, and what its state hash
        # in Redis holds of the occupants (full JID -> nick, role, presence) and of the room itself.
        self.lease: Lease | None = None
        self.mirrored: dict[str, tuple[str, str, Element]] = {}
        self.mirrored_room = ""

    def __repr__(self) -> str:
        return f"<Room {self.jid}>"

    @property
    def title(self) -> str:
        return self.config.name or self.jid.local or ""

    # --- affiliations and roles -------------------------------------------------------------------

    def affiliation_record(self, jid: JID) -> Affiliation | None:
        """XEP-0045 5.2: an affiliation given to the bare JID, or else to the whole domain."""
        return self.affiliations.get(jid.bare) or self.affiliations.get(JID.make(None, jid.domain))

    def affiliation(self, jid: JID) -> str:
        found = self.affiliation_record(jid)
        return found.affiliation if found else "none"

    def default_role(self, affiliation: str) -> str:
        """XEP-0045 5.1.2: the role an affiliation enters with."""
        if affiliation in ("owner", "admin"):
            return "moderator"
        if affiliation == "member" or (affiliation == "none" and not self.config.moderated):
            return "participant"
        return "visitor" if affiliation == "none" else "none"

    def with_affiliation(self, affiliation: str) -> list[JID]:
        return [jid for jid, a in self.affiliations.items() if a.affiliation == affiliation]

    def nick_owner(self, nick: str) -> JID | None:
        """The user who registered `nick` in this room (XEP-0045 7.10), if anyone did."""
        key = nick_key(nick)
        for jid, a in self.affiliations.items():
            if a.nick and nick_key(a.nick) == key:
                return jid
        return None

    # --- occupants --------------------------------------------------------------------------------

    def new_occupant(self, nick: str, jid: JID, role: str) -> Occupant:
        return Occupant(self.jid, nick, jid.bare, role, self.service.occupant_id(self.jid, jid.bare))

    def find(self, nick: str) -> Occupant | None:
        try:
            return self.occupants.get(nick_key(nick))
        except UnicodeError:
            return None

    def occupants_of(self, jid: JID) -> list[Occupant]:
        """The occupants a user (or, for a domain JID, anyone of that domain) is in the room as."""
        if jid.local is None:
            return [o for o in self.occupants.values() if o.jid.domain == jid.domain]
        return [o for o in self.occupants.values() if o.jid == jid.bare]

    def add_session(self, occupant: Occupant, session: JID, presence: Element) -> None:
        self.occupants[occupant.key] = occupant
        self.by_session[session] = occupant
        occupant.update(session, presence)

    def remove_session(self, session: JID) -> Occupant:
        occupant = self.by_session.pop(session)
        del occupant.sessions[session]
        if not occupant.sessions:
            del self.occupants[occupant.key]
        return occupant

    def remove(self, occupant: Occupant) -> None:
        for session in occupant.sessions:
            self.by_session.pop(session, None)
        self.occupants.pop(occupant.key, None)

    def rename(self, occupant: Occupant, nick: str) -> None:
        del self.occupants[occupant.key]
        occupant.nick = nick
        occupant.key = nick_key(nick)
        occupant.room_jid = self.jid.with_resource(nick)
        self.occupants[occupant.key] = occupant

    def sessions(self) -> list[JID]:
        """Every joined session: where a message to the room goes."""
        return list(self.by_session)

    def moderators(self) -> Iterator[Occupant]:
        return (o for o in self.occupants.values() if o.role == "moderator")

    def sees_jids(self, occupant: Occupant) -> bool:
        """XEP-0045 5.1.4 / 10.2: real JIDs are shown to everyone, or in semi-anonymous rooms to moderators."""
        return self.config.non_anonymous or occupant.role == "moderator"

    # --- presence ---------------------------------------------------------------------------------

    def presence(self, occupant: Occupant, source: Element | None = None, *, real_jid: JID | None,
                 unavailable: bool = False,
                 statuses: Iterable[str] = (), nick: str | None = None, reason: str | None = None,
                 actor: str | None = None, extra: Element | None = None) -> Element:
        """The occupant's presence as the room shows it: the client's own presence (or `source`), readdressed,
        with a muc#user item stating affiliation and role.

        `real_jid` is the session shown to those allowed to see it (None for the others), `nick` the new nick
        of a nick change, `actor` the nick of the moderator who kicked or banned,
        `extra` a further child of the muc#user element (the <destroy/> of a destroyed room).
        """
        if source is None and not unavailable:
            source = occupant.presence
        el = element("presence", from_=str(occupant.room_jid), type="unavailable" if unavailable else None)
        if source is not None:
            el.extend(child for child in source if child.tag not in ROOM_ONLY)
        SubElement(el, OCCUPANT_ID, {"id": occupant.id})
        x = user_x(*statuses)
        # An unavailable presence naming a new nick is a nick change (XEP-0045 7.6): the occupant stays, and
        # keeps its role; any other unavailable presence is someone leaving, whose role becomes none.
        role = "none" if unavailable and nick is None else occupant.role
        it = item(USER, None, affiliation=self.affiliation(occupant.jid), role=role,
                  jid=str(real_jid) if real_jid else None, nick=nick)
        if actor:
            SubElement(it, ns.qname(USER, "actor"), {"nick": actor})
        if reason:
            SubElement(it, ns.qname(USER, "reason")).text = reason
        x.insert(0, it)
        if extra is not None:
            x.insert(1, extra)
        el.append(x)
        return el

    def current_presence(self, occupant: Occupant, *, with_jid: bool) -> Prepared:
        """The occupant's presence as a newcomer gets it, serialized once and reused while it is unchanged:
        everyone's goes to each joining client, which in a large room would otherwise mean serializing every
        occupant's presence on every join."""
        real = occupant.real_jid if with_jid else None
        key = (occupant.presence, occupant.role, self.affiliation(occupant.jid), occupant.nick, real)
        cached = occupant.shown.get(with_jid)
        if cached is None or cached[0] != key:
            cached = occupant.shown[with_jid] = (key, Prepared(self.presence(occupant, real_jid=real)))
        return cached[1]

    def broadcast_presence(self, occupant: Occupant, source: Element | None = None, *,
                           self_statuses: Iterable[str] = (), statuses: Iterable[str] = (),
                           to_self: Iterable[JID] | None = None, session: JID | None = None,
                           unavailable: bool = False, nick: str | None = None,
                           reason: str | None = None, actor: str | None = None,
                           extra: Element | None = None) -> list[Batch]:
        """The occupant's presence to everyone in the room, and to `to_self` (by default its own sessions) with
        status 110 and `self_statuses`; each variant is built once, for the recipients that share it.

        `session` is the real JID to show, by default the occupant's latest session (one that is leaving has
        already been removed)."""
        real = session or occupant.real_jid
        build = partial(self.presence, occupant, source, unavailable=unavailable, nick=nick, reason=reason,
                        actor=actor, extra=extra)
        statuses = tuple(statuses)
        own = list(occupant.sessions) if to_self is None else list(to_self)
        shown: list[JID] = []
        hidden: list[JID] = []
        for other in self.occupants.values():
            if other is not occupant:
                (shown if self.sees_jids(other) else hidden).extend(other.sessions)
        batches: list[Batch] = []
        if own:
            batches.append((build(real_jid=real, statuses=(*statuses, SELF, *self_statuses)), own))
        if shown:
            batches.append((build(real_jid=real, statuses=statuses), shown))
        if hidden:
            batches.append((build(real_jid=None, statuses=statuses), hidden))
        return batches

    def subject_message(self) -> Element:
        """XEP-0045 7.2.15: sent last on join, empty when no subject is set."""
        sender = self.jid.with_resource(self.subject_from) if self.subject_from else self.jid
        el = element("message", from_=str(sender), type="groupchat")
        SubElement(el, SUBJECT).text = self.subject or None
        return el

    def status_message(self, *statuses: str) -> Element:
        """A message from the room itself carrying status codes (configuration changes, XEP-0045 10.2.1)."""
        el = element("message", from_=str(self.jid), type="groupchat")
        el.append(user_x(*statuses))
        return el

    async def publish(self, el: Element) -> None:
        """A message to everyone in the room, stamped with the room's XEP-0359 stanza-id (any other claiming
        to be the room's is removed), kept in the discussion history and archived.

        The archive is written behind. Then the server-wide 'muc/message' (room, element) tells modules that
        serve members who are not in the room."""
        by = str(self.jid)
        for found in el.findall(STANZA_ID):
            if found.get("by") == by:
                el.remove(found)
        uid = secrets.token_urlsafe(12)
        SubElement(el, STANZA_ID, {"id": uid, "by": by})
        stamp = datetime.now(UTC)
        self.history.add(el, stamp)
        if self.config.archive and worth_archiving(el):
            self.recorder.add(el, uid, stamp)
        server = self.service.server
        await self.service.record(self)
        await fan_out(server, el, self.sessions())
        await server.hooks.fire("muc/message", self, el)

    async def flush(self, batches: Iterable[Batch]) -> None:
        server = self.service.server
        await self.service.record(self)
        for el, recipients in batches:
            await fan_out(server, el, recipients)

    # --- persistence ------------------------------------------------------------------------------

    def stored(self) -> StoredRoom:
        return StoredRoom(self.jid.local or "", self.config.to_json(), self.created, self.subject,
                          self.subject_from, {str(jid): a for jid, a in self.affiliations.items()}, self.vcard)

    async def guard(self) -> None:
        """Before a write to storage, in a cluster: refused unless this member still owns the room (fencing)."""
        placement = self.service.placement
        if placement is None:
            return
        try:
            if self.lease is None:
                raise NotOwner(str(self.jid))
            await placement.ownership.guard(self.lease)
        except NotOwner:
            raise StanzaError("remote-server-timeout", "the room moved; try again") from None

    async def save(self) -> None:
        """Write the configuration and subject of a persistent room."""
        if self.config.persistent:
            await self.guard()
            await self.service.store.update_room(self.service.domain, self.jid.local or "", self.config.to_json(),
                                                 self.subject, self.subject_from)

    async def save_affiliation(self, jid: JID) -> None:
        if self.config.persistent:
            await self.guard()
            await self.service.store.set_affiliation(self.service.domain, self.jid.local or "", str(jid),
                                                     self.affiliations.get(jid))
