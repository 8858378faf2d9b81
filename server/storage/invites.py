"""Invitations (XEP-0401, XEP-0379, XEP-0445): tokens that register an account or approve a subscription.

A token is spent by a conditional update (`use`), so that two registrations racing for the last use of an
invitation cannot both succeed, on either backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Row

from server.storage.engine import writer
from server.storage.schema import invites

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

KINDS = frozenset({"account", "contact"})


@dataclass(frozen=True)
class Invite:
    token: str
    host: str
    kind: str  # 'account': registers an account; 'contact': also approves a subscription to the inviter
    inviter: str  # the local user the invitee becomes a contact of ('' for none)
    uses_left: int
    created: datetime
    expires: datetime

    def valid(self, now: datetime) -> bool:
        return self.uses_left > 0 and now < self.expires


def _invite(row: Row) -> Invite:
    return Invite(**row._mapping)


class InviteStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)

    async def add(self, invite: Invite) -> None:
        if invite.kind not in KINDS:
            raise ValueError(f"unknown invitation kind {invite.kind!r}")
        async with self._writer.begin() as conn:
            await conn.execute(invites.insert().values(**invite.__dict__))

    async def get(self, token: str) -> Invite | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(invites).where(invites.c.token == token))).first()
        return _invite(row) if row is not None else None

    async def use(self, token: str, now: datetime) -> Invite | None:
        """Spend one use of a valid invitation; the invitation as it was, or None if it is not valid (any more)."""
        async with self._writer.begin() as conn:
            row = (await conn.execute(select(invites).where(invites.c.token == token))).first()
            if row is None or not _invite(row).valid(now):
                return None
            done = await conn.execute(update(invites).where(invites.c.token == token, invites.c.uses_left > 0)
                                      .values(uses_left=invites.c.uses_left - 1))
        return _invite(row) if done.rowcount == 1 else None

    async def list(self, host: str, inviter: str | None = None) -> list[Invite]:
        """The host's invitations (or one inviter's), oldest first, spent and expired ones included."""
        where = [invites.c.host == host]
        if inviter is not None:
            where.append(invites.c.inviter == inviter)
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(invites).where(*where).order_by(invites.c.created, invites.c.token))
        return [_invite(row) for row in rows]

    async def active(self, host: str, inviter: str, now: datetime) -> int:
        """How many of the inviter's invitations are still valid, for a user's quota."""
        async with self._engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).where(
                invites.c.host == host, invites.c.inviter == inviter, invites.c.uses_left > 0,
                invites.c.expires > now)) or 0)

    async def remove(self, token: str) -> bool:
        async with self._writer.begin() as conn:
            done = await conn.execute(delete(invites).where(invites.c.token == token))
        return done.rowcount == 1

    async def remove_inviter(self, host: str, inviter: str) -> None:
        """Forget the invitations of a user whose account goes: nobody may become their contact any more."""
        async with self._writer.begin() as conn:
            await conn.execute(delete(invites).where(invites.c.host == host, invites.c.inviter == inviter))

    async def expire(self, host: str, now: datetime) -> int:
        """Forget the host's spent and expired invitations; how many."""
        async with self._writer.begin() as conn:
            done = await conn.execute(delete(invites).where(
                invites.c.host == host, (invites.c.uses_left <= 0) | (invites.c.expires <= now)))
        return int(done.rowcount)
