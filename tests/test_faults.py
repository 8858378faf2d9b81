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
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from xml.etree.ElementTree import Element, fromstring

import pytest
from slixmpp import ClientXMPP
from sqlalchemy import func, select

from parley import build_server
from server.accounts import create_account
from server.storage import open_storage
from server.storage.schema import archive, offline
from tests.conftest import (
    Harness,
    RawClient,
    drop_pg_schema,
    free_port,
    free_ports,
    make_config,
    make_pg_schema,
    unavailable,
)
from tests.test_cli import PARLEY, write_config
from tests.test_offline import collect
from tests.test_roster_presence import sync
from tests.test_shutdown import stop_reading

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
        return int(next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), 0))


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


async def accounts(url: str, *names: str, password: str = "secret") -> None:
    storage = await open_storage(url)
    try:
        for name in names:
            await create_account(storage, "localhost", name, password, 4096)
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


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, url: str, *users: str, extra: str = "") -> AsyncIterator[tuple[Parley, Harness]]:
    """`parley serve` on `url` with these accounts (password 'secret'), and a harness for its clients."""
    await accounts(url, *users)
    parley = Parley(tmp_path, url, extra)
    await parley.start()
    harness = Harness(None, parley.port, parley.direct_port, tmp_path)  # type: ignore[arg-type]
    try:
        yield parley, harness
    finally:
        await harness.close()
        await parley.stop()


async def online(harness: Harness, jid: str) -> tuple[ClientXMPP, asyncio.Queue[Element]]:
    """A client logged in and available, with the queue of the messages it receives."""
    client = await harness.client(jid, resource="desk")
    inbox = collect(client)
    client.send_presence()
    await sync(client)
    return client, inbox


async def test_kill_9_during_a_burst_to_an_offline_user(tmp_path: Path, storage_url: str) -> None:
    async with serving(tmp_path, storage_url, "alice", "bob") as (parley, harness):
        acked = await burst_until_killed(harness, parley, "bob@localhost")
        await harness.close()
        await parley.start()
        bob, inbox = await online(harness, "bob@localhost")

        async def all_taken() -> bool:
            return not await stored(storage_url, "offline", "bob")

        await until(all_taken, "bob's offline messages delivered")
        await sync(bob)
        received = bodies(inbox)
        assert len(received) == len(set(received)), "a message was delivered twice"
        assert set(acked) <= set(received), sorted(set(acked) - set(received), key=lambda b: int(b[1:]))


async def test_kill_9_during_archived_online_delivery(tmp_path: Path, storage_url: str) -> None:
    async with serving(tmp_path, storage_url, "alice", "bob") as (parley, harness):
        bob, before = await online(harness, "bob@localhost")
        acked = await burst_until_killed(harness, parley, "bob@localhost")
        bob.abort()
        received = bodies(before)
        await harness.close()
        await parley.start()
        _, after = await online(harness, "bob@localhost")
        received += bodies(after)
        archived = await stored(storage_url, "archive", "bob")
        assert len(received) == len(set(received)), "a message was delivered twice"
        assert len(archived) == len(set(archived)), "a message was archived twice"
        assert set(received) <= set(archived), "delivered without being archived"
        assert set(acked) <= set(received) | set(archived), sorted(set(acked) - set(received) - set(archived))


async def archived_in_order(url: str, user: str) -> list[str]:
    """Bodies of `user`'s archive, oldest row first."""
    storage = await open_storage(url)
    try:
        async with storage.engine.connect() as conn:
            rows = await conn.execute(select(archive.c.body).where(archive.c.username == user).order_by(archive.c.id))
            return [row.body for row in rows]
    finally:
        await storage.close()


def numbered(bodies: list[str]) -> list[int]:
    return [int(body[1:]) for body in bodies]


async def test_kill_9_while_a_connection_reads_past_messages_waiting_for_the_archive(
        tmp_path: Path, storage_url: str) -> None:
    """The sender keeps 40 messages in flight, so its connection reads on while earlier ones wait for their
    archive commit (server/archiving.py's Turn): whatever stream management acknowledged is in both archives,
    and each archive, and what the recipient got, is in the order sent, with no gap before the last one."""
    async with serving(tmp_path, storage_url, "alice", "bob") as (parley, harness):
        bob, before = await online(harness, "bob@localhost")
        acked = await burst_until_killed(harness, parley, "bob@localhost")
        bob.abort()
        received = numbered(bodies(before))
        sent_archive = numbered(await archived_in_order(storage_url, "alice"))
        bob_archive = numbered(await archived_in_order(storage_url, "bob"))
        for kept in (received, sent_archive, bob_archive):
            assert kept == list(range(len(kept))), [*kept[:5], "...", *kept[-5:]]
        assert len(acked) <= min(len(sent_archive), len(bob_archive)), (len(acked), len(sent_archive),
                                                                       len(bob_archive))
        assert len(received) <= len(bob_archive), "delivered before it was archived"


def _as_postgres(*command: str) -> list[str]:
    """PostgreSQL's tools refuse to run as root: as root, run them as the 'postgres' user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


class PrivatePostgres:
    """A PostgreSQL instance of the test's own in a temporary folder, on a free port: restarted at will
    without disturbing the machine's shared one."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not found:
            unavailable("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bin = found[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="parley-pg-"))
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(_as_postgres(str(self.bin / tool), *args), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{tool} {args}: {done.stdout}{done.stderr}"

    def _ctl(self, action: str, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", *args, action)

    def start(self) -> None:
        if not (self.dir / "data").exists():
            self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("start", "-o", options)

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def remove(self) -> None:
        with contextlib.suppress(AssertionError):
            self._ctl("stop", "-m", "immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture(name="private_postgres")
async def private_postgres_fixture() -> AsyncIterator[PrivatePostgres]:
    postgres = PrivatePostgres()
    try:
        await asyncio.to_thread(postgres.start)
        yield postgres
    finally:
        await asyncio.to_thread(postgres.remove)


async def test_a_postgresql_restart_while_serving(tmp_path: Path, private_postgres: PrivatePostgres) -> None:
    """Parley keeps serving across a PostgreSQL restart: the connections it had are gone, new ones are made."""
    port, direct_port = free_ports(2)
    harness = Harness(build_server(make_config(tmp_path, port, direct_port, private_postgres.url)), port,
                      direct_port, tmp_path)
    await harness.server.start()
    try:
        for name in ("alice", "bob"):
            await harness.add_user(name)
        alice = await harness.client("alice@localhost", resource="phone")
        errors = collect(alice, "error")
        alice.send_message(mto="bob@localhost", mbody="before", mtype="chat")
        await sync(alice)
        await asyncio.to_thread(private_postgres.restart)
        alice.send_message(mto="bob@localhost", mbody="after", mtype="chat")
        await sync(alice)
        assert errors.empty(), "a message was refused after PostgreSQL came back"
        bob = await harness.client("bob@localhost", resource="desk")  # a login reads the accounts
        inbox = collect(bob)
        bob.send_presence()
        got = [(await asyncio.wait_for(inbox.get(), 10)).findtext("{jabber:client}body") for _ in range(2)]
        assert got == ["before", "after"]
    finally:
        await harness.close()
        await harness.server.stop()


class MemoryWatch:
    """The server's resident memory, sampled every 50 ms from a baseline until stopped: the peak growth."""

    def __init__(self, parley: Parley) -> None:
        self.parley = parley
        self.baseline = parley.rss()
        self.peak = self.baseline
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.parley.rss())
            await asyncio.sleep(0.05)

    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / 1024

    def stop(self) -> None:
        self._task.cancel()


async def chatting(harness: Harness, rounds: int, every: float) -> None:
    """Alice writes to Bob `rounds` times, `every` seconds; each message must arrive within 3 s."""
    alice = await harness.client("alice@localhost", resource="phone")
    bob = await harness.client("bob@localhost", resource="desk")
    inbox = collect(bob)
    for i in range(rounds):
        sent = time.monotonic()
        alice.send_message(mto="bob@localhost/desk", mbody=f"still here {i}", mtype="chat")
        got = await asyncio.wait_for(inbox.get(), 3)
        assert got.findtext("{jabber:client}body") == f"still here {i}"
        await asyncio.sleep(max(0.0, every - (time.monotonic() - sent)))


SLOW_CONNECTIONS = 300
HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")


async def test_slowloris_is_cut_and_costs_little(tmp_path: Path) -> None:
    """300 connections that send a byte a second: cut after the unauthenticated timeout, bounded memory,
    and other users log in and chat meanwhile."""
    url = f"sqlite+aiosqlite:///{tmp_path}/data/parley.db"
    limits = "[limits]\nmax_connections_per_ip = 1000\nunauthenticated_timeout = 4.0\n"
    async with serving(tmp_path, url, "alice", "bob", "carol", extra=limits) as (parley, harness):
        await slowloris(parley, harness)


async def slowloris(parley: Parley, harness: Harness) -> None:
    slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    memory = MemoryWatch(parley)
    try:
        slow = [await asyncio.open_connection("127.0.0.1", parley.port) for _ in range(SLOW_CONNECTIONS)]
        cut: set[int] = set()

        async def drip() -> None:
            for second in range(10):
                for i, (reader, writer) in enumerate(slow):
                    if i in cut:
                        continue
                    if reader.at_eof() or writer.is_closing():
                        cut.add(i)
                        continue
                    writer.write(HEADER[second:second + 1])
                await asyncio.sleep(1)
                for i, (reader, _) in enumerate(slow):
                    with contextlib.suppress(OSError):
                        if i not in cut and (reader.at_eof() or await _eof_now(reader)):
                            cut.add(i)

        dripping = asyncio.get_running_loop().create_task(drip())
        await chatting(harness, rounds=5, every=1.0)
        carol = await harness.client("carol@localhost", resource="late", timeout=5)  # a login under the attack
        assert carol.boundjid.bare == "carol@localhost"
        await dripping
        assert len(cut) == SLOW_CONNECTIONS, f"{SLOW_CONNECTIONS - len(cut)} slow connections were never cut"
        assert memory.growth_mb() < 40, f"{memory.growth_mb():.1f} MB more for {SLOW_CONNECTIONS} slow connections"
    finally:
        memory.stop()
        for _, writer in slow:
            writer.transport.abort()


async def _eof_now(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection (what it sent meanwhile, a stream error, is read and dropped)."""
    with contextlib.suppress(TimeoutError):
        while await asyncio.wait_for(reader.read(65536), 0.001):
            pass
        return True
    return reader.at_eof()


NOT_READING = 10
FLOOD = 130  # messages of 60 kB to each client that does not read: 78 MB in all, twice what the kernel buffers


BIG = "x" * 60_000


@contextlib.asynccontextmanager
async def not_readers(tmp_path: Path) -> AsyncIterator[tuple[Parley, Harness, list[RawClient], MemoryWatch]]:
    """A server with a 4 MB output budget, users alice, bob and flood, NOT_READING clients n0… that stopped
    reading, and the watch of its memory, which must not grow by 40 MB."""
    url = f"sqlite+aiosqlite:///{tmp_path}/data/parley.db"
    await accounts(url, *(f"n{i}" for i in range(NOT_READING)), password="pw")  # as stop_reading logs in
    limits = "[limits]\nmax_output_total = 4000000\nc2s_rate = 100000000\nc2s_burst = 100000000\n"
    async with serving(tmp_path, url, "alice", "bob", "flood", extra=limits) as (parley, harness):
        stalled: list[RawClient] = []
        memory: MemoryWatch | None = None
        try:
            stalled = [await stop_reading(harness, f"n{i}") for i in range(NOT_READING)]
            memory = MemoryWatch(parley)
            yield parley, harness, stalled, memory
            growth = memory.growth_mb()
            assert growth < 40, f"{growth:.1f} MB more for {NOT_READING} clients that do not read"
        finally:
            if memory is not None:
                memory.stop()
            for raw in stalled:
                raw.writer.transport.abort()


async def test_clients_that_never_read_are_cut_within_the_output_budget(tmp_path: Path) -> None:
    """Another user sends ten clients that read nothing 7.8 MB each: the server cuts them within its output
    budget, its memory stays bounded, and Alice and Bob chat on."""
    async with not_readers(tmp_path) as (parley, harness, _, _):
        flood = await harness.client("flood@localhost", resource="hose")

        async def send() -> None:
            for i in range(FLOOD):
                for n in range(NOT_READING):
                    # Headlines: once a client is cut, the rest are dropped rather than stored for it.
                    flood.send_message(mto=f"n{n}@localhost/desk", mbody=f"{i} {BIG}", mtype="headline")
                await asyncio.sleep(0.005)

        flooding = asyncio.get_running_loop().create_task(send())
        await chatting(harness, rounds=5, every=0.5)
        await flooding
        await until(lambda: "output unread" in parley.log.read_text(), "clients that do not read cut")


@pytest.mark.xfail(strict=True, reason="defect found here, not fixed: a burst of large answers to one client "
                   "leaves in one TLS write, which asyncio's SSL transport hands to the TCP transport whole; "
                   "get_write_buffer_size() no longer counts it, so neither the output budget nor "
                   "WRITE_BUFFER_LIMIT sees it (server/c2s.py, server/stream/edge.py)")
async def test_clients_that_ask_for_large_answers_and_never_read_are_cut(tmp_path: Path) -> None:
    """Ten clients that read nothing ask for a 60 kB vCard 200 times each (120 MB of answers)."""
    async with not_readers(tmp_path) as (_, harness, stalled, memory):
        flood = await harness.client("flood@localhost", resource="hose")
        vcard = flood.Iq(stype="set")
        vcard.append(fromstring(f"<vCard xmlns='vcard-temp'><DESC>{BIG}</DESC></vCard>"))
        await vcard.send(timeout=5)
        memory.baseline = memory.peak = max(memory.peak, memory.parley.rss())
        requests = "".join(f"<iq type='get' to='flood@localhost' id='v{i}'><vCard xmlns='vcard-temp'/></iq>"
                           for i in range(200))
        for raw in stalled:
            await raw.send(requests)
        await chatting(harness, rounds=5, every=0.5)
