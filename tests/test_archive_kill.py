"""kill -9 and the archive's full-text queue on SQLite: since schema step 13 a batch queues its rows' bodies
for the index itself, in the transaction that writes the rows, rather than by a trigger per row. Whatever
stream management acknowledged before the kill is in both archives and found by a full-text search."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from server.storage import open_storage
from server.storage.archive import ArchiveFilter
from tests.test_faults import burst_until_killed, online, serving


async def test_kill_9_leaves_every_acknowledged_message_searchable_in_both_archives(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/data/parley.db"
    async with serving(tmp_path, url, "alice", "bob") as (parley, harness):
        bob, _ = await online(harness, "bob@localhost")
        acked = await burst_until_killed(harness, parley, "bob@localhost")
        bob.abort()
    storage = await open_storage(url)
    try:
        async with storage.engine.connect() as conn:
            queued = await conn.scalar(text("SELECT count(*) FROM archive_fts_queue"))
            archived = await conn.scalar(text("SELECT count(*) FROM archive WHERE body IS NOT NULL"))
        assert archived and queued is not None and queued <= archived  # none queued without its row
        for body in acked:
            for user in ("alice", "bob"):
                page = await storage.archive.query("localhost", user, ArchiveFilter(text=body), 10)
                assert page.count == 1, (user, body, page.count)
        async with storage.engine.connect() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM archive_fts_queue")) == 0
            indexed = await conn.scalar(text("SELECT count(*) FROM archive_fts WHERE archive_fts MATCH 'm0'"))
            assert indexed == 2  # the first message, in alice's archive and in bob's
            await conn.execute(text("INSERT INTO archive_fts(archive_fts) VALUES ('integrity-check')"))
    finally:
        await storage.close()
