"""Stopping the server loses nothing a client sent, and clients that do not read cannot hold the server's memory.

`parley serve` is run as a real process and stopped with SIGTERM, as systemd does: what a sender without
stream management sent before the signal is delivered to the online recipient or kept in offline storage.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
import socket
from pathlib import Path
from xml.etree.ElementTree import Element, SubElement

import pytest

from server.jid import JID
from server.limits import OutputBudget
from server.stanza import parse_stored
from server.storage import open_storage
from tests.conftest import Harness, RawClient, free_port
from tests.test_cli import parley, start_process
from tests.test_stream_management import until

STREAMS = "http://etherx.jabber.org/streams"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
BODY = "{jabber:client}body"
COUNT = 2000
FAST = "[limits]\nc2s_rate = 100000000\nc2s_burst = 100000000\noffline_quota = 10000"


async def login(harness: Harness, user: str, resource: str, raw: RawClient | None = None) -> RawClient:
    """A raw client (a new one unless given) over STARTTLS, authenticated with PLAIN, `resource` bound,
    available."""
    raw = raw or await harness.raw()
    await raw.starttls()
    await raw.open()
    await raw.expect(f"{{{STREAMS}}}features")
    token = base64.b64encode(f"\0{user}\0pw".encode()).decode()
    await raw.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>")
    await raw.expect(f"{{{SASL}}}success")
    raw.parser.reset()
    await raw.open()
    await raw.expect(f"{{{STREAMS}}}features")
    await raw.send(f"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                   f"<resource>{resource}</resource></bind></iq>")
    await raw.expect("{jabber:client}iq")
    await raw.send("<presence/>")
    await raw.expect("{jabber:client}presence")
    return raw


async def read_messages(raw: RawClient, bodies: list[str]) -> None:
    """Collect the bodies of the messages `raw` receives until the server closes the stream."""
    while True:
        try:
            event = await raw.next(timeout=60)
        except (EOFError, ConnectionError):
            return
        if isinstance(event, Element) and event.findtext(BODY):
            bodies.append(event.findtext(BODY) or "")


async def test_sigterm_delivers_or_stores_everything_that_was_read(tmp_path: Path) -> None:
    port, direct_port = free_port(), free_port()
    proc, _ = await start_process(tmp_path, port, direct_port, extra=FAST)
    try:
        for user in ("alice", "bob", "carol"):
            assert parley("user", "--config", str(tmp_path / "parley.toml"), "add", f"{user}@localhost",
                          "--password", "pw").returncode == 0
        harness = Harness(None, port, direct_port, tmp_path)  # type: ignore[arg-type]
        alice = await login(harness, "alice", "desk")
        bob = await login(harness, "bob", "desk")  # no stream management
        delivered: list[str] = []
        reading = asyncio.get_running_loop().create_task(read_messages(alice, delivered))
        # Every other message to alice (online), the rest to carol (offline: each is a database write).
        await bob.send("".join(
            f"<message type='chat' to='{'alice@localhost/desk' if i % 2 == 0 else 'carol@localhost'}' id='m{i}'>"
            f"<body>m{i}</body></message>" for i in range(COUNT)))
        await until(lambda: len(delivered) > 0, timeout=30)  # the server has read and is working through them
        proc.send_signal(signal.SIGTERM)
        farewell = (await bob.closed(timeout=60)).decode()
        await asyncio.wait_for(reading, 60)
        await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert "<system-shutdown" in farewell
    assert delivered == [f"m{i}" for i in range(0, COUNT, 2)]
    storage = await open_storage(f"sqlite+aiosqlite:///{tmp_path}/data/parley.db")  # as the next start finds it
    try:
        stored = await storage.offline.pop_all("localhost", "carol")
    finally:
        await storage.close()
    assert [parse_stored(xml).findtext(BODY) for _, xml in stored] == [f"m{i}" for i in range(1, COUNT, 2)]


BUDGET = 1_000_000


async def stop_reading(harness: Harness, user: str) -> RawClient:
    """A logged-in client with a small receive buffer that stops reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting, so the window stays small
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", harness.port))
    raw = await login(harness, user, "desk", RawClient(*await asyncio.open_connection(sock=sock)))
    raw.writer.transport.pause_reading()
    return raw


async def not_reading(harness: Harness, user: str) -> RawClient:
    """A logged-in client that stops reading, with small socket buffers so that output piles up in the server."""
    raw = await stop_reading(harness, user)
    conn = next(c for c in harness.server.connections if c.session and c.session.bare == JID.parse(f"{user}@localhost"))
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return raw


def big_message(to: str, i: int) -> Element:
    el = Element("{jabber:client}message", {"from": "bob@localhost/desk", "to": to, "type": "chat"})
    SubElement(el, "{jabber:client}body").text = f"{i:06d}" + "x" * 50_000
    return el


@pytest.mark.parley_config(limits={"max_output_total": BUDGET})
async def test_output_held_for_clients_that_do_not_read_is_capped_server_wide(
        server: Harness, caplog: pytest.LogCaptureFixture) -> None:
    users = ["u0", "u1", "u2"]
    for user in [*users, "reader", "bob"]:
        await server.add_user(user, "pw")
    stalled = [await not_reading(server, user) for user in users]
    reader = await login(server, "reader", "desk")
    received: list[str] = []
    reading = asyncio.get_running_loop().create_task(read_messages(reader, received))
    sessions = {u: server.server.sessions.get(JID.parse(f"{u}@localhost/desk")) for u in [*users, "reader"]}
    caplog.set_level(logging.WARNING, "parley.server")
    for i in range(24):  # 1.2 MB each, 3.6 MB in all; each connection's own cap (16 MiB) is far away
        for user in users:
            sessions[user].send(big_message(f"{user}@localhost/desk", i))
        await asyncio.sleep(0)  # one message each per write, as traffic comes
    await until(lambda: any(sessions[u].closed for u in users))
    assert server.server.output.holding <= BUDGET
    assert "hold more than 1000000 bytes of output unread" in caplog.text
    for i in range(3):
        sessions["reader"].send(big_message("reader@localhost/desk", i))
    await until(lambda: len(received) == 3)
    assert not sessions["reader"].closed
    reading.cancel()
    for raw in stalled:
        raw.writer.transport.abort()


def test_the_output_budget_closes_the_largest_holders_first() -> None:
    budget: OutputBudget[str] = OutputBudget(100)
    assert budget.held("a", 40) == [] and budget.held("b", 50) == []
    assert budget.held("c", 30) == ["b"]  # 120 > 100: the largest goes, 70 left
    assert budget.holding == 70
    assert budget.held("a", 0) == [] and budget.holding == 30  # drained below its high mark
    assert budget.held("c", 200) == ["c"] and budget.holding == 0
