"""XEP-0114 external components: a trusted process serving a domain (a push app server, a gateway).

The component opens a jabber:component:accept stream to its domain and proves the shared secret with a
handshake (the hex SHA-1 of our stream id and the secret); from then on it exchanges stanzas as a server
would, from its domain or subdomains only. Each configured domain stays in `server.services` for the
server's lifetime, so a stanza to a component that is not connected is bounced (service-unavailable,
as Prosody does) instead of being sent to federation or lost.

In a cluster a component connects to any member (the listeners share their port) and is reached from all:
a Redis hash (`components`: domain -> member) says which member holds each connected component, one at a
time, and every member keeps a copy of it, told of changes by the members (frames of kind "component")
and read whole when it starts. A member without the connection hands the component's stanzas to the one
that has it, which sends them on or bounces them; what the component sends is routed where it connected,
and the router reaches users on any member. An entry goes when its component disconnects, when its member
is lost ('cluster/member-lost') and when a member starts again in the place of one that died holding it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any
from xml.etree.ElementTree import Element

from server import ns
from server.jid import JID, JIDError
from server.limits import TokenBucket
from server.ownership import redis_failures
from server.router import parse_jid_attr
from server.stanza import KINDS, Stanza, error_reply, parse_stored
from server.stream.edge import StreamEdge
from server.stream.errors import StanzaError, StreamError
from server.stream.parser import StreamClose, StreamOpen, StreamParser
from server.stream.writer import STREAM_FOOTER, serialize, stream_header

if TYPE_CHECKING:
    from server.config import ListenerConfig
    from server.server import Server

log = logging.getLogger("parley.component")

# A component is trusted and may carry a gateway's traffic: its read budget only stops a runaway one.
READ_RATE = 1024 * 1024  # bytes/s
READ_BURST = 4 * 1024 * 1024
HANDSHAKE = ns.qname(ns.CLIENT, "handshake")  # the parser gives the component namespace as jabber:client
REGISTRY = "components"  # the cluster's Redis hash: component domain -> member holding its connection
FRAME = "component"  # the cluster frames of components: '+domain', '-domain', 's' and a stanza
# Remove a registry entry only if it is still the given member's (a newer connection elsewhere stays).
RELEASE = "if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('hdel', KEYS[1], ARGV[1]) end " \
          "return 0"


def handshake_digest(stream_id: str, secret: str) -> str:
    """What a component must send to prove the secret (XEP-0114 3)."""
    return hashlib.sha1((stream_id + secret).encode()).hexdigest()


def serves(domain: str, sender: JID) -> bool:
    """A component speaks for its domain and the subdomains under it."""
    return sender.domain == domain or sender.domain.endswith("." + domain)


class Component:
    """A configured component domain and the connection serving it, if one is authenticated."""

    def __init__(self, components: Components, domain: str, secret: str) -> None:
        self.components = components
        self.server = components.server
        self.domain = domain
        self.secret = secret
        self.connection: ComponentConnection | None = None
        self.claiming: ComponentConnection | None = None  # past the handshake, while the cluster is asked

    async def receive(self, st: Stanza) -> None:
        """Every stanza to the domain comes here, connected or not: nothing meant for it may leak elsewhere."""
        if self.connection is not None:
            self.connection.send(st.el)
        elif not self.components.forward(self.domain, st):
            await self.server.router.bounce(st, StanzaError("service-unavailable", "the component is not connected"))


class Components:
    """Every configured component and the listeners they connect to."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.by_domain = {domain: Component(self, domain, c.secret) for domain, c in server.config.components.items()}
        self.listeners: list[asyncio.base_events.Server] = []
        self.elsewhere: dict[str, str] = {}  # domain -> the other member holding its component (a cluster's)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._joined = False  # hooked into the cluster (once: a restart keeps the hooks)

    async def start(self, listeners: list[ListenerConfig]) -> None:
        self._stopping = False
        if self.server.cluster is not None and self.by_domain:
            await self._join_cluster()
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
        self._stopping = True
        for srv in self.listeners:
            srv.close()
        for component in self.by_domain.values():
            if self.server.services.get(component.domain) == component.receive:
                del self.server.services[component.domain]
            if component.connection is not None:
                component.connection.stream_error(StreamError("system-shutdown"))


    # --- in a cluster ------------------------------------------------------------------------------

    async def _join_cluster(self) -> None:
        """Read where the components are; forget what a process of this member that died left."""
        cluster = self.server.cluster
        assert cluster is not None
        if not self._joined:
            self._joined = True
            cluster.on(FRAME, self._heard)
            self.server.hooks.add("cluster/member-lost", self._member_lost)
            self.server.hooks.add("cluster/member-up", self._member_up)
            self.server.hooks.add("server/stopping", self._release_all)
        try:
            registry = await cluster.redis.hgetall(cluster.key(REGISTRY))
        except redis_failures() as exc:
            log.warning("components: cannot read where the cluster's components are: %s", exc)
            return
        for raw_domain, raw_member in registry.items():
            domain, member = raw_domain.decode(), raw_member.decode()
            if domain not in self.by_domain:
                continue
            if member == cluster.member:
                await self._release(domain)
            else:
                self.elsewhere[domain] = member

    def _broadcast(self, payload: str) -> None:
        cluster = self.server.cluster
        assert cluster is not None
        for member in cluster.members():
            if member != cluster.member:
                cluster.send(member, FRAME, payload)

    async def claim(self, domain: str) -> bool:
        """Record that this member holds the domain's component; False if another live member does."""
        cluster = self.server.cluster
        if cluster is None:
            return True
        key = cluster.key(REGISTRY)
        try:
            if not await cluster.redis.hsetnx(key, domain, cluster.member):
                holder = (await cluster.redis.hget(key, domain) or b"").decode()
                if holder != cluster.member and holder in cluster.members():
                    return False
                await cluster.redis.hset(key, domain, cluster.member)
        except redis_failures() as exc:
            # Without Redis the component serves this member's users; the others learn of it from the frame.
            log.warning("components: could not record %s in Redis: %s", domain, exc)
        self.elsewhere.pop(domain, None)
        self._broadcast(f"+{domain}")
        return True

    def released(self, domain: str) -> None:
        """The domain's component disconnected from this member (the entry goes unless the server stops, when
        `_release_all` has removed it already)."""
        if self.server.cluster is not None and not self._stopping:
            self._spawn(self._release(domain))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, domain: str, member: str | None = None) -> None:
        """Remove the entry of `domain` if `member` (this one by default) still holds it, and tell the others."""
        cluster = self.server.cluster
        assert cluster is not None
        holder = member or cluster.member
        try:
            await cluster.redis.eval(RELEASE, 1, cluster.key(REGISTRY), domain, holder)  # type: ignore[misc]
        except redis_failures() as exc:
            log.warning("components: could not remove %s from Redis: %s", domain, exc)
        if holder == cluster.member:
            self._broadcast(f"-{domain}")

    async def _release_all(self, _server: Server) -> None:
        """'server/stopping': this member's components are about to be disconnected."""
        self._stopping = True
        for domain, component in self.by_domain.items():
            if component.connection is not None:
                await self._release(domain)

    def forward(self, domain: str, st: Stanza) -> bool:
        """Hand a stanza for a component connected to another member to that member; False if none has it."""
        cluster = self.server.cluster
        member = self.elsewhere.get(domain)
        if cluster is None or member is None or member not in cluster.members():
            return False
        cluster.send(member, FRAME, "s" + serialize(st.el))
        return True

    async def _heard(self, sender: str, payload: str) -> None:
        """A frame of another member: a component connected to it or gone from it, or a stanza for one here."""
        kind, rest = payload[:1], payload[1:]
        if kind == "+":
            self.elsewhere[rest] = sender
        elif kind == "-":
            if self.elsewhere.get(rest) == sender:
                del self.elsewhere[rest]
        elif kind == "s":
            el = parse_stored(rest)
            st = Stanza(el, KINDS[el.tag], JID.parse(el.get("from") or ""), JID.parse(el.get("to") or ""))
            component = self.by_domain.get(st.to.domain)
            if component is not None and component.connection is not None:
                component.connection.send(el)
            else:  # it went meanwhile: never sent on again, which could go round between members
                await self.server.router.bounce(st, StanzaError("service-unavailable",
                                                                "the component is not connected"))

    def _member_up(self, member: str) -> None:
        """A member that started after this one read the registry may have missed our latest change."""
        cluster = self.server.cluster
        assert cluster is not None
        for domain, component in self.by_domain.items():
            if component.connection is not None:
                cluster.send(member, FRAME, f"+{domain}")

    def _member_lost(self, member: str) -> None:
        """Its components went with it: stanzas for them bounce here until they connect again somewhere."""
        for domain in [domain for domain, holder in self.elsewhere.items() if holder == member]:
            del self.elsewhere[domain]
            self._spawn(self._release(domain, member))


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
            self.components.released(component.domain)
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
            await self._handshake(el)
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

    async def _handshake(self, el: Element) -> None:
        component = self.wanted
        if el.tag != HANDSHAKE or component is None:
            raise StreamError("not-authorized", "send the handshake first")
        expected = handshake_digest(self.stream_id, component.secret)
        if not hmac.compare_digest((el.text or "").strip().lower(), expected):
            log.warning("component %s from %s: wrong secret", component.domain, self.remote_ip)
            raise StreamError("not-authorized", "wrong handshake")
        if component.connection is not None or component.claiming is not None:
            raise StreamError("conflict", "the component is already connected")
        component.claiming = self
        try:
            claimed = await self.components.claim(component.domain)
        finally:
            component.claiming = None
        if not claimed:
            raise StreamError("conflict", "the component is already connected to another member of the cluster")
        if self.closing:  # the connection went while the cluster was asked
            self.components.released(component.domain)
            return
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
