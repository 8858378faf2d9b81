"""A minimal raw XMPP client for the load generator.

No client library sits in the measured loop: negotiation parses with ElementTree's pull parser (C
accelerated), and once a session is established a connection can switch to a raw byte handler so the
hot path only scans bytes. Every server is spoken to the same way: no XML declaration on any stream
header (ejabberd rejects one on restarted streams), PLAIN or SCRAM-SHA-1, optional STARTTLS.

The same client speaks XMPP over WebSocket (RFC 7395) with `LoginOptions(websocket=True)`: a `WsConnection`
upgrades an HTTP connection to the target's WebSocket path, sends each element as one masked text frame and
hands each received message whole to the same element queue or raw handler; pings are answered.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import os
import secrets
import ssl
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from xml.etree.ElementTree import Element, ParseError, XMLPullParser, fromstring

STREAM_NS = "http://etherx.jabber.org/streams"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION_NS = "urn:ietf:params:xml:ns:xmpp-session"
ROSTER_NS = "jabber:iq:roster"
REGISTER_NS = "jabber:iq:register"
FEATURES = f"{{{STREAM_NS}}}features"
STREAM_ERROR = f"{{{STREAM_NS}}}error"
IQ = "{jabber:client}iq"
PRESENCE = "{jabber:client}presence"
MESSAGE = "{jabber:client}message"
FRAMING_NS = "urn:ietf:params:xml:ns:xmpp-framing"

# Clients cache the salted password per salt, as real clients do, so repeated logins of one user do not
# make the generator pay PBKDF2 again; the server's work is unchanged by it.
_SALTED: dict[tuple[str, str, bytes, int], bytes] = {}


class LoginError(Exception):
    """The server refused or broke off a step of the login; the message names the step."""


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;")


def bare(jid: str) -> str:
    return jid.split("/", 1)[0]


@functools.cache
def insecure_tls() -> ssl.SSLContext:
    """Benchmark servers use self-signed certificates. One context for all connections: making one
    loads the system's CA store, which costs more than a TLS handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(frozen=True)
class Target:
    """Where and how to reach one server under test."""

    address: str
    port: int
    domain: str
    http_port: int = 0  # where the WebSocket endpoint is (0: none)
    ws_path: str = ""


class Connection(asyncio.Protocol):
    """One client stream. Top-level elements queue up for `next()` unless a handler takes them."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.transport: asyncio.Transport | None = None
        self.jid = ""
        self.roster: Element | None = None  # the roster query of the login's roster result
        self.on_element: Callable[[Element], None] | None = None
        self.on_raw: Callable[[bytes], None] | None = None
        self._queue: deque[Element] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._error: str | None = None
        self._new_parser()

    def _new_parser(self) -> None:
        self._parser = XMLPullParser(events=("start", "end"))
        self._depth = 0
        self._root: Element | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self.on_raw is not None:
            self.on_raw(data)
            return
        parser = self._parser
        try:
            parser.feed(data)
            for event, el in parser.read_events():
                if event == "start":
                    self._depth += 1
                    if self._depth == 1:
                        self._root = el
                    continue
                self._depth -= 1
                if self._depth == 1:
                    self._root.remove(el)
                    if self.on_element is not None and el.tag in (MESSAGE, PRESENCE, IQ):
                        self.on_element(el)
                    else:
                        self._queue.append(el)
                elif self._depth == 0:
                    self._closed = True
        except Exception as exc:  # malformed XML from the server ends this client, not the run
            self._error = f"XML error: {exc}"
            self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- sending and receiving --------------------------------------------------------------------

    def send(self, data: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data.encode())

    def send_many(self, elements: list[str]) -> None:
        self.send("".join(elements))

    def open_stream(self) -> None:
        self._new_parser()
        self.send(f"<stream:stream xmlns='jabber:client' xmlns:stream='{STREAM_NS}' to='{self.domain}' "
                  "version='1.0'>")

    async def next(self, timeout: float) -> Element:
        """The next queued top-level element; LoginError on close or time-out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._queue:
            if self._closed:
                raise LoginError(self._error or "stream closed by the server")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise LoginError("timed out waiting for the server")
            self._waiter = loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, remaining)
            except TimeoutError:
                pass
            finally:
                self._waiter = None
        el = self._queue.popleft()
        if el.tag == STREAM_ERROR:
            raise LoginError(f"stream error: {', '.join(child.tag.split('}')[-1] for child in el)}")
        return el

    async def expect(self, tag: str, timeout: float, iq_id: str | None = None) -> Element:
        """Skip queued elements until one with `tag` (and id, for IQs) arrives."""
        while True:
            el = await self.next(timeout)
            if el.tag == tag and (iq_id is None or el.get("id") == iq_id):
                return el

    def close(self) -> None:
        """End the stream politely and drop the connection without waiting for the server's answer."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"</stream:stream>")
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class WsConnection(Connection):
    """One client stream over a WebSocket: the same queue, handlers and login as a TCP stream."""

    def __init__(self, domain: str, host: str, path: str) -> None:
        super().__init__(domain)
        self._request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                         "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: xmpp\r\n\r\n").encode()
        self._buffer = b""
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.write(self._request)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(LoginError("WebSocket upgrade failed: connection closed"))
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        buf = self._buffer + data
        if not self.upgraded.done():
            head, sep, buf = buf.partition(b"\r\n\r\n")
            if not sep:
                self._buffer = head
                return
            if not head.startswith(b"HTTP/1.1 101"):
                self.upgraded.set_exception(LoginError(f"WebSocket upgrade refused: {head[:60]!r}"))
                return
            self.upgraded.set_result(None)
        texts: list[bytes] = []  # in raw mode, the chunk's messages go to the handler at once, as over TCP
        while len(buf) >= 2:
            opcode, size = buf[0] & 0x0F, buf[1] & 0x7F
            start = 2
            if size == 126:
                if len(buf) < 4:
                    break
                size, start = struct.unpack("!H", buf[2:4])[0], 4
            elif size == 127:
                if len(buf) < 10:
                    break
                size, start = struct.unpack("!Q", buf[2:10])[0], 10
            if len(buf) < start + size:
                break
            payload, buf = buf[start:start + size], buf[start + size:]
            if opcode == 0x1 and self.on_raw is not None:
                texts.append(payload)
            else:
                self._frame(opcode, payload)
        self._buffer = buf
        if texts:
            self.on_raw(b"".join(texts))  # type: ignore[misc]

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x9:  # ping: pong with its payload
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(self._write_frame(0xA, payload))
        elif opcode == 0x8:
            self._closed = True
            self._wake()
        elif opcode == 0x1:
            self._message(payload)

    def _message(self, payload: bytes) -> None:
        try:
            el = fromstring(payload)
        except ParseError as exc:
            self._error, self._closed = f"XML error: {exc}", True
            self._wake()
            return
        if el.tag == f"{{{FRAMING_NS}}}close":
            self._closed = True
        elif self.on_element is not None and el.tag in (MESSAGE, PRESENCE, IQ):
            self.on_element(el)
        elif el.tag != f"{{{FRAMING_NS}}}open":
            self._queue.append(el)
        self._wake()

    def _write_frame(self, opcode: int, payload: bytes) -> bytes:
        """A client frame, masked with a zero key (RFC 6455 5.3 lets the key be any value; XOR with zeros
        leaves the payload as it is, so the generator spends nothing on masking)."""
        size = len(payload)
        if size < 126:
            head = bytes((0x80 | opcode, 0x80 | size))
        elif size < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0xFE, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, size)
        return head + b"\0\0\0\0" + payload

    def send(self, data: str) -> None:
        self.send_many([data])

    def send_many(self, elements: list[str]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._write_frame(0x1, _standalone(e).encode()) for e in elements))

    def open_stream(self) -> None:
        self.send(f"<open xmlns='{FRAMING_NS}' to='{self.domain}' version='1.0'/>")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.send(f"<close xmlns='{FRAMING_NS}'/>")
            self.transport.close()


def _standalone(element: str) -> str:
    """A stanza written for a stream, declaring jabber:client as a WebSocket message must."""
    if element.startswith(("<message ", "<iq ", "<presence")) and "jabber:client" not in element[:120]:
        name_end = element.find(" ") if element[1] != "p" else len("<presence")
        return element[:name_end] + " xmlns='jabber:client'" + element[name_end:]
    return element


@dataclass
class LoginOptions:
    mechanism: str = "PLAIN"  # or SCRAM-SHA-1
    starttls: bool = False
    websocket: bool = False  # over the target's WebSocket endpoint instead of a TCP stream
    roster: bool = True
    presence: bool = True
    timeout: float = 30.0


async def connect(target: Target, websocket: bool = False) -> Connection:
    loop = asyncio.get_running_loop()
    if not websocket:
        _, conn = await loop.create_connection(lambda: Connection(target.domain), target.address, target.port)
        return conn
    if not target.http_port:
        raise LoginError("this server has no WebSocket endpoint configured")
    host = f"{target.address}:{target.http_port}"
    _, ws = await loop.create_connection(lambda: WsConnection(target.domain, host, target.ws_path),
                                         target.address, target.http_port)
    await ws.upgraded
    return ws


async def _starttls(conn: Connection, timeout: float) -> None:
    conn.send(f"<starttls xmlns='{TLS_NS}'/>")
    el = await conn.next(timeout)
    if el.tag != f"{{{TLS_NS}}}proceed":
        raise LoginError("STARTTLS refused")
    loop = asyncio.get_running_loop()
    conn.transport = await loop.start_tls(conn.transport, conn, insecure_tls(), server_hostname=conn.domain,
                                          ssl_handshake_timeout=timeout)


def _mechanisms(features: Element) -> list[str]:
    return [m.text or "" for m in features.iter(f"{{{SASL_NS}}}mechanism")]


async def _sasl_plain(conn: Connection, user: str, password: str, timeout: float) -> None:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    conn.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{token}</auth>")
    _sasl_outcome(await conn.next(timeout), "PLAIN")


def _sasl_outcome(el: Element, mechanism: str) -> Element:
    if el.tag != f"{{{SASL_NS}}}success":
        reason = ", ".join(child.tag.split("}")[-1] for child in el)
        raise LoginError(f"SASL {mechanism} failed: {reason or el.tag}")
    return el


def _scram_attrs(message: bytes) -> dict[str, str]:
    return dict(part.split("=", 1) for part in message.decode().split(",") if "=" in part)


async def _sasl_scram(conn: Connection, user: str, password: str, hash_name: str, timeout: float) -> None:
    """RFC 5802 SCRAM without channel binding (gs2 flag 'n')."""
    algo = {"SHA-1": "sha1", "SHA-256": "sha256"}[hash_name]
    mechanism = f"SCRAM-{hash_name}"
    nonce = secrets.token_urlsafe(18)
    name = user.replace("=", "=3D").replace(",", "=2C")
    first_bare = f"n={name},r={nonce}"
    first = base64.b64encode(f"n,,{first_bare}".encode()).decode()
    conn.send(f"<auth xmlns='{SASL_NS}' mechanism='{mechanism}'>{first}</auth>")
    challenge = await conn.next(timeout)
    if challenge.tag != f"{{{SASL_NS}}}challenge":
        _sasl_outcome(challenge, mechanism)
        raise LoginError(f"SASL {mechanism}: no challenge")
    server_first = base64.b64decode(challenge.text or "")
    attrs = _scram_attrs(server_first)
    if not attrs.get("r", "").startswith(nonce):
        raise LoginError(f"SASL {mechanism}: server nonce does not extend ours")
    salt, iterations = base64.b64decode(attrs["s"]), int(attrs["i"])
    key = (algo, password, salt, iterations)
    salted = _SALTED.get(key)
    if salted is None:
        salted = _SALTED[key] = hashlib.pbkdf2_hmac(algo, password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", algo)
    stored_key = hashlib.new(algo, client_key).digest()
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{first_bare},{server_first.decode()},{without_proof}".encode()
    signature = hmac.digest(stored_key, auth_message, algo)
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True))).decode()
    final = base64.b64encode(f"{without_proof},p={proof}".encode()).decode()
    conn.send(f"<response xmlns='{SASL_NS}'>{final}</response>")
    success = _sasl_outcome(await conn.next(timeout), mechanism)
    server_sig = hmac.digest(hmac.digest(salted, b"Server Key", algo), auth_message, algo)
    given = _scram_attrs(base64.b64decode(success.text or "")).get("v", "")
    if base64.b64decode(given) != server_sig:
        raise LoginError(f"SASL {mechanism}: wrong server signature")


async def login(target: Target, user: str, password: str, resource: str,
                options: LoginOptions | None = None) -> Connection:
    """Connect and log in: stream, [STARTTLS], SASL, bind, [roster get], [initial presence]."""
    opts = options or LoginOptions()
    timeout = opts.timeout
    conn = await connect(target, opts.websocket)
    try:
        conn.open_stream()
        features = await conn.expect(FEATURES, timeout)
        if opts.starttls:
            if features.find(f"{{{TLS_NS}}}starttls") is None:
                raise LoginError("server offers no STARTTLS")
            await _starttls(conn, timeout)
            conn.open_stream()
            features = await conn.expect(FEATURES, timeout)
        if opts.mechanism not in _mechanisms(features):
            raise LoginError(f"server does not offer {opts.mechanism} (offers {_mechanisms(features)})")
        if opts.mechanism == "PLAIN":
            await _sasl_plain(conn, user, password, timeout)
        else:
            await _sasl_scram(conn, user, password, opts.mechanism.removeprefix("SCRAM-"), timeout)
        conn.open_stream()
        features = await conn.expect(FEATURES, timeout)
        conn.send(f"<iq type='set' id='bind'><bind xmlns='{BIND_NS}'><resource>{escape(resource)}</resource>"
                  "</bind></iq>")
        bound = await conn.expect(IQ, timeout, "bind")
        jid_el = bound.find(f"{{{BIND_NS}}}bind/{{{BIND_NS}}}jid")
        if bound.get("type") != "result" or jid_el is None or not jid_el.text:
            raise LoginError("resource binding failed")
        conn.jid = jid_el.text
        session = features.find(f"{{{SESSION_NS}}}session")
        if session is not None and session.find(f"{{{SESSION_NS}}}optional") is None:
            conn.send(f"<iq type='set' id='sess'><session xmlns='{SESSION_NS}'/></iq>")
            await conn.expect(IQ, timeout, "sess")
        if opts.roster:
            conn.send(f"<iq type='get' id='roster'><query xmlns='{ROSTER_NS}'/></iq>")
            result = await conn.expect(IQ, timeout, "roster")
            if result.get("type") != "result":
                raise LoginError("roster get failed")
            conn.roster = result.find(f"{{{ROSTER_NS}}}query")
        if opts.presence:
            conn.send("<presence/>")
        return conn
    except BaseException:
        conn.abort()
        raise


async def register(target: Target, user: str, password: str, timeout: float = 30.0) -> None:
    """XEP-0077 in-band registration, for servers whose accounts are made over XMPP."""
    conn = await connect(target)
    try:
        conn.open_stream()
        await conn.expect(FEATURES, timeout)
        conn.send(f"<iq type='set' id='reg'><query xmlns='{REGISTER_NS}'><username>{escape(user)}</username>"
                  f"<password>{escape(password)}</password></query></iq>")
        result = await conn.expect(IQ, timeout, "reg")
        if result.get("type") != "result":
            conflict = result.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}conflict")
            if conflict is None:
                raise LoginError(f"registration of {user} failed")
    finally:
        conn.close()
