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
import base64
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from xml.etree.ElementTree import Element, fromstring

import aiohttp
import pytest
from slixmpp import ClientXMPP
from sqlalchemy import func, select

from parley import build_server
from server import ns
from server.accounts import create_account
from server.config import DEFAULT_MODULES
from server.jid import JID
from server.storage import open_storage
from server.storage.schema import archive, offline
from server.stream import edge
from tests.browser_support import web_listener, ws_client
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
from tests.test_bosh import Bosh, bosh_listener, stanzas
from tests.test_cli import PARLEY, write_config
from tests.test_offline import collect
from tests.test_roster_presence import sync
from tests.test_shutdown import big_message, login, not_reading, stop_reading
from tests.test_stream_management import SM, enabled
from tests.test_websocket import logged_in, stream_error

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


async def send_burst(alice: ClientXMPP, to: str, count: int) -> None:
    """alice sends chat messages m0, m1... to `to`, with at most IN_FLIGHT of them unacknowledged (XEP-0198)."""
    plugin = alice.plugin["xep_0198"]
    for i in range(count):
        while plugin.seq - plugin.last_ack >= IN_FLIGHT:
            await asyncio.sleep(0.001)
        alice.send_message(mto=to, mbody=f"m{i}", mtype="chat")
        await asyncio.sleep(0)


async def burst_until_killed(harness: Harness, parley: Parley, to: str) -> list[str]:
    """Alice sends BURST messages with stream management; the server is killed -9 mid-way. Returns the bodies
    the server acknowledged (the first h of those alice sent since enabling it)."""
    alice = await harness.client("alice@localhost", resource="phone", plugins=("xep_0198",))
    plugin = alice.plugin["xep_0198"]
    plugin.window = 5  # ask for an acknowledgement every 5 stanzas
    await until(lambda: plugin.sm_id is not None, "stream management enabled")
    first = plugin.seq
    sender = asyncio.get_running_loop().create_task(send_burst(alice, to, BURST))
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


SLOW_CONNECTIONS = 1000
DRIP_EVERY = 2.0  # seconds between the bytes of each slow connection
HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")


class Slow(asyncio.Protocol):
    """A slowloris connection: it sends its stream header a byte at a time, reads and drops what comes, and
    notes when the server closes it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.cut = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def eof_received(self) -> None:
        self.cut = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.cut = True


@contextlib.contextmanager
def open_files(needed: int) -> Iterator[None]:
    """The soft limit on open files raised to `needed` (each side of SLOW_CONNECTIONS connections takes a
    descriptor in this process and one in the server, which inherits the limit), and restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.fail(f"the open-file limit (ulimit -Hn) is {hard}; this test needs {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_slowloris_is_cut_and_costs_little(tmp_path: Path) -> None:
    """1,000 connections that send a byte every 2 s: cut after the unauthenticated timeout, bounded memory,
    and other users log in and chat meanwhile."""
    url = f"sqlite+aiosqlite:///{tmp_path}/data/parley.db"
    limits = f"[limits]\nmax_connections_per_ip = {SLOW_CONNECTIONS + 100}\nunauthenticated_timeout = 4.0\n"
    with open_files(SLOW_CONNECTIONS + 1024):
        async with serving(tmp_path, url, "alice", "bob", "carol", extra=limits) as (parley, harness):
            await slowloris(parley, harness)


async def slowloris(parley: Parley, harness: Harness) -> None:
    slow: list[Slow] = []
    memory = MemoryWatch(parley)
    loop = asyncio.get_running_loop()
    try:
        for _ in range(SLOW_CONNECTIONS):
            slow.append((await loop.create_connection(Slow, "127.0.0.1", parley.port))[1])
        opened = time.monotonic()

        async def drip() -> None:
            for at in range(len(HEADER)):
                for conn in slow:
                    if not conn.cut:
                        conn.transport.write(HEADER[at:at + 1])
                if all(conn.cut for conn in slow) or time.monotonic() - opened > 15:
                    return
                await asyncio.sleep(DRIP_EVERY)

        dripping = loop.create_task(drip())
        await chatting(harness, rounds=5, every=1.0)
        carol = await harness.client("carol@localhost", resource="late", timeout=5)  # a login under the attack
        assert carol.boundjid.bare == "carol@localhost"
        await dripping
        left = sum(not conn.cut for conn in slow)
        assert not left, f"{left} slow connections were never cut"
        assert memory.growth_mb() < 40, f"{memory.growth_mb():.1f} MB more for {SLOW_CONNECTIONS} slow connections"
    finally:
        memory.stop()
        for conn in slow:
            if conn.transport is not None:
                conn.transport.abort()


NOT_READING = 10
FLOOD = 130  # messages of 60 kB to each client that does not read: 78 MB in all, twice what the kernel buffers


BIG = "x" * 60_000


@contextlib.asynccontextmanager
async def not_readers(tmp_path: Path, limits: str = "") -> AsyncIterator[tuple[Parley, Harness, list[RawClient],
                                                                           MemoryWatch]]:
    """A server with a 4 MB output budget (and these further `limits`), users alice, bob and flood,
    NOT_READING clients n0… that stopped reading, and the watch of its memory, which must not grow by 40 MB."""
    url = f"sqlite+aiosqlite:///{tmp_path}/data/parley.db"
    await accounts(url, *(f"n{i}" for i in range(NOT_READING)), password="pw")  # as stop_reading logs in
    limits = f"[limits]\nmax_output_total = 4000000\nc2s_rate = 100000000\nc2s_burst = 100000000\n{limits}"
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


async def test_clients_that_ask_for_large_answers_and_never_read_are_cut(tmp_path: Path) -> None:
    """Ten clients that read nothing ask for a 60 kB vCard 200 times each (120 MB of answers, 12 MB each in
    one go as the vCard is cached). They are read and answered no further once their output is blocked, so
    the answers do not pile up in memory (nor in a TLS transport's TCP transport, out of its count: 266 MB
    more before), and they are cut with <connection-timeout/> once they have taken nothing for
    output_timeout; a client that reads again in time finds the stream error. Alice and Bob chat on."""
    async with not_readers(tmp_path, "output_timeout = 3.0\n") as (parley, harness, stalled, memory):
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
        await until(lambda: parley.log.read_text().count("stream error connection-timeout") == NOT_READING,
                    "clients that do not read cut", timeout=10)
        raw = stalled[0]
        raw.writer.transport.resume_reading()
        error = await raw.expect(f"{{{ns.STREAM}}}error")
        assert error.find(f"{{{ns.STREAMS_ERR}}}connection-timeout") is not None, error
        assert raw.raw.count(b"<iq ") < 200, "the server answered a client whose output was blocked"


async def test_a_client_that_leaves_more_than_its_cap_unread_is_cut(server: Harness,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """What others send to a client that reads nothing piles up past its connection's cap (1 MB here, 16 MiB
    in service): it is cut with <policy-violation/> behind what it was sent, and its session ends at once, so
    that what comes afterwards goes to offline storage instead of being held for it."""
    monkeypatch.setattr(edge, "WRITE_BUFFER_LIMIT", 1_000_000)
    await server.add_user("u", "pw")
    raw = await not_reading(server, "u")
    session = server.server.sessions.get(JID.parse("u@localhost/desk"))
    for i in range(40):  # 2 MB
        session.send(big_message("u@localhost/desk", i))
        await asyncio.sleep(0)
    await until(lambda: session.ended, "the session ended")
    raw.writer.transport.resume_reading()
    error = await raw.expect(f"{{{ns.STREAM}}}error")
    assert error.find(f"{{{ns.STREAMS_ERR}}}policy-violation") is not None, raw.raw[-500:]
    assert await stored(server.server.config.storage.url, "offline", "u"), "nothing sent after the cut was kept"


@pytest.mark.parley_config(modules=[*DEFAULT_MODULES, "websocket"], limits={"output_timeout": 2.0})
async def test_a_websocket_client_that_asks_and_never_reads_is_read_no_further_and_cut(server: Harness) -> None:
    """The same bound on a WebSocket session (over HTTPS, so behind a TLS transport): a client that asks for
    a 60 kB vCard 200 times and reads nothing gets a few answers, the rest of its requests wait unread, and
    it is cut with <connection-timeout/> once it has taken nothing for output_timeout."""
    base = await web_listener(server, tls="direct")
    await server.add_user("juliet")
    async with ws_client(base.replace("https", "wss") + "/xmpp-websocket") as juliet:
        await logged_in(juliet, "juliet")
        await juliet.send(f"<iq xmlns='jabber:client' type='set' id='set'><vCard xmlns='vcard-temp'><DESC>{BIG}"
                          "</DESC></vCard></iq>")
        assert (await juliet.expect("{jabber:client}iq")).get("type") == "result"
        juliet_jid = JID.parse("juliet@localhost")
        conn = next(c for c in server.server.connections if c.session and c.session.bare == juliet_jid)
        juliet.ws._conn.transport.pause_reading()  # type: ignore[union-attr]  # aiohttp reads for its client
        for i in range(200):
            await juliet.send(f"<iq xmlns='jabber:client' type='get' id='v{i}'><vCard xmlns='vcard-temp'/></iq>")
        await until(lambda: conn._write_paused, "the client's output blocked")
        await asyncio.sleep(0.5)
        assert conn.unsent() < 1_000_000, conn.unsent()
        await until(lambda: conn.closing, "the client cut", timeout=5)
        juliet.ws._conn.transport.resume_reading()  # type: ignore[union-attr]
        assert stream_error(await juliet.closed()) == "connection-timeout"
        answers = sum(fromstring(text).get("id", "").startswith("v") for text in juliet.received)
        assert answers < 200, "the server answered a client whose output was blocked"


@pytest.mark.parley_config(limits={"output_timeout": 2.0})
async def test_a_bosh_client_that_asks_and_never_comes_back_is_cut(server: Harness,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The same bound on a BOSH session, whose output waits for the client's next request: a client that asks
    for a 60 kB vCard 200 times in one request and does not come back for the answers gets a few with that
    request, the rest of its requests wait unhandled, and it is cut with <connection-timeout/> once it has
    taken nothing for output_timeout (not after BOSH's inactivity period, with 12 MB held meanwhile)."""
    url = await bosh_listener(server)
    await server.add_user("web")
    async with aiohttp.ClientSession() as http:
        bosh = Bosh(url, http)
        await bosh.login("web")
        answer = await bosh.send(f"<iq xmlns='jabber:client' type='set' id='set'><vCard xmlns='vcard-temp'>"
                                 f"<DESC>{BIG}</DESC></vCard></iq>")
        result = answer.find("{jabber:client}iq")
        assert (result if result is not None else await stanzas(bosh, "{jabber:client}iq")).get("id") == "set"
        web = JID.parse("web@localhost")
        conn = next(c for c in server.server.connections if c.session and c.session.bare == web)
        answer = await bosh.send("".join(f"<iq xmlns='jabber:client' type='get' id='v{i}'>"
                                         "<vCard xmlns='vcard-temp'/></iq>" for i in range(200)))
        answered = len(answer.findall("{jabber:client}iq"))
        await asyncio.sleep(0.5)
        assert 0 < answered < 10 and conn.unsent() < 1_000_000, (answered, conn.unsent())
        await until(lambda: conn.closing, "the client cut", timeout=5)
        assert "output unread for 2 s" in caplog.text


async def test_a_resumable_client_cut_for_not_reading_can_resume(server: Harness,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A client with resumable stream management that stops reading is cut past its cap like any other, but
    did not close its stream: its session waits for it (XEP-0198 7), and on a new connection it resumes and
    gets what it had not acknowledged."""
    monkeypatch.setattr(edge, "WRITE_BUFFER_LIMIT", 1_000_000)
    await server.add_user("u", "pw")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    raw = await login(server, "u", "desk", RawClient(*await asyncio.open_connection(sock=sock)))
    previd = await enabled(raw, presence=False)
    raw.writer.transport.pause_reading()
    session = server.server.sessions.get(JID.parse("u@localhost/desk"))
    conn = next(c for c in server.server.connections if c.session is session)
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for i in range(40):  # 2 MB
        session.send(big_message("u@localhost/desk", i))
        await asyncio.sleep(0)
    await until(lambda: session.detached, "the session detached")
    assert not session.ended and server.server.sessions.get(session.jid) is session
    raw.writer.transport.abort()

    again = await server.raw()
    await again.starttls()
    await again.open()
    await again.expect(f"{{{ns.STREAM}}}features")
    token = base64.b64encode(b"\0u\0pw").decode()
    await again.send(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{token}</auth>")
    await again.expect(f"{{{ns.SASL}}}success")
    again.parser.reset()
    await again.open()
    await again.expect(f"{{{ns.STREAM}}}features")
    await again.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    await again.expect(f"{{{SM}}}resumed")
    first = await again.expect("{jabber:client}message")
    assert first.findtext("{jabber:client}body", "").startswith("000000")
