"""A client session carried over HTTP (WebSocket, BOSH) rather than its own TCP connection.

It is an ordinary C2SConnection: the same negotiation table, SASL, binding, modules, limits and sessions,
so a browser's session is a client session like any other. What differs is the carrier: the connection
writes whole top-level elements, one per message, through a `MessageTransport` that stands where the
socket's transport would, so the edge's output batching, write-buffer cap, backpressure (`pause_reading`
stops the WebSocket's reading loop) and the server's output budget apply unchanged. Its address is the
client's (`server.http.Peer`, the forwarded one behind a trusted proxy), and it counts as TLS when the HTTP
request came over TLS, to us or to a proxy we trust. There is no STARTTLS (TLS is the HTTP layer's) and no
whitespace keepalive (each transport has its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from server.c2s import C2SConnection
from server.http import Peer

if TYPE_CHECKING:
    from server.server import Server

# Ends each message among what the edge batches into one write: XML never holds NUL (the writer replaces
# it), so the transport splits a batch into messages without parsing it.
SEPARATOR = "\0"
# The socket belongs to the HTTP server's protocol, which gets its pause_writing/resume_writing: the session
# learns of a client that reads slowly from the socket's buffer instead, over these marks (asyncio's own).
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024
DRAIN_POLL = 0.05  # seconds between looks at a paused socket's buffer


class MessageTransport:
    """What a WebSession sees as its transport: `write` takes a batch of messages, each ended by SEPARATOR,
    and hands each to `send` (which frames it for the wire); the rest goes to the HTTP connection's socket.

    `close` is the carrier's orderly end (a WebSocket close handshake), `abort` cuts the socket. The protocol
    (`set_protocol`) is paused while the socket holds more than HIGH_WATER bytes, until it is under LOW_WATER,
    so that the session's flow control and the server's output budget see a client that does not read."""

    def __init__(self, socket: asyncio.Transport, peer: Peer, send: Callable[[list[bytes]], None],
                 close: Callable[[], None]) -> None:
        self._socket = socket
        self._peer = peer
        self._send = send
        self._close = close
        self._closed = False
        self._protocol: asyncio.BaseProtocol | None = None
        self._draining: asyncio.Task[None] | None = None
        self.readable = asyncio.Event()  # cleared while the connection asks for no more input
        self.readable.set()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        self._send(data.split(SEPARATOR.encode())[:-1])
        if self._draining is None and self._protocol is not None and \
                self._socket.get_write_buffer_size() > HIGH_WATER:
            self._protocol.pause_writing()
            self._draining = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while not self.is_closing() and self._socket.get_write_buffer_size() > LOW_WATER:
            await asyncio.sleep(DRAIN_POLL)
        self._draining = None
        if self._protocol is not None:
            self._protocol.resume_writing()

    def is_closing(self) -> bool:
        return self._closed or self._socket.is_closing()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def abort(self) -> None:
        self._closed = True
        self._socket.abort()

    def get_write_buffer_size(self) -> int:
        return self._socket.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return (self._peer.address, 0)
        return self._socket.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.readable.clear()

    def resume_reading(self) -> None:
        self.readable.set()


class WebSession(C2SConnection):
    """A C2SConnection whose every write is one message of its carrier; subclasses say how the stream
    header and its end are written (`_send_header`, `end_stream`) and how a message is framed."""

    def __init__(self, server: Server, peer: Peer) -> None:
        super().__init__(server, peer.secure)

    def _tls_available(self) -> bool:
        return False  # TLS belongs to the HTTP connection: no STARTTLS inside

    def write(self, data: str) -> None:
        if data.isspace():
            return  # the server's whitespace keepalive: the carrier keeps the connection alive its own way
        for message in self.messages(data):
            super().write(message + SEPARATOR)

    def messages(self, data: str) -> list[str]:
        """The messages that carry `data`, one top-level element (or our stream's end) written for a stream."""
        raise NotImplementedError
