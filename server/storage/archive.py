"""The message archive of each user (XEP-0313): append, query a page, first and last, expire.

An archive belongs to an owner JID's (host, username): a user's, or a room's (service domain, room name).
Rows are never updated, except that a retracted message becomes its tombstone in place (``replace``): the
internal ``id`` gives the archive's order, the ``stanza_id`` is the unpredictable UID clients see.
``with_jid``/``with_resource`` hold the other party of each message, so that every query filter is a
condition on an indexed column. Bodies are indexed for full-text search by the database itself: an FTS5
table on SQLite, fed in batches from a queue that each write fills (see ``index_bodies``), a generated
``tsvector`` column with a GIN index on PostgreSQL (see the migration steps in
:mod:`server.storage.schema`). Both treat a search as all of its words, case-insensitively.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Integer, case, column, delete, func, literal, literal_column, select, text, update
from sqlalchemy.dialects import sqlite

from server.metrics import LatencyHistogram
from server.storage.engine import Outage, storage_condition, user_rows, writer
from server.storage.schema import archive

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

_WORD = re.compile(r"\w+")
INDEX_DELAY = 1.0  # seconds from an archive write to indexing its bodies for full-text search (SQLite)
# Bodies queued for the full-text index past which a batch indexes them in its own transaction (SQLite):
# under load that is cheaper than indexing them once a second in aiosqlite's thread, which held the write
# lock, and so the batches, for about a third of each second.
INDEX_BATCH = 1000

log = logging.getLogger("parley.archive")


class UnknownArchiveId(LookupError):
    """A query named a UID that is not in the archive (XEP-0313: item-not-found)."""


@dataclass(frozen=True)
class ArchivedMessage:
    id: str  # the UID, XEP-0359 stanza-id
    stamp: datetime
    stanza_xml: str


@dataclass(frozen=True)
class NewMessage:
    """A message to archive: its UID, when, the other party (bare JID and resource), body and stanza."""

    stanza_id: str
    stamp: datetime
    with_jid: str
    with_resource: str | None
    body: str | None
    stanza_xml: str


@dataclass(frozen=True)
class ArchiveFilter:
    """The XEP-0313 form fields; None (or empty) means "no condition"."""

    with_jid: str | None = None  # a bare JID
    with_resource: str | None = None  # given with with_jid when the query named a full JID
    start: datetime | None = None
    end: datetime | None = None
    after_id: str | None = None
    before_id: str | None = None
    ids: Sequence[str] = ()
    text: str | None = None


@dataclass
class Page:
    messages: list[ArchivedMessage] = field(default_factory=list)  # oldest first
    count: int = 0  # messages matching the filter, over all pages
    index: int | None = None  # position of the first message of the page among them
    complete: bool = True  # no more matching messages beyond the page, in the direction asked


def words(search: str) -> list[str]:
    return _WORD.findall(search)


# A row to insert: the values of _COLUMNS, in that order (a tuple: a dict per row cost the hot path).
Row = tuple[str, str, str, datetime, str, str | None, str | None, str]
_COLUMNS = ["host", "username", "stanza_id", "stamp", "with_jid", "with_resource", "body", "stanza_xml"]
_BODY = _COLUMNS.index("body")


def _row(host: str, user: str, m: NewMessage) -> Row:
    return host, user, m.stanza_id, m.stamp, m.with_jid, m.with_resource, m.body, m.stanza_xml


# The INSERT of a batch on SQLite's inline connection, with its parameters in SQLAlchemy's storage form.
_SQLITE = sqlite.dialect()
_INSERT_SQL = str(archive.insert().compile(dialect=_SQLITE, column_keys=_COLUMNS))
# The rows of a batch whose bodies wait for the full-text index (schema step 13: no trigger per row). Every
# row a write transaction inserts gets an id above the largest before it, and it holds the write lock.
_LAST_ID = "SELECT coalesce(max(id), 0) FROM archive"
_QUEUE_BODIES = "INSERT INTO archive_fts_queue(id) SELECT id FROM archive WHERE id > ? AND body IS NOT NULL"


def sqlite_stamp(stamp: datetime) -> str:
    """What SQLAlchemy stores on SQLite for a UTCDateTime (naive UTC, 'YYYY-MM-DD HH:MM:SS.ffffff', always
    with microseconds, so that stamps compare as strings), made without its bind processors: they took a
    twentieth of the server's CPU with the archive on."""
    if stamp.utcoffset() is None:
        raise ValueError(f"naive datetime {stamp!r}: pass a timezone-aware datetime")
    return stamp.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _sqlite_values(row: Row) -> tuple[Any, ...]:
    host, user, stanza_id, stamp, with_jid, with_resource, body, stanza_xml = row
    return host, user, stanza_id, sqlite_stamp(stamp), with_jid, with_resource, body, stanza_xml


def _settle(done: asyncio.Future[None], error: Exception | None) -> None:
    """Tell a waiting append how its row fared, unless it stopped waiting (its caller was cancelled)."""
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


class ArchiveStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)
        # Group commit: appends that arrive while a transaction is being written wait for the next one,
        # which writes them all at once.
        self._pending: list[tuple[Row, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._indexing: asyncio.TimerHandle | asyncio.Task[None] | None = None
        self._unindexed = 0  # bodies written by batches since the last indexing (SQLite)
        # Appends that failed (outage.failures, for metrics), logged once per burst.
        self.outage = Outage("message archive", "messages are delivered without being archived")
        self.commits = LatencyHistogram()  # seconds each group commit takes, for metrics

    def append(self, host: str, user: str, stanza_id: str, stamp: datetime, with_jid: str,
               with_resource: str | None, body: str | None, stanza_xml: str) -> asyncio.Future[None]:
        """Queue one message for the archive; the future is done once its row is committed.

        Callers deliver a message only after the future is done, so a message that reached anyone is in
        the archive even if the process dies right after. Appends queued while a transaction is being
        written share the next one (group commit): under load a commit is paid once per batch instead of
        once per message. A failed append (a full disk) raises from the future, and is logged and counted
        in ``outage`` here: callers deliver the message all the same.
        """
        row = (host, user, stanza_id, stamp, with_jid, with_resource, body, stanza_xml)
        done = asyncio.get_running_loop().create_future()
        self._pending.append((row, done))
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
        return done

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                began = time.perf_counter()
                try:
                    await self._insert([row for row, _ in batch])
                    self.commits.observe(time.perf_counter() - began)
                except Exception as exc:
                    if storage_condition(exc) == "resource-constraint":
                        # A full disk fails every row alike: trying them one by one would only wait longer.
                        self._failed(batch, exc)
                        continue
                    # One bad row must not fail the others: write them one by one to find it.
                    for one in batch:
                        try:
                            await self._insert([one[0]])
                        except Exception as row_exc:
                            self._failed([one], row_exc)
                        else:
                            self._written([one])
                    continue
                self._written(batch)
        finally:
            self._flushing = None

    @property
    def queued(self) -> int:
        """Messages waiting for the next commit (not those of the commit under way)."""
        return len(self._pending)

    def _written(self, batch: list[tuple[Row, asyncio.Future[None]]]) -> None:
        self.outage.succeeded()
        for _, done in batch:
            _settle(done, None)

    def _failed(self, batch: list[tuple[Row, asyncio.Future[None]]], exc: Exception) -> None:
        self.outage.failed(exc, len(batch))
        for _, done in batch:
            _settle(done, exc)

    async def _insert(self, rows: list[Row]) -> None:
        if self._writer.inline is not None:
            bodies = self._unindexed + sum(row[_BODY] is not None for row in rows)
            async with self._writer.begin_inline() as dbapi:
                last = dbapi.execute(_LAST_ID).fetchone()[0]
                dbapi.executemany(_INSERT_SQL, [_sqlite_values(row) for row in rows])
                if bodies > self._unindexed:
                    dbapi.execute(_QUEUE_BODIES, (last,))
                if bodies >= INDEX_BATCH:
                    for statement in _INDEX_QUEUED:
                        dbapi.execute(statement)
            self._unindexed = 0 if bodies >= INDEX_BATCH else bodies
        else:
            async with self._writer.begin() as conn:
                sqlite = conn.dialect.name == "sqlite"
                last = await conn.scalar(text(_LAST_ID)) if sqlite else 0
                await conn.execute(archive.insert(), [dict(zip(_COLUMNS, row, strict=True)) for row in rows])
                if sqlite and any(row[_BODY] is not None for row in rows):
                    await conn.exec_driver_sql(_QUEUE_BODIES, (last,))
        if self._engine.dialect.name == "sqlite" and self._indexing is None:
            self._indexing = asyncio.get_running_loop().call_later(INDEX_DELAY, self._start_indexing)

    def _start_indexing(self) -> None:
        self._indexing = asyncio.get_running_loop().create_task(self.index_bodies())
        self._indexing.add_done_callback(self._indexed)

    def _indexed(self, task: asyncio.Task[None]) -> None:
        self._indexing = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("indexing archived bodies failed (a search indexes them first): %s", task.exception())

    async def index_bodies(self) -> None:
        """Index the bodies queued since the last time for full-text search (SQLite).

        A write only queues its rows' bodies: indexed in batches, once a second or before a search, a
        body costs FTS5 a fraction of what it did one transaction at a time.
        """
        async with self._writer.begin() as conn:
            await _index_queued(conn)
        self._unindexed = 0

    def close(self) -> None:
        """Stop the indexing timer (what is still queued is indexed after the next start, at the latest
        before the next search)."""
        if self._indexing is not None:
            self._indexing.cancel()
            self._indexing = None

    async def append_many(self, host: str, user: str, messages: Sequence[NewMessage]) -> None:
        """Archive several messages, in this order, in one transaction (a busy room writes them in batches)."""
        await self._insert([_row(host, user, m) for m in messages])

    async def query(self, host: str, user: str, filter: ArchiveFilter, max: int, after: str | None = None,
                    before: str | None = None) -> Page:
        """One page of the messages matching ``filter``, as RSM (XEP-0059) asks for it.

        ``after`` pages forward from a UID; ``before`` pages backward from a UID, or from the end of the
        archive when it is ''; ``max`` 0 only counts. Raises UnknownArchiveId for a UID not in the archive.
        """
        backward = before is not None
        anchor = before if backward else after
        if words(filter.text or "") and self._engine.dialect.name == "sqlite":
            await self.index_bodies()
        async with self._engine.begin() as conn:
            conditions = [*user_rows(archive, host, user), *await self._conditions(conn, host, user, filter)]
            if anchor:
                at = (await self._rows(conn, host, user, [anchor]))[0]
                conditions_of_page = [*conditions, archive.c.id < at if backward else archive.c.id > at]
            else:
                conditions_of_page = conditions
            rows = []
            if max > 0:
                rows = list(await conn.execute(
                    select(archive.c.id, archive.c.stanza_id, archive.c.stamp, archive.c.stanza_xml)
                    .where(*conditions_of_page)
                    .order_by(archive.c.id.desc() if backward else archive.c.id.asc())
                    .limit(max + 1)
                ))
            complete = len(rows) <= max
            rows = rows[:max]
            if backward:
                rows.reverse()
            # A page at either end of the results knows its index; one in the middle counts what is before it.
            before_first = func.sum(case((archive.c.id < rows[0].id, 1), else_=0)) if rows and anchor else literal(0)
            count, index = (await conn.execute(select(func.count(), before_first).where(*conditions))).one()
        if rows and not anchor:
            index = count - len(rows) if backward else 0
        messages = [ArchivedMessage(row.stanza_id, row.stamp, row.stanza_xml) for row in rows]
        return Page(messages, count, int(index or 0) if rows else None, complete and (max > 0 or count == 0))

    async def _rows(self, conn: AsyncConnection, host: str, user: str, ids: Sequence[str]) -> list[int]:
        """Internal ids of the UIDs, in the order given; UnknownArchiveId if one is missing."""
        if not ids:
            return []
        found = dict((await conn.execute(
            select(archive.c.stanza_id, archive.c.id).where(*user_rows(archive, host, user),
                                                             archive.c.stanza_id.in_(set(ids)))
        )).all())
        missing = [i for i in ids if i not in found]
        if missing:
            raise UnknownArchiveId(missing[0])
        return [found[i] for i in ids]

    async def _conditions(self, conn: AsyncConnection, host: str, user: str,
                          filter: ArchiveFilter) -> list[ColumnElement[bool]]:
        c = archive.c
        conditions: list[ColumnElement[bool]] = []
        if filter.with_jid is not None:
            conditions.append(c.with_jid == filter.with_jid)
            if filter.with_resource is not None:
                conditions.append(c.with_resource == filter.with_resource)
        if filter.start is not None:
            conditions.append(c.stamp >= filter.start)
        if filter.end is not None:
            conditions.append(c.stamp <= filter.end)
        if filter.after_id:
            conditions.append(c.id > (await self._rows(conn, host, user, [filter.after_id]))[0])
        if filter.before_id:
            conditions.append(c.id < (await self._rows(conn, host, user, [filter.before_id]))[0])
        if filter.ids:
            conditions.append(c.id.in_(await self._rows(conn, host, user, filter.ids)))
        search = words(filter.text or "")
        if search:
            conditions.append(_fulltext(conn.dialect.name, search))
        return conditions

    async def replace(self, host: str, user: str, stanza_id: str, stanza_xml: str) -> bool:
        """Put a tombstone in place of a message (XEP-0424, XEP-0425): it keeps its place and UID, and its
        body leaves the row and the full-text index. False when there is no such message."""
        async with self._writer.begin() as conn:
            row = (await conn.execute(select(archive.c.id, archive.c.body).where(
                *user_rows(archive, host, user), archive.c.stanza_id == stanza_id))).first()
            if row is None:
                return False
            if row.body is not None and conn.dialect.name == "sqlite":  # PostgreSQL's index column follows
                await _index_queued(conn)  # so that the body is in the index, to be deleted from it
                await conn.execute(text("INSERT INTO archive_fts(archive_fts, rowid, body)"
                                        " VALUES ('delete', :id, :body)"), {"id": row.id, "body": row.body})
            await conn.execute(update(archive).where(archive.c.id == row.id).values(body=None, stanza_xml=stanza_xml))
        return True

    async def delete_all(self, host: str, user: str) -> None:
        """Forget an owner's whole archive (a room that is destroyed)."""
        async with self._writer.begin() as conn:
            await conn.execute(delete(archive).where(*user_rows(archive, host, user)))

    async def bounds(self, host: str, user: str) -> tuple[ArchivedMessage | None, ArchivedMessage | None]:
        """The first and the last message of the archive (XEP-0313 7, archive metadata)."""
        async with self._engine.begin() as conn:
            ends = []
            for order in (archive.c.id.asc(), archive.c.id.desc()):
                row = (await conn.execute(
                    select(archive.c.stanza_id, archive.c.stamp, archive.c.stanza_xml)
                    .where(*user_rows(archive, host, user)).order_by(order).limit(1)
                )).first()
                ends.append(ArchivedMessage(row.stanza_id, row.stamp, row.stanza_xml) if row else None)
        return ends[0], ends[1]

    async def expire(self, host: str, older_than: datetime) -> int:
        """Delete the host's messages stamped before ``older_than``, in every archive; the number deleted."""
        async with self._writer.begin() as conn:
            gone = await conn.execute(delete(archive).where(archive.c.host == host, archive.c.stamp < older_than))
        return gone.rowcount or 0


# CROSS JOIN keeps the queue as the outer loop (SQLite does not reorder it): a plain join let the planner scan
# the whole archive for each batch of bodies, so that writing slowed down as the archive grew.
_INDEX_QUEUED = (
    "INSERT INTO archive_fts(rowid, body) SELECT archive.id, archive.body FROM archive_fts_queue"
    " CROSS JOIN archive ON archive.id = archive_fts_queue.id WHERE archive.body IS NOT NULL",
    "DELETE FROM archive_fts_queue",
)


async def _index_queued(conn: AsyncConnection) -> None:
    for statement in _INDEX_QUEUED:
        await conn.execute(text(statement))


def _fulltext(dialect: str, search: list[str]) -> ColumnElement[bool]:
    """Messages whose body has every word of the search."""
    if dialect == "postgresql":
        query = func.plainto_tsquery(literal_column("'simple'::regconfig"), " ".join(search))
        return literal_column("archive.body_tsv").op("@@")(query)
    # FTS5 query syntax: each word as a quoted string, all of them required.
    match = " ".join(f'"{word}"' for word in search)
    matching = text("SELECT rowid FROM archive_fts WHERE archive_fts MATCH :match").bindparams(match=match)
    return archive.c.id.in_(matching.columns(column("rowid", Integer)))
