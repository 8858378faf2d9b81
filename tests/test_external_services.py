"""XEP-0215 external services: the STUN/TURN list and credentials that slixmpp clients get, the option type that
declares the services (a list of tables), and coturn, started here, relaying with the credentials Parley hands
out and refusing expired or forged ones."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import re
import shutil
import time
import tomllib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

import pytest
from slixmpp import ClientXMPP

from extensions.external_services import EXTDISCO, SERVICE, turn_credentials
from parley import build_server
from server.config import DEFAULT_MODULES, ConfigError, load_config, parse_config
from server.options import Option, example_section
from server.registry import available, load
from server.stanza import parse_datetime
from tests.conftest import Harness, free_ports, make_config, unavailable
from tests.test_basic_modules import INFO, features_of, iq_error, query_of, send_iq

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "parley.example.toml"
SECRET = "a secret coturn shares"
MODULES = [*DEFAULT_MODULES, "external_services"]
SERVICES = [
    {"type": "stun", "host": "stun.localhost"},
    {"type": "turn", "restricted": True, "ttl": 600},
    {"type": "turn", "transport": "tcp", "restricted": True, "ttl": 600},
    {"type": "turns", "host": "turn.localhost", "port": 5349, "transport": "tcp", "restricted": True,
     "name": "Relay over TLS"},
]
WITH_SERVICES = pytest.mark.parley_config(modules=MODULES, module_options={
    "external_services": {"secret": SECRET, "services": SERVICES}})


def services_of(result: Element, tag: str = "services") -> list[dict[str, str]]:
    found = result.find(f"{{{EXTDISCO}}}{tag}")
    assert found is not None, result
    return [dict(service.attrib) for service in found.iter(SERVICE)]


def without_credentials(service: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in service.items() if key not in ("username", "password", "expires")}


def assert_credentials(service: dict[str, str], user: str, ttl: int) -> None:
    """The TURN REST API's credentials: '<expiry>:<user>' and the HMAC-SHA1 of it with the shared secret."""
    expiry, _, name = service["username"].partition(":")
    assert name == user
    assert abs(int(expiry) - (time.time() + ttl)) < 30
    assert parse_datetime(service["expires"]) == datetime.fromtimestamp(int(expiry), UTC)
    digest = hmac.new(SECRET.encode(), service["username"].encode(), hashlib.sha1).digest()
    assert service["password"] == base64.b64encode(digest).decode()


async def alice(server: Harness) -> ClientXMPP:
    await server.add_user("alice")
    return await server.client("alice@localhost")


# --- the services list ----------------------------------------------------------------------------------------

@WITH_SERVICES
async def test_the_host_advertises_external_service_discovery(server: Harness) -> None:
    client = await alice(server)
    assert EXTDISCO in features_of(query_of(await send_iq(client, "get", f"<query xmlns='{INFO}'/>", "localhost"),
                                            INFO))


@WITH_SERVICES
async def test_services_list_stun_plain_and_turn_with_credentials_that_expire(server: Harness) -> None:
    client = await alice(server)
    services = services_of(await send_iq(client, "get", f"<services xmlns='{EXTDISCO}'/>", "localhost"))
    assert [without_credentials(service) for service in services] == [
        {"type": "stun", "host": "stun.localhost", "port": "3478", "transport": "udp"},
        {"type": "turn", "host": "localhost", "port": "3478", "transport": "udp", "restricted": "1"},
        {"type": "turn", "host": "localhost", "port": "3478", "transport": "tcp", "restricted": "1"},
        {"type": "turns", "host": "turn.localhost", "port": "5349", "transport": "tcp", "restricted": "1",
         "name": "Relay over TLS"},
    ]
    for service, ttl in zip(services[1:], (600, 600, 86400), strict=True):
        assert_credentials(service, "alice@localhost", ttl)


@WITH_SERVICES
async def test_services_filtered_by_type(server: Harness) -> None:
    client = await alice(server)
    result = await send_iq(client, "get", f"<services xmlns='{EXTDISCO}' type='turn'/>", "localhost")
    assert result.find(f"{{{EXTDISCO}}}services").get("type") == "turn"
    assert [(s["type"], s["transport"]) for s in services_of(result)] == [("turn", "udp"), ("turn", "tcp")]
    stun = await send_iq(client, "get", f"<services xmlns='{EXTDISCO}' type='stun'/>", "localhost")
    assert [s["host"] for s in services_of(stun)] == ["stun.localhost"]
    assert services_of(await send_iq(client, "get", f"<services xmlns='{EXTDISCO}' type='ftp'/>", "localhost")) == []


# --- credentials on request (XEP-0215 §3.3) -------------------------------------------------------------------

def credentials(*services: str) -> str:
    return f"<credentials xmlns='{EXTDISCO}'>{''.join(services)}</credentials>"


@WITH_SERVICES
async def test_credentials_for_a_service_by_type_and_host_and_port(server: Harness) -> None:
    client = await alice(server)
    turn = services_of(await send_iq(client, "get", credentials("<service type='turn' host='localhost'/>"),
                                     "localhost"), "credentials")
    assert [(s["transport"], s["port"]) for s in turn] == [("udp", "3478"), ("tcp", "3478")]
    for service in turn:
        assert_credentials(service, "alice@localhost", 600)
    turns = services_of(await send_iq(client, "get", credentials(
        "<service type='turns' host='turn.localhost' port='5349'/>"), "localhost"), "credentials")
    assert [(s["host"], s["port"], s["name"]) for s in turns] == [("turn.localhost", "5349", "Relay over TLS")]
    assert_credentials(turns[0], "alice@localhost", 86400)


@WITH_SERVICES
async def test_credentials_for_what_has_none_are_item_not_found_and_a_vague_request_bad_request(
        server: Harness) -> None:
    client = await alice(server)
    for unknown in ("<service type='turn' host='elsewhere.example'/>", "<service type='turns' host='turn.localhost' "
                    "port='3478'/>", "<service type='stun' host='stun.localhost'/>"):
        assert await iq_error(client, "get", credentials(unknown), "localhost") == (
            "item-not-found", "no service with credentials matches")
    for vague in (credentials(), credentials("<service type='turn'/>"), credentials("<service host='localhost'/>")):
        assert await iq_error(client, "get", vague, "localhost") == (
            "bad-request", "name each service with its type and host")


@WITH_SERVICES
async def test_only_the_hosts_own_users_are_answered(server: Harness) -> None:
    await server.add_user("bob", host="example.test")
    bob = await server.client("bob@example.test")
    for request in (f"<services xmlns='{EXTDISCO}'/>", credentials("<service type='turn' host='localhost'/>")):
        assert await iq_error(bob, "get", request, "localhost") == (
            "forbidden", "external services are for users of localhost")
    own = services_of(await send_iq(bob, "get", f"<services xmlns='{EXTDISCO}'/>", "example.test"))
    assert_credentials(own[1], "bob@example.test", 600)  # his own host answers him, for his own JID


@pytest.mark.parley_config(modules=MODULES)
async def test_without_a_secret_restricted_services_are_not_offered(server: Harness,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    client = await alice(server)
    services = services_of(await send_iq(client, "get", f"<services xmlns='{EXTDISCO}'/>", "localhost"))
    assert services == [{"type": "stun", "host": "localhost", "port": "3478", "transport": "udp"}]  # the defaults
    assert await iq_error(client, "get", credentials("<service type='turn' host='localhost'/>"), "localhost") == (
        "item-not-found", "no service with credentials matches")
    logged = [record.getMessage() for record in caplog.get_records("setup")]  # at the server's start
    assert any(line.startswith("localhost: restricted services are not offered") for line in logged), logged


def test_the_example_configuration_offers_stun_and_turn_with_a_placeholder_secret() -> None:
    host = load_config(EXAMPLE, known_modules=available()).hosts["example.org"]
    assert "external_services" in host.modules
    assert "REPLACE" in host.options["external_services.secret"]
    services = host.options.get("external_services.services", load("external_services")._declared["services"].default)
    assert [(s["type"], s["transport"], s["restricted"]) for s in services] == [
        ("stun", "udp", False), ("turn", "udp", True), ("turn", "tcp", True)]


# --- the option type: a list of tables ------------------------------------------------------------------------

PORTS = Option("ports", list, ({"kind": "a"},), "a list of tables", fields=(
    Option("kind", str, None, "its kind", choices=("a", "b"), required=True),
    Option("port", int, 1, "its port", minimum=1, maximum=65535),
    Option("label", str, None, "a label"),
))


def test_tables_are_checked_key_by_key_and_completed_with_defaults() -> None:
    assert PORTS.default == ({"kind": "a", "port": 1, "label": None},)
    assert PORTS.check([{"kind": "b", "port": 80}, {"label": "x", "kind": "a"}]) == (
        {"kind": "b", "port": 80, "label": None}, {"kind": "a", "port": 1, "label": "x"})
    assert PORTS.check([]) == ()
    for bad, reason in [
        ({"kind": "a"}, "must be a list of tables (got {'kind': 'a'})"),
        (["a"], "must be a list of tables (got ['a'])"),
        ([{"kind": "a"}, {"kind": "c"}], "table 2, kind: must be one of 'a', 'b' (got 'c')"),
        ([{"kind": "a", "port": 0}], "table 1, port: must be an integer from 1 to 65535 (got 0)"),
        ([{"kind": "a", "prot": 80}], "table 1, prot: unknown key 'prot' (did you mean 'port'?)"),
        ([{"port": 80}], "table 1: kind is required"),
    ]:
        with pytest.raises(ValueError) as info:
            PORTS.check(bad)
        assert str(info.value) == reason
    with pytest.raises(TypeError, match="declares its fields"):
        Option("tables", list, (), "a list of tables without fields")
    with pytest.raises(TypeError, match="declares its fields"):
        Option("port", int, 1, "not a list", fields=PORTS.fields)


def test_a_list_of_tables_in_the_example_reads_back_as_its_default() -> None:
    section = example_section({"demo": [PORTS]})
    assert "#   kind: its kind (a, b); required\n#   port: its port; default 1\n#   label: a label; optional\n" \
           "ports = [\n  { kind = \"a\" },\n]\n" in section
    assert PORTS.check(tomllib.loads(section)["module_options"]["demo"]["ports"]) == PORTS.default


def test_a_bad_service_is_a_configuration_error_naming_the_table_and_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"modules": MODULES, "module_options": {"external_services": {"services": [
            {"type": "turn"}, {"type": "turn", "transport": "sctp"}]}}}, known_modules=available())
    assert [(error.key, error.reason) for error in info.value.errors] == [(
        "module_options.external_services.services", "table 2, transport: must be one of 'udp', 'tcp' (got 'sctp')")]


# --- coturn ---------------------------------------------------------------------------------------------------

STUN_BINDING = bytes.fromhex("0001 0000 2112a442") + os.urandom(12)


class _Datagram(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)


async def udp_answer(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send `request` to 127.0.0.1:`port` until an answer comes (the server may still be starting)."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Datagram, remote_addr=("127.0.0.1", port))
    deadline = loop.time() + timeout
    try:
        while True:
            transport.sendto(request)
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(protocol.received.get(), 0.2)
            if loop.time() > deadline:
                raise AssertionError(f"nothing answered on udp 127.0.0.1:{port}")
    finally:
        transport.close()


def coturn_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} from coturn (apt-get install coturn)")
    return path


@contextlib.asynccontextmanager
async def process(*argv: str, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=asyncio.subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.fixture
async def coturn(tmp_path: Path) -> AsyncIterator[tuple[int, int]]:
    """coturn with the TURN REST API on 127.0.0.1 (udp and tcp on one port), and a UDP echo peer for its relays:
    yields (TURN port, peer port) once both answer."""
    turnserver, peer = coturn_tool("turnserver"), coturn_tool("turnutils_peer")
    port, peer_port = free_ports(2)
    run = tmp_path / "coturn"
    run.mkdir()
    async with process(turnserver, "-n", "--use-auth-secret", f"--static-auth-secret={SECRET}",
                       "--realm=parley.test", "--no-tls", "--no-dtls", "--listening-ip=127.0.0.1",
                       "--relay-ip=127.0.0.1", f"--listening-port={port}", "--allow-loopback-peers", "--no-cli",
                       f"--db={run / 'turndb'}", f"--pidfile={run / 'turnserver.pid'}", "--log-file=stdout",
                       log=run / "turnserver.log"), \
            process(peer, "-L", "127.0.0.1", "-p", str(peer_port), log=run / "peer.log"):
        binding = await udp_answer(port, STUN_BINDING)
        assert binding[:2] == b"\x01\x01" and binding[8:20] == STUN_BINDING[8:20]  # a STUN binding success
        assert await udp_answer(peer_port, b"ping") == b"ping"
        yield port, peer_port


@contextlib.asynccontextmanager
async def parley_with(tmp_path: Path, services: list[dict[str, Any]]) -> AsyncIterator[Harness]:
    """A Parley server whose external services are `services` (what the `server` fixture starts, with options
    that depend on a port known only now)."""
    port, direct_port = free_ports(2)
    config = make_config(tmp_path, port, direct_port, f"sqlite+aiosqlite:///{tmp_path}/parley.db", modules=MODULES,
                         module_options={"external_services": {"secret": SECRET, "services": services}})
    harness = Harness(build_server(config), port, direct_port, tmp_path)
    await harness.server.start()
    try:
        yield harness
    finally:
        await harness.close()
        await harness.server.stop()


async def allocate(port: int, peer_port: int, username: str, password: str, transport: str) -> tuple[int, str]:
    """turnutils_uclient allocating a relay with these credentials and sending a message through it to the peer:
    its exit code and output."""
    uclient = coturn_tool("turnutils_uclient")
    tcp = ["-t"] if transport == "tcp" else []
    proc = await asyncio.create_subprocess_exec(
        uclient, "-v", "-c", *tcp, "-n", "1", "-p", str(port), "-u", username, "-w", password,
        "-e", "127.0.0.1", "-r", str(peer_port), "127.0.0.1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


def relayed(returncode: int, output: str) -> bool:
    """Whether uclient got a relay address and its message came back from the peer through the relay."""
    return returncode == 0 and re.search(r"Received relay addr: 127\.0\.0\.1:\d+", output) is not None \
        and "tot_recv_msgs=1" in output and "Total lost packets 0 " in output


async def test_coturn_relays_with_the_credentials_parley_hands_out(tmp_path: Path, coturn: tuple[int, int]) -> None:
    port, peer_port = coturn
    services = [{"type": "stun", "host": "127.0.0.1", "port": port},
                {"type": "turn", "host": "127.0.0.1", "port": port, "restricted": True},
                {"type": "turn", "host": "127.0.0.1", "port": port, "transport": "tcp", "restricted": True}]
    async with parley_with(tmp_path, services) as server:
        client = await alice(server)
        listed = services_of(await send_iq(client, "get", f"<services xmlns='{EXTDISCO}'/>", "localhost"))
        assert (await udp_answer(int(listed[0]["port"]), STUN_BINDING))[:2] == b"\x01\x01"
        requested = services_of(await send_iq(client, "get", credentials(
            f"<service type='turn' host='127.0.0.1' port='{port}'/>"), "localhost"), "credentials")
    runs = await asyncio.gather(*(allocate(port, peer_port, service["username"], service["password"],
                                           service["transport"]) for service in (*listed[1:], *requested)))
    assert len(runs) == 4
    for returncode, output in runs:
        assert relayed(returncode, output), output


async def test_coturn_refuses_expired_and_forged_credentials(coturn: tuple[int, int]) -> None:
    port, peer_port = coturn
    now = int(time.time())
    expired = turn_credentials(SECRET, "alice@localhost", now - 60)
    forged = turn_credentials("not the secret", "alice@localhost", now + 3600)
    valid_name, valid_password = turn_credentials(SECRET, "alice@localhost", now + 3600)
    refused = (expired, forged, (valid_name.replace("alice", "mallory"), valid_password))
    *runs, valid = await asyncio.gather(*(allocate(port, peer_port, username, password, "udp")
                                          for username, password in (*refused, (valid_name, valid_password))))
    for returncode, output in runs:
        assert returncode != 0 and "Received relay addr" not in output, output
        assert "Cannot complete Allocation" in output, output
    assert relayed(*valid), valid[1]  # made right with the same secret, for the same user
