"""Shared fixtures: an in-process Parley on free loopback ports, and real clients that talk to it.

`server` starts Parley with two hosts ('localhost' with in-band registration, 'example.test'),
a STARTTLS listener and a Direct TLS listener, on SQLite by default. Parametrize it indirectly
with 'postgresql' to run a test on PostgreSQL (a fresh schema, dropped afterwards).
"""

from __future__ import annotations

import asyncio
import asyncio.runners
import contextlib
import io
import os
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest
import uvloop
from slixmpp import ClientXMPP

from parley import build_server
from server.accounts import create_account
from server.config import DEFAULT_MODULES, parse_config
from server.registry import available
from server.server import Server
from server.stream.parser import StreamParser

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
IN_CI = os.environ.get("CI") == "true"
# End-to-end files that run on uvloop's event loop as well, as `parley serve` does (each test twice).
ON_UVLOOP = {"test_c2s_guards.py", "test_delivery.py", "test_offline.py", "test_scram_plus_independent.py",
             "test_s2s_dns.py", "test_carbons.py"}


def free_ports(count: int) -> list[int]:
    """Ports free now and all different: each socket stays bound until all are picked (one after another, the
    kernel may hand out a port it just gave)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def insecure_context() -> ssl.SSLContext:
    """Test clients accept the server's self-signed certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def unavailable(reason: str) -> NoReturn:
    """Something a test needs is missing: skip locally, fail under CI=true, where nothing may hide."""
    if IN_CI:
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


def needs_module(name: str) -> None:
    """A test of a module this build may lack: skips locally, fails under CI."""
    if name not in available():
        unavailable(f"Parley has no {name} module")


async def postgres_available() -> bool:
    try:
        import asyncpg

        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test", timeout=3)
        await conn.close()
        return True
    except Exception:
        return False


async def make_pg_schema() -> str:
    """A private schema for one test; fails (not skips) under CI when PostgreSQL is missing."""
    if not await postgres_available():
        unavailable("PostgreSQL at 127.0.0.1:5432 is not reachable")
    return f"parley_t_{uuid.uuid4().hex[:12]}"


async def drop_pg_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def disconnect_all(clients: list[ClientXMPP]) -> None:
    """End each client's stream and wait until it is closed (aborting one that does not close in time)."""
    for client in clients:
        if client.transport is None:
            continue  # already gone: disconnect() would wait on a future that never completes
        try:
            await asyncio.wait_for(client.disconnect(wait=0.5), 3)
        except Exception:
            client.abort()


class Harness:
    """A running server plus helpers to create accounts and connect clients to it."""

    def __init__(self, server: Server, port: int, direct_port: int, data_dir: Path, component_port: int = 0) -> None:
        self.server = server
        self.port = port
        self.direct_port = direct_port
        self.component_port = component_port  # XEP-0114 listener
        self.data_dir = data_dir
        self.host = "localhost"
        self.address = "127.0.0.1"  # where clients connect (a node of a cluster may listen on another loopback)
        self._clients: list[ClientXMPP] = []
        self._raw: list[RawClient] = []

    async def add_user(self, name: str, password: str = "secret", host: str = "localhost") -> str:
        await create_account(self.server.storage, host, name, password, self.server.config.scram_iterations)
        return f"{name}@{host}"

    async def client(self, jid: str, password: str = "secret", resource: str | None = None, *,
                     direct: bool = False, plugins: tuple[str, ...] = (), timeout: float = 10.0,
                     **kwargs: Any) -> ClientXMPP:
        """A slixmpp client logged in over STARTTLS (or Direct TLS), session started."""
        client = ClientXMPP(f"{jid}/{resource}" if resource else jid, password, **kwargs)
        client.ssl_context = insecure_context()
        client.enable_direct_tls = direct
        client.enable_starttls = not direct
        client.enable_plaintext = False
        for plugin in plugins:
            client.register_plugin(plugin)
        loop = asyncio.get_running_loop()
        started: asyncio.Future[bool] = loop.create_future()

        def on_start(_: object) -> None:
            if not started.done():
                started.set_result(True)

        def on_failure(event: object) -> None:
            if not started.done():
                started.set_exception(AssertionError(f"login failed for {jid}: {event}"))

        client.add_event_handler("session_start", on_start)
        client.add_event_handler("failed_all_auth", on_failure)
        self._clients.append(client)
        client.connect(self.address, self.direct_port if direct else self.port)
        await asyncio.wait_for(started, timeout)
        return client

    @staticmethod
    def inbox(client: ClientXMPP) -> asyncio.Queue:
        """A queue of the messages with a body that `client` receives."""
        queue: asyncio.Queue = asyncio.Queue()
        client.add_event_handler("message", queue.put_nowait)
        return queue

    async def raw(self, *, tls: bool = False) -> RawClient:
        """A raw socket for protocol-level and hostile-input tests."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        raw = RawClient(reader, writer)
        self._raw.append(raw)
        return raw

    async def restart(self) -> None:
        """Disconnect every client and replace the server with a new one on the same configuration, storage
        and ports: what a test finds afterwards is what survives a restart."""
        await self.close()
        self._clients.clear()
        self._raw.clear()
        await self.server.stop()
        self.server = build_server(self.server.config)
        await self.server.start()

    async def close(self) -> None:
        await disconnect_all(self._clients)
        for raw in self._raw:
            raw.writer.close()
        await asyncio.sleep(0)


class RawClient:
    """Speaks bytes to the server and parses what comes back with Parley's own stream parser."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = StreamParser(max_stanza_size=10_000_000)
        self.events: list[object] = []
        self.raw = b""

    async def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)
        await self.writer.drain()

    async def open(self, to: str = "localhost") -> None:
        await self.send(f"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                        f"xmlns:stream='http://etherx.jabber.org/streams' to='{to}' version='1.0'>")

    async def starttls(self, to: str = "localhost") -> None:
        """Open a stream and upgrade it to TLS, leaving a fresh stream to open."""
        await self.open(to)
        await self.expect("{http://etherx.jabber.org/streams}features")
        await self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await self.expect("{urn:ietf:params:xml:ns:xmpp-tls}proceed")
        await self.writer.start_tls(insecure_context(), server_hostname=to)
        self.parser.reset()

    async def next(self, timeout: float = 5.0) -> object:
        while not self.events:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise EOFError("server closed the connection")
            self.raw += data
            self.events.extend(self.parser.feed(data))
        return self.events.pop(0)

    async def expect(self, tag: str, timeout: float = 5.0) -> Any:
        """Skip events until an element with `tag` arrives."""
        while True:
            event = await self.next(timeout)
            if getattr(event, "tag", None) == tag:
                return event

    async def closed(self, timeout: float = 5.0) -> bytes:
        """Read until the server closes the connection; return everything received."""
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
                if not data:
                    return self.raw
                self.raw += data
        except ConnectionResetError:
            return self.raw


def make_config(data_dir: Path, port: int, direct_port: int, storage_url: str, component_port: int | None = None,
                **overrides: Any) -> Any:
    components = [{"type": "component", "address": "127.0.0.1", "port": component_port}] if component_port else []
    data: dict[str, Any] = {
        "data_dir": str(data_dir),
        "storage": {"url": storage_url},
        "limits": {"auth_lockout": 2.0, "auth_max_failures": 3, "unauthenticated_timeout": 10.0},
        "listeners": [
            {"type": "c2s", "address": "127.0.0.1", "port": port, "tls": "starttls"},
            {"type": "c2s", "address": "127.0.0.1", "port": direct_port, "tls": "direct"},
            *components,
        ],
        "hosts": {
            "localhost": {"registration": True, "admins": ["admin@localhost"]},
            "example.test": {},
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return parse_config(data, known_modules=available())


@pytest.fixture
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    backend = getattr(request, "param", "sqlite")
    overrides: dict[str, Any] = {}
    marker = request.node.get_closest_marker("parley_config")
    if marker is not None:
        overrides = marker.kwargs
    schema = None
    if backend == "postgresql":
        schema = await make_pg_schema()
        url = f"{PG_URL}?schema={schema}"
    else:
        url = f"sqlite+aiosqlite:///{tmp_path}/parley.db"
    port, direct_port, spare = free_ports(3)
    component_port = spare if "components" in overrides else None  # a listener for XEP-0114 tests only
    config = make_config(tmp_path, port, direct_port, url, component_port, **overrides)
    srv = build_server(config)
    await srv.start()
    harness = Harness(srv, port, direct_port, tmp_path, component_port or 0)
    try:
        yield harness
    finally:
        await harness.close()
        await harness.server.stop()
        if schema:
            await drop_pg_schema(schema)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """asyncio's own loop for every test, and uvloop's too for the files in ON_UVLOOP."""
    factories: dict[str, Callable[[], Any]] = {"asyncio": asyncio.new_event_loop}
    if item.path.name in ON_UVLOOP:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


# Seconds the end of a test's event loop waits for its tasks to finish once cancelled.
TEARDOWN_GRACE = 20.0


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio's end-of-loop cancellation (asyncio.runners._cancel_all_tasks, which pytest-asyncio's runner
    calls after every test) with a bound: asyncio's waits for ever for a task that ignores its cancellation,
    and one CI run hung so after a test had passed, with pytest-timeout's alarm spent. A task still running
    after TEARDOWN_GRACE is named with its stack in the RuntimeError, which pytest-asyncio reports as a
    warning of that test; the loop is then closed."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    done, stuck = loop.run_until_complete(asyncio.wait(tasks, timeout=TEARDOWN_GRACE))
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler({"message": "unhandled exception during the test's loop shutdown",
                                         "exception": task.exception(), "task": task})
    if stuck:
        stacks = io.StringIO()
        for task in stuck:
            task.print_stack(file=stacks)
        raise RuntimeError(f"{len(stuck)} task(s) ignored their cancellation:\n{stacks.getvalue()}")


def pytest_configure(config: pytest.Config) -> None:
    asyncio.runners._cancel_all_tasks = _cancel_all_tasks  # type: ignore[attr-defined]
    config.addinivalue_line("markers", "parley_config(**overrides): top-level config keys for the server fixture")


@contextlib.asynccontextmanager
async def module_servers(tmp_path: Path, backend: str, module: str) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    """Starts servers with `module` (given its options) besides the default ones, with c2s, Direct TLS and http
    listeners, on SQLite or on a fresh PostgreSQL schema (`backend`); stops them and drops the schemas after."""
    started: list[tuple[Harness, str | None]] = []

    async def start(**options: Any) -> Harness:
        schema = await make_pg_schema() if backend == "postgresql" else None
        url = f"{PG_URL}?schema={schema}" if schema else f"sqlite+aiosqlite:///{tmp_path}/parley.db"
        port, direct, http = free_ports(3)
        config = make_config(tmp_path, port, direct, url, listeners=[
            {"type": "c2s", "address": "127.0.0.1", "port": port, "tls": "starttls"},
            {"type": "c2s", "address": "127.0.0.1", "port": direct, "tls": "direct"},
            {"type": "http", "address": "127.0.0.1", "port": http, "tls": "none"},
        ], modules=[*DEFAULT_MODULES, module], module_options={module: options})
        srv = build_server(config)
        await srv.start()
        started.append((Harness(srv, port, direct, tmp_path), schema))
        return started[-1][0]

    try:
        yield start
    finally:
        for harness, schema in started:
            await harness.close()
            await harness.server.stop()
            if schema:
                await drop_pg_schema(schema)
