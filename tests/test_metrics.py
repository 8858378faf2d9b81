"""Prometheus metrics and the health check (server/metrics.py) over a real HTTP socket, after real slixmpp
logins and messages; /health while PostgreSQL is gone and once it is back."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from parley import build_server
from server.c2s import C2SConnection
from server.config import ListenerConfig
from server.ns import SASL
from server.server import Server
from tests.conftest import Harness, drop_pg_schema, free_ports, make_config, make_pg_schema
from tests.s2s_support import Parley, linked, servers_fixture

servers = servers_fixture
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def http_listener(server: Harness) -> str:
    port = free_ports(1)[0]
    server.server.config.listeners.append(ListenerConfig("http", "127.0.0.1", port, "none"))
    await server.restart()
    return f"http://127.0.0.1:{port}"


async def get(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(base + path, headers=headers) as response:
        return response.status, await response.text(), response.headers.get("Content-Type", "")


async def scrape(base: str) -> Samples:
    status, body, content_type = await get(base, "/metrics")
    assert status == 200, body
    assert content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_scrape_after_logins_and_messages(server: Harness) -> None:
    base = await http_listener(server)
    before = await scrape(base)
    for name in ("alice", "bob", "carol"):
        await server.add_user(name)
    alice = await server.client("alice@localhost", resource="a")
    bob = await server.client("bob@localhost", resource="b", direct=True)
    inbox = server.inbox(bob)
    raw = await server.raw()
    await raw.starttls()
    await raw.open()
    wrong = base64.b64encode(b"\0carol\0wrong").decode()
    await raw.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{wrong}</auth>")
    await raw.expect(f"{{{SASL}}}failure")
    for i in range(3):
        alice.send_message(mto="bob@localhost/b", mbody=f"hello {i}", mtype="chat")
    alice.send_message(mto="carol@localhost", mbody="while you were away", mtype="chat")
    for _ in range(3):
        await asyncio.wait_for(inbox.get(), 5)

    async def offline_stored() -> bool:
        return value(await scrape(base), "parley_offline_messages") == 1

    await until(offline_stored)
    after = await scrape(base)
    assert value(after, "parley_c2s_sessions", transport="tcp") == 1
    assert value(after, "parley_c2s_sessions", transport="direct_tls") == 1
    moved = {name: value(after, name, **labels) - value(before, name, **labels) for name, labels in (
        ("parley_c2s_stanzas_received_total", {"kind": "message"}),
        ("parley_c2s_stanzas_sent_total", {"kind": "message"}),
        ("parley_c2s_authentications_total", {"mechanism": "PLAIN", "outcome": "failure"}),
        ("parley_delivery_seconds_count", {}),
        ("parley_archive_commit_seconds_count", {}),
    )}
    assert moved["parley_c2s_stanzas_received_total"] == 4
    assert moved["parley_c2s_stanzas_sent_total"] >= 3  # and whatever else bob got (presence is another kind)
    assert moved["parley_c2s_authentications_total"] == 1
    assert moved["parley_delivery_seconds_count"] == 4
    assert moved["parley_archive_commit_seconds_count"] >= 1  # alice's and bob's archives, grouped or not
    successes = sum(v for (name, labels), v in after.items()
                    if name == "parley_c2s_authentications_total" and ("outcome", "success") in labels)
    assert successes == 2
    assert value(after, "parley_archive_queue") == 0
    assert value(after, "parley_storage_up") == 1
    assert value(after, "parley_storage_write_failures_total", store="message archive") == 0
    assert value(after, "parley_storage_write_failures_total", store="offline storage") == 0
    assert value(after, "parley_event_loop_lag_seconds_count") >= 0
    assert value(after, "process_resident_memory_bytes") > 0
    status, body, _ = await get(base, "/health")
    assert status == 200 and '"status": "ok"' in body


def test_a_transport_is_labelled_by_its_connection_class() -> None:
    class WebSocketConnection(C2SConnection):
        pass

    class Named(C2SConnection):
        transport_label = "carrier-pigeon"

    assert (C2SConnection.transport_label, WebSocketConnection.transport_label, Named.transport_label) == \
        ("tcp", "websocket", "carrier-pigeon")


async def test_event_loop_lag_is_sampled(server: Harness) -> None:
    base = await http_listener(server)

    async def sampled() -> bool:
        return value(await scrape(base), "parley_event_loop_lag_seconds_count") >= 2

    await until(sampled)
    time.sleep(0.6)  # block the loop on purpose: the sample under way is at least 0.35 s late

    async def late() -> bool:
        samples = await scrape(base)
        return value(samples, "parley_event_loop_lag_seconds_bucket", le="0.25") < \
            value(samples, "parley_event_loop_lag_seconds_count")

    await until(late)


@pytest.mark.parley_config(http_api={"allowed_networks": ["10.0.0.0/8"]})
async def test_metrics_only_to_the_allowed_networks_health_to_all(server: Harness) -> None:
    base = await http_listener(server)
    assert (await get(base, "/metrics"))[0] == 403
    assert (await get(base, "/health"))[0] == 200


async def test_behind_a_trusted_proxy_the_client_must_be_allowed(server: Harness) -> None:
    """Loopback is allowed, but a proxy on loopback forwards anyone: the client it names is what counts."""
    base = await http_listener(server)
    server.server.config.trusted_proxies = [ipaddress.ip_network("127.0.0.1/32")]
    assert (await get(base, "/metrics", {"X-Forwarded-For": "203.0.113.9"}))[0] == 403
    assert (await get(base, "/metrics", {"X-Forwarded-For": "127.0.0.1"}))[0] == 200


class Proxy:
    """A TCP relay to PostgreSQL that the test cuts and restores: the database 'goes away' for Parley
    alone, not for anyone else on the machine."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


@pytest.fixture
async def behind_proxy(tmp_path: Path) -> AsyncIterator[tuple[Harness, Proxy, str]]:
    schema = await make_pg_schema()
    port, direct_port, proxy_port, http_port = free_ports(4)
    proxy = Proxy(proxy_port)
    await proxy.start()
    config = make_config(tmp_path, port, direct_port,
                         f"postgresql+asyncpg://postgres@127.0.0.1:{proxy_port}/test?schema={schema}")
    config.listeners.append(ListenerConfig("http", "127.0.0.1", http_port, "none"))
    srv = build_server(config)
    await srv.start()
    harness = Harness(srv, port, direct_port, tmp_path)
    try:
        yield harness, proxy, f"http://127.0.0.1:{http_port}"
    finally:
        await harness.close()
        if not proxy.serving:
            await proxy.start()  # for the server's goodbye writes
        await harness.server.stop()
        await proxy.stop()
        await drop_pg_schema(schema)


async def test_health_503_while_postgresql_is_gone(behind_proxy: tuple[Harness, Proxy, str]) -> None:
    _, proxy, base = behind_proxy
    status, body, content_type = await get(base, "/health")
    assert status == 200 and content_type.startswith("application/json"), body
    await proxy.stop()
    status, body, _ = await get(base, "/health")
    assert status == 503 and '"status": "unavailable"' in body
    assert value(await scrape(base), "parley_storage_up") == 0
    await proxy.start()

    async def healthy() -> bool:
        return (await get(base, "/health"))[0] == 200

    await until(healthy, 10)


def registry_samples(server: Server) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in
            text_string_to_metric_families(generate_latest(server.metrics.registry).decode()) for s in family.samples}


async def test_s2s_links_by_direction_and_state(servers: tuple[Parley, Parley]) -> None:
    a, b = servers
    assert value(registry_samples(a.server), "parley_s2s_links", direction="outgoing", state="established") == 0
    await linked(a, b)
    sent, received = registry_samples(a.server), registry_samples(b.server)
    assert value(sent, "parley_s2s_links", direction="outgoing", state="established") == 1
    assert value(sent, "parley_s2s_links", direction="outgoing", state="connecting") == 0
    assert value(received, "parley_s2s_links", direction="incoming", state="established") == 1
    assert value(sent, "parley_s2s_queued_stanzas") == 0
