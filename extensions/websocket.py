"""XMPP over WebSocket (RFC 7395) on the server's http listeners, as Prosody's mod_websocket.

A WebSocket is a client session like a TCP one (server/web_session.py): SASL, binding, every module,
stream management with resumption over a new WebSocket or a TCP connection, and the same limits
(unauthenticated timeout, connections per address, read rate, stanza size and depth, restricted XML).
The framing differs: each text message holds exactly one complete element, with its namespaces declared,
and `<open/>`/`<close/>` of urn:ietf:params:xml:ns:xmpp-framing stand for the stream header and its end.

Browsers send the page's Origin with the upgrade: only pages of the same origin, or those the
`allowed_origins` option lists, may open a session (no cross-site WebSocket hijacking of a browser that
reaches the server). A binary message, a message that is not one complete element, and an oversized one
get the stream error they deserve and close that session only. WebSocket pings keep idle connections up
and drop clients that stopped answering.

One endpoint serves every host that loads the module (the stream's `to` names the host); the options of the
endpoint (path aside) are those of the host that loaded it first.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import struct
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from xml.etree.ElementTree import Element

from aiohttp import WSMsgType, web

from server import ns
from server.module import Module
from server.options import Option
from server.stream.errors import StreamError
from server.stream.parser import StreamClose, StreamOpen, StreamParser
from server.stream.writer import STREAM_FOOTER, serialize
from server.web_session import MessageTransport, WebSession

if TYPE_CHECKING:
    from server.http import Peer
    from server.server import Server

FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
DEFAULT_PATH = "/xmpp-websocket"
PROTOCOL = "xmpp"  # the WebSocket subprotocol (RFC 7395 3.1)
OPEN = ns.qname(FRAMING, "open")
CLOSE = ns.qname(FRAMING, "close")
CLOSE_XML = serialize(Element(CLOSE))
_WRAPPER = f"<stream:stream xmlns='{ns.CLIENT}' xmlns:stream='{ns.STREAM}'>".encode()
_TAG = re.compile(r"<([^\s/>]+)")
_CLIENT_XMLNS = f' xmlns="{ns.CLIENT}"'
_STREAM_XMLNS = f' xmlns:stream="{ns.STREAM}"'
_STANZAS = frozenset({"message", "presence", "iq"})


class FramedParser(StreamParser):
    """RFC 7395 3.3: one message, one complete element; `<open/>` and `<close/>` become the events a stream
    header and its end would be. Each message is parsed inside a stream of our own making, so the
    parser's restricted XML, size and depth limits apply to it as to a TCP stream."""

    def reset(self) -> None:
        super().reset()
        super().feed(_WRAPPER)

    def feed(self, data: bytes) -> list[object]:
        if len(data) > self.max_stanza_size:  # a whole message comes at once: refused before it is parsed
            raise StreamError("policy-violation", f"stanza larger than {self.max_stanza_size} bytes")
        events = super().feed(data)
        whole = self._depth == 1 and self._parser.CurrentByteIndex == self._fed  # nothing left half-read
        if not whole or len(events) > 1 or (not events and not data.isspace()):
            raise StreamError("not-well-formed", "a WebSocket message holds exactly one complete element")
        if not events:
            return events  # whitespace between elements
        el = events[0]
        if el.tag == OPEN:  # type: ignore[attr-defined]
            return [StreamOpen(dict(el.attrib), ns.CLIENT)]  # type: ignore[attr-defined]
        if el.tag == CLOSE:  # type: ignore[attr-defined]
            return [StreamClose()]
        return events


def standalone(xml: str) -> str:
    """A top-level element written for a stream, as a message that stands alone (RFC 7395 3.3.3): stanzas
    declare jabber:client, which a stream would have declared for them, and stream-namespace elements
    (features, errors) declare the 'stream' prefix."""
    tag = _TAG.match(xml)
    if tag is None:
        return xml
    name = tag.group(1)
    if name in _STANZAS:
        return xml[:tag.end()] + _CLIENT_XMLNS + xml[tag.end():]
    if name.startswith("stream:"):
        return xml[:tag.end()] + _STREAM_XMLNS + xml[tag.end():]
    return xml


def text_frames(messages: list[bytes]) -> bytes:
    """Unmasked, unfragmented WebSocket text frames (RFC 6455 5.2) as a server sends them."""
    out = []
    for message in messages:
        size = len(message)
        if size < 126:
            out.append(bytes((0x81, size)))
        elif size < 65536:
            out.append(struct.pack("!BBH", 0x81, 126, size))
        else:
            out.append(struct.pack("!BBQ", 0x81, 127, size))
        out.append(message)
    return b"".join(out)


class WebSocketConnection(WebSession):
    def __init__(self, server: Server, peer: Peer, see_other_uri: str | None) -> None:
        super().__init__(server, peer)
        limits = server.config.limits
        self.parser = FramedParser(ns.CLIENT, limits.max_stanza_size, limits.max_depth)
        self.see_other_uri = see_other_uri

    def __repr__(self) -> str:
        who = f" {self.session.jid}" if self.session is not None else ""
        return f"<WebSocket #{self.conn_id} {self.remote_ip}{who}>"

    def messages(self, data: str) -> list[str]:
        if data.endswith(STREAM_FOOTER):
            head = data[:-len(STREAM_FOOTER)]
            return [standalone(head), CLOSE_XML] if head else [CLOSE_XML]
        return [standalone(data)]

    def _send_header(self) -> None:
        if not self.header_sent:
            self.header_sent = True
            self.stream_id = secrets.token_hex(8)
            attrs = {"id": self.stream_id, "version": "1.0", ns.LANG: self.lang}
            if self.host is not None:
                attrs["from"] = self.host.name
            self.write(serialize(Element(OPEN, attrs)))

    async def handle(self, event: object) -> None:
        if isinstance(event, StreamOpen) and self.see_other_uri:
            # RFC 7395 3.6.1: this endpoint sends clients elsewhere.
            self.write(serialize(Element(CLOSE, {"see-other-uri": self.see_other_uri})))
            self.close()
            return
        await super().handle(event)

    async def read(self, ws: web.WebSocketResponse, transport: MessageTransport) -> None:
        """Hand each text message to the parser, within the read rate the connection's budget allows."""
        async for message in ws:
            if self.closing:
                continue  # our close handshake is under way
            if message.type is WSMsgType.BINARY:
                self.stream_error(StreamError("bad-format", "XMPP over WebSocket uses text messages only"))
                continue
            if message.type is not WSMsgType.TEXT:
                continue
            await transport.readable.wait()
            delay = self.bucket.consume(len(message.data))
            if delay > 0:
                await asyncio.sleep(delay)  # over the read-rate budget: the next message waits its turn
            self._feed(message.data)


class WebSocket(Module):
    name = "websocket"
    options = (
        Option("path", str, DEFAULT_PATH, "the HTTP path of the WebSocket endpoint on the http listeners"),
        Option("allowed_origins", tuple, (),
               "web pages (scheme://host[:port]) whose scripts may open sessions, besides those served from the "
               "endpoint's own origin; [\"*\"]: any page"),
        Option("ping_interval", float, 30.0,
               "seconds between WebSocket pings; a client that does not answer within half of it is dropped "
               "(0: no pings)", minimum=0),
        Option("see_other_uri", str, None, "send every client to this WebSocket URL instead (RFC 7395 3.6.1)"),
    )

    def setup(self) -> None:
        self._open: set[WebSocketConnection] = set()  # the connections this instance serves
        self.add_http("GET", self.option("path"), self.serve)
        self.hook_global("http/stopping", self.stopping)

    def origin_allowed(self, request: web.Request) -> bool:
        """No Origin (not a browser), the endpoint's own origin, or one the configuration lists."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        allowed = self.option("allowed_origins")
        if "*" in allowed or origin.rstrip("/") in allowed:
            return True
        return urlsplit(origin).netloc.lower() == request.host.lower()

    async def serve(self, request: web.Request) -> web.StreamResponse:
        if not self.origin_allowed(request):
            self.log.info("refused a WebSocket from %s: origin %s", self.server.http.peer(request).address,
                          request.headers.get("Origin"))
            raise web.HTTPForbidden(text="pages of this origin may not open XMPP sessions here")
        limits = self.server.config.limits
        ws = web.WebSocketResponse(protocols=(PROTOCOL,), heartbeat=self.option("ping_interval") or None,
                                   max_msg_size=2 * limits.max_stanza_size, compress=False, decode_text=False)
        ready = ws.can_prepare(request)
        if not ready.ok:
            raise web.HTTPBadRequest(text="this is an XMPP WebSocket endpoint (RFC 7395): upgrade to a WebSocket")
        if ready.protocol != PROTOCOL:
            raise web.HTTPBadRequest(text="the 'xmpp' WebSocket subprotocol is required (RFC 7395 3.1)")
        await ws.prepare(request)
        socket: Any = request.transport
        peer = self.server.http.peer(request)
        conn = WebSocketConnection(self.server, peer, self.option("see_other_uri"))
        transport = MessageTransport(socket, peer, lambda messages: socket.write(text_frames(messages)),
                                     lambda: self.spawn(ws.close()))
        transport.set_protocol(conn)
        conn.connection_made(transport)  # type: ignore[arg-type]
        self._open.add(conn)
        try:
            if not conn.closing:
                await conn.read(ws, transport)
        finally:
            self._open.discard(conn)
            conn.connection_lost(None)
        return ws

    def stopping(self) -> None:
        """The http listeners stop first when the server does: clients hear system-shutdown, as TCP ones do."""
        for conn in list(self._open):
            conn.stream_error(StreamError("system-shutdown"))
