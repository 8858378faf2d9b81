"""The archive store on SQLite and PostgreSQL: what deleting an account or expiring leaves behind."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from server.storage import Storage, archive, engine, open_storage, schema
from server.storage.archive import ArchiveFilter
from tests.storage_fixtures import storage_fixture, storage_url_fixture  # noqa: F401
from tests.test_basic_modules import wait_for

H = "example.org"
T0 = datetime(2024, 5, 1, tzinfo=UTC)


async def fill(storage: Storage, user: str, count: int) -> None:
    for i in range(count):
        await storage.archive.append(H, user, f"{user}-{i}", T0 + timedelta(hours=i), "carol@example.com", None,
                                     f"apple {user} {i}", f"<message><body>apple {i}</body></message>")


async def fill_as_written_then(storage: Storage, user: str, count: int) -> None:
    """What ``fill`` stores, inserted as rows alone: on a database of an earlier schema version its
    triggers indexed or queued the bodies, where today's writer queues them itself (step 13)."""
    async with storage.engine.begin() as conn:
        await conn.execute(schema.archive.insert(), [
            {"host": H, "username": user, "stanza_id": f"{user}-{i}", "stamp": T0 + timedelta(hours=i),
             "with_jid": "carol@example.com", "with_resource": None, "body": f"apple {user} {i}",
             "stanza_xml": f"<message><body>apple {i}</body></message>"} for i in range(count)])


async def test_deleting_an_account_deletes_its_archive_only(storage: Storage) -> None:
    for user in ("alice", "bob"):
        await storage.accounts.create(H, user, [])
        await fill(storage, user, 3)
    assert await storage.accounts.delete(H, "alice")
    for user, left in (("alice", 0), ("bob", 3)):
        assert (await storage.archive.query(H, user, ArchiveFilter(), 10)).count == left
        assert (await storage.archive.query(H, user, ArchiveFilter(text="apple"), 10)).count == left
    assert await storage.archive.bounds(H, "alice") == (None, None)


async def test_expiry_removes_the_oldest_and_keeps_the_search_index_in_step(storage: Storage) -> None:
    await fill(storage, "alice", 5)
    assert await storage.archive.expire("other.example", T0 + timedelta(days=1)) == 0
    assert await storage.archive.expire(H, T0 + timedelta(hours=2)) == 2
    page = await storage.archive.query(H, "alice", ArchiveFilter(text="apple"), 10)
    assert [m.id for m in page.messages] == ["alice-2", "alice-3", "alice-4"]
    first, last = await storage.archive.bounds(H, "alice")
    assert (first.id, last.id, last.stamp) == ("alice-2", "alice-4", T0 + timedelta(hours=4))
    await storage.archive.append(H, "alice", "alice-5", T0, "carol@example.com", None, "apple again", "<message/>")
    assert (await storage.archive.query(H, "alice", ArchiveFilter(text="apple"), 10)).count == 4


async def test_concurrent_appends_share_transactions_and_a_bad_row_fails_alone(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: 200 appends at once take far fewer transactions; a duplicate UID fails only itself."""
    await fill(storage, "alice", 1)
    transactions: list[int] = []
    insert = storage.archive._insert

    async def counted(rows: list[dict[str, object]]) -> None:
        transactions.append(len(rows))
        await insert(rows)

    monkeypatch.setattr(storage.archive, "_insert", counted)

    async def append(i: int, uid: str) -> None:
        await storage.archive.append(H, "alice", uid, T0, "carol@example.com", None, f"pear {i}", "<message/>")

    await asyncio.gather(*(append(i, f"p-{i}") for i in range(200)))
    assert sum(transactions) == 200 and len(transactions) < 20
    outcomes = await asyncio.gather(*(append(i, "alice-0" if i == 205 else f"p-{i}") for i in range(200, 210)),
                                    return_exceptions=True)
    failed = [i for i, outcome in enumerate(outcomes, 200) if isinstance(outcome, Exception)]
    assert failed == [205]
    page = await storage.archive.query(H, "alice", ArchiveFilter(text="pear"), 250)
    assert [m.id for m in page.messages] == [f"p-{i}" for i in range(210) if i != 205]  # in arrival order


async def fts_rows(storage: Storage, word: str) -> tuple[int, int]:
    """Rows the FTS5 index finds for ``word``, and rows still queued for it (SQLite)."""
    async with storage.engine.connect() as conn:
        found = await conn.scalar(text("SELECT count(*) FROM archive_fts WHERE archive_fts MATCH :w"), {"w": word})
        queued = await conn.scalar(text("SELECT count(*) FROM archive_fts_queue"))
    return int(found or 0), int(queued or 0)


async def test_bodies_are_indexed_in_the_background_and_before_a_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive, "INDEX_DELAY", 0.05)
    storage = await open_storage(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        await fill(storage, "alice", 3)
        assert await fts_rows(storage, "apple") == (0, 3)  # queued, not yet indexed

        async def indexed() -> bool:
            return await fts_rows(storage, "apple") == (3, 0)

        await wait_for(indexed)  # by the background indexer, without a search to make it
        monkeypatch.setattr(archive, "INDEX_DELAY", 60)
        await fill(storage, "bob", 2)
        await storage.archive.expire(H, T0 + timedelta(hours=1))  # deletes alice-0 (indexed), bob-0 (queued)
        assert await fts_rows(storage, "apple") == (2, 1)
        page = await storage.archive.query(H, "bob", ArchiveFilter(text="apple"), 10)  # indexes first
        assert [m.id for m in page.messages] == ["bob-1"]
        assert await fts_rows(storage, "apple") == (3, 0)
        await fill(storage, "carol", 1)
        assert await storage.archive.replace(H, "carol", "carol-0", "<message/>")  # retracted while queued
        assert (await storage.archive.query(H, "carol", ArchiveFilter(text="apple"), 10)).count == 0
        async with storage.engine.connect() as conn:  # FTS5's check of its own structure
            await conn.execute(text("INSERT INTO archive_fts(archive_fts) VALUES ('integrity-check')"))
    finally:
        await storage.close()


async def test_rows_indexed_by_the_old_trigger_stay_searchable_and_deletable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    monkeypatch.setattr(schema, "STEPS", schema.STEPS[:4])
    old = await open_storage(url)
    await fill_as_written_then(old, "alice", 3)
    await old.close()
    monkeypatch.undo()
    storage = await open_storage(url)
    try:
        assert await fts_rows(storage, "apple") == (3, 0)
        assert await storage.archive.expire(H, T0 + timedelta(hours=1)) == 1
        await fill(storage, "bob", 1)
        page = await storage.archive.query(H, "alice", ArchiveFilter(text="apple"), 10)
        assert [m.id for m in page.messages] == ["alice-1", "alice-2"]
        assert await fts_rows(storage, "apple") == (3, 0)
        async with storage.engine.connect() as conn:
            await conn.execute(text("INSERT INTO archive_fts(archive_fts) VALUES ('integrity-check')"))
    finally:
        await storage.close()


async def test_rows_queued_by_the_trigger_before_step_13_are_indexed_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 13 drops the trigger that queued each row's body; what it had queued is indexed all the same, and
    the writer queues new bodies itself, in both of SQLite's write paths (inline and aiosqlite's)."""
    monkeypatch.setattr(archive, "INDEX_DELAY", 60)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    every_step = schema.STEPS
    monkeypatch.setattr(schema, "STEPS", every_step[:11])
    old = await open_storage(url)
    await fill_as_written_then(old, "alice", 2)
    assert await fts_rows(old, "apple") == (0, 2)
    await old.close()
    monkeypatch.setattr(schema, "STEPS", every_step)
    storage = await open_storage(url)
    try:
        async with storage.engine.connect() as conn:
            found = await conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'"))
            triggers = set(found.scalars())
        assert triggers == {"archive_fts_delete"}
        await fill(storage, "bob", 2)
        await storage.archive.append(H, "bob", "bob-silent", T0, "carol@example.com", None, None, "<message/>")
        assert await fts_rows(storage, "apple") == (0, 4)  # the body-less row is not queued
        await storage.archive.append_many(H, "carol", [
            archive.NewMessage("carol-0", T0, "bob@example.com", None, "apple carol", "<message/>")])
        page = await storage.archive.query(H, "bob", ArchiveFilter(text="apple"), 10)
        assert [m.id for m in page.messages] == ["bob-0", "bob-1"]
        assert await fts_rows(storage, "apple") == (5, 0)
        assert (await storage.archive.query(H, "alice", ArchiveFilter(text="apple"), 10)).count == 2
        assert await storage.archive.expire(H, T0 + timedelta(minutes=30)) == 4  # those stamped T0, all indexed by then
        assert await fts_rows(storage, "apple") == (2, 0)
        async with storage.engine.connect() as conn:
            await conn.execute(text("INSERT INTO archive_fts(archive_fts) VALUES ('integrity-check')"))
    finally:
        await storage.close()


@pytest.mark.parametrize("url", ["sqlite+aiosqlite:///:memory:", "file"])
async def test_both_sqlite_write_paths_queue_bodies_for_the_index(url: str, tmp_path: Path) -> None:
    """A file is written inline, an in-memory database through aiosqlite: each queues the bodies it writes."""
    storage = await open_storage(f"sqlite:///{tmp_path / 'p.db'}" if url == "file" else url)
    try:
        await fill(storage, "alice", 3)
        await storage.archive.append(H, "alice", "silent", T0, "carol@example.com", None, None, "<message/>")
        assert await fts_rows(storage, "apple") == (0, 3)
        page = await storage.archive.query(H, "alice", ArchiveFilter(text="apple 2"), 10)
        assert [m.id for m in page.messages] == ["alice-2"]
    finally:
        await storage.close()


async def test_indexing_and_queueing_read_only_the_new_rows_however_large_the_archive(tmp_path: Path) -> None:
    """Each batch's statements look rows up by id: with a join SQLite's planner was free to order, the indexing
    scanned the whole archive for every thousand bodies, and writes slowed down as the archive grew (from 15 to
    60 ms per thousand rows over the first hundred thousand)."""
    storage = await open_storage(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        await fill(storage, "alice", 3)
        async with storage.engine.connect() as conn:
            for statement in (*archive._INDEX_QUEUED, archive._QUEUE_BODIES, archive._LAST_ID):
                plan = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", (0,) * statement.count("?")))
                steps = [row[-1] for row in plan]
                assert "SCAN archive" not in steps, (statement, steps)
    finally:
        await storage.close()


async def test_the_archive_writer_leaves_checkpoints_to_a_worker_thread(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The inline writer runs on the event loop's thread, where SQLite's automatic checkpoints made the loop wait
    for the copy into the database file and its fsync: it checkpoints from a worker thread instead, holding the
    writers' lock (with writes going on during the checkpoint, the log was never started afresh and only grew),
    and what it committed reaches the database file itself (a copy of the file without its log holds the rows)."""
    path = tmp_path / "p.db"
    storage = await open_storage(f"sqlite:///{path}")
    lock = storage.archive._writer._lock
    assert lock is not None
    checkpoints: list[tuple[int, bool]] = []
    checkpoint = engine._checkpoint

    def spy(path: str) -> None:
        checkpoints.append((threading.get_ident(), lock.locked()))
        checkpoint(path)

    monkeypatch.setattr(engine, "_checkpoint", spy)
    monkeypatch.setattr(engine, "_CHECKPOINT_INTERVAL", 0.0)
    try:
        shared = engine.inline(storage.engine)
        assert shared is not None

        async def settled() -> bool:
            return bool(checkpoints) and shared._checkpointing is None

        await asyncio.gather(*(fill(storage, user, 20) for user in ("alice", "bob", "carol")))
        await wait_for(settled)
        shared.committed(lock)  # one more, in case the last commit came while a checkpoint was under way
        await wait_for(settled)
        assert checkpoints and all(thread != threading.get_ident() and locked for thread, locked in checkpoints)
        copy = tmp_path / "copy.db"
        copy.write_bytes(path.read_bytes())
        with sqlite3.connect(copy) as conn:
            assert conn.execute("SELECT count(*) FROM archive").fetchone() == (60,)
    finally:
        await storage.close()


def test_stamps_are_stored_as_sqlalchemy_stores_them_on_sqlite() -> None:
    """The writer formats stamps itself (archive.sqlite_stamp); queries compare them with SQLAlchemy's."""
    dialect = archive._SQLITE
    processor = schema.archive.c.stamp.type.dialect_impl(dialect).bind_processor(dialect)
    east = timezone(timedelta(hours=5, minutes=30))
    for stamp in (datetime.now(UTC), T0, datetime(5, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
                  datetime(2024, 5, 1, 3, 0, tzinfo=east), datetime(2024, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)):
        assert archive.sqlite_stamp(stamp) == processor(stamp)
    with pytest.raises(ValueError, match="naive"):
        archive.sqlite_stamp(datetime(2024, 5, 1))
