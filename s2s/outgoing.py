"""Outgoing server-to-server links: we connect to another server to deliver stanzas to it.

A link connects to the first reachable candidate from the resolver, negotiates STARTTLS (or starts with
Direct TLS), checks the peer's certificate as the policy demands, asks for XEP-0288 bidirectionality when
offered (the peer then answers on this stream rather than connecting back), then authenticates each local
domain it carries: SASL EXTERNAL with our certificate when the peer offers it, else Server Dialback.
Stanzas wait in a queue per (local, remote) domain pair until that pair is authenticated. The link also
carries our <db:verify/> requests when we check a dialback key this domain's server gave us on an
incoming stream.

Dialback lets one link carry several pairs (XEP-0220 2.6): more local domains (sender multiplexing),
and more remote domains (target multiplexing) where the peer's certificate names them too and they
resolve to the address the link is connected to, so that the peer cannot draw in traffic for a domain
it does not serve. While a dialback request for a local domain is pending, that domain's stanzas wait:
Prosody forgets a domain's authentication on its stream until it has checked a new request for it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from s2s import dialback
from s2s.certs import a_label, acceptable
from s2s.policy import UNCHECKED
from s2s.resolver import Target, resolve
from s2s.stream import BIDI, BIDI_FEATURE, S2SStream
from server import ns
from server.stanza import KINDS
from server.stream import sm
from server.stream.errors import StreamError
from server.stream.parser import StreamClose, StreamOpen
from server.stream.writer import serialize

if TYPE_CHECKING:
    from s2s.manager import S2SManager

log = logging.getLogger("parley.s2s.out")

Pair = tuple[str, str]  # (local domain, remote domain)

FEATURES = ns.qname(ns.STREAM, "features")
STREAM_ERROR = ns.qname(ns.STREAM, "error")


class S2SOutgoing(S2SStream):
    def __init__(self, manager: S2SManager, local: str, remote: str) -> None:
        super().__init__(manager)
        self.local = local  # the stream's 'from': the domain whose certificate we present
        self.remote = remote
        self.spend_for(remote)  # we chose whom to connect to: its budget from the start
        self.mode = manager.policy.certificate_mode(remote)
        self.task: asyncio.Task[None] | None = None
        self.stream_id: str | None = None  # the peer's, which dialback keys are bound to
        self.address: tuple[str, int] | None = None  # the peer's IP address and port
        self.queues: dict[Pair, list[Element]] = {(local, remote): []}  # stanzas waiting, per pair
        self.methods: dict[Pair, str] = {}  # authenticated pair -> "external" or "dialback"
        self.requested: set[Pair] = set()  # pairs whose <db:result/> awaits an answer
        self.refused: set[str] = set()  # remote domains the peer would not take over this link
        self.verifies: dict[tuple[str, str, str], asyncio.Future[str]] = {}  # (local, remote, stream id)
        self.unsent: list[tuple[str, str, str, str]] = []  # verification requests waiting for settled()
        self.dialback = False  # the peer offered dialback
        self.settled = False  # TLS and SASL are over: dialback elements may flow
        self.sasl: str | None = None  # SASL EXTERNAL: None, "attempting", "succeeded" or "failed"
        self.sm_offered = False  # the peer's latest features offer stream management (XEP-0198)
        self.failure = "remote-server-timeout"

    def describe(self) -> str:
        return f"{self.local} -> {self.remote} at {self.remote_ip or '?'}"

    # --- what the manager asks of a link ----------------------------------------------------------

    def submit(self, local: str, remote: str, el: Element) -> bool:
        """Send now if the pair is authenticated here, else queue; False when the remote domain's queue is full."""
        pair = (local, remote)
        if pair in self.methods and pair not in self.queues and not self._holding(local) and not self.closing:
            self.send_stanza(el)
            return True
        if not self.manager.has_room(remote):
            return False
        self.queues.setdefault(pair, []).append(el)
        return True

    def queued(self, remote: str) -> int:
        return sum(len(queue) for (_, other), queue in self.queues.items() if other == remote)

    def can_multiplex(self) -> bool:
        return self.settled and self.dialback and not self.closing

    def may_carry(self, remote: str) -> bool:
        """Whether the certificate checked when this link came up names `remote` as well (a link whose
        certificate went unchecked vouches for nothing more)."""
        mode = self.manager.policy.certificate_mode(remote)
        return self.can_multiplex() and remote not in self.refused and mode != UNCHECKED \
            and acceptable(self.peer_certificate(), remote, mode)

    def add_pair(self, local: str, remote: str) -> None:
        """Carry another domain pair over this link: authenticate it with dialback."""
        self.queues.setdefault((local, remote), [])
        self._request((local, remote))

    def take_over(self, other: S2SOutgoing) -> None:
        """Carry everything a link that never connected was holding (it found this one going the same way)."""
        for (local, remote), queue in other.queues.items():
            self.add_pair(local, remote)
            self.queues[local, remote].extend(queue)
            self._release(local)
        self.verifies.update(other.verifies)
        self.unsent.extend(other.unsent)
        if self.settled:
            self._send_verifies()
        other.queues, other.verifies, other.unsent = {}, {}, []

    async def verify(self, local: str, remote: str, stream_id: str, key: str, timeout: float) -> str:
        """Ask the peer, as authoritative server, about a key: 'valid', 'invalid' or an error condition."""
        future = self.verifies.get((local, remote, stream_id))
        if future is None:
            future = self.verifies[local, remote, stream_id] = asyncio.get_running_loop().create_future()
            self.unsent.append((local, remote, stream_id, key))
            if self.settled:
                self._send_verifies()
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            if self.verifies.get((local, remote, stream_id)) is future:
                del self.verifies[local, remote, stream_id]
            return "remote-server-timeout"

    def idle(self) -> bool:
        unacknowledged = self.sm is not None and len(self.sm) > 0
        return bool(self.methods) and not any(self.queues.values()) and not self.verifies and not unacknowledged

    # --- connecting -------------------------------------------------------------------------------

    async def run(self) -> None:
        config = self.server.config
        loop = asyncio.get_running_loop()
        resolved = False
        targets = await resolve(self.remote, config.s2s.static)
        if await self._reuse(targets):
            return
        for target in targets:
            context = self.manager.tls.client(self.manager.host_of(self.local), self.mode, direct=True) \
                if target.direct_tls else None
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda: self, target.host, target.port, ssl=context,
                                           server_hostname=a_label(self.remote) if context else None),
                    config.s2s.connect_timeout)
            except socket.gaierror as exc:
                log.info("cannot resolve %s for %s: %s", target.host, self.remote, exc)
                continue
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                resolved = True
                log.info("cannot connect to %s:%d for %s: %s", target.host, target.port, self.remote, exc)
                continue
            break
        else:
            self.fail("remote-server-timeout" if resolved else "remote-server-not-found")
            return
        self.address = self.transport.get_extra_info("peername")[:2] if self.transport is not None else None
        if self.secure and not self._certificate_ok():
            return
        self.send_header(self.local, self.remote)
        loop.call_later(config.limits.unauthenticated_timeout, self._deadline)

    async def _reuse(self, targets: list[Target]) -> bool:
        """Hand what this link holds to an established one that may carry it, instead of connecting."""
        candidates = [link for link in set(self.manager.links.values())
                      if link is not self and link.may_carry(self.remote)]
        if not candidates:
            return False
        addresses = await addresses_of(targets)
        other = next((link for link in candidates if link.address in addresses and link.may_carry(self.remote)), None)
        if other is None or self.closing:
            return False
        log.info("link %r: multiplexed on %r", self, other)
        other.take_over(self)
        self.manager.replace_link(self, other)
        self.closing = self._lost = True
        return True

    def _deadline(self) -> None:
        if not self.methods and not self.closing:
            log.info("link %r: not authenticated in time", self)
            self.fail("remote-server-timeout")

    def _certificate_ok(self) -> bool:
        if acceptable(self.peer_certificate(), self.remote, self.mode):
            return True
        log.warning("link %r: the certificate does not prove %s (policy %s)", self, self.remote, self.mode)
        self.fail("remote-server-timeout")
        return False

    def fail(self, condition: str) -> None:
        """Give up: close, and let lost() bounce the queues with `condition`."""
        self.failure = condition
        if self.transport is None:
            self._gone()
        elif not self.closing:
            self.end()

    def lost(self) -> None:
        if self.task is not None and not self.task.done() and self.task is not asyncio.current_task():
            self.task.cancel()
        condition = self.failure
        for future in self.verifies.values():
            if not future.done():
                future.set_result("remote-server-not-found" if condition == "remote-server-not-found"
                                  else "remote-connection-failed")
        self.verifies.clear()
        queued, self.queues = self.queues, {}
        if any(queued.values()):
            log.info("link %r failed (%s): bouncing %d stanzas", self, condition, sum(map(len, queued.values())))
        self.manager.link_lost(self, queued, condition)
        self.manager.requeue(self.unacknowledged())

    # --- negotiation ------------------------------------------------------------------------------

    async def handle(self, event: object) -> None:
        if isinstance(event, Element):
            await self._element(event)
        elif isinstance(event, StreamOpen):
            if event.content_ns != ns.SERVER:
                raise StreamError("invalid-namespace", "expected jabber:server")
            self.stream_id = event.get("id")
        elif isinstance(event, StreamClose):
            self.end()

    async def _element(self, el: Element) -> None:
        tag = el.tag
        if self.stream_management(el):
            return
        if tag == FEATURES:
            await self._features(el)
        elif tag == dialback.RESULT:
            self._dialback_result(el)
        elif tag == dialback.VERIFY:
            self._dialback_verify(el)
        elif tag == ns.qname(ns.TLS, "proceed"):
            await self._tls()
        elif tag == ns.qname(ns.SASL, "success") and self.sasl == "attempting":
            self.sasl = "succeeded"  # stanzas wait for the restarted stream's features
            self.parser.reset()
            self.send_header(self.local, self.remote)
        elif tag == ns.qname(ns.SASL, "failure") and self.sasl == "attempting":
            self.sasl = "failed"
            log.info("link %r: SASL EXTERNAL refused; trying dialback", self)
            self._choose_dialback()
        elif tag == STREAM_ERROR:
            condition = next((c.tag.partition("}")[2] for c in el if c.tag.startswith("{" + ns.STREAMS_ERR)),
                             "undefined-condition")
            log.info("link %r: stream error from the peer: %s", self, condition)
            self.fail("remote-server-not-found" if condition == "host-unknown" else "remote-server-timeout")
        elif tag in KINDS and self.bidi:
            # The peer may send back what we may send to it: from its domain to the ones we authenticated.
            self.count_received()
            await self.deliver(el, {(remote, local) for local, remote in self.methods})
        elif tag == sm.ENABLED and self.sm is not None:
            self.sm_receiving = True
        elif tag == sm.FAILED and self.sm is not None:
            log.info("link %r: the peer refused stream management", self)
            self.sm = None
        elif tag in KINDS:
            raise StreamError("unsupported-stanza-type", "stanzas do not flow this way on this stream")
        else:
            raise StreamError("unsupported-stanza-type", f"unexpected element {tag}")

    async def _features(self, features: Element) -> None:
        if not self.secure:
            if features.find(ns.qname(ns.TLS, "starttls")) is not None:
                self.write(serialize(Element(ns.qname(ns.TLS, "starttls"))))
                return
            if self.manager.policy.require_encryption:
                log.warning("link %r: the peer does not offer TLS", self)
                self.fail("remote-server-timeout")
                return
        self.dialback = features.find(ns.qname(dialback.FEATURE_NS, "dialback")) is not None
        self.sm_offered = features.find(sm.FEATURE) is not None
        if not self.bidi and not self.methods and self.manager.config.bidi and features.find(BIDI_FEATURE) is not None:
            self.bidi = True  # XEP-0288: before authenticating, so the peer may answer on this stream
            self.write(serialize(Element(BIDI)))
        if self.sasl == "succeeded" and (self.local, self.remote) not in self.methods:
            self._authenticated((self.local, self.remote), "external")
        elif self.sasl is None:
            mechanisms = features.find(ns.qname(ns.SASL, "mechanisms"))
            offered = [m.text for m in mechanisms] if mechanisms is not None else []
            if "EXTERNAL" in offered:
                self.sasl = "attempting"
                auth = Element(ns.qname(ns.SASL, "auth"), {"mechanism": "EXTERNAL"})
                auth.text = base64.b64encode(self.local.encode()).decode()
                self.send(auth)
                return
        self._choose_dialback()

    def _choose_dialback(self) -> None:
        """Past TLS and SASL: dialback for whatever local domain is not authenticated yet."""
        self.settled = True
        missing = [pair for pair in self.queues if pair not in self.methods]
        if missing and not self.dialback:
            log.warning("link %r: no way to authenticate (no EXTERNAL, no dialback)", self)
            self.fail("remote-server-timeout")
            return
        for pair in missing:
            self._request(pair)
        self._send_verifies()

    async def _tls(self) -> None:
        context = self.manager.tls.client(self.manager.host_of(self.local), self.mode)
        if not await self.start_tls(context, server_side=False, server_hostname=a_label(self.remote),
                                    timeout=self.server.config.limits.unauthenticated_timeout):
            return
        if self._certificate_ok():
            self.send_header(self.local, self.remote)

    def _request(self, pair: Pair) -> None:
        if pair in self.requested or pair in self.methods or self.stream_id is None or not self.settled:
            return
        self.requested.add(pair)
        local, remote = pair
        key = dialback.make_key(self.manager.secret(local), remote, local, self.stream_id)
        self.write(dialback.element("result", local, remote, key=key))
        asyncio.get_running_loop().call_later(self.server.config.limits.unauthenticated_timeout,
                                              self._unanswered, pair)

    def _unanswered(self, pair: Pair) -> None:
        """A dialback request the peer left unanswered must not hold its local domain's stanzas for ever."""
        if pair in self.requested and not self.closing:
            self._pair_failed(pair, "no answer in time", invalid=False)

    def _send_verifies(self) -> None:
        unsent, self.unsent = self.unsent, []
        for local, remote, stream_id, key in unsent:
            self.write(dialback.element("verify", local, remote, id=stream_id, key=key))

    def _holding(self, local: str) -> bool:
        return any(pending == local for pending, _ in self.requested)

    def _authenticated(self, pair: Pair, method: str) -> None:
        self.methods[pair] = method
        self.requested.discard(pair)
        log.info("link %r: %s -> %s authenticated (%s)", self, *pair, method)
        if self.sm_offered and self.sm is None:
            self.send(Element(sm.ENABLE))  # XEP-0198: we count what we send from here on
            self.sm = sm.StreamManagement()
        self._release(pair[0])

    def _release(self, local: str) -> None:
        """Send what waited for `local`'s pairs, once none of them awaits a dialback answer."""
        if self._holding(local):
            return
        for pair in [pair for pair in self.queues if pair[0] == local and pair in self.methods]:
            for el in self.queues.pop(pair):
                self.send_stanza(el)

    def _dialback_result(self, el: Element) -> None:
        local = el.get("to") or ""
        if el.get("type") is None:  # a request: the peer would authenticate more domains over bidi
            self.write(dialback.element("result", local, el.get("from") or "", error="feature-not-implemented"))
            return
        pair = (local, el.get("from") or "")
        if pair not in self.requested:
            log.warning("link %r: unsolicited dialback result for %s -> %s", self, *pair)
            return
        kind = el.get("type")
        if kind == "valid":
            self._authenticated(pair, "dialback")
        else:
            self._pair_failed(pair, kind if kind == "invalid" else dialback.error_condition(el), kind == "invalid")

    def _pair_failed(self, pair: Pair, reason: str, invalid: bool) -> None:
        """A pair the peer would not authenticate: another remote domain gets a link of its own, the rest
        is bounced; other pairs carry on."""
        local = pair[0]
        self.requested.discard(pair)
        condition = "internal-server-error" if invalid else "remote-server-timeout"
        log.warning("link %r: dialback for %s -> %s failed: %s", self, *pair, reason)
        if self.manager.links.get(pair) is self:
            del self.manager.links[pair]
        queued = self.queues.pop(pair, [])
        if pair[1] != self.remote and not invalid:
            self.refused.add(pair[1])
            for stanza in queued:
                self.manager.resubmit(local, pair[1], stanza)
        else:
            for stanza in queued:
                self.manager.spawn(self.manager.bounce(stanza, condition))
        self._release(local)
        if not self.methods and not self.requested:
            self.fail(condition)

    def _dialback_verify(self, el: Element) -> None:
        key = (el.get("to") or "", el.get("from") or "", el.get("id") or "")
        if key not in self.verifies:
            log.warning("link %r: unsolicited dialback verification", self)
            return
        kind = el.get("type")
        self.verifies.pop(key).set_result(kind if kind in ("valid", "invalid") else "remote-server-timeout")


async def addresses_of(targets: list[Target]) -> set[tuple[str, int]]:
    """The IP addresses and ports the targets resolve to."""
    loop = asyncio.get_running_loop()
    found: set[tuple[str, int]] = set()
    for target in targets:
        try:
            infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            continue
        found.update((info[4][0], info[4][1]) for info in infos)
    return found
