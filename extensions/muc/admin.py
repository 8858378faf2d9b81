"""Roles and affiliations (muc#admin): kick, voice, moderator, ban, membership, admin and owner, and
the lists of each (XEP-0045 8, 9, 10.3-10.8).

A request may carry several items; every item is checked before any is applied, so a request is done
whole or refused whole. Who may do what follows XEP-0045 5.1.3 and 5.2.2: moderators change the roles of
those below admin, admins the affiliations of those below admin, owners everything except leaving the
room without an owner (conflict).
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.etree.ElementTree import Element

from extensions.muc.occupants import Occupant
from extensions.muc.protocol import (
    ADMIN,
    ADMIN_QUERY,
    AFFILIATION_CHANGED,
    AFFILIATIONS,
    BANNED,
    KICKED,
    REMOVED_AFFILIATION,
    ROLES,
    USER,
    affiliation_rank,
    item,
    user_x,
)
from extensions.muc.room import Batch, Room
from server import ns
from server.jid import JID, JIDError
from server.stanza import Stanza, element
from server.storage.muc import Affiliation
from server.stream.errors import StanzaError

ITEM = ns.qname(ADMIN, "item")
REASON = ns.qname(ADMIN, "reason")
ADMIN_RANK = affiliation_rank("admin")
MEMBER_RANK = affiliation_rank("member")


@dataclass(frozen=True)
class Actor:
    """Who asks: their bare JID, their affiliation, and their occupant if they are in the room."""

    jid: JID
    affiliation: str
    occupant: Occupant | None

    @property
    def rank(self) -> int:
        return affiliation_rank(self.affiliation)

    @property
    def moderator(self) -> bool:
        return self.rank >= ADMIN_RANK or (self.occupant is not None and self.occupant.role == "moderator")

    @property
    def nick(self) -> str | None:
        return self.occupant.nick if self.occupant else None


def actor_of(room: Room, st: Stanza) -> Actor:
    return Actor(st.from_.bare, room.affiliation(st.from_), room.by_session.get(st.from_))


# --- lists --------------------------------------------------------------------------------------------

async def get_list(room: Room, st: Stanza) -> Element:
    """XEP-0045 8.5, 9.5, 9.8, 10.5, 10.8: the holders of one affiliation or one role."""
    items = st.el[0].findall(ITEM)
    if len(items) != 1:
        raise StanzaError("bad-request", "ask for one affiliation or one role")
    actor = actor_of(room, st)
    affiliation, role = items[0].get("affiliation"), items[0].get("role")
    query = Element(ADMIN_QUERY)
    if affiliation in AFFILIATIONS and affiliation != "none":
        if not may_list(room, actor, affiliation):
            raise StanzaError("forbidden", f"you may not see the {affiliation} list")
        for jid, held in sorted(room.affiliations.items(), key=lambda pair: str(pair[0])):
            if held.affiliation == affiliation:
                query.append(item(ADMIN, held.reason, affiliation=affiliation, jid=str(jid), nick=held.nick))
    elif role in ROLES and role != "none":
        if not actor.moderator:
            raise StanzaError("forbidden", "only moderators see the roles")
        for occupant in room.occupants.values():
            if occupant.role == role:
                query.append(item(ADMIN, None, role=role, nick=occupant.nick, jid=str(occupant.real_jid),
                                  affiliation=room.affiliation(occupant.jid)))
    else:
        raise StanzaError("bad-request", "unknown affiliation or role")
    return query


def may_list(room: Room, actor: Actor, affiliation: str) -> bool:
    """Admins see every list. In a non-anonymous room members see who the members, admins and owners are,
    which end-to-end encrypted clients (OMEMO) need to encrypt to every member."""
    if actor.rank >= ADMIN_RANK:
        return True
    return room.config.non_anonymous and affiliation != "outcast" and \
        (actor.rank >= MEMBER_RANK or actor.occupant is not None)


# --- changes ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoleChange:
    occupant: Occupant
    role: str
    reason: str | None


@dataclass(frozen=True)
class AffiliationChange:
    jid: JID
    affiliation: str
    reason: str | None
    nick: str | None


async def change(room: Room, st: Stanza) -> None:
    actor = actor_of(room, st)
    items = st.el[0].findall(ITEM)
    if not items:
        raise StanzaError("bad-request", "no item to change")
    changes = [plan(room, actor, it) for it in items]
    check_owners_remain(room, [c for c in changes if isinstance(c, AffiliationChange)])
    batches: list[Batch] = []
    changed: list[JID] = []
    for c in changes:
        if isinstance(c, RoleChange):
            batches += set_role(room, c.occupant, c.role, c.reason, actor.nick)
        else:
            batches += set_affiliation(room, c, actor.nick)
            changed.append(c.jid)
    for jid in changed:
        await room.save_affiliation(jid)
    await room.flush(batches)
    for c in changes:
        if isinstance(c, AffiliationChange) and not room.occupants_of(c.jid):
            await tell_absent(room, c)


async def tell_absent(room: Room, c: AffiliationChange) -> None:
    """The new affiliation of a user who is not in the room: the user learns it by message with status 101
    (XEP-0045 17.1), and the occupants who may see real JIDs by a message from the room (10.3, 10.6, 10.7),
    which is how their clients keep the member list that end-to-end encryption needs (OMEMO)."""
    x = user_x(AFFILIATION_CHANGED)
    x.insert(0, item(USER, affiliation=room.affiliation(c.jid), jid=str(c.jid)))
    message = element("message", from_=str(room.jid), to=str(c.jid))
    message.append(x)
    await room.service.server.router.send(message)
    observers = [session for o in room.occupants.values() if room.sees_jids(o) for session in o.sessions]
    if observers:
        notice = element("message", from_=str(room.jid))
        notice.append(user_x())
        notice[0].append(item(USER, c.reason, affiliation=room.affiliation(c.jid), jid=str(c.jid), role="none"))
        await room.flush([(notice, observers)])


def plan(room: Room, actor: Actor, it: Element) -> RoleChange | AffiliationChange:
    """Check one item against the actor's rights; the change it asks for."""
    role, affiliation, reason = it.get("role"), it.get("affiliation"), it.findtext(REASON)
    if (role is None) == (affiliation is None):
        raise StanzaError("bad-request", "an item changes either a role or an affiliation")
    if role is not None:
        target = room.find(it.get("nick") or "")
        if target is None:
            raise StanzaError("item-not-found" if it.get("nick") else "bad-request", "no such occupant")
        check_role(room, actor, target, role)
        return RoleChange(target, role, reason)
    jid = _target_jid(room, it)
    check_affiliation(room, actor, jid, affiliation or "")
    return AffiliationChange(jid, affiliation or "", reason, it.get("nick"))


def _target_jid(room: Room, it: Element) -> JID:
    if it.get("jid"):
        try:
            return JID.parse(it.get("jid") or "").bare
        except JIDError as exc:
            raise StanzaError("jid-malformed", str(exc)) from None
    occupant = room.find(it.get("nick") or "")
    if occupant is None:
        raise StanzaError("item-not-found" if it.get("nick") else "bad-request", "name a JID or an occupant")
    return occupant.jid


def check_role(room: Room, actor: Actor, target: Occupant, role: str) -> None:
    """XEP-0045 8.2-8.4, 9.6-9.7: moderators kick and change voice; only admins make or unmake moderators;
    nobody changes the role of an admin or owner."""
    if role not in ROLES:
        raise StanzaError("bad-request", f"unknown role {role!r}")
    if not actor.moderator:
        raise StanzaError("forbidden", "only moderators change roles")
    target_rank = affiliation_rank(room.affiliation(target.jid))
    if target_rank >= ADMIN_RANK or target_rank > actor.rank:
        raise StanzaError("not-allowed", "you may not change the role of someone above you")
    if (role == "moderator" or target.role == "moderator") and actor.rank < ADMIN_RANK:
        raise StanzaError("forbidden", "only admins grant or revoke moderator")


def check_affiliation(room: Room, actor: Actor, jid: JID, affiliation: str) -> None:
    """XEP-0045 9.1-9.4, 10.3-10.7: admins give or take outcast, none and member to those below admin;
    owners give or take admin and owner."""
    if affiliation not in AFFILIATIONS:
        raise StanzaError("bad-request", f"unknown affiliation {affiliation!r}")
    if actor.rank < ADMIN_RANK:
        raise StanzaError("forbidden", "only admins and owners change affiliations")
    if affiliation == "outcast" and jid == actor.jid:
        raise StanzaError("conflict", "you may not ban yourself")
    current = affiliation_rank(room.affiliation(jid))
    if actor.affiliation != "owner":
        if affiliation_rank(affiliation) >= ADMIN_RANK:
            raise StanzaError("forbidden", "only owners grant admin or owner")
        if current >= ADMIN_RANK:
            raise StanzaError("not-allowed", "only owners change the affiliation of an admin or owner")


def check_owners_remain(room: Room, changes: list[AffiliationChange]) -> None:
    owners = set(room.with_affiliation("owner"))
    for c in changes:
        if c.affiliation == "owner":
            owners.add(c.jid)
        else:
            owners.discard(c.jid)
    if not owners:
        raise StanzaError("conflict", "a room keeps at least one owner")


def set_role(room: Room, occupant: Occupant, role: str, reason: str | None, actor: str | None) -> list[Batch]:
    if role == "none":
        batches = room.broadcast_presence(occupant, unavailable=True, statuses=[KICKED], reason=reason, actor=actor)
        room.remove(occupant)
        return batches
    occupant.role = role
    return room.broadcast_presence(occupant, reason=reason, actor=actor)


def set_affiliation(room: Room, c: AffiliationChange, actor: str | None) -> list[Batch]:
    """Record the affiliation, then bring the user's occupants in line: out if banned or no longer allowed
    in (301, 321), otherwise with the role that goes with the new affiliation."""
    old = room.affiliation(c.jid)
    if c.affiliation == "none":
        room.affiliations.pop(c.jid, None)
    else:
        held = room.affiliations.get(c.jid)
        # XEP-0045 9.1: an outcast loses the nick they had registered.
        nick = None if c.affiliation == "outcast" else c.nick or (held.nick if held else None)
        room.affiliations[c.jid] = Affiliation(c.affiliation, nick, c.reason)
    batches: list[Batch] = []
    for occupant in room.occupants_of(c.jid):
        if c.affiliation == "outcast" or (room.config.members_only and affiliation_rank(c.affiliation) < MEMBER_RANK):
            status = BANNED if c.affiliation == "outcast" else REMOVED_AFFILIATION
            batches += room.broadcast_presence(occupant, unavailable=True, statuses=[status], reason=c.reason,
                                               actor=actor)
            room.remove(occupant)
            continue
        if "admin" in (c.affiliation, old) or "owner" in (c.affiliation, old):
            occupant.role = room.default_role(c.affiliation)
        elif occupant.role == "visitor" and c.affiliation == "member":
            occupant.role = "participant"
        batches += room.broadcast_presence(occupant, reason=c.reason, actor=actor)
    return batches
