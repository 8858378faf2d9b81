"""SCRAM-PLUS against a client side that shares nothing with Parley's: TLS by pyOpenSSL (OpenSSL's own
exporter and peer certificate), SCRAM by aiosasl, and the channel-binding data computed here from RFC 9266
(tls-exporter) and RFC 5929 (tls-server-end-point). A server that checked bindings only the way its own
client computes them would pass its own tests and fail real clients."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

import aiosasl
import pytest
from aiosasl.channel_binding import ChannelBindingProvider
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from server.stream.parser import StreamParser
from tests.conftest import Harness, RawClient
from tests.test_c2s import SASL, STREAMS

TLS = "urn:ietf:params:xml:ns:xmpp-tls"


class OpenSSLStream:
    """XMPP over pyOpenSSL on memory buffers, carried by a raw client's TCP connection after STARTTLS."""

    def __init__(self, raw: RawClient) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_verify(SSL.VERIFY_NONE)
        self.conn = SSL.Connection(context, None)
        self.conn.set_tlsext_host_name(b"localhost")
        self.conn.set_connect_state()
        self.raw = raw
        self.parser = StreamParser(max_stanza_size=1_000_000)
        self.events: list[Any] = []

    async def _flush(self) -> None:
        while True:
            try:
                self.raw.writer.write(self.conn.bio_read(65536))
            except SSL.WantReadError:
                break
        await self.raw.writer.drain()

    async def _fill(self) -> None:
        data = await self.raw.reader.read(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.conn.bio_write(data)

    async def handshake(self) -> None:
        while True:
            try:
                self.conn.do_handshake()
                break
            except SSL.WantReadError:
                await self._flush()
                await self._fill()
        await self._flush()

    async def send(self, text: str) -> None:
        self.conn.sendall(text.encode())
        await self._flush()

    async def next(self) -> Any:
        while not self.events:
            try:
                self.events.extend(self.parser.feed(self.conn.recv(65536)))
            except SSL.WantReadError:
                await self._flush()
                await self._fill()
        return self.events.pop(0)

    async def expect(self, tag: str) -> Any:
        while getattr(event := await self.next(), "tag", None) != tag:
            pass
        return event

    async def open(self) -> Any:
        """A new stream; its features."""
        self.parser.reset()
        await self.send("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                        "xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")
        return await self.expect(f"{{{STREAMS}}}features")


class XmppSasl(aiosasl.SASLInterface):
    """RFC 6120 6.4's SASL elements, for aiosasl's state machine."""

    def __init__(self, stream: OpenSSLStream) -> None:
        self.stream = stream

    async def _reply(self) -> tuple[aiosasl.SASLState, bytes | None]:
        el = await self.stream.next()
        payload = base64.b64decode(el.text or "")
        if el.tag == f"{{{SASL}}}challenge":
            return aiosasl.SASLState.CHALLENGE, payload
        if el.tag == f"{{{SASL}}}success":
            return aiosasl.SASLState.SUCCESS, payload or None
        condition = el[0].tag.split("}")[1] if len(el) else "unknown"
        raise aiosasl.SASLFailure(condition, el.findtext(f"{{{SASL}}}text"))

    async def initiate(self, mechanism: str, payload: bytes | None = None) -> Any:
        data = base64.b64encode(payload).decode() if payload else "="
        await self.stream.send(f"<auth xmlns='{SASL}' mechanism='{mechanism}'>{data}</auth>")
        return await self._reply()

    async def respond(self, payload: bytes) -> Any:
        await self.stream.send(f"<response xmlns='{SASL}'>{base64.b64encode(payload).decode()}</response>")
        return await self._reply()

    async def abort(self) -> None:
        await self.stream.send(f"<abort xmlns='{SASL}'/>")
        await self._reply()


class Binding(ChannelBindingProvider):
    """A channel binding named `name` whose data `compute` takes from the TLS connection."""

    def __init__(self, name: str, compute: Callable[[SSL.Connection], bytes], conn: SSL.Connection) -> None:
        self.name, self.compute, self.conn = name, compute, conn

    @property
    def cb_name(self) -> bytes:
        return self.name.encode()

    def extract_cb_data(self) -> bytes:
        return self.compute(self.conn)


def exporter(conn: SSL.Connection) -> bytes:
    """RFC 9266 2: 32 bytes of the TLS exporter with label EXPORTER-Channel-Binding and no context."""
    return conn.export_keying_material(b"EXPORTER-Channel-Binding", 32)


def end_point(conn: SSL.Connection) -> bytes:
    """RFC 5929 4.1: the certificate hashed with its signature's hash, SHA-256 in place of MD5 or SHA-1."""
    cert = conn.get_peer_certificate(as_cryptography=True)
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    return hashlib.new(algorithm.name, cert.public_bytes(Encoding.DER)).digest()


def wrong_label(conn: SSL.Connection) -> bytes:
    return conn.export_keying_material(b"EXPORTER-Not-Channel-Binding", 32)


async def plus_login(server: Harness, mechanism: str, binding: str,
                     compute: Callable[[SSL.Connection], bytes]) -> OpenSSLStream:
    """STARTTLS with pyOpenSSL, then aiosasl's SCRAM-PLUS with `binding`; a refusal raises AuthenticationFailure."""
    await server.add_user("alice", "pencil")
    raw = await server.raw()
    await raw.open()
    await raw.expect(f"{{{STREAMS}}}features")
    await raw.send(f"<starttls xmlns='{TLS}'/>")
    await raw.expect(f"{{{TLS}}}proceed")
    stream = OpenSSLStream(raw)
    await stream.handshake()
    features = await stream.open()
    assert mechanism in {m.text for m in features.iter(f"{{{SASL}}}mechanism")}
    assert binding in {cb.get("type") for cb in features.iter("{urn:xmpp:sasl-cb:0}channel-binding")}

    async def credentials() -> tuple[str, str]:
        return "alice", "pencil"

    scram = aiosasl.SCRAMPLUS(credentials, Binding(binding, compute, stream.conn))
    token = scram.any_supported([mechanism])
    assert token is not None
    await scram.authenticate(aiosasl.SASLStateMachine(XmppSasl(stream)), token)  # checks the server's signature
    return stream


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-1-PLUS", "SCRAM-SHA-256-PLUS"])
@pytest.mark.parametrize(("binding", "compute"), [("tls-exporter", exporter), ("tls-server-end-point", end_point)])
async def test_an_independent_client_logs_in_with_each_channel_binding(
        server: Harness, mechanism: str, binding: str, compute: Callable[[SSL.Connection], bytes]) -> None:
    stream = await plus_login(server, mechanism, binding, compute)
    assert stream.conn.get_protocol_version_name() == "TLSv1.3"
    await stream.open()  # the authenticated stream goes on: bind
    await stream.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    bound = await stream.expect("{jabber:client}iq")
    assert bound.get("type") == "result"
    assert bound.findtext(".//{urn:ietf:params:xml:ns:xmpp-bind}jid").startswith("alice@localhost/")


@pytest.mark.parametrize(("binding", "compute"), [("tls-exporter", wrong_label), ("tls-server-end-point", exporter)])
async def test_binding_data_of_another_kind_is_refused(server: Harness, binding: str,
                                                       compute: Callable[[SSL.Connection], bytes]) -> None:
    with pytest.raises(aiosasl.AuthenticationFailure) as failure:
        await plus_login(server, "SCRAM-SHA-256-PLUS", binding, compute)
    assert failure.value.opaque_error == "not-authorized"
