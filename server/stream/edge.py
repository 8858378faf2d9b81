"""The asyncio edge shared by client and server streams, around the sans-IO parser.

Input over the read-rate budget waits unparsed until it has been paid for; parsed events are handled
in order by one task per burst, so a slow database lookup for one stanza never reorders the next (an
event that `read_on`s, a client's archived message, keeps its own order; see server/archiving.py's Turn);
output written during one loop iteration leaves in one transport write. STARTTLS, the same for clients
and servers, is here too; what a certificate must prove stays with each kind of stream.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import ssl
import time
from collections import deque
from xml.etree.ElementTree import Element

from server import ns
from server.limits import TokenBucket
from server.stream import trace
from server.stream.errors import StreamError
from server.stream.parser import StreamParser
from server.stream.writer import STREAM_FOOTER, serialize
from server.tls import handshake_failure

log = logging.getLogger("parley.stream")

WRITE_BUFFER_LIMIT = 16 * 1024 * 1024  # a peer that lets this much pile up is not reading: drop it
_connection_ids = itertools.count(1)
PROCEED = serialize(Element(ns.qname(ns.TLS, "proceed")))


class StreamEdge(asyncio.Protocol):
    """Subclasses implement `handle(event)`, and `before_error()` when an error needs a header first."""

    def __init__(self, parser: StreamParser, bucket: TokenBucket) -> None:
        self.conn_id = next(_connection_ids)  # tells connections apart in the logs
        self.parser = parser
        self.bucket = bucket
        self.transport: asyncio.Transport | None = None
        self.secure = False  # TLS is up: Direct TLS from the start, or after STARTTLS
        self.closing = False
        self.last_write = time.monotonic()
        self._events: deque[object] = deque()
        self._held: list[bytes] = []  # input received over the read-rate budget, not yet parsed
        self._worker: asyncio.Task[None] | None = None
        self._out: list[str] = []
        self._flush_pending = False
        self._finishing = False  # the server is shutting down: read nothing more, handle what was read
        # The context the reading tasks run in (a copy of the current one for each when None): a subclass
        # sets in it, once, what its handlers look up per event.
        self.task_context: contextvars.Context | None = None

    async def handle(self, event: object) -> None:
        raise NotImplementedError

    def before_error(self) -> None:
        """Make the stream well-formed enough to carry an error (RFC 6120 4.9.1.3: our header first)."""

    def stream_error(self, exc: StreamError) -> None:
        """Send a stream error and close the connection."""
        if self.closing:
            return
        log.info("stream error %s to %r%s", exc.condition, self, f": {exc.text}" if exc.text else "")
        self.before_error()
        self.write(serialize(exc.to_element()) + STREAM_FOOTER)
        self.close()

    def close(self) -> None:
        if self.closing:
            return
        self.flush()
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # --- input ------------------------------------------------------------------------------------

    async def finish(self) -> None:
        """Stop reading and handle what was read: the events parsed, and the input held back by the read-rate
        budget (a server that shuts down answers or stores what a client sent before it closes the stream)."""
        self._finishing = True
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()
        if self._held:
            held, self._held = b"".join(self._held), []
            self._feed(held)
        while self._worker is not None:
            await asyncio.wait([self._worker])

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self._finishing:
            self._feed(data)  # read already (a TLS record that was under way): handled as the rest
            return
        if self._held:
            self._held.append(data)
            return
        delay = self.bucket.consume(len(data))
        if delay > 0 and self.transport is not None:
            # Over budget: this chunk waits, unparsed, until the bucket has paid for it.
            self.transport.pause_reading()
            self._held.append(data)
            asyncio.get_running_loop().call_later(delay, self._release_held)
            return
        self._feed(data)

    def _release_held(self) -> None:
        held, self._held = b"".join(self._held), []
        if self.closing:
            return
        self._feed(held)
        if self.transport is not None and not self.closing and not self._finishing:
            self.transport.resume_reading()

    def _feed(self, data: bytes) -> None:
        try:
            events = self.parser.feed(data)
        except StreamError as exc:
            self.stream_error(exc)
            return
        if events:
            if trace.enabled():
                trace.received(self, events)
            self._events.extend(events)
            if self._worker is None:
                self._worker = asyncio.get_running_loop().create_task(self._drain(), context=self.task_context)

    async def _drain(self) -> None:
        me = asyncio.current_task()
        try:
            while self._events and not self.closing and self._worker is me:
                event = self._events.popleft()
                try:
                    await self.handle(event)
                except StreamError as exc:
                    self.stream_error(exc)
                except Exception:
                    log.exception("internal error on %r", self)
                    self.stream_error(StreamError("internal-server-error"))
        finally:
            if self._worker is me:
                self._worker = None

    def read_on(self) -> None:
        """Hand the events after the one being handled to a new task, from the task handling it: that event
        will take a while (a message waiting for its archive commit), and finishes in this task."""
        if self._worker is None or self._worker is not asyncio.current_task():
            return
        self._worker = asyncio.get_running_loop().create_task(self._drain(), context=self.task_context) \
            if self._events and not self.closing else None

    # --- output -----------------------------------------------------------------------------------

    def write(self, data: str) -> None:
        if self.closing:
            return
        if trace.enabled():
            trace.sent(self, data)
        self._out.append(data)
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write("".join(self._out).encode())
            self.last_write = time.monotonic()
            if self.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                log.warning("closing %r: the peer does not read (%d bytes queued)", self,
                            self.transport.get_write_buffer_size())
                self._out.clear()
                self.transport.abort()
        self._out.clear()

    def send(self, el: Element) -> None:
        self.write(serialize(el))

    # --- TLS --------------------------------------------------------------------------------------

    async def proceed_with_tls(self, context: ssl.SSLContext, timeout: float) -> bool:
        """The receiving side of STARTTLS (RFC 6120 5.4.2.3): <proceed/>, then the handshake as the server."""
        self.write(PROCEED)
        return await self.start_tls(context, server_side=True, timeout=timeout)

    async def start_tls(self, context: ssl.SSLContext, *, server_side: bool, timeout: float,
                        server_hostname: str | None = None) -> bool:
        """Upgrade the connection once <proceed/> is on its way (RFC 6120 5.4.3.3); False when the handshake
        fails, the connection then dropped and reported lost.

        The parser starts afresh first: the peer's new stream header can arrive before start_tls() returns.
        A handshake that times out leaves asyncio silent, so the loss is reported here (connection_lost
        must bear a second call).
        """
        self.flush()
        self.parser.reset()
        failure: BaseException | None = None
        try:
            transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, context, server_side=server_side, server_hostname=server_hostname,
                ssl_handshake_timeout=timeout)
        except (TimeoutError, OSError, ConnectionError) as exc:  # ssl.SSLError is an OSError
            failure, transport = exc, None
        if transport is None:
            log.info("TLS handshake with %r failed: %s", self, handshake_failure(failure))
            if self.transport is not None:
                self.transport.abort()
            self.connection_lost(failure)
            return False
        self.transport = transport
        self.secure = True
        return True
