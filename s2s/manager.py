"""Federation: routes stanzas for remote domains over outgoing links and keeps track of every s2s stream.

The router fires 'route/remote' for a domain that is neither a local host nor a service; the manager
takes the stanza, finds (or starts) the outgoing link for its (local domain, remote domain) pair and
queues it there until the link is authenticated. A link that fails bounces what it holds with
remote-server-not-found (the domain does not resolve) or remote-server-timeout (resolved, but no
authenticated stream), so nothing is dropped silently.

Links are keyed by domain pair. A second local domain (another virtual host, or a service such as
conference.<host>) shares a link to the same remote domain when that link is up and speaks dialback
(XEP-0220 sender multiplexing); a second remote domain shares a link when the link's certificate names
it and it resolves to the same address (target multiplexing, see s2s.outgoing); otherwise each gets
its own.

In a cluster every member runs a manager: each accepts incoming streams on the shared port (routing what
arrives to the users wherever their sessions are) and opens its own outgoing links, as each ejabberd node
does; no link state is shared. A remote server checks a dialback key we gave it by connecting back, and
that connection may reach any member: the key is made with the host's secret in the shared storage
(`KeyValueStore.host_secret`), so the member that answers <db:verify/> need not be the one that made it.
The federation lists admins edit are in that storage too; the member where they change tells the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from prometheus_client.core import GaugeMetricFamily

from s2s.certs import S2STls
from s2s.incoming import S2SIncoming
from s2s.limits import FederationLimits
from s2s.outgoing import S2SOutgoing
from s2s.policy import POLICY_CHANGED, Policy
from server.jid import JID
from server.stanza import KINDS, Stanza
from server.stream.errors import StanzaError, StreamError

if TYPE_CHECKING:
    from server.config import ListenerConfig
    from server.server import Server

log = logging.getLogger("parley.s2s")

SWEEP_INTERVAL = 5.0
DIALBACK_STORE = "dialback"  # the host's key-value document 'secret'
CLUSTER_FRAME = "s2s"  # frames to the federation of other members: 'policy' (read the lists again)



class S2SManager:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.config = server.config.s2s
        self.policy = Policy(self.config)
        self.limits = FederationLimits(self.config)
        self.tls = S2STls(server.config)
        self.links: dict[tuple[str, str], S2SOutgoing] = {}
        self.bidi: dict[tuple[str, str], S2SIncoming] = {}  # (local, remote) -> incoming stream we may send on
        self.incoming: set[S2SIncoming] = set()
        self.listeners: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._retried: weakref.WeakSet[Element] = weakref.WeakSet()  # stanzas already sent over a lost link
        self.secrets: dict[str, bytes] = {}  # host -> its dialback secret
        self.stopping = False
        self._unexport = server.metrics.add_collector(self.collect)

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self, listeners: list[ListenerConfig]) -> None:
        await self.policy.load(self.server.storage.kv)
        await self._load_secrets()
        if self.server.cluster is not None:
            self.server.cluster.on(CLUSTER_FRAME, self._heard)
        self.server.hooks.add(POLICY_CHANGED, self.policy_changed)
        loop = asyncio.get_running_loop()
        for listener in listeners:
            direct = listener.tls == "direct"
            ssl = self.tls.server_direct(next(iter(self.server.hosts)), self.host_of) if direct else None
            timeout = self.server.config.limits.unauthenticated_timeout if direct else None
            srv = await loop.create_server(lambda: S2SIncoming(self), listener.address, listener.port,
                                           ssl=ssl, reuse_address=True, backlog=256, ssl_handshake_timeout=timeout,
                                           reuse_port=self.server.config.cluster.workers > 1)
            self.listeners.append(srv)
            log.info("listening for servers on %s:%d (%s)", listener.address, listener.port, listener.tls)
        self.server.hooks.add("route/remote", self.route)
        self.server.hooks.add("server/reloaded", self.reloaded)
        self._sweeper = loop.create_task(self._sweep())

    async def stop(self) -> None:
        """Stop accepting, close every stream, and bounce what was still waiting for a link."""
        self.stopping = True
        self._unexport()
        self.server.hooks.remove("route/remote", self.route)
        self.server.hooks.remove("server/reloaded", self.reloaded)
        for srv in self.listeners:
            srv.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.server.hooks.remove(POLICY_CHANGED, self.policy_changed)
        for task in list(self._tasks):
            task.cancel()
        for link in set(self.links.values()):
            link.fail("remote-server-timeout")
        for stream in list(self.incoming):
            stream.end()
        await asyncio.sleep(0)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Links by direction and state, for metrics: 'established' once a domain pair is authenticated on it."""
        links = GaugeMetricFamily("parley_s2s_links", "server-to-server streams by direction and state",
                                  labels=["direction", "state"])
        outgoing = set(self.links.values())
        established = sum(1 for link in outgoing if link.methods)
        links.add_metric(["outgoing", "established"], established)
        links.add_metric(["outgoing", "connecting"], len(outgoing) - established)
        established = sum(1 for stream in self.incoming if stream.pairs)
        links.add_metric(["incoming", "established"], established)
        links.add_metric(["incoming", "authenticating"], len(self.incoming) - established)
        yield links
        queued = GaugeMetricFamily("parley_s2s_queued_stanzas", "stanzas waiting for an outgoing link to be ready")
        queued.add_metric([], sum(len(q) for link in outgoing for q in link.queues.values()))
        yield queued

    async def policy_changed(self) -> None:
        """Apply the lists admins changed (XEP-0133) or modules loaded (POLICY_CHANGED), here and on the other
        members of a cluster, which read them again from the shared storage."""
        await self._apply_policy()
        cluster = self.server.cluster
        if cluster is not None:
            for member in cluster.members():
                if member != cluster.member:
                    cluster.send(member, CLUSTER_FRAME, "policy")

    async def _heard(self, _sender: str, payload: str) -> None:
        """A frame of another member's federation: its policy changed."""
        if payload == "policy":
            await self._apply_policy()

    async def _apply_policy(self) -> None:
        """Outgoing stanzas meet the policy one by one, but a stream a refused domain opened earlier would go on."""
        await self.policy.load(self.server.storage.kv)
        for stream in list(self.incoming):
            if any(not self.policy.allowed(remote) for remote, _ in stream.pairs):
                stream.stream_error(StreamError("policy-violation", "federation with your domain has ended"))

    async def reloaded(self, server: Server) -> None:
        """reload_config changed the [s2s] table in place: what was copied from it at start, and the
        certificates, follow; streams of domains the new lists refuse end."""
        self.policy.require_encryption = self.config.require_encryption
        self.limits.per_ip.max_per_ip = self.config.max_incoming_per_ip
        self.tls.forget()
        await self._load_secrets()
        await self._apply_policy()  # every member reloads its configuration: none needs telling

    async def _load_secrets(self) -> None:
        for host in self.server.hosts:
            if host not in self.secrets:
                self.secrets[host] = await self.server.storage.kv.host_secret(host, DIALBACK_STORE)

    def secret(self, domain: str) -> bytes:
        """What dialback keys for a local domain are made with: its host's secret, the same on every member."""
        return self.secrets[self.host_of(domain)]

    def descriptors_left(self) -> int:
        """What remains of the server's connection budget once clients and federation streams are counted."""
        streams = len(self.incoming) + len(set(self.links.values()))
        return self.server.max_connections - len(self.server.connections) - streams

    def spawn(self, coro: object) -> asyncio.Task[None]:
        """A task the manager cancels at shutdown."""
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- domains ----------------------------------------------------------------------------------

    def is_local(self, domain: str) -> bool:
        return domain in self.server.hosts or domain in self.server.services

    def host_of(self, domain: str) -> str:
        """The host whose certificate stands for a local domain (a service uses its parent host's)."""
        if domain in self.server.hosts:
            return domain
        parent = domain.partition(".")[2]
        return parent if parent in self.server.hosts else next(iter(self.server.hosts))

    # --- outgoing ---------------------------------------------------------------------------------

    async def route(self, st: Stanza) -> bool | None:
        """'route/remote': take a stanza from a local domain to a remote one."""
        local, remote = st.from_.domain, st.to.domain
        if not self.is_local(local):
            return None
        if not self.policy.allowed(remote):
            await self.server.router.bounce(st, StanzaError("not-allowed", f"no federation with {remote}"))
            return True
        stream = self.bidi.get((local, remote))
        if stream is not None and not stream.closing:
            stream.send_stanza(st.el)
        elif not self.link(local, remote).submit(local, remote, st.el):
            await self.server.router.bounce(st, StanzaError("resource-constraint", "too many stanzas queued"))
        return True

    def resubmit(self, local: str, remote: str, el: Element) -> None:
        """Queue again a stanza that a link gave back without sending it."""
        if not self.link(local, remote).submit(local, remote, el):
            self.spawn(self.bounce(el, "resource-constraint"))

    def link(self, local: str, remote: str) -> S2SOutgoing:
        """The outgoing link for a domain pair, multiplexed on an existing one or newly started."""
        link = self.links.get((local, remote))
        if link is not None and not link.closing:
            return link
        for (_, other_remote), other in self.links.items():
            if other_remote == remote and other.can_multiplex():
                other.add_pair(local, remote)
                self.links[local, remote] = other
                return other
        link = S2SOutgoing(self, local, remote)
        self.links[local, remote] = link
        link.task = self.spawn(link.run())
        return link

    def has_room(self, remote: str) -> bool:
        """Whether another stanza may wait for `remote`, over all the links being set up to it."""
        links = {link for (_, other), link in self.links.items() if other == remote}
        return sum(link.queued(remote) for link in links) < self.limits.of(remote).max_queue

    def replace_link(self, old: S2SOutgoing, new: S2SOutgoing) -> None:
        for key in [key for key, value in self.links.items() if value is old]:
            self.links[key] = new

    def requeue(self, stanzas: list[Element]) -> None:
        """Stanzas a lost stream sent and the peer never acknowledged: once more over a new link, and
        bounced if that one is lost as well. The peer may have got some: duplicates, but nothing lost."""
        for el in stanzas:
            if el in self._retried or self.stopping:
                self.spawn(self.bounce(el, "remote-server-timeout"))
                continue
            self._retried.add(el)
            self.resubmit(JID.parse(el.get("from") or "").domain, JID.parse(el.get("to") or "").domain, el)

    def forget_bidi(self, stream: S2SIncoming) -> None:
        for key in [key for key, value in self.bidi.items() if value is stream]:
            del self.bidi[key]

    def link_lost(self, link: S2SOutgoing, queued: dict[tuple[str, str], list[Element]], condition: str) -> None:
        """Forget a link and bounce the stanzas it never sent."""
        for key in [key for key, value in self.links.items() if value is link]:
            del self.links[key]
        for stanzas in queued.values():
            for el in stanzas:
                self.spawn(self.bounce(el, condition))

    async def bounce(self, el: Element, condition: str) -> None:
        sender, to = el.get("from"), el.get("to")
        if not sender or not to:
            return
        st = Stanza(el, KINDS[el.tag], JID.parse(sender), JID.parse(to))
        await self.server.router.bounce(st, StanzaError(condition))

    async def verify(self, local: str, remote: str, stream_id: str, key: str) -> str:
        """Ask `remote`'s authoritative server about a dialback key: 'valid', 'invalid' or an error condition."""
        if not self.policy.allowed(remote):
            return "not-allowed"
        return await self.link(local, remote).verify(local, remote, stream_id, key,
                                                     self.server.config.limits.unauthenticated_timeout)

    # --- housekeeping -----------------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Close idle links, incoming streams that never authenticated, and streams whose peer stopped
        acknowledging."""
        while True:
            idle, acks = self.config.idle_timeout, self.config.ack_timeout  # read afresh: they may change
            unauthenticated = self.server.config.limits.unauthenticated_timeout
            await asyncio.sleep(min(SWEEP_INTERVAL, idle / 2, unauthenticated / 2, acks / 2))
            now = time.monotonic()
            for link in set(self.links.values()):
                if link.idle() and now - link.last_active > idle:
                    log.info("closing idle link %r", link)
                    link.end()
                link.check_acks(now, acks)
            for stream in list(self.incoming):
                stream.sweep(now, idle, unauthenticated)
                stream.check_acks(now, acks)
