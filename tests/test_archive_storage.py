"""The archive store on SQLite and PostgreSQL: what deleting an account or expiring leaves behind."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from server.storage import Storage
from server.storage.archive import ArchiveFilter
from tests.storage_fixtures import storage_fixture, storage_url_fixture  # noqa: F401

H = "example.org"
T0 = datetime(2024, 5, 1, tzinfo=UTC)


async def fill(storage: Storage, user: str, count: int) -> None:
    for i in range(count):
        await storage.archive.append(H, user, f"{user}-{i}", T0 + timedelta(hours=i), "carol@example.com", None,
                                     f"apple {user} {i}", f"<message><body>apple {i}</body></message>")


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


async def test_concurrent_appends_share_transactions_and_a_bad_row_fails_alone(storage: Storage) -> None:
    """Group commit: 200 appends at once take far fewer transactions; a duplicate UID fails only itself."""
    from sqlalchemy import event

    await fill(storage, "alice", 1)
    commits: list[object] = []

    def committed(conn: object) -> None:
        commits.append(conn)

    event.listen(storage.engine.sync_engine, "commit", committed)

    async def append(i: int, uid: str) -> None:
        await storage.archive.append(H, "alice", uid, T0, "carol@example.com", None, f"pear {i}", "<message/>")

    await asyncio.gather(*(append(i, f"p-{i}") for i in range(200)))
    event.remove(storage.engine.sync_engine, "commit", committed)
    assert len(commits) < 20
    outcomes = await asyncio.gather(*(append(i, "alice-0" if i == 205 else f"p-{i}") for i in range(200, 210)),
                                    return_exceptions=True)
    failed = [i for i, outcome in enumerate(outcomes, 200) if isinstance(outcome, Exception)]
    assert failed == [205]
    page = await storage.archive.query(H, "alice", ArchiveFilter(text="pear"), 250)
    assert [m.id for m in page.messages] == [f"p-{i}" for i in range(210) if i != 205]  # in arrival order
