"""Engine creation and the transaction helpers every store shares.

Supported URLs:

* ``sqlite+aiosqlite:///path/to/parley.db`` (``sqlite:///`` is accepted too). The parent folder is
  created. Every connection runs with ``journal_mode=WAL``, ``synchronous=NORMAL`` and
  ``foreign_keys=ON``.
* ``postgresql+asyncpg://user@host:5432/db`` (``postgresql://`` is accepted too). An optional
  ``?schema=NAME`` query parameter (lower-case letters, digits and ``_``) puts all of Parley's tables
  in that schema: it is removed from the URL, applied as the connection's ``search_path`` and
  created by the migration when missing. Use it to share one database between several servers or
  test runs.

SQLite transactions are started by us rather than by the sqlite3 module, so DDL is transactional
and writers take the database lock up front (``BEGIN IMMEDIATE``): two writers can then never both
hold a read snapshot and deadlock while upgrading to a write lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.util
import logging
import os
import re
import sqlite3
import sys
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import ColumnElement, Table, bindparam, create_engine, event, make_url, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.util import await_only

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine


def _asyncio_engine_module() -> ModuleType:
    """SQLAlchemy's asyncio engine (``sqlalchemy.ext.asyncio.engine``) without its package's ``__init__``.

    That ``__init__`` also imports the ORM's ``AsyncSession``, hence all of ``sqlalchemy.orm``: some 7 MiB of
    resident memory in every process for what Parley, which uses Core alone, never calls. The package stands
    in as a bare module while its engine module loads, and is taken out again: code that imports
    ``sqlalchemy.ext.asyncio`` later (the ORM's users) runs the real ``__init__``, which finds this same
    engine module, so there is one ``AsyncEngine`` class either way. The other storage modules import these
    names for their annotations only (``TYPE_CHECKING``); tests/test_architecture.py checks that the ORM
    stays out.
    """
    package = "sqlalchemy.ext.asyncio"
    if package in sys.modules:  # the ORM's users came first: nothing to save
        from sqlalchemy.ext.asyncio import engine as loaded

        return loaded
    spec = importlib.util.find_spec(package)
    assert spec is not None
    sys.modules[package] = importlib.util.module_from_spec(spec)  # the package's module, its __init__ not run
    try:
        from sqlalchemy.ext.asyncio import engine as asyncio_engine
    finally:
        del sys.modules[package]
    return asyncio_engine


if not TYPE_CHECKING:
    create_async_engine = _asyncio_engine_module().create_async_engine

log = logging.getLogger("parley.storage")
T = TypeVar("T")

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")
_WRITE_OPTION = "parley_write"
# A checkpoint (copying the write-ahead log into the database) every 10,000 pages (40 MB) instead of
# SQLite's 1,000: a page the archive's appends rewrite many times is copied once per checkpoint, and
# checkpoints, which run in the committing connection, stall the event loop ten times less often.
_SQLITE_PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "wal_autocheckpoint=10000")
# The page cache of the connection that writes archive batches, in KiB (SQLite's default is 2,000): a batch
# touches the last pages of each of the archive's indexes for every user in it, and with the default those
# were read back from the file for every batch. 16 MiB took a row from 33 to 21-24 µs of CPU in batches of
# 1,000 over a 100,000-row archive; more made no difference.
_WRITING_CACHE_KIB = 16384
# Seconds a SQLite writer waits for the database lock before failing with "database is locked".
_SQLITE_BUSY_TIMEOUT = 30
# Seconds at least between two checkpoints of the write-ahead log on behalf of the inline writer
# (InlineSQLite.committed): a page the batches rewrite in the meantime is copied once. A busy archive writes
# some 100 MB of log a second (each batch rewrites the last pages of four indexes for each of its users).
_CHECKPOINT_INTERVAL = 0.25
# Bytes the write-ahead log file is cut back to once a checkpoint has emptied it (it is reused, not shrunk).
_WAL_SIZE_LIMIT = 64 * 1024 * 1024


def make_engine(url: str) -> tuple[AsyncEngine, str | None]:
    """Create the engine for ``url``; also return the PostgreSQL schema it names, if any."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed), None
    if backend == "postgresql":
        return _postgresql_engine(parsed)
    raise ValueError(f"unsupported storage backend {backend!r}: use sqlite or postgresql")


def _private_file(path: Path) -> None:
    """Create the database file (and its folder) for the server's user alone, before SQLite creates it with
    the umask's usual 0644; its -wal and -shm files take the database file's mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _sqlite_pragma(cursor: Any, pragma: str, sleep: Callable[[float], object]) -> None:
    """Run a PRAGMA, retrying while the file is locked.

    Switching a new database file to WAL needs an exclusive lock and fails at once, without waiting on the
    busy timeout, when several connections open the file together (as at first start).
    """
    for attempt in range(50):
        try:
            cursor.execute(f"PRAGMA {pragma}")
            return
        except Exception as exc:
            if "locked" not in str(exc) or attempt == 49:
                raise
            sleep(0.01 * (attempt + 1))


def _sqlite_engine(url: URL) -> AsyncEngine:
    if "schema" in url.query:
        raise ValueError("the schema parameter is only supported on PostgreSQL")
    url = url.set(drivername="sqlite+aiosqlite")
    database = url.database or ""
    if database not in ("", ":memory:") and not database.startswith("file:"):
        _private_file(Path(database))
    engine = create_async_engine(url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT})
    _sqlite_setup(engine.sync_engine, lambda seconds: await_only(asyncio.sleep(seconds)))
    return engine


def _sqlite_setup(engine: Engine, sleep: Callable[[float], object]) -> None:
    """Every SQLite connection's pragmas, and BEGIN (IMMEDIATE for writers) issued by us."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        for pragma in _SQLITE_PRAGMAS:
            _sqlite_pragma(cursor, pragma, sleep)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class InlineSQLite:
    """The engine's SQLite file, used from the event loop's own thread.

    A short SQLite statement takes microseconds, less than handing it to aiosqlite's thread and back
    (a queue, a lock and a wake-up on each side), so the hot paths (archive batches, login reads) run
    theirs inline, as Prosody runs all of its storage. ``engine`` is a synchronous SQLAlchemy engine for
    Core statements; ``writing()`` is a DBAPI connection kept for batches written with ``executemany``,
    where SQLAlchemy's per-transaction and per-row work would cost more than SQLite's.
    """

    def __init__(self, url: URL) -> None:
        self.engine = create_engine(url.set(drivername="sqlite+pysqlite"),
                                    connect_args={"timeout": _SQLITE_BUSY_TIMEOUT})
        _sqlite_setup(self.engine, time.sleep)
        self._writing: Any = None
        self._path = url.database or ""
        self._checkpointing: asyncio.Task[None] | None = None
        self._last_checkpoint = 0.0

    def writing(self) -> sqlite3.Connection:
        if self._writing is None:
            self._writing = self.engine.raw_connection()
            conn = self._writing.driver_connection
            conn.execute(f"PRAGMA cache_size = -{_WRITING_CACHE_KIB}")
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # see committed()
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        return self._writing.driver_connection

    def committed(self, lock: asyncio.Lock) -> None:
        """After an inline write transaction: checkpoint the write-ahead log in a thread, at most once per
        `_CHECKPOINT_INTERVAL`. SQLite runs its automatic checkpoints in the committing connection, here
        the event loop's thread, which then waited for the copy into the database file and its fsync (a
        tenth of a busy archive's time). The checkpoint holds the writers' `lock`, so that it copies the
        whole log and the next write starts the log afresh: with writes going on during it, the log only
        grew (800 MB in half a minute of archiving). The writers wait for it; the event loop does not."""
        now = time.monotonic()
        if self._checkpointing is not None or now - self._last_checkpoint < _CHECKPOINT_INTERVAL:
            return
        self._last_checkpoint = now
        self._checkpointing = asyncio.get_running_loop().create_task(self._checkpoint(lock))

    async def _checkpoint(self, lock: asyncio.Lock) -> None:
        try:
            async with lock:
                await asyncio.get_running_loop().run_in_executor(None, _checkpoint, self._path)
        except Exception as exc:
            log.warning("checkpoint of %s failed: %s", self._path, exc)
        finally:
            self._checkpointing = None

    def dispose(self) -> None:
        if self._writing is not None:
            self._writing.close()
            self._writing = None
        self.engine.dispose()


def _checkpoint(path: str) -> None:
    """Copy what the write-ahead log holds into the database file without waiting for anyone (PASSIVE),
    on a connection of this call's own: it runs in a worker thread."""
    conn = sqlite3.connect(path, timeout=_SQLITE_BUSY_TIMEOUT)
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        conn.close()


def inline(engine: AsyncEngine) -> InlineSQLite | None:
    """The inline access to ``engine``'s SQLite file, shared by its stores.

    None for PostgreSQL, whose statements all go through ``engine``, and for in-memory databases, which
    a second connection would not see. Kept per engine, the answer costs every read one lookup.
    """
    key = engine.sync_engine
    if key not in _INLINE:
        database = engine.url.database or ""
        file = engine.dialect.name == "sqlite" and database not in ("", ":memory:") and not database.startswith("file:")
        _INLINE[key] = InlineSQLite(engine.url) if file else None
    return _INLINE[key]


async def read(engine: AsyncEngine, query: Callable[[Connection], T]) -> T:
    """Run ``query`` in a read transaction: inline on a SQLite file, through ``engine`` otherwise.

    For the short indexed reads of a login or a stanza, where the statement costs less than a hop to
    aiosqlite's thread. One function serves both backends (``run_sync`` on the async engine).
    """
    shared = inline(engine)
    if shared is not None:
        with shared.engine.connect() as conn:
            return query(conn)
    async with engine.connect() as conn:
        return await conn.run_sync(query)


async def dispose_inline(engine: AsyncEngine) -> None:
    """Close the inline connections, when the async engine is disposed of, once a checkpoint under way is done
    (it holds the writers' lock and a worker thread)."""
    shared = _INLINE.pop(engine.sync_engine, None)
    if shared is not None:
        if shared._checkpointing is not None:
            await asyncio.gather(shared._checkpointing, return_exceptions=True)
        shared.dispose()


_INLINE: weakref.WeakKeyDictionary[Engine, InlineSQLite | None] = weakref.WeakKeyDictionary()


def _postgresql_engine(url: URL) -> tuple[AsyncEngine, str | None]:
    schema = url.query.get("schema")
    if schema is not None and (not isinstance(schema, str) or not _SCHEMA_NAME.match(schema)):
        raise ValueError(f"invalid schema name {schema!r}: use lower-case letters, digits and _")
    url = url.difference_update_query(["schema"]).set(drivername="postgresql+asyncpg")
    connect_args: dict[str, Any] = {}
    if schema is not None:
        connect_args["server_settings"] = {"search_path": schema}
    return create_async_engine(url, connect_args=connect_args, pool_pre_ping=True), schema


class Writer:
    """Write transactions on one engine (BEGIN IMMEDIATE on SQLite), taken one at a time on SQLite.

    SQLite has one write lock per database file. Writers that queue for it inside SQLite wait in its busy
    handler, which polls with sleeps of up to 100 ms, so a burst of writes (a hundred sessions ending
    at once) costs seconds; queued on an asyncio lock instead, each writer starts the moment the previous
    one commits. PostgreSQL writers run concurrently.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine.execution_options(**{_WRITE_OPTION: True})
        self._lock = _SQLITE_WRITE_LOCKS.setdefault(engine.sync_engine, asyncio.Lock()) \
            if engine.dialect.name == "sqlite" else None
        self.inline = inline(engine)

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        if self._lock is None:
            async with self._engine.begin() as conn:
                yield conn
            return
        async with self._lock, self._engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def begin_inline(self) -> AsyncIterator[sqlite3.Connection]:
        """A write transaction on the inline DBAPI connection (see :class:`InlineSQLite`), on SQLite only.

        It takes the same lock as :meth:`begin`: no aiosqlite writer of this process then holds SQLite's
        lock, so BEGIN IMMEDIATE never waits, on the event loop's thread, for a writer that needs that loop.
        """
        assert self.inline is not None and self._lock is not None
        async with self._lock:
            conn = self.inline.writing()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # A full disk may have rolled the transaction back already (SQLite does on SQLITE_FULL), or
                # may fail the COMMIT and leave it open: the next BEGIN needs it closed either way.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self.inline.committed(self._lock)


# One lock per SQLite engine, shared by every store writing through it.
_SQLITE_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, asyncio.Lock] = weakref.WeakKeyDictionary()


def writer(engine: AsyncEngine) -> Writer:
    """Where a store opens its write transactions."""
    return Writer(engine)


def dialect_insert(conn: AsyncConnection, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT supporting ON CONFLICT for the connection's backend (both spell it the same)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql  # loaded with the engine of a PostgreSQL URL, by no other

        return postgresql.insert(table)
    return sqlite.insert(table)


def upsert(
    conn: AsyncConnection, table: Table, key: dict[str, Any], values: dict[str, Any]
) -> postgresql.Insert | sqlite.Insert:
    """INSERT the row ``key | values``, or UPDATE ``values`` on the row with that primary ``key``."""
    stmt = dialect_insert(conn, table).values(**key, **values)
    return stmt.on_conflict_do_update(
        index_elements=list(key), set_={name: stmt.excluded[name] for name in values}
    )


def user_rows(table: Table, host: str, username: str) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """WHERE clauses selecting one user's rows of ``table``."""
    return table.c.host == host, table.c.username == username


def user_params(table: Table) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """WHERE clauses selecting one user's rows of ``table``, the user given as the parameters ``host`` and
    ``username``: for the statements of hot paths, built once and run with those parameters."""
    return table.c.host == bindparam("host"), table.c.username == bindparam("username")


async def lock_user(conn: AsyncConnection, purpose: int, host: str, user: str) -> None:
    """Serialise read-then-write transactions on one user's data until the transaction ends.

    PostgreSQL's READ COMMITTED would otherwise let concurrent transactions act on the same stale
    read; SQLite writers already hold the whole-database lock from BEGIN IMMEDIATE.
    """
    if conn.dialect.name == "postgresql":
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(:purpose, hashtext(:key))"),
            {"purpose": purpose, "key": f"{user}@{host}"},
        )


# SQLSTATE class 53, insufficient resources: disk full (53100), out of memory, too many connections.
_PG_INSUFFICIENT_RESOURCES = "53"
_CAUSES = 4  # SQLAlchemy's error, the adapter's, the driver's: a longer chain is not the database's


def storage_condition(exc: BaseException) -> str | None:
    """The stanza error for a stanza whose storage failed with ``exc``; None if ``exc`` is not the storage's.

    A full disk or database is ``resource-constraint`` (it may pass: the sender can try again), any other
    error of the database ``internal-server-error``. Either way it is that stanza that fails, not the
    stream that carried it.
    """
    if _full(exc):
        return "resource-constraint"
    if isinstance(exc, DBAPIError | sqlite3.Error):
        return "internal-server-error"
    return None


def storage_error_text(exc: BaseException) -> str:
    """What the database said, for the log: SQLAlchemy's own text adds the statement and its parameters,
    which hold message bodies."""
    return f"{type(exc.orig).__name__}: {exc.orig}" if isinstance(exc, DBAPIError) else str(exc)


def _full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or the driver error it wraps, says the disk or the database is full."""
    for _ in range(_CAUSES):
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, sqlite3.Error) and (exc.sqlite_errorcode & 0xFF) == sqlite3.SQLITE_FULL:
            return True
        sqlstate = getattr(exc, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_PG_INSUFFICIENT_RESOURCES):
            return True
        exc = exc.orig if isinstance(exc, DBAPIError) else exc.__cause__
    return False


class Outage:
    """The failures of one kind of write, logged once per burst and counted.

    A full disk fails every message: a line per message would bury the one that says why. ``failures``
    counts every failed write since the start, for metrics.
    """

    def __init__(self, what: str, effect: str) -> None:
        self.what = what
        self.effect = effect
        self.failures = 0
        self._burst = 0

    def failed(self, exc: BaseException, count: int = 1) -> None:
        if self._burst == 0:
            log.warning("%s: a write failed (%s); %s until a write succeeds", self.what, storage_error_text(exc),
                        self.effect)
        self._burst += count
        self.failures += count

    def succeeded(self) -> None:
        if self._burst:
            log.warning("%s: writes work again, after %d failed", self.what, self._burst)
            self._burst = 0
