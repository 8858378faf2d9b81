"""XEP-0114 external components: a trusted process serving a domain (a push app server, a gateway).

The component opens a jabber:component:accept stream to its domain and proves the shared secret with a
handshake (the hex SHA-1 of our stream id and the secret); from then on it exchanges stanzas as a server
would, from its domain or subdomains only. Each configured domain stays in `server.services` for the
server's lifetime, so a stanza to a component that is not connected is bounced (service-unavailable,
as Prosody does) instead of being sent to federation or lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from server import ns
from server.jid import JID, JIDError
from server.limits import TokenBucket
from server.router import parse_jid_attr
from server.stanza import KINDS, Stanza, error_reply
from server.stream.edge import StreamEdge
from server.stream.errors import StanzaError, StreamError
from server.stream.parser import StreamClose, StreamOpen, StreamParser
from server.stream.writer import STREAM_FOOTER, stream_header

if TYPE_CHECKING:
    from server.config import ListenerConfig
    from server.server import Server

log = logging.getLogger("parley.component")

# A component is trusted and may carry a gateway's traffic: its read budget only stops a runaway one.
READ_RATE = 1024 * 1024  # bytes/s
READ_BURST = 4 * 1024 * 1024
HANDSHAKE = ns.qname(ns.CLIENT, "handshake")  # the parser gives the component namespace as jabber:client


def handshake_digest(stream_id: str, secret: str) -> str:
    """What a component must send to prove the secret (XEP-0114 3)."""
    return hashlib.sha1((stream_id + secret).encode()).hexdigest()


def serves(domain: str, sender: JID) -> bool:
    """A component speaks for its domain and the subdomains under it."""
    return sender.domain == domain or sender.domain.endswith("." + domain)


class Component:
    """A configured component domain and the connection serving it, if one is authenticated."""

    def __init__(self, server: Server, domain: str, secret: str) -> None:
        self.server = server
        self.domain = domain
        self.secret = secret
        self.connection: ComponentConnection | None = None

    async def receive(self, st: Stanza) -> None:
        """Every stanza to the domain comes here, connected or not: nothing meant for it may leak elsewhere."""
        if self.connection is None:
            await self.server.router.bounce(st, StanzaError("service-unavailable", "the component is not connected"))
        else:
            self.connection.send(st.el)


class Components:
    """Every configured component and the listeners they connect to."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.by_domain = {domain: Component(server, domain, c.secret) for domain, c in server.config.components.items()}
        self.listeners: list[asyncio.base_events.Server] = []

    async def start(self, listeners: list[ListenerConfig]) -> None:
        services = self.server.services
        for domain, component in self.by_domain.items():
            if domain in services:
                raise ValueError(f"component domain {domain} is already served by a module")
            services[domain] = component.receive
        loop = asyncio.get_running_loop()
        for listener in listeners:
            srv = await loop.create_server(lambda: ComponentConnection(self.server, self), listener.address,
                                           listener.port, reuse_address=True,
                                           reuse_port=self.server.config.cluster.workers > 1)
            self.listeners.append(srv)
            log.info("listening for components on %s:%d", listener.address, listener.port)

    def stop(self) -> None:
        for srv in self.listeners:
            srv.close()
        for component in self.by_domain.values():
            if self.server.services.get(component.domain) == component.receive:
                del self.server.services[component.domain]
            if component.connection is not None:
                component.connection.stream_error(StreamError("system-shutdown"))


class ComponentConnection(StreamEdge):
    """One TCP connection from a component: header, handshake, then stanzas both ways."""

    def __init__(self, server: Server, components: Components) -> None:
        limits = server.config.limits
        super().__init__(StreamParser(ns.COMPONENT, limits.max_stanza_size, limits.max_depth),
                         TokenBucket(READ_RATE, READ_BURST))
        self.server = server
        self.components = components
        self.stream_id = secrets.token_hex(8)
        self.remote_ip = ""
        self.header_sent = False
        self.wanted: Component | None = None  # the component the stream header named
        self.component: Component | None = None  # set once the handshake succeeded
        self._timeout: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        domain = self.wanted.domain if self.wanted else "?"
        return f"<ComponentConnection {domain} from {self.remote_ip}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote_ip = peer[0] if peer else ""
        self._timeout = asyncio.get_running_loop().call_later(
            self.server.config.limits.unauthenticated_timeout, self._handshake_overdue)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._timeout is not None:
            self._timeout.cancel()
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
        component, self.component = self.component, None
        if component is not None and component.connection is self:
            component.connection = None
            log.info("component %s disconnected", component.domain)

    def _handshake_overdue(self) -> None:
        if self.component is None:
            self.stream_error(StreamError("connection-timeout", "complete the handshake sooner"))

    def before_error(self) -> None:
        self._send_header()

    def _send_header(self) -> None:
        if not self.header_sent:
            self.header_sent = True
            self.write(stream_header(content_ns=ns.COMPONENT, from_=self.wanted.domain if self.wanted else None,
                                     to=None, stream_id=self.stream_id))

    async def handle(self, event: object) -> None:
        if isinstance(event, StreamOpen):
            self._stream_open(event)
        elif isinstance(event, StreamClose):
            self.write(STREAM_FOOTER)
            self.close()
        elif isinstance(event, Element):
            await self._element(event)

    async def _element(self, el: Element) -> None:
        if self.component is None:
            self._handshake(el)
        elif el.tag in KINDS:
            await self._stanza(el)
        else:
            raise StreamError("unsupported-stanza-type", f"unexpected element {el.tag}")

    def _stream_open(self, header: StreamOpen) -> None:
        if self.header_sent:
            raise StreamError("bad-format", "a component stream is opened once")
        try:
            self.wanted = self.components.by_domain.get(str(JID.parse(header.get("to") or "")))
        except JIDError:
            self.wanted = None
        self._send_header()
        if header.content_ns != ns.COMPONENT:
            raise StreamError("invalid-namespace", "expected jabber:component:accept")
        if self.wanted is None:
            raise StreamError("host-unknown", "no component is configured for that domain")

    def _handshake(self, el: Element) -> None:
        component = self.wanted
        if el.tag != HANDSHAKE or component is None:
            raise StreamError("not-authorized", "send the handshake first")
        expected = handshake_digest(self.stream_id, component.secret)
        if not hmac.compare_digest((el.text or "").strip().lower(), expected):
            log.warning("component %s from %s: wrong secret", component.domain, self.remote_ip)
            raise StreamError("not-authorized", "wrong handshake")
        if component.connection is not None:
            raise StreamError("conflict", "the component is already connected")
        component.connection = self
        self.component = component
        self.send(Element(HANDSHAKE))
        log.info("component %s connected from %s", component.domain, self.remote_ip)

    async def _stanza(self, el: Element) -> None:
        domain = self.component.domain
        try:
            sender = JID.parse(el.get("from") or "")
        except JIDError:
            sender = None
        if sender is None or not serves(domain, sender):
            raise StreamError("invalid-from", f"a component sends from {domain} or its subdomains only")
        if not el.get("to"):
            raise StreamError("improper-addressing", "a stanza from a component needs a 'to'")
        try:
            to = parse_jid_attr(el.get("to"))
        except StanzaError as exc:
            if el.get("type") != "error":
                self.send(error_reply(el, exc))
            return
        await self.server.router.route(Stanza(el, KINDS[el.tag], sender, to))
