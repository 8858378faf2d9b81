"""The asyncio edge of a server-to-server stream, shared by both directions.

Built on the StreamEdge that c2s uses too (reading under a rate budget, events handled in order, output
coalesced), with the sans-IO parser in jabber:server mode, so stanzas reach the router in the canonical
jabber:client namespace.

Stream management (XEP-0198, server/stream/sm.py) works the same way in both directions once enabled:
every stanza we write is kept until the peer acknowledges it, one <r/> follows each burst of output, and
what is still unacknowledged when the connection dies goes back to the manager to be sent over a new
link (or bounced) rather than lost. There is no resumption on server-to-server streams.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Collection
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from s2s import dialback
from server import ns
from server.jid import JID, JIDError
from server.stanza import KINDS, Stanza
from server.stream import sm
from server.stream.edge import StreamEdge
from server.stream.errors import StreamError
from server.stream.parser import StreamParser
from server.stream.writer import STREAM_FOOTER, serialize, stream_header

if TYPE_CHECKING:
    from s2s.manager import S2SManager

log = logging.getLogger("parley.s2s")

BIDI = ns.qname("urn:xmpp:bidi", "bidi")
BIDI_FEATURE = ns.qname("urn:xmpp:features:bidi", "bidi")
XML_DECLARATION = "<?xml version='1.0'?>"


class S2SStream(StreamEdge):
    """One TCP connection to or from another server. Subclasses implement `handle()` and `lost()`."""

    def __init__(self, manager: S2SManager) -> None:
        self.manager = manager
        self.server = manager.server
        limits = self.server.config.limits
        self.budget = manager.limits.unauthenticated_budget()
        super().__init__(StreamParser(ns.SERVER, limits.max_stanza_size, limits.max_depth), self.budget.bytes)
        self.remote_ip = ""
        self.created = time.monotonic()
        self.last_active = self.created  # last stanza either way, for the idle timeout
        self._headers_sent = 0
        self._lost = False
        self.bidi = False  # XEP-0288: stanzas flow both ways on this stream
        self.rejected = 0  # stanzas dropped for addresses this stream was not authenticated for
        self.sm: sm.StreamManagement[Element] | None = None  # XEP-0198, counting what we send
        self.sm_receiving = False  # ...and counting what we receive
        self._ack_requested = False
        self.awaiting_ack: float | None = None  # when we sent an <r/> the peer has not answered yet

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def describe(self) -> str:
        return self.remote_ip

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote_ip = peer[0] if peer else ""
        self.secure = transport.get_extra_info("ssl_object") is not None

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()

    def _gone(self) -> None:
        self.closing = True
        if self._worker is not None and not self._worker.done() and self._worker is not asyncio.current_task():
            self._worker.cancel()
        if not self._lost:
            self._lost = True
            self.lost()

    def lost(self) -> None:
        """The connection is gone: give back what depended on it."""

    def spend_for(self, domain: str) -> None:
        """Read and route under `domain`'s budget from now on."""
        self.budget = self.manager.limits.budget(domain)
        self.bucket = self.budget.bytes

    async def deliver(self, el: Element, pairs: Collection[tuple[str, str]]) -> None:
        """Route a stanza the peer sent, if its (from, to) domains are a pair authenticated on this stream.

        Anything else is dropped and logged, never answered: an error would go to an address nobody proved,
        and the stream's legitimate traffic carries on.
        """
        delay = self.budget.stanzas.consume(1)
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            sender, to = JID.parse(el.get("from") or ""), JID.parse(el.get("to") or "")
        except JIDError:
            self._reject(el, "unparsable 'from' or 'to'")
            return
        if (sender.domain, to.domain) not in pairs:
            self._reject(el, "domain pair not authenticated on this stream")
            return
        self.last_active = time.monotonic()
        await self.server.router.route(Stanza(el, KINDS[el.tag], sender, to))

    def count_received(self) -> None:
        """One more stanza from the peer, routed or rejected: either way handled (XEP-0198 'h')."""
        if self.sm is not None and self.sm_receiving:
            self.sm.received()

    def stream_management(self, el: Element) -> bool:
        """Handle <r/> and <a/>; False for anything else."""
        if el.tag == sm.REQUEST and self.sm is not None and self.sm_receiving:
            self.send(sm.ack_element(self.sm.handled))
        elif el.tag == sm.ACK and self.sm is not None:
            self.awaiting_ack = None
            try:
                self.sm.acknowledge(sm.parse_h(el.get("h")))
            except ValueError as exc:
                raise StreamError("bad-format", str(exc)) from None
        else:
            return False
        return True

    def unacknowledged(self) -> list[Element]:
        """What the peer may not have got, once the stream is gone."""
        return self.sm.take_unacked() if self.sm is not None else []

    def _reject(self, el: Element, reason: str) -> None:
        self.rejected += 1
        log.warning("rejected a stanza on %r (%s): from=%r to=%r", self, reason, el.get("from"), el.get("to"))

    # --- output -----------------------------------------------------------------------------------

    def send_stanza(self, el: Element) -> None:
        self.last_active = time.monotonic()
        self.write(serialize(el))
        if self.sm is not None:
            self.sm.sent(el)
            if not self._ack_requested:
                self._ack_requested = True
                asyncio.get_running_loop().call_soon(self._request_ack)

    def _request_ack(self) -> None:
        self._ack_requested = False
        self.send(sm.request_element())
        if self.awaiting_ack is None:
            self.awaiting_ack = time.monotonic()

    def check_acks(self, now: float, timeout: float) -> None:
        """Drop a connection whose peer leaves our <r/> unanswered: it is dead or does not read, and what
        it has not acknowledged is better sent over a new one."""
        if self.awaiting_ack is not None and now - self.awaiting_ack > timeout and self.transport is not None:
            log.warning("dropping %r: no acknowledgement for %.0f s", self, now - self.awaiting_ack)
            self.transport.abort()

    def send_header(self, from_: str | None, to: str | None, stream_id: str | None = None) -> None:
        """Our stream header; the XML declaration only opens the connection, since ejabberd rejects it on
        a restarted stream."""
        header = stream_header(content_ns=ns.SERVER, from_=from_, to=to, stream_id=stream_id,
                               extra=dialback.DECLARATION)
        if self._headers_sent and header.startswith(XML_DECLARATION):
            header = header[len(XML_DECLARATION):]
        self._headers_sent += 1
        self.write(header)

    def end(self) -> None:
        """Close politely: our footer, then the connection."""
        self.write(STREAM_FOOTER)
        self.close()

    # --- TLS --------------------------------------------------------------------------------------

    def peer_certificate(self) -> bytes | None:
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None


def new_stream_id() -> str:
    return secrets.token_hex(8)
