"""Storage tests, run against SQLite and PostgreSQL (see tests/storage_fixtures.py)."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Connection, func, inspect, select, text

from server.storage import QuotaExceeded, RosterItem, Storage, StoredCredentials, open_storage, schema
from server.storage.engine import make_engine
from server.storage.schema import STEPS, schema_version
from tests.storage_fixtures import (  # noqa: F401
    connect_postgres,
    postgres_url,
    storage_fixture,
    storage_url_fixture,
)

H1 = "example.org"
H2 = "example.net"


@dataclass(frozen=True)
class FakeScram:
    """Stands in for server.sasl.scram.ScramCredentials: the store must accept any such object."""

    hash_name: str
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def creds(hash_name: str = "SHA-256", seed: int = 1) -> FakeScram:
    return FakeScram(hash_name, bytes([seed]) * 16, 4096 + seed, bytes([seed, 0, 255]) * 8, bytes(32))


def stored(c: FakeScram) -> StoredCredentials:
    return StoredCredentials(c.hash_name, c.salt, c.iterations, c.stored_key, c.server_key)


def stamp(seconds: int) -> datetime:
    return datetime(2024, 5, 1, 12, 0, tzinfo=UTC) + timedelta(seconds=seconds)


async def schema_version_of(storage: Storage) -> int:
    async with storage.engine.connect() as conn:
        return int(await conn.scalar(select(func.max(schema_version.c.version))))


# Accounts


async def test_create_and_get(storage: Storage) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    assert await storage.accounts.create(H1, "alice", [creds("SHA-1", 1), creds("SHA-256", 2)])
    account = await storage.accounts.get(H1, "alice")
    assert account is not None
    assert (account.host, account.username) == (H1, "alice")
    assert account.credentials == {"SHA-1": stored(creds("SHA-1", 1)), "SHA-256": stored(creds("SHA-256", 2))}
    assert isinstance(account.credentials["SHA-1"].salt, bytes)
    assert account.created.tzinfo is not None
    assert before <= account.created <= datetime.now(UTC) + timedelta(seconds=5)
    assert account.disabled is False
    assert account.last_logout is None and account.last_status is None
    assert await storage.accounts.exists(H1, "alice")
    assert not await storage.accounts.exists(H1, "bob")
    assert await storage.accounts.get(H1, "bob") is None


async def test_create_duplicate_keeps_original(storage: Storage) -> None:
    assert await storage.accounts.create(H1, "alice", [creds(seed=1)])
    assert not await storage.accounts.create(H1, "alice", [creds(seed=2)])
    account = await storage.accounts.get(H1, "alice")
    assert account is not None
    assert account.credentials == {"SHA-256": stored(creds(seed=1))}


async def test_create_without_credentials(storage: Storage) -> None:
    assert await storage.accounts.create(H1, "nopass", [])
    account = await storage.accounts.get(H1, "nopass")
    assert account is not None and account.credentials == {}


async def test_set_credentials_replaces_all(storage: Storage) -> None:
    await storage.accounts.create(H1, "alice", [creds("SHA-1", 1), creds("SHA-256", 2)])
    assert await storage.accounts.set_credentials(H1, "alice", [creds("SHA-256", 3)])
    account = await storage.accounts.get(H1, "alice")
    assert account is not None
    assert account.credentials == {"SHA-256": stored(creds("SHA-256", 3))}
    assert not await storage.accounts.set_credentials(H1, "nobody", [creds()])
    assert not await storage.accounts.exists(H1, "nobody")


async def test_delete_cascades_to_user_data_only(storage: Storage) -> None:
    for user in ("alice", "bob"):
        await storage.accounts.create(H1, user, [creds()])
        await storage.roster.put(H1, user, RosterItem("carol@example.com", subscription="both"))
        await storage.roster.add_pending(H1, user, "dave@example.com", "<presence type='subscribe'/>")
        await storage.offline.push(H1, user, "<message/>", stamp(0), quota=10)
        await storage.kv.set(H1, user, "vcard", "", {"fn": user})
    await storage.kv.set(H1, "", "settings", "motd", "hello")
    version_before = await storage.roster.version(H1, "alice")

    assert await storage.accounts.delete(H1, "alice")
    assert not await storage.accounts.exists(H1, "alice")
    _, items = await storage.roster.get(H1, "alice")
    assert items == {}
    assert await storage.roster.list_pending(H1, "alice") == []
    assert await storage.offline.count(H1, "alice") == 0
    assert await storage.kv.keys(H1, "alice", "vcard") == []
    # A re-created account must not match a client's cached roster version of the old one.
    assert await storage.roster.version(H1, "alice") > version_before
    # Credentials went with the account.
    assert await storage.accounts.create(H1, "alice", [creds("SHA-1", 9)])
    account = await storage.accounts.get(H1, "alice")
    assert account is not None and set(account.credentials) == {"SHA-1"}

    # Nobody else's data is touched.
    assert await storage.accounts.exists(H1, "bob")
    assert set((await storage.roster.get(H1, "bob"))[1]) == {"carol@example.com"}
    assert len(await storage.roster.list_pending(H1, "bob")) == 1
    assert await storage.offline.count(H1, "bob") == 1
    assert await storage.kv.get(H1, "bob", "vcard") == {"fn": "bob"}
    assert await storage.kv.get(H1, "", "settings", "motd") == "hello"


async def test_delete_missing_account(storage: Storage) -> None:
    assert not await storage.accounts.delete(H1, "nobody")


async def test_list_and_count(storage: Storage) -> None:
    assert await storage.accounts.list(H1) == []
    assert await storage.accounts.count(H1) == 0
    for user in ("zoe", "Bob", "alice", "émile", "bob"):
        await storage.accounts.create(H1, user, [creds()])
    await storage.accounts.create(H2, "other", [creds()])
    assert await storage.accounts.list(H1) == ["Bob", "alice", "bob", "zoe", "émile"]
    assert await storage.accounts.count(H1) == 5
    assert await storage.accounts.list(H2) == ["other"]
    assert await storage.accounts.count(H2) == 1


async def test_set_disabled(storage: Storage) -> None:
    await storage.accounts.create(H1, "alice", [creds()])
    assert await storage.accounts.set_disabled(H1, "alice", True)
    account = await storage.accounts.get(H1, "alice")
    assert account is not None and account.disabled is True
    assert await storage.accounts.set_disabled(H1, "alice", True)  # unchanged still counts as found
    assert await storage.accounts.set_disabled(H1, "alice", False)
    account = await storage.accounts.get(H1, "alice")
    assert account is not None and account.disabled is False
    assert not await storage.accounts.set_disabled(H1, "nobody", True)


async def test_record_logout_normalises_to_utc(storage: Storage) -> None:
    await storage.accounts.create(H1, "alice", [creds()])
    when = datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=timezone(timedelta(hours=2)))
    await storage.accounts.record_logout(H1, "alice", when, "Gone fishing")
    account = await storage.accounts.get(H1, "alice")
    assert account is not None
    assert account.last_logout == when
    assert account.last_logout is not None and account.last_logout.utcoffset() == timedelta(0)
    assert account.last_status == "Gone fishing"
    await storage.accounts.record_logout(H1, "alice", when, None)
    account = await storage.accounts.get(H1, "alice")
    assert account is not None and account.last_status is None
    await storage.accounts.record_logout(H1, "nobody", when, None)  # no account: nothing happens


async def test_naive_datetime_refused(storage: Storage) -> None:
    await storage.accounts.create(H1, "alice", [creds()])
    with pytest.raises(Exception, match="naive datetime"):
        await storage.accounts.record_logout(H1, "alice", datetime(2024, 1, 1), None)


async def test_hosts_are_isolated(storage: Storage) -> None:
    assert await storage.accounts.create(H1, "alice", [creds(seed=1)])
    assert await storage.accounts.create(H2, "alice", [creds(seed=2)])
    await storage.roster.put(H1, "alice", RosterItem("bob@example.com"))
    await storage.offline.push(H2, "alice", "<message/>", stamp(0), quota=10)
    await storage.kv.set(H1, "alice", "private", "ns", "<x/>")

    one, two = await storage.accounts.get(H1, "alice"), await storage.accounts.get(H2, "alice")
    assert one is not None and two is not None
    assert one.credentials["SHA-256"].salt != two.credentials["SHA-256"].salt
    await storage.accounts.set_disabled(H1, "alice", True)
    two = await storage.accounts.get(H2, "alice")
    assert two is not None and not two.disabled
    assert (await storage.roster.get(H2, "alice"))[1] == {}
    assert await storage.offline.count(H1, "alice") == 0
    assert await storage.kv.get(H2, "alice", "private", "ns") is None

    assert await storage.accounts.delete(H1, "alice")
    assert await storage.accounts.exists(H2, "alice")
    assert await storage.offline.count(H2, "alice") == 1


async def test_unicode_usernames(storage: Storage) -> None:
    names = ["jürgen", "张伟", "δοκιμή", "😀"]
    for name in names:
        assert await storage.accounts.create(H1, name, [creds()])
    assert await storage.accounts.list(H1) == sorted(names)
    account = await storage.accounts.get(H1, "张伟")
    assert account is not None and account.username == "张伟"
    await storage.roster.put(H1, "jürgen", RosterItem("δοκιμή@example.org", name="Δ", groups=("Φίλοι",)))
    item = await storage.roster.get_item(H1, "jürgen", "δοκιμή@example.org")
    assert item == RosterItem("δοκιμή@example.org", name="Δ", groups=("Φίλοι",))
    await storage.kv.set(H1, "😀", "vcard", "", {"fn": "Smiley 😀"})
    assert await storage.kv.get(H1, "😀", "vcard") == {"fn": "Smiley 😀"}
    assert await storage.accounts.delete(H1, "😀")
    assert await storage.kv.get(H1, "😀", "vcard") is None


# Roster


async def test_roster_put_get_remove(storage: Storage) -> None:
    assert await storage.roster.get(H1, "alice") == (0, {})
    assert await storage.roster.version(H1, "alice") == 0
    item = RosterItem("bob@example.com", name="Bob", subscription="to", ask=True, groups=("Friends", "Work"))
    v1 = await storage.roster.put(H1, "alice", item)
    assert v1 == 1
    assert await storage.roster.get_item(H1, "alice", "bob@example.com") == item
    assert await storage.roster.get_item(H1, "alice", "nobody@example.com") is None

    replaced = RosterItem("bob@example.com", subscription="both", approved=True)
    v2 = await storage.roster.put(H1, "alice", replaced)
    v3 = await storage.roster.put(H1, "alice", RosterItem("carol@example.com"))
    assert v1 < v2 < v3
    version, items = await storage.roster.get(H1, "alice")
    assert version == v3
    assert items == {"bob@example.com": replaced, "carol@example.com": RosterItem("carol@example.com")}

    v4 = await storage.roster.remove(H1, "alice", "bob@example.com")
    assert v4 > v3
    assert await storage.roster.remove(H1, "alice", "bob@example.com") == v4  # nothing removed
    assert await storage.roster.version(H1, "alice") == v4
    assert set((await storage.roster.get(H1, "alice"))[1]) == {"carol@example.com"}
    assert await storage.roster.remove(H1, "nobody", "bob@example.com") == 0


async def test_roster_versions_are_per_user(storage: Storage) -> None:
    await storage.roster.put(H1, "alice", RosterItem("a@example.com"))
    await storage.roster.put(H1, "alice", RosterItem("b@example.com"))
    assert await storage.roster.put(H1, "bob", RosterItem("a@example.com")) == 1
    assert await storage.roster.put(H2, "alice", RosterItem("a@example.com")) == 1
    assert await storage.roster.version(H1, "alice") == 2


async def test_roster_concurrent_puts_get_distinct_versions(storage: Storage) -> None:
    versions = await asyncio.gather(
        *(storage.roster.put(H1, "alice", RosterItem(f"c{i}@example.com")) for i in range(10))
    )
    assert sorted(versions) == list(range(1, 11))
    assert len((await storage.roster.get(H1, "alice"))[1]) == 10


async def test_roster_rejects_bad_subscription(storage: Storage) -> None:
    with pytest.raises(ValueError):
        await storage.roster.put(H1, "alice", RosterItem("bob@example.com", subscription="sometimes"))
    assert await storage.roster.version(H1, "alice") == 0


async def test_pending_subscriptions(storage: Storage) -> None:
    assert await storage.roster.list_pending(H1, "alice") == []
    await storage.roster.add_pending(H1, "alice", "bob@example.com", "<presence type='subscribe' id='1'/>")
    await storage.roster.add_pending(H1, "alice", "ann@example.com", "<presence type='subscribe'/>")
    await storage.roster.add_pending(H1, "alice", "bob@example.com", "<presence type='subscribe' id='2'/>")
    assert await storage.roster.list_pending(H1, "alice") == [
        ("ann@example.com", "<presence type='subscribe'/>"),
        ("bob@example.com", "<presence type='subscribe' id='2'/>"),
    ]
    assert await storage.roster.list_pending(H2, "alice") == []
    assert await storage.roster.remove_pending(H1, "alice", "bob@example.com")
    assert not await storage.roster.remove_pending(H1, "alice", "bob@example.com")
    assert await storage.roster.list_pending(H1, "alice") == [
        ("ann@example.com", "<presence type='subscribe'/>")
    ]
    assert await storage.roster.version(H1, "alice") == 0  # pending requests are not roster items


# Offline messages


async def test_offline_push_pop_order(storage: Storage) -> None:
    # Stored out of stamp order: delivery follows arrival order.
    await storage.offline.push(H1, "alice", "<message id='1'/>", stamp(10), quota=10)
    await storage.offline.push(H1, "alice", "<message id='2'/>", stamp(5), quota=10)
    plus_two = timezone(timedelta(hours=2))
    await storage.offline.push(H1, "alice", "<message id='3'/>", stamp(20).astimezone(plus_two), quota=10)
    await storage.offline.push(H1, "bob", "<message id='b'/>", stamp(0), quota=10)
    assert await storage.offline.count(H1, "alice") == 3

    popped = await storage.offline.pop_all(H1, "alice")
    assert popped == [
        (stamp(10), "<message id='1'/>"),
        (stamp(5), "<message id='2'/>"),
        (stamp(20), "<message id='3'/>"),
    ]
    assert all(when.utcoffset() == timedelta(0) for when, _ in popped)
    assert await storage.offline.count(H1, "alice") == 0
    assert await storage.offline.pop_all(H1, "alice") == []
    assert await storage.offline.count(H1, "bob") == 1


async def test_offline_quota(storage: Storage) -> None:
    for i in range(3):
        await storage.offline.push(H1, "alice", f"<message id='{i}'/>", stamp(i), quota=3)
    with pytest.raises(QuotaExceeded):
        await storage.offline.push(H1, "alice", "<message id='x'/>", stamp(9), quota=3)
    assert await storage.offline.count(H1, "alice") == 3
    await storage.offline.push(H1, "alice", "<message id='y'/>", stamp(9), quota=4)  # quota is per call
    with pytest.raises(QuotaExceeded):
        await storage.offline.push(H1, "bob", "<message/>", stamp(0), quota=0)
    await storage.offline.pop_all(H1, "alice")
    await storage.offline.push(H1, "alice", "<message id='z'/>", stamp(10), quota=3)
    assert await storage.offline.count(H1, "alice") == 1


async def test_offline_concurrent_pushes_respect_quota(storage: Storage) -> None:
    results = await asyncio.gather(
        *(storage.offline.push(H1, "alice", f"<message id='{i}'/>", stamp(i), quota=10) for i in range(20)),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 10
    assert sum(isinstance(r, QuotaExceeded) for r in results) == 10
    assert await storage.offline.count(H1, "alice") == 10


async def test_offline_concurrent_pops_deliver_once(storage: Storage) -> None:
    for i in range(30):
        await storage.offline.push(H1, "alice", f"<message id='{i}'/>", stamp(i), quota=100)
    batches = await asyncio.gather(*(storage.offline.pop_all(H1, "alice") for _ in range(5)))
    delivered = [xml for batch in batches for _, xml in batch]
    assert sorted(delivered) == sorted(f"<message id='{i}'/>" for i in range(30))
    for batch in batches:
        assert [when for when, _ in batch] == sorted(when for when, _ in batch)
    assert await storage.offline.count(H1, "alice") == 0


# Key-value documents


async def test_kv_get_set_delete_keys(storage: Storage) -> None:
    assert await storage.kv.get(H1, "alice", "vcard") is None
    doc = {"fn": "Alice", "tel": ["+1 555"], "nested": {"n": 1, "ok": True, "none": None}}
    await storage.kv.set(H1, "alice", "vcard", "", doc)
    assert await storage.kv.get(H1, "alice", "vcard") == doc
    assert await storage.kv.get(H1, "alice", "vcard", "") == doc
    await storage.kv.set(H1, "alice", "vcard", "", {"fn": "Alice B."})
    assert await storage.kv.get(H1, "alice", "vcard") == {"fn": "Alice B."}

    await storage.kv.set(H1, "alice", "private", "jabber:iq:b", "<b/>")
    await storage.kv.set(H1, "alice", "private", "jabber:iq:a", ["<a/>", 2, 3.5])
    await storage.kv.set(H1, "alice", "private", "count", 0)
    await storage.kv.set(H1, "alice", "private", "flag", False)
    assert await storage.kv.keys(H1, "alice", "private") == ["count", "flag", "jabber:iq:a", "jabber:iq:b"]
    assert await storage.kv.get(H1, "alice", "private", "count") == 0
    assert await storage.kv.get(H1, "alice", "private", "flag") is False
    assert await storage.kv.get(H1, "alice", "private", "jabber:iq:a") == ["<a/>", 2, 3.5]

    await storage.kv.set(H1, "alice", "private", "jabber:iq:b", None)
    assert await storage.kv.get(H1, "alice", "private", "jabber:iq:b") is None
    assert await storage.kv.keys(H1, "alice", "private") == ["count", "flag", "jabber:iq:a"]
    await storage.kv.set(H1, "alice", "private", "never-set", None)  # deleting nothing is fine
    assert await storage.kv.keys(H1, "alice", "vcard") == [""]
    assert await storage.kv.keys(H1, "bob", "private") == []


async def test_kv_host_level_documents(storage: Storage) -> None:
    await storage.kv.set(H1, "", "announce", "motd", {"text": "Welcome"})
    await storage.kv.set(H2, "", "announce", "motd", {"text": "Bienvenue"})
    assert await storage.kv.get(H1, "", "announce", "motd") == {"text": "Welcome"}
    assert await storage.kv.get(H2, "", "announce", "motd") == {"text": "Bienvenue"}
    assert await storage.kv.get(H1, "alice", "announce", "motd") is None


# Opening and migrations


async def test_migrations_are_idempotent(storage_url: str) -> None:
    first = await open_storage(storage_url)
    try:
        assert await schema_version_of(first) == len(STEPS)
        await first.accounts.create(H1, "alice", [creds()])
        await first.offline.push(H1, "alice", "<message/>", stamp(0), quota=10)
    finally:
        await first.close()
    second = await open_storage(storage_url)
    try:
        assert await schema_version_of(second) == len(STEPS)
        async with second.engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(schema_version)) == len(STEPS)
        assert await second.accounts.exists(H1, "alice")
        assert await second.offline.count(H1, "alice") == 1
    finally:
        await second.close()


async def test_later_steps_apply_in_order_and_atomically(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await (await open_storage(storage_url)).close()
    applied: list[int] = []

    def step_2(conn: Connection) -> None:
        applied.append(2)
        conn.execute(text("CREATE TABLE step_two (x INTEGER)"))

    def failing_step_3(conn: Connection) -> None:
        applied.append(3)
        conn.execute(text("CREATE TABLE step_three (x INTEGER)"))
        raise RuntimeError("step 3 is broken")

    monkeypatch.setattr(schema, "STEPS", [*STEPS, step_2, failing_step_3])
    with pytest.raises(RuntimeError, match="broken"):
        await open_storage(storage_url)
    assert applied == [2, 3]

    monkeypatch.setattr(schema, "STEPS", [*STEPS, step_2])
    storage = await open_storage(storage_url)
    try:
        assert applied == [2, 3, 2]  # the failed run left nothing behind, step 2 included
        assert await schema_version_of(storage) == len(STEPS) + 1
        async with storage.engine.connect() as conn:
            tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        assert "step_two" in tables and "step_three" not in tables
    finally:
        await storage.close()
    await (await open_storage(storage_url)).close()
    assert applied == [2, 3, 2]


async def test_concurrent_opens_migrate_once(storage_url: str) -> None:
    opened = await asyncio.gather(*(open_storage(storage_url) for _ in range(4)))
    try:
        for storage in opened:
            assert await schema_version_of(storage) == len(STEPS)
        async with opened[0].engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(schema_version)) == len(STEPS)
    finally:
        for storage in opened:
            await storage.close()


async def test_newer_database_is_refused(storage: Storage, storage_url: str) -> None:
    async with storage.engine.begin() as conn:
        await conn.execute(schema_version.insert().values(version=len(STEPS) + 1, applied=stamp(0)))
    with pytest.raises(RuntimeError, match="newer"):
        await open_storage(storage_url)


async def test_sqlite_parent_folder_and_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "parley.db"
    storage = await open_storage(f"sqlite:///{path}")
    try:
        assert path.is_file()
        async with storage.engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == 1  # NORMAL
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    finally:
        await storage.close()


@pytest.mark.parametrize(
    "url",
    [
        "mysql+aiomysql://localhost/parley",
        "sqlite:///parley.db?schema=x",
        "postgresql+asyncpg://localhost/test?schema=Bad-Name",
        "postgresql+asyncpg://localhost/test?schema=a&schema=b",
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        make_engine(url)


async def test_postgresql_schema_is_created_and_used() -> None:
    schema = f"parley_t_{secrets.token_hex(8)}"
    conn = await connect_postgres()
    await conn.close()
    storage = await open_storage(postgres_url(schema))
    try:
        async with storage.engine.connect() as conn:
            assert await conn.scalar(text("SELECT current_schema()")) == schema
            tables = await conn.scalars(
                text("SELECT table_name FROM information_schema.tables WHERE table_schema = :schema"),
                {"schema": schema},
            )
            assert {"schema_version", "accounts", "roster", "offline", "kv"} <= set(tables)
    finally:
        await storage.close()
        conn = await connect_postgres()
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
