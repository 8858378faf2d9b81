"""Faults a real `parley serve` must survive: `kill -9` in the middle of a burst of messages (to an offline
user, and to an online one whose archive takes each message before delivery), on SQLite and on
PostgreSQL; a PostgreSQL restart under a running server (a private PostgreSQL instance, never the
machine's shared one); slowloris connections and clients that never read.

The promise checked after `kill -9`: every message whose receipt the sender's stream management
(XEP-0198) acknowledged is delivered after the restart or is in the recipient's archive, and none twice.
(A full disk is tests/test_full_disk.py.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from xml.etree.ElementTree import Element

import pytest
from sqlalchemy import func, select

from server.accounts import create_account
from server.storage import open_storage
from server.storage.schema import archive, offline
from tests.conftest import Harness, drop_pg_schema, free_ports, make_pg_schema
from tests.test_cli import PARLEY, write_config
from tests.test_offline import collect
from tests.test_roster_presence import sync

BURST = 1000  # messages the sender would send; the server is killed once ACKED_BEFORE_KILL are acknowledged
ACKED_BEFORE_KILL = 60
IN_FLIGHT = 40  # unacknowledged messages the sender allows itself: the server is busy with some when it dies


async def until(condition: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        outcome = condition()
        if await outcome if isinstance(outcome, Awaitable) else outcome:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class Parley:
    """`parley serve` in a subprocess, with its log in a file (a pipe nobody reads would stall it)."""

    def __init__(self, tmp_path: Path, storage_url: str, extra: str = "") -> None:
        self.port, self.direct_port = free_ports(2)
        storage = f'[storage]\nurl = "{storage_url}"\n'
        self.config = write_config(tmp_path, self.port, self.direct_port, f"{extra}\n{storage}")
        self.log = tmp_path / "parley.log"
        self.url = storage_url
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *PARLEY, "serve", "--config", str(self.config), stdout=asyncio.subprocess.PIPE, stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        while b"Ctrl-C stops" not in (line := await asyncio.wait_for(self.proc.stdout.readline(), 30)):
            assert line, f"parley serve exited: {self.log.read_text()[-3000:]}"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
        if self.proc is not None:
            await self.proc.wait()

    def rss(self) -> int:
        """Resident memory of the server process, in kB."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


@pytest.fixture(name="storage_url", params=["sqlite", "postgresql"])
async def storage_url_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/data/parley.db"
        return
    schema = await make_pg_schema()
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/test?schema={schema}"
    finally:
        await drop_pg_schema(schema)


async def accounts(url: str, *names: str) -> None:
    storage = await open_storage(url)
    try:
        for name in names:
            await create_account(storage, "localhost", name, "secret", 4096)
    finally:
        await storage.close()


async def stored(url: str, table: str, user: str) -> list[str]:
    """Bodies of `user`'s archived messages, or of the offline messages waiting for `user`."""
    storage = await open_storage(url)
    try:
        async with storage.engine.connect() as conn:
            if table == "archive":
                rows = await conn.execute(select(archive.c.body).where(archive.c.username == user))
                return [row.body for row in rows]
            count = await conn.scalar(select(func.count()).select_from(offline).where(offline.c.username == user))
            return [""] * int(count or 0)
    finally:
        await storage.close()


def bodies(queue: asyncio.Queue[Element]) -> list[str]:
    found = []
    while not queue.empty():
        body = queue.get_nowait().findtext("{jabber:client}body")
        if body:
            found.append(body)
    return found


async def burst_until_killed(harness: Harness, parley: Parley, to: str) -> list[str]:
    """Alice sends BURST messages with stream management; the server is killed -9 mid-way. Returns the bodies
    the server acknowledged (the first h of those alice sent since enabling it)."""
    alice = await harness.client("alice@localhost", resource="phone", plugins=("xep_0198",))
    plugin = alice.plugin["xep_0198"]
    plugin.window = 5  # ask for an acknowledgement every 5 stanzas
    await until(lambda: plugin.sm_id is not None, "stream management enabled")
    first = plugin.seq

    async def send() -> None:
        for i in range(BURST):
            while plugin.seq - plugin.last_ack >= IN_FLIGHT:
                await asyncio.sleep(0.001)
            alice.send_message(mto=to, mbody=f"m{i}", mtype="chat")
            await asyncio.sleep(0)

    sender = asyncio.get_running_loop().create_task(send())
    try:
        await until(lambda: plugin.last_ack - first >= ACKED_BEFORE_KILL, "acknowledgements")
        acked = plugin.last_ack - first
        parley.kill()
        await parley.proc.wait()
        assert not sender.done(), "the burst ended before the server was killed: make it longer"
    finally:
        sender.cancel()
    alice.abort()
    return [f"m{i}" for i in range(acked)]


async def test_kill_9_during_a_burst_to_an_offline_user(tmp_path: Path, storage_url: str) -> None:
    await accounts(storage_url, "alice", "bob")
    parley = Parley(tmp_path, storage_url)
    await parley.start()
    try:
        harness = Harness(None, parley.port, parley.direct_port, tmp_path)  # type: ignore[arg-type]
        acked = await burst_until_killed(harness, parley, "bob@localhost")
        await harness.close()
        await parley.start()
        bob = await harness.client("bob@localhost", resource="desk")
        inbox = collect(bob)
        bob.send_presence()

        async def all_taken() -> bool:
            return not await stored(storage_url, "offline", "bob")

        await until(all_taken, "bob's offline messages delivered")
        await sync(bob)
        received = bodies(inbox)
        assert len(received) == len(set(received)), "a message was delivered twice"
        assert set(acked) <= set(received), sorted(set(acked) - set(received), key=lambda b: int(b[1:]))
        await harness.close()
    finally:
        await parley.stop()


async def test_kill_9_during_archived_online_delivery(tmp_path: Path, storage_url: str) -> None:
    await accounts(storage_url, "alice", "bob")
    parley = Parley(tmp_path, storage_url)
    await parley.start()
    try:
        harness = Harness(None, parley.port, parley.direct_port, tmp_path)  # type: ignore[arg-type]
        bob = await harness.client("bob@localhost", resource="desk")
        before = collect(bob)
        bob.send_presence()
        await sync(bob)
        acked = await burst_until_killed(harness, parley, "bob@localhost")
        bob.abort()
        received = bodies(before)
        await harness.close()
        await parley.start()
        bob = await harness.client("bob@localhost", resource="desk")
        after = collect(bob)
        bob.send_presence()
        await sync(bob)
        received += bodies(after)
        archived = await stored(storage_url, "archive", "bob")
        assert len(received) == len(set(received)), "a message was delivered twice"
        assert len(archived) == len(set(archived)), "a message was archived twice"
        assert set(received) <= set(archived), "delivered without being archived"
        assert set(acked) <= set(received) | set(archived), sorted(set(acked) - set(received) - set(archived))
        await harness.close()
    finally:
        await parley.stop()
