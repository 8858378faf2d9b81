"""Missed-message notifications: pending counts per conversation and the outbox of notifications to send.

Counts wait in `notify_pending` until a digest takes them: `take` deletes the user's rows and returns what
it deleted (DELETE ... RETURNING), so two processes making the same digest cannot both get them, and writes
the outbox row in the same transaction. Outbox rows are sent by whichever process claims them: `claim`
moves a row from 'pending' (or from 'sending' whose lease ran out: its process died) to 'sending' with a
conditional UPDATE, which only one process wins. A row's id is the notification's idempotency key; a row
marked 'sent' is never sent again, a restart included.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, func, or_, select, update

from server.storage.engine import dialect_insert, user_rows, writer
from server.storage.schema import notify_outbox, notify_pending

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

MAX_SENDERS = 5  # names kept per conversation for the digest ("alice, bob and 3 others")
MAX_BODIES = 3  # bodies kept per conversation, the latest, for users who opted in to them
PENDING, SENDING, SENT, DEAD = "pending", "sending", "sent", "dead"


@dataclass(frozen=True)
class Waiting:
    """Messages of one conversation that wait for a digest."""

    conversation: str
    count: int
    senders: tuple[str, ...]
    first: datetime
    bodies: tuple[tuple[str, str], ...] = ()  # (sender, body), oldest first: only for users who opted in


@dataclass(frozen=True)
class Outgoing:
    """One notification of the outbox."""

    id: str
    host: str
    username: str
    channel: str
    target: str
    payload: dict[str, Any]
    status: str
    due: datetime
    attempts: int
    error: str | None
    created: datetime


def _waiting(row: Any) -> Waiting:
    return Waiting(row.conversation, row.count, tuple(row.senders), row.first,
                   tuple((sender, body) for _, sender, body in row.recent or ()))


def _outgoing(row: Any) -> Outgoing:
    return Outgoing(row.id, row.host, row.username, row.channel, row.target, row.payload, row.status, row.due,
                    row.attempts, row.error, row.created)


class NotificationStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)

    # --- pending counts ---------------------------------------------------------------------------

    async def note(self, host: str, username: str, conversation: str, sender: str, first: datetime,
                   body: tuple[str, str] | None = None) -> None:
        """Count one more message of `conversation` for the user, `first` being when a digest may tell it;
        `body` is (key, text) for users who opted in to bodies: the last MAX_BODIES are kept.

        One statement when the sender is the conversation and no body is kept (a 1:1 chat, the hot path); in a
        room the speakers' names are kept too, up to MAX_SENDERS."""
        where = (*user_rows(notify_pending, host, username), notify_pending.c.conversation == conversation)
        async with self._writer.begin() as conn:
            await conn.execute(dialect_insert(conn, notify_pending).values(
                host=host, username=username, conversation=conversation, count=1, senders=[sender], first=first)
                .on_conflict_do_update(index_elements=["host", "username", "conversation"],
                                       set_={"count": notify_pending.c.count + 1}))
            if sender == conversation and body is None:
                return
            row = (await conn.execute(select(notify_pending.c.senders, notify_pending.c.recent).where(*where)
                                      .with_for_update())).one()
            senders, recent = list(row.senders or []), list(row.recent or [])
            values: dict[str, Any] = {}
            if sender not in senders and len(senders) < MAX_SENDERS:
                values["senders"] = [*senders, sender]
            if body is not None:
                values["recent"] = [*recent, [body[0], sender, body[1]]][-MAX_BODIES:]
            if values:
                await conn.execute(update(notify_pending).where(*where).values(**values))

    async def unnote(self, host: str, username: str, conversation: str, key: str) -> bool:
        """Take back one message counted by `note` (push delivered it): one less in the count, its body (by
        `key`) forgotten, the row gone at zero. False when nothing waits for the conversation any more."""
        where = (*user_rows(notify_pending, host, username), notify_pending.c.conversation == conversation)
        async with self._writer.begin() as conn:
            row = (await conn.execute(select(notify_pending.c.count, notify_pending.c.recent).where(*where)
                                      .with_for_update())).one_or_none()
            if row is None:
                return False
            if row.count <= 1:
                await conn.execute(delete(notify_pending).where(*where))
            else:
                recent = [r for r in row.recent or [] if r[0] != key]
                await conn.execute(update(notify_pending).where(*where).values(
                    count=notify_pending.c.count - 1, recent=recent or None))
            return True

    async def cancel(self, host: str, username: str, conversation: str | None = None) -> int:
        """Forget what waits for the user (in one conversation, or all): the user has seen it."""
        where = [*user_rows(notify_pending, host, username)]
        if conversation is not None:
            where.append(notify_pending.c.conversation == conversation)
        async with self._writer.begin() as conn:
            return (await conn.execute(delete(notify_pending).where(*where))).rowcount

    async def waiting(self, host: str, username: str) -> list[Waiting]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(notify_pending).where(*user_rows(notify_pending, host, username))
                                      .order_by(notify_pending.c.first))
            return [_waiting(r) for r in rows]

    async def due_users(self, host: str, before: datetime, limit: int = 500) -> list[tuple[str, datetime]]:
        """Users of `host` with messages waiting since `before` or earlier, and since when."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(notify_pending.c.username, notify_pending.c.first)
                .where(notify_pending.c.host == host, notify_pending.c.first <= before)
                .order_by(notify_pending.c.first).limit(limit))
            seen: dict[str, datetime] = {}
            for row in rows:
                seen.setdefault(row.username, row.first)
            return list(seen.items())

    async def take(self, host: str, username: str, make: Outgoing | None) -> list[Waiting]:
        """Take everything that waits for the user and, if something did, queue `make` with it as its payload's
        'conversations' (None: just take). Returns what was taken (empty when another process took it)."""
        async with self._writer.begin() as conn:
            rows = list(await conn.execute(delete(notify_pending).where(*user_rows(notify_pending, host, username))
                                           .returning(notify_pending.c.conversation, notify_pending.c.count,
                                                      notify_pending.c.senders, notify_pending.c.first,
                                                      notify_pending.c.recent)))
            taken = sorted((_waiting(r) for r in rows),
                           key=lambda w: (-w.count, w.conversation))  # the busiest conversations first
            if taken and make is not None:
                payload = {**make.payload, "conversations": [
                    {"jid": w.conversation, "count": w.count, "senders": list(w.senders),
                     **({"bodies": [list(b) for b in w.bodies]} if w.bodies else {})} for w in taken]}
                await self._insert(conn, make, payload)
            return taken

    # --- the outbox -------------------------------------------------------------------------------

    async def queue(self, item: Outgoing) -> bool:
        """Add a notification; False when one with its id (idempotency key) exists already."""
        async with self._writer.begin() as conn:
            return await self._insert(conn, item, item.payload)

    @staticmethod
    async def _insert(conn: Any, item: Outgoing, payload: dict[str, Any]) -> bool:
        result = await conn.execute(dialect_insert(conn, notify_outbox).values(
            id=item.id, host=item.host, username=item.username, channel=item.channel, target=item.target,
            payload=payload, status=PENDING, due=item.due, lease=None, attempts=0, error=None,
            created=item.created).on_conflict_do_nothing(index_elements=["id"]))
        return bool(result.rowcount)

    async def claim(self, host: str, now: datetime, lease: timedelta, limit: int = 50) -> list[Outgoing]:
        """Notifications of `host` due now that this process will send: each is claimed by one process only."""
        ready = (notify_outbox.c.host == host,
                 or_(and_(notify_outbox.c.status == PENDING, notify_outbox.c.due <= now),
                     and_(notify_outbox.c.status == SENDING, notify_outbox.c.lease < now)))
        async with self._engine.connect() as conn:
            candidates = list(await conn.scalars(select(notify_outbox.c.id).where(*ready)
                                                 .order_by(notify_outbox.c.due).limit(limit)))
        claimed = []
        for key in candidates:
            async with self._writer.begin() as conn:
                won = await conn.execute(update(notify_outbox).where(notify_outbox.c.id == key, *ready)
                                         .values(status=SENDING, lease=now + lease))
                if won.rowcount:
                    row = (await conn.execute(select(notify_outbox).where(notify_outbox.c.id == key))).one()
                    claimed.append(_outgoing(row))
        return claimed

    async def finish(self, key: str, status: str, due: datetime | None = None, error: str | None = None,
                     attempted: bool = True) -> None:
        """Record the outcome of a claimed notification: 'sent', 'dead', or 'pending' again at `due`."""
        values: dict[str, Any] = {"status": status, "lease": None, "error": error}
        if due is not None:
            values["due"] = due
        if attempted:
            values["attempts"] = notify_outbox.c.attempts + 1
        async with self._writer.begin() as conn:
            await conn.execute(update(notify_outbox).where(notify_outbox.c.id == key).values(**values))

    async def list(self, host: str, status: str | None = None, username: str | None = None,
                   limit: int = 100) -> list[Outgoing]:
        where = [notify_outbox.c.host == host]
        if status is not None:
            where.append(notify_outbox.c.status == status)
        if username is not None:
            where.append(notify_outbox.c.username == username)
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(notify_outbox).where(*where)
                                      .order_by(notify_outbox.c.created).limit(limit))
            return [_outgoing(r) for r in rows]

    async def sent_since(self, host: str, since: datetime, username: str | None = None) -> int:
        """Notifications of the host (or one user) created since `since`: for the rate limits."""
        where = [notify_outbox.c.host == host, notify_outbox.c.created >= since]
        if username is not None:
            where.append(notify_outbox.c.username == username)
        async with self._engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(notify_outbox).where(*where)) or 0)
