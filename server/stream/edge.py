"""The asyncio edge shared by client and server streams, around the sans-IO parser.

Input over the read-rate budget waits unparsed until it has been paid for; parsed events are handled
in order by one task per burst, so a slow database lookup for one stanza never reorders the next (an
event that `read_on`s, a client's archived message, keeps its own order; see server/archiving.py's Turn);
output written during one loop iteration leaves in one transport write. STARTTLS, the same for clients
and servers, is here too; what a certificate must prove stays with each kind of stream.

Output is held here, not in the transport, while the peer does not take it: the transport gets at most
WRITE_CHUNK at a time and nothing while it asks for a pause (asyncio's pause_writing, over its high-water
mark). A TLS transport counts only what it has not yet encrypted: what it encrypted is handed whole to
the TCP transport below, out of sight, so a burst written in one go (200 answers of 60 kB to a client
that reads nothing: 12 MB in one write) escaped every cap. While its output is blocked a client is not
read and what it sent already is not handled (`backpressure`: a client that asks without reading gets no
more answers than the buffers hold), and a peer that leaves more than WRITE_BUFFER_LIMIT unread, or takes
nothing for `output_timeout()` seconds, is cut with a stream error: <policy-violation/> for the first (the
policy named in the error's text, RFC 6120 4.9.3.14), <connection-timeout/> for the second (a peer that
takes nothing has, as far as we can tell, lost the ability to communicate, RFC 6120 4.9.3.4).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import ssl
import time
import weakref
from collections.abc import Awaitable
from xml.etree.ElementTree import Element

from server import ns
from server.limits import TokenBucket
from server.stream import trace
from server.stream.errors import StreamError
from server.stream.parser import StreamParser
from server.stream.writer import STREAM_FOOTER, serialize
from server.tls import handshake_failure

log = logging.getLogger("parley.stream")

WRITE_BUFFER_LIMIT = 16 * 1024 * 1024  # a peer that leaves this much unread (here and in the transport): cut it
# The transport's buffer over which it asks for a pause: asyncio's for plain TCP; TLS transports default to
# 512 KiB, which a thousand stalled clients would hold each.
WRITE_HIGH_WATER = 64 * 1024
WRITE_CHUNK = 64 * 1024  # most output handed to the transport in one write (one larger element goes whole)
OUTPUT_TIMEOUT = 60.0  # seconds output may stay blocked before the peer is cut, unless a subclass says otherwise
REST_AFTER = 0.5  # seconds without input after which a stream's parser lets go of expat's (StreamParser.rest)
CLOSE_GRACE = 10.0  # seconds a closed stream has to take its last words before the connection is cut
_connection_ids = itertools.count(1)
PROCEED = serialize(Element(ns.qname(ns.TLS, "proceed")))


def _cut_if_open(edge: weakref.ref[StreamEdge]) -> None:
    """CLOSE_GRACE after `close`: cut a peer that has not let go. The timer holds the stream weakly, as its
    transport holds it while open: a connection that ended in time is freed at once with its TLS buffers,
    where a reference to the transport kept every one of a login storm's connections for the grace period
    (some 4,000 of them at 400 logins/s, 100 MiB)."""
    stream = edge()
    if stream is not None and stream.transport is not None:
        stream.transport.abort()


def _rest_if_idle(edge: weakref.ref[StreamEdge]) -> None:
    """REST_AFTER after a read: the parser of a stream that has been quiet since rests. Held weakly, as above."""
    stream = edge()
    if stream is not None:
        stream.rest()


class StreamEdge(asyncio.Protocol):
    """Subclasses implement `handle(event)`, and `before_error()` when an error needs a header first."""

    # While output is blocked, read the peer no further and handle none of its input: for clients, whose
    # requests make most of what they are sent. Not for servers and components, which send on their own: two
    # that did it on a link carrying both directions could each wait for the other to read, until cut.
    backpressure = False

    def __init__(self, parser: StreamParser, bucket: TokenBucket) -> None:
        self.conn_id = next(_connection_ids)  # tells connections apart in the logs
        self.parser = parser
        self.bucket = bucket
        self.transport: asyncio.Transport | None = None
        self.secure = False  # TLS is up: Direct TLS from the start, or after STARTTLS
        self.closing = False
        self.last_write = time.monotonic()
        self.last_read = self.last_write
        self._resting: asyncio.TimerHandle | None = None  # until the parser may rest (`rest`)
        # Lists, not deques, and the event only while a worker waits on it: an empty deque holds a block of 64
        # slots, and the three were some 2.2 KiB of an idle session's 15.
        self._events: list[object] = []
        self._held: list[bytes] = []  # input received over the read-rate budget, not yet parsed
        self._worker: asyncio.Task[None] | None = None
        self._out: list[bytes] = []  # output the transport has not been given yet
        self._queued = 0  # bytes in _out
        self._flush_pending = False
        self._write_paused = False  # the transport asked for no more output (pause_writing)
        # While the worker waits for output room (`_output_room`): set when output is unblocked or the stream ends.
        self._writable: asyncio.Event | None = None
        self._stall: asyncio.TimerHandle | None = None  # cuts the peer when output stays blocked too long
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
        """Close the stream after what was written: all of it goes to the transport, paused or not, and a
        peer that has not taken it CLOSE_GRACE seconds later is cut (a closing transport would hold it for
        as long as the peer does not read)."""
        if self.closing:
            return
        self._flush_pending = False
        self._write_out(everything=True)
        self.closing = True
        self._unblock()
        if self.transport is not None:
            self.transport.close()
            asyncio.get_running_loop().call_later(CLOSE_GRACE, _cut_if_open, weakref.ref(self))

    def cut(self, condition: str, text: str) -> None:
        """End the stream of a peer that does not take its output: what it did not take is dropped and the
        stream error goes behind what the transport holds already, for a peer that reads again in time."""
        if self.closing:
            return
        log.warning("closing %r: %s", self, text)
        self._out.clear()
        self._queued = 0
        self.stream_error(StreamError(condition, text))

    def unsent(self) -> int:
        """Bytes written to the peer and not yet handed to the kernel: held here and in the transport (a
        TLS transport's part; the TCP transport under it holds at most its high-water mark and a chunk)."""
        return self._queued + (self.transport.get_write_buffer_size() if self.transport is not None else 0)

    def output_timeout(self) -> float:
        """Seconds output may stay blocked, the peer taking nothing, before it is cut."""
        return OUTPUT_TIMEOUT

    # --- input ------------------------------------------------------------------------------------

    async def finish(self) -> None:
        """Stop reading and handle what was read: the events parsed, and the input held back by the read-rate
        budget (a server that shuts down answers or stores what a client sent before it closes the stream)."""
        self._finishing = True
        self.wake_writer()  # a worker waiting for the peer to read handles the rest now
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()
        if self._held:
            held, self._held = b"".join(self._held), []
            self._feed(held)
        while self._worker is not None:
            await asyncio.wait([self._worker])

    def _reading_wanted(self) -> bool:
        """Whether to read the peer: not while input waits for the read-rate budget, output is blocked,
        or the stream is ending."""
        return not (self._held or self._write_paused or self._finishing or self.closing)

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

    def rest(self) -> None:
        """Let the parser of a stream quiet for REST_AFTER seconds give back its memory (most of an idle
        client's); a stream still reading waits for the rest of the time."""
        self._resting = None
        if self.closing:
            return
        quiet = time.monotonic() - self.last_read
        if quiet < REST_AFTER:
            self._resting = asyncio.get_running_loop().call_later(REST_AFTER - quiet, _rest_if_idle,
                                                                  weakref.ref(self))
            return
        self.parser.rest()

    def _release_held(self) -> None:
        held, self._held = b"".join(self._held), []
        if self.closing:
            return
        self._feed(held)
        if self.transport is not None and self._reading_wanted():
            self.transport.resume_reading()

    def _feed(self, data: bytes) -> None:
        try:
            events = self.parser.feed(data)
        except StreamError as exc:
            self.stream_error(exc)
            return
        self.last_read = time.monotonic()
        if self._resting is None:
            self._resting = asyncio.get_running_loop().call_later(REST_AFTER, _rest_if_idle, weakref.ref(self))
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
                if self.backpressure and (self._write_paused or self._queued >= WRITE_CHUNK):
                    await self._output_room()
                    if self.closing or self._worker is not me:
                        break
                await self.guarded(self.handle(self._events.pop(0)))
        finally:
            if self._worker is me:
                self._worker = None

    async def guarded(self, handling: Awaitable[None]) -> None:
        """Handle one piece of input: a stream error it raises ends the stream, and any other error is logged
        and ends it with internal-server-error, so that a defect costs one stream, never the server."""
        try:
            await handling
        except StreamError as exc:
            self.stream_error(exc)
        except Exception:
            log.exception("internal error on %r", self)
            self.stream_error(StreamError("internal-server-error"))

    def read_on(self) -> None:
        """Hand the events after the one being handled to a new task, from the task handling it: that event
        will take a while (a message waiting for its archive commit), and finishes in this task."""
        if self._worker is None or self._worker is not asyncio.current_task():
            return
        self._worker = asyncio.get_running_loop().create_task(self._drain(), context=self.task_context) \
            if self._events and not self.closing else None

    async def _output_room(self) -> None:
        """Before handling more of what the peer sent: write what is queued, and wait while the peer does not
        take it (a shutdown handles what was read regardless)."""
        self.flush()
        await self.writable()

    async def writable(self) -> None:
        """Until the transport takes output again, or the stream ends or finishes."""
        while self._write_paused and not self.closing and not self._finishing:
            if self._writable is None:
                self._writable = asyncio.Event()
            await self._writable.wait()

    # --- output -----------------------------------------------------------------------------------

    def write(self, data: str) -> None:
        if self.closing:
            return
        if trace.enabled():
            trace.sent(self, data)
        encoded = data.encode()
        self._out.append(encoded)
        self._queued += len(encoded)
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Hand the queued output to the transport while it takes it; cut a peer that leaves too much."""
        self._flush_pending = False
        self._write_out(everything=False)
        if self._write_paused and not self.closing and self.unsent() > WRITE_BUFFER_LIMIT:
            self.cut("policy-violation", f"more than {WRITE_BUFFER_LIMIT} bytes of output unread")

    def _write_out(self, everything: bool) -> None:
        """Write the queue in chunks of WRITE_CHUNK (whole elements: a WebSocket frames each), until the
        transport asks for a pause, or all of it when `everything`."""
        transport = self.transport
        if transport is None or transport.is_closing():
            self._out.clear()
            self._queued = 0
            return
        out = self._out
        taken = 0
        while taken < len(out) and (everything or not self._write_paused) and not transport.is_closing():
            first = out[taken]
            taken += 1
            size = len(first)
            if taken < len(out) and size + len(out[taken]) <= WRITE_CHUNK:
                chunk = [first]
                while taken < len(out) and size + len(out[taken]) <= WRITE_CHUNK:
                    chunk.append(out[taken])
                    size += len(out[taken])
                    taken += 1
                first = b"".join(chunk)
            self._queued -= size
            transport.write(first)
            self.last_write = time.monotonic()
        del out[:taken]

    def pause_writing(self) -> None:
        """The transport holds more than its high-water mark: queue output here, stop reading the peer and
        handling its input (with `backpressure`), and cut it if it takes nothing for `output_timeout()`
        seconds."""
        if self._write_paused or self.closing:
            return
        self._write_paused = True
        if self.backpressure and self.transport is not None:
            self.transport.pause_reading()
        self._stall = asyncio.get_running_loop().call_later(self.output_timeout(), self._stalled)

    def resume_writing(self) -> None:
        """The peer took enough: write on, read on."""
        self._write_paused = False
        self._unblock()
        if self.transport is not None and self._reading_wanted():
            self.transport.resume_reading()
        if self._out and not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush)

    def _unblock(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self.wake_writer()

    def wake_writer(self) -> None:
        """Let a worker waiting for output room go on (it looks at why itself)."""
        if self._writable is not None:
            self._writable.set()
            self._writable = None

    def _stalled(self) -> None:
        self._stall = None
        if self._write_paused and not self.closing:
            self.cut("connection-timeout", f"output unread for {self.output_timeout():g} s "
                     f"({self.unsent()} bytes waiting)")

    def _bound_write_buffer(self) -> None:
        """Give a TLS transport the high-water mark of a plain one (see WRITE_HIGH_WATER). Looked up rather
        than checked with isinstance: uvloop's transports do not derive from asyncio's, and a WebSocket
        session's MessageTransport has no limits of its own."""
        limits = getattr(self.transport, "set_write_buffer_limits", None)
        if limits is not None:
            limits(high=WRITE_HIGH_WATER)

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
        self._write_out(everything=True)  # <proceed/> goes in the clear, whatever the transport's buffer holds
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
        self._bound_write_buffer()
        self.secure = True
        return True
