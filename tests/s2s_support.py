"""Helpers for federation tests: a test CA, certificates, Parley instances with an s2s listener, and
waiting for what a client receives."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from slixmpp import ClientXMPP

from parley import build_server
from s2s.dialback import make_key
from server import ns
from server.config import parse_config
from server.registry import available
from server.server import Server
from server.stream.parser import StreamOpen, StreamParser
from tests.conftest import Harness, free_ports, insecure_context


def free_port_on(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


class TestCA:
    """A certificate authority for one test run; peers that trust it can use SASL EXTERNAL."""

    __test__ = False

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Parley test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / "ca.crt"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, domain: str, directory: Path | None = None) -> tuple[Path, Path]:
        """A certificate for `domain` and its subdomains, good for TLS servers and clients."""
        directory = directory or self.dir
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain), x509.DNSName(f"*.{domain}")]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        crt, key_path = directory / f"{domain}.crt", directory / f"{domain}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        return crt, key_path


class Parley:
    """An in-process Parley serving some domains, with c2s on 127.0.0.1 and s2s on its own address."""

    def __init__(self, server: Server, harness: Harness, address: str, s2s_port: int) -> None:
        self.server = server
        self.harness = harness
        self.address = address
        self.s2s_port = s2s_port

    @property
    def manager(self) -> Any:
        return self.server.s2s

    async def user(self, jid: str, password: str = "secret", available: bool = True, **kwargs: Any) -> ClientXMPP:
        """A new account, logged in; available (so that messages to its bare JID reach it) unless told."""
        local, _, domain = jid.partition("@")
        await self.harness.add_user(local, password, host=domain)
        client = await self.harness.client(jid, password, **kwargs)
        if available:
            await online(client)
        return client

    async def stop(self) -> None:
        await self.harness.close()
        await self.server.stop()


async def start_parley(directory: Path, domains: dict[str, dict[str, Any]], address: str, *, s2s_port: int = 0,
                       s2s: dict[str, Any] | None = None, s2s_tls: str = "starttls",
                       unauthenticated_timeout: float = 5.0) -> Parley:
    """Start Parley for `domains` (each with its host config) listening for servers on `address`."""
    directory.mkdir(parents=True, exist_ok=True)
    port, direct_port = free_ports(2)
    s2s_port = s2s_port or free_port_on(address)
    config = parse_config({
        "data_dir": str(directory),
        "storage": {"url": f"sqlite+aiosqlite:///{directory}/parley.db"},
        "limits": {"unauthenticated_timeout": unauthenticated_timeout},
        "listeners": [
            {"type": "c2s", "address": "127.0.0.1", "port": port},
            {"type": "c2s", "address": "127.0.0.1", "port": direct_port, "tls": "direct"},
            {"type": "s2s", "address": address, "port": s2s_port, "tls": s2s_tls},
        ],
        "hosts": domains,
        "s2s": s2s or {},
    }, known_modules=available())
    server = build_server(config)
    await server.start()
    return Parley(server, Harness(server, port, direct_port, directory), address, s2s_port)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition on server state that no client sees."""
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def online(client: ClientXMPP) -> None:
    """Send initial presence and wait until the server reflected it back."""
    reflected = Inbox(client, "presence")
    client.send_presence()
    await reflected.wait(lambda p: p["from"] == client.boundjid)


class Inbox:
    """Stanzas of one kind a client received, to wait for by what they say."""

    def __init__(self, client: ClientXMPP, event: str = "message") -> None:
        self.received: list[Any] = []
        self._arrived = asyncio.Event()
        client.add_event_handler(event, self._add)

    def _add(self, stanza: Any) -> None:
        self.received.append(stanza)
        self._arrived.set()

    async def wait(self, match: Callable[[Any], bool] = lambda _: True, timeout: float = 10.0) -> Any:
        async def first() -> Any:
            while True:
                for stanza in self.received:
                    if match(stanza):
                        self.received.remove(stanza)
                        return stanza
                self._arrived.clear()
                await self._arrived.wait()

        try:
            return await asyncio.wait_for(first(), timeout)
        except TimeoutError:
            raise AssertionError(f"not received; got {[str(s) for s in self.received]}") from None


class RawPeer:
    """A hand-driven server connecting to Parley's s2s port: for hostile and protocol-level tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = StreamParser(ns.SERVER)
        self.events: list[object] = []
        self.stream_id = ""

    @classmethod
    async def connect(cls, address: str, port: int, source: str | None = None) -> RawPeer:
        """Connect, from the loopback address `source` when given."""
        reader, writer = await asyncio.open_connection(address, port, local_addr=(source, 0) if source else None)
        return cls(reader, writer)

    async def send(self, data: str) -> None:
        self.writer.write(data.encode())
        await self.writer.drain()

    async def open(self, from_: str, to: str) -> Element:
        """Send a stream header; return the features that answer it."""
        await self.send(f"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' "
                        f"xmlns:stream='http://etherx.jabber.org/streams' from='{from_}' to='{to}' version='1.0'>")
        header = await self.next()
        assert isinstance(header, StreamOpen), header
        self.stream_id = header.get("id") or ""
        return await self.expect(f"{{{ns.STREAM}}}features")

    async def starttls(self, from_: str, to: str) -> Element:
        await self.open(from_, to)
        await self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await self.expect(f"{{{ns.TLS}}}proceed")
        await self.writer.start_tls(insecure_context())
        self.parser.reset()
        return await self.open(from_, to)

    async def next(self, timeout: float = 10.0) -> object:
        while not self.events:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise EOFError("the server closed the connection")
            self.events.extend(self.parser.feed(data))
        return self.events.pop(0)

    async def expect(self, tag: str, timeout: float = 10.0) -> Any:
        while True:
            event = await self.next(timeout)
            if getattr(event, "tag", None) == tag:
                return event

    async def closed(self, timeout: float = 10.0) -> bytes:
        """Everything the server sends until it closes the connection."""
        received = b""
        try:
            while data := await asyncio.wait_for(self.reader.read(65536), timeout):
                received += data
        except ConnectionResetError:
            pass
        return received

    def close(self) -> None:
        self.writer.close()


# --- two Parley servers federating over loopback ---------------------------------------------------------

A_ADDR, B_ADDR = "127.0.0.5", "127.0.0.6"


async def pair(tmp_path: Path, a_s2s: dict[str, Any] | None = None, b_s2s: dict[str, Any] | None = None, *,
               certs: str = "ca", a_domains: tuple[str, ...] = ("a.test",), b_listener: str = "starttls",
               bidi: bool = False, **options: Any) -> tuple[Parley, Parley]:
    """Parley A (a.test) and Parley B (b.test), each reaching the other's domains through the static map.

    certs="ca": certificates from a CA both trust, so SASL EXTERNAL works; certs="self-signed": each
    server generates its own, which the other cannot verify. Without bidi (XEP-0288) each server opens
    its own connection to the other, so both directions authenticate.
    """
    hosts: dict[str, dict[str, Any]] = {domain: {} for domain in (*a_domains, "b.test")}
    trust: dict[str, Any] = {"bidi": bidi}
    if certs == "ca":
        ca = TestCA(tmp_path / "ca")
        for domain in hosts:
            crt, key = ca.issue(domain)
            hosts[domain] = {"certificate": str(crt), "key": str(key)}
        trust["ca_bundle"] = str(ca.path)
    a_port, b_port = free_port_on(A_ADDR), free_port_on(B_ADDR)
    to_b = {"b.test": {"address": B_ADDR, "port": b_port, "tls": b_listener}}
    to_a = {domain: {"address": A_ADDR, "port": a_port} for domain in a_domains}
    a = await start_parley(tmp_path / "a", {d: hosts[d] for d in a_domains}, A_ADDR, s2s_port=a_port,
                           s2s={**trust, "static": to_b, **(a_s2s or {})}, **options)
    b = await start_parley(tmp_path / "b", {"b.test": hosts["b.test"]}, B_ADDR, s2s_port=b_port,
                           s2s={**trust, "static": to_a, **(b_s2s or {})}, s2s_tls=b_listener, **options)
    return a, b


@contextlib.asynccontextmanager
async def running_pair(tmp_path: Path, **options: Any) -> AsyncIterator[tuple[Parley, Parley]]:
    """The pair, stopped afterwards."""
    a, b = await pair(tmp_path, **options)
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


@pytest.fixture(name="servers")
async def servers_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Parley, Parley]]:
    """The pair, for test modules that take this fixture in (`servers = servers_fixture`); a test changes
    its options with `@options(...)`."""
    async with running_pair(tmp_path, **getattr(request, "param", {})) as both:
        yield both


def options(**kwargs: Any) -> pytest.MarkDecorator:
    """Options for the pair a test module's `servers` fixture starts."""
    return pytest.mark.parametrize("servers", [kwargs], indirect=True, ids=[""])


def incoming_methods(server: Parley) -> dict[tuple[str, str], str]:
    return {pair: method for stream in server.manager.incoming for pair, method in stream.methods.items()}


async def chat(sender: Any, inbox: Inbox, to: str, body: str) -> Any:
    sender.send_message(mto=to, mbody=body, mtype="chat")
    return await inbox.wait(lambda m: m["body"] == body)


async def linked(a: Parley, b: Parley) -> tuple[ClientXMPP, ClientXMPP, Inbox]:
    """alice@a.test and bob@b.test (with bob's inbox), once a message went over A's link to B."""
    alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
    inbox = Inbox(bob)
    await chat(alice, inbox, "bob@b.test", "the link is up")
    return alice, bob, inbox


async def authenticated_raw_peer(a: Parley, b: Parley, domain: str = "a.test", source: str | None = None) -> RawPeer:
    """A raw connection to B claiming `domain` (one of A's), authenticated by dialback with a key A really
    vouches for (computed here with A's secret, as A's own outgoing link would)."""
    peer = await RawPeer.connect(B_ADDR, b.s2s_port, source)
    await peer.starttls(domain, "b.test")
    key = make_key(a.manager.secret(domain), "b.test", domain, peer.stream_id)
    await peer.send(f"<db:result from='{domain}' to='b.test'>{key}</db:result>")
    result = await peer.expect("{jabber:server:dialback}result")
    assert result.get("type") == "valid"
    return peer
