"""HTTP file upload slots and files (XEP-0363): what each user reserved and stored, for quotas and expiry.

The files themselves are kept elsewhere (the upload module's blob store); a row is written at the slot
request, so that a reserved slot counts against the quotas before its file arrives, and is the only
authority on whether a file may be served: a file without a row is garbage.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select, update

from server.storage.engine import lock_user, user_rows, writer
from server.storage.schema import uploads

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

# First key of the advisory lock serialising one user's slot requests, so that the quota holds exactly.
_SLOT_LOCK = 3
HOUR = timedelta(hours=1)


class UploadRefused(Exception):
    """A slot the quotas or the rate do not allow; `retry` is when a rate-limited user may ask again."""

    def __init__(self, reason: str, retry: datetime | None = None) -> None:
        super().__init__(reason)
        self.retry = retry


@dataclass(frozen=True)
class Upload:
    id: str
    host: str
    username: str
    filename: str
    size: int
    content_type: str
    created: datetime
    uploaded: datetime | None = None
    thumbnail: str | None = None


@dataclass(frozen=True)
class Limits:
    """0 means no limit."""

    user_quota: int = 0  # bytes one user may keep, reserved slots included
    host_quota: int = 0  # bytes all the host's users may keep
    per_hour: int = 0  # slots one user may request in an hour


class UploadStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)

    async def reserve(self, slot: Upload, limits: Limits) -> None:
        """Record a requested slot, unless it would pass a quota or the rate (UploadRefused)."""
        async with self._writer.begin() as conn:
            await lock_user(conn, _SLOT_LOCK, slot.host, slot.username)
            mine = user_rows(uploads, slot.host, slot.username)
            if limits.per_hour:
                recent = list(await conn.scalars(
                    select(uploads.c.created).where(*mine, uploads.c.created > slot.created - HOUR)
                    .order_by(uploads.c.created).limit(limits.per_hour)))
                if len(recent) >= limits.per_hour:
                    raise UploadRefused(f"at most {limits.per_hour} uploads an hour", recent[0] + HOUR)
            if limits.user_quota:
                used = await conn.scalar(select(func.coalesce(func.sum(uploads.c.size), 0)).where(*mine))
                if int(used) + slot.size > limits.user_quota:
                    raise UploadRefused(f"upload quota of {limits.user_quota} bytes reached ({used} bytes in use)")
            if limits.host_quota:
                used = await conn.scalar(select(func.coalesce(func.sum(uploads.c.size), 0))
                                         .where(uploads.c.host == slot.host))
                if int(used) + slot.size > limits.host_quota:
                    raise UploadRefused("the server's upload space is full")
            await conn.execute(uploads.insert().values(
                id=slot.id, host=slot.host, username=slot.username, filename=slot.filename, size=slot.size,
                content_type=slot.content_type, created=slot.created))

    async def get(self, slot_id: str) -> Upload | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(uploads).where(uploads.c.id == slot_id))).first()
        return Upload(**row._mapping) if row is not None else None

    async def stored(self, slot_id: str, size: int, thumbnail: str | None, when: datetime) -> bool:
        """Mark the slot's file stored (its final size, its thumbnail's type); False if it was already, or the
        slot is gone (expired, its account deleted) meanwhile."""
        async with self._writer.begin() as conn:
            done = await conn.execute(update(uploads).where(uploads.c.id == slot_id, uploads.c.uploaded.is_(None))
                                      .values(uploaded=when, size=size, thumbnail=thumbnail))
        return done.rowcount == 1

    async def remove(self, slot_id: str) -> None:
        async with self._writer.begin() as conn:
            await conn.execute(delete(uploads).where(uploads.c.id == slot_id))

    async def remove_user(self, host: str, user: str) -> list[str]:
        """Forget every slot of the user; the ids, whose files the caller deletes."""
        async with self._writer.begin() as conn:
            return list(await conn.scalars(delete(uploads).where(*user_rows(uploads, host, user))
                                           .returning(uploads.c.id)))

    async def expire(self, host: str, stored_before: datetime | None, reserved_before: datetime,
                     uploading: list[str]) -> list[str]:
        """Forget the host's files stored before `stored_before` (None: they never expire) and the slots
        reserved before `reserved_before` whose file never came, but those `uploading` now; the ids."""
        old = uploads.c.uploaded.is_(None) & (uploads.c.created < reserved_before) & uploads.c.id.not_in(uploading)
        if stored_before is not None:
            old = old | (uploads.c.uploaded < stored_before)
        async with self._writer.begin() as conn:
            return list(await conn.scalars(delete(uploads).where(uploads.c.host == host, old)
                                           .returning(uploads.c.id)))

    async def known(self, ids: list[str]) -> set[str]:
        """Which of `ids` have a row."""
        async with self._engine.connect() as conn:
            return set(await conn.scalars(select(uploads.c.id).where(uploads.c.id.in_(ids))))

    async def usage(self, host: str, user: str | None = None) -> tuple[int, int]:
        """Files stored and their bytes, for the host or one of its users."""
        where = [uploads.c.host == host, uploads.c.uploaded.is_not(None)]
        if user is not None:
            where.append(uploads.c.username == user)
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(func.count(), func.coalesce(func.sum(uploads.c.size), 0))
                                      .where(*where))).one()
        return int(row[0]), int(row[1])
