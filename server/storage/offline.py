"""Offline message storage (RFC 6121 section 8.5.2.2, XEP-0160)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, delete, func, select

from server.storage.engine import lock_user, read, user_params, user_rows, writer
from server.storage.schema import offline

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

# First key of the advisory lock serialising pushes to one user's offline store.
_PUSH_LOCK = 1


# Whether the user has any stored message: a login's check, which most often finds none.
_ANY = select(offline.c.id).where(*user_params(offline)).limit(1)


class QuotaExceeded(Exception):
    """The user's offline store is full; the caller bounces the stanza instead."""


class OfflineStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)

    async def push(self, host: str, user: str, stanza_xml: str, stamp: datetime, quota: int) -> None:
        """Store a message for later delivery; raise QuotaExceeded if ``quota`` are stored already.

        Concurrent pushes are serialised per user, so the quota holds exactly.
        """
        async with self._writer.begin() as conn:
            await lock_user(conn, _PUSH_LOCK, host, user)
            stored = await conn.scalar(
                select(func.count()).select_from(offline).where(*user_rows(offline, host, user))
            )
            if (stored or 0) >= quota:
                raise QuotaExceeded(f"{user}@{host} has {stored} offline messages (quota {quota})")
            await conn.execute(
                offline.insert().values(host=host, username=user, stamp=stamp, stanza_xml=stanza_xml)
            )

    async def pop_all(self, host: str, user: str) -> list[tuple[datetime, str]]:
        """Remove and return the stored messages, oldest first."""
        return await self.pop(host, user, None)

    async def pop(self, host: str, user: str, limit: int | None) -> list[tuple[datetime, str]]:
        """Remove and return the `limit` oldest stored messages (all without a limit), oldest first: a page
        of a delivery that waits for the client to take each page before it takes the next from storage.

        Most logins find nothing, so a read (which never waits for the write lock) looks first; then a
        single DELETE ... RETURNING, so concurrent pops never deliver a message twice.
        """
        if await read(self._engine, lambda conn: conn.scalar(_ANY, {"host": host, "username": user})) is None:
            return []
        mine: tuple[ColumnElement[bool], ...] = user_rows(offline, host, user)
        if limit is not None:
            oldest = select(offline.c.id).where(*mine).order_by(offline.c.id).limit(limit)
            mine = (offline.c.id.in_(oldest.scalar_subquery()),)
        async with self._writer.begin() as conn:
            rows = await conn.execute(
                delete(offline).where(*mine).returning(offline.c.id, offline.c.stamp, offline.c.stanza_xml)
            )
            popped = sorted(rows, key=lambda row: row.id)
        return [(row.stamp, row.stanza_xml) for row in popped]

    async def restore(self, host: str, user: str, messages: list[tuple[datetime, str]], after: int = 0) -> None:
        """Put messages that were taken out for delivery and never reached the client back, in their order,
        after the first `after` stored ones (0: before all of them), past the quota, since they were
        accepted already: what is stored since then stays behind them.

        The user's rows are written again in the new order (ids give the order), in one transaction.
        """
        async with self._writer.begin() as conn:
            await lock_user(conn, _PUSH_LOCK, host, user)
            rows = await conn.execute(
                delete(offline)
                .where(*user_rows(offline, host, user))
                .returning(offline.c.id, offline.c.stamp, offline.c.stanza_xml)
            )
            stored = [(row.stamp, row.stanza_xml) for row in sorted(rows, key=lambda row: row.id)]
            ordered = stored[:after] + messages + stored[after:]
            await conn.execute(
                offline.insert(),
                [{"host": host, "username": user, "stamp": stamp, "stanza_xml": xml} for stamp, xml in ordered],
            )

    async def count(self, host: str, user: str) -> int:
        async with self._engine.begin() as conn:
            stored = await conn.scalar(
                select(func.count()).select_from(offline).where(*user_rows(offline, host, user))
            )
        return int(stored or 0)
