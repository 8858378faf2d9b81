"""A full disk (issue 19, defect 2): chat goes on, offline messages are refused, nothing stored is lost.

The data lives on a small tmpfs filled up with a ballast file, for real: SQLite's database in the data
directory, PostgreSQL's tables in a tablespace on that tmpfs (PostgreSQL here runs on
this machine). Mounting needs root, as the tests run under CI; elsewhere they are skipped.
"""

from __future__ import annotations

import errno
import os
import pwd
import secrets
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import asyncpg
import pytest
from slixmpp import ClientXMPP
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from parley import build_server
from server.stanza import parse_stored
from server.storage.archive import ArchiveFilter
from server.storage.engine import storage_condition
from tests.conftest import IN_CI, PG_URL, Harness, drop_pg_schema, free_port, make_config, make_pg_schema
from tests.test_basic_modules import iq_error, send_iq
from tests.test_offline import collect, take
from tests.test_roster_presence import sync

STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
STANZA_ID = "{urn:xmpp:sid:0}stanza-id"
# Incompressible and large, so that PostgreSQL stores it out of line in a new page, which needs space.
PRIVATE = f"<query xmlns='jabber:iq:private'><prefs xmlns='bob:prefs'>{secrets.token_urlsafe(9000)}</prefs></query>"
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@contextmanager
def small_disk(path: Path, size: str = "4m", owner: str | None = None) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` (owned by the user `owner`), unmounted afterwards."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the full-disk tests mount a tmpfs: run them as root under CI")
        pytest.skip("mounting a tmpfs needs root")
    options = f"size={size},mode=0700"
    if owner is not None:
        user = pwd.getpwnam(owner)
        options += f",uid={user.pw_uid},gid={user.pw_gid}"
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)
            pytest.fail(f"a file on {path} was left open")


def fill(ballast: Path) -> None:
    """Write `ballast` until its filesystem has no space left."""
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (b"\0" * 65536, b"\0" * 512):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def empty_log(db: Path) -> None:
    """Cut SQLite's write-ahead log of `db` to nothing. After a checkpoint SQLite writes into the log file's
    old space, which needs no new blocks: the first writes on a disk that just filled up would still succeed."""
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0  # not busy: it ran
    assert db.with_name(db.name + "-wal").stat().st_size == 0


async def start(data_dir: Path, url: str) -> Harness:
    port, direct_port = free_port(), free_port()
    server = build_server(make_config(data_dir, port, direct_port, url))
    await server.start()
    return Harness(server, port, direct_port, data_dir)


async def chat_through_a_full_disk(harness: Harness, ballast: Path, caplog: pytest.LogCaptureFixture,
                                   stored_before: bool, settle: Callable[[], None] = lambda: None) -> None:
    """What a full disk leaves working, and that everything works again once there is space, with what was
    `stored_before` the disk filled up (PostgreSQL would put new rows in the free space of its pages);
    `settle` runs just before the disk fills."""
    for name in ("alice", "bob", "carol"):  # carol stays offline
        await harness.add_user(name)
    alice = await harness.client("alice@localhost", resource="phone")
    bob = await harness.client("bob@localhost", resource="desk")
    to_alice, to_bob, errors = collect(alice), collect(bob), collect(bob, "error")  # to_bob has errors too
    dropped: list[object] = []
    for client in (alice, bob):
        client.add_event_handler("disconnected", dropped.append)
        client.send_presence()
    await sync(alice, bob)

    def chat(sender: ClientXMPP, to: str, body: str) -> None:
        sender.send_message(mto=to, mbody=body, mtype="chat")

    earlier = ["before"] if stored_before else []
    for body in earlier:
        chat(bob, "alice@localhost", body)
        chat(bob, "carol@localhost", body)
        await take(to_alice, 1)
    await sync(bob)

    settle()
    fill(ballast)
    chat(bob, "alice@localhost", "online 1")
    chat(bob, "carol@localhost", "offline 1")
    chat(bob, "alice@localhost", "online 2")
    got = await take(to_alice, 2)
    assert [m.findtext("{jabber:client}body") for m in got] == ["online 1", "online 2"]
    assert all(m.find(STANZA_ID) is None for m in got)  # no id of an archive row that is not there
    bounced = (await take(errors, 1))[0]
    assert bounced.get("from") == "carol@localhost"
    assert bounced.find(f"{{jabber:client}}error/{{{STANZAS}}}resource-constraint") is not None
    # Any other write that fails (private XML storage here) is that stanza's error, not the stream's.
    assert (await iq_error(bob, "set", PRIVATE))[0] == "resource-constraint"
    chat(alice, "bob@localhost", "back to you")  # the other session is unaffected
    _, back = await take(to_bob, 2)  # the bounce, then alice's message
    assert back.findtext("{jabber:client}body") == "back to you"
    await sync(alice, bob)
    assert dropped == [] and errors.empty()
    assert harness.server.storage.archive.outage.failures >= 6  # both copies of the three messages
    assert harness.server.hosts["localhost"].modules["offline"].outage.failures == 1
    failures = [r.getMessage() for r in caplog.records if "a write failed" in r.getMessage()]
    assert len(failures) == 2, failures  # once per burst: one for the archive, one for offline storage
    assert not [r for r in caplog.records if "online 1" in r.getMessage()]  # no message bodies in the log

    ballast.unlink()
    chat(bob, "carol@localhost", "offline 2")
    chat(bob, "alice@localhost", "online 3")
    assert (await take(to_alice, 1))[0].find(STANZA_ID) is not None
    await sync(bob)
    assert errors.empty()
    await send_iq(bob, "set", PRIVATE)
    page = await harness.server.storage.archive.query("localhost", "alice", ArchiveFilter(), 10)
    assert [parse_stored(m.stanza_xml).findtext("{jabber:client}body") for m in page.messages] == \
        [*earlier, "online 3"]
    carol = await harness.client("carol@localhost")
    to_carol = collect(carol)
    carol.send_presence()
    got = await take(to_carol, len(earlier) + 1)
    assert [m.findtext("{jabber:client}body") for m in got] == [*earlier, "offline 2"]
    await sync(carol)
    assert to_carol.empty()


async def test_sqlite_on_a_full_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with small_disk(tmp_path / "data") as data_dir:
        harness = await start(data_dir, f"sqlite+aiosqlite:///{data_dir}/parley.db")
        try:
            await chat_through_a_full_disk(harness, data_dir / "ballast", caplog, stored_before=True,
                                           settle=lambda: empty_log(data_dir / "parley.db"))
        finally:
            await harness.close()
            await harness.server.stop()
        with closing(sqlite3.connect(data_dir / "parley.db")) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert db.execute("SELECT count(*) FROM archive").fetchone() == (8,)  # 2 copies of 4 messages


async def test_postgresql_on_a_full_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    schema = await make_pg_schema()
    space = f"parley_{schema}"
    # PostgreSQL (another user) reaches the tablespace's folder through /tmp, not through pytest's 0700 folders.
    folder = Path(tempfile.mkdtemp(prefix="parley-pg-"))
    try:
        with small_disk(folder, owner="postgres"):
            harness = await start(tmp_path, f"{PG_URL}?schema={schema}")
            conn = await asyncpg.connect(PG_DSN)
            try:
                await conn.execute(f"CREATE TABLESPACE {space} LOCATION '{folder}'")
                for table in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema):
                    await conn.execute(f'ALTER TABLE "{schema}"."{table[0]}" SET TABLESPACE {space}')
                await chat_through_a_full_disk(harness, folder / "ballast", caplog, stored_before=False)
            finally:
                await harness.close()
                await harness.server.stop()
                await drop_pg_schema(schema)
                await conn.execute(f"DROP TABLESPACE IF EXISTS {space}")
                await conn.close()
    finally:
        folder.rmdir()


def test_storage_errors_map_to_stanza_errors() -> None:
    """What the c2s edge, the archive and offline storage make of an exception (PostgreSQL's disk-full
    error is also met for real above; its out-of-memory and connection errors only here)."""

    def wrapped(orig: BaseException) -> DBAPIError:
        return OperationalError("INSERT", {}, orig)

    with closing(sqlite3.connect(":memory:")) as db:  # a database full for real, at its page limit
        db.execute("PRAGMA max_page_count = 2")
        with pytest.raises(sqlite3.OperationalError) as raised:
            db.execute("CREATE TABLE t (x)")
            db.execute("CREATE TABLE u (x)")
    full = raised.value
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = sqlite3.SQLITE_BUSY

    def pg(sqlstate: str) -> DBAPIError:
        return wrapped(asyncpg.PostgresError.new({"C": sqlstate, "M": "error"}))

    cases: list[tuple[BaseException, str | None]] = [
        (full, "resource-constraint"),
        (wrapped(full), "resource-constraint"),
        (OSError(errno.ENOSPC, "No space left on device"), "resource-constraint"),
        (pg("53100"), "resource-constraint"),  # disk_full
        (pg("53200"), "resource-constraint"),  # out_of_memory
        (locked, "internal-server-error"),
        (wrapped(locked), "internal-server-error"),
        (pg("57P01"), "internal-server-error"),  # admin_shutdown
        (IntegrityError("INSERT", {}, Exception("duplicate")), "internal-server-error"),
        (OSError(errno.ECONNRESET, "reset"), None),
        (ValueError("a bug"), None),
    ]
    for exc, condition in cases:
        assert storage_condition(exc) == condition, exc

