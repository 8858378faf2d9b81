"""Incoming server-to-server streams: another server connects to us to deliver stanzas.

Negotiation (RFC 6120): stream header, STARTTLS, then SASL EXTERNAL when the peer's certificate verified
for the domain in its header, or Server Dialback (XEP-0220) for each domain pair it asks for. Dialback
keys are checked with the sender's authoritative server over our own outgoing link to it, unless the
peer's verified certificate already names the domain (XEP-0344). Dialback requests run as tasks, so the
stream keeps answering <db:verify/> meanwhile: the peer may verify our key over this very stream.

A stanza is routed only when its 'from' and 'to' domains are a pair authenticated on this stream (see
S2SStream.deliver). Input that is not XML ends the stream, as it must.

When the peer asks for XEP-0288 bidirectionality, the manager sends our stanzas for each authenticated
pair back over this stream instead of opening a connection of its own.

Stream management (XEP-0198) is offered once TLS is up and may be enabled once a pair is authenticated.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, SubElement

from s2s import dialback
from s2s.certs import names_domain
from s2s.policy import VERIFY
from s2s.stream import BIDI, BIDI_FEATURE, S2SStream, new_stream_id
from server import ns
from server.jid import JID, JIDError
from server.stanza import KINDS
from server.stream import sm
from server.stream.errors import StreamError
from server.stream.parser import StreamClose, StreamOpen
from server.stream.writer import serialize

if TYPE_CHECKING:
    from s2s.manager import S2SManager

log = logging.getLogger("parley.s2s.in")

STARTTLS = ns.qname(ns.TLS, "starttls")
AUTH = ns.qname(ns.SASL, "auth")
MAX_CHECKS = 8  # dialback keys checked at once for one incoming stream


def _domain(text: str | None) -> str | None:
    if not text:
        return None
    try:
        jid = JID.parse(text)
    except JIDError:
        return None
    return jid.domain if jid.local is None and jid.resource is None else None


class S2SIncoming(S2SStream):
    def __init__(self, manager: S2SManager) -> None:
        super().__init__(manager)
        self.local: str | None = None  # the 'to' of the stream header
        self.remote: str | None = None  # the 'from' of the stream header, when given
        self.stream_id = ""
        self.header_sent = False
        self.certificate: bytes | None = None  # the peer's, verified against our trust store
        self.sasl_done = False
        self.pairs: set[tuple[str, str]] = set()  # (remote, local) domain pairs allowed to send
        self.methods: dict[tuple[str, str], str] = {}  # pair -> "external" or "dialback"
        self.checking = 0  # dialback keys being checked with their authoritative servers
        self.counted = False  # admitted, and counted against the caps on incoming connections

    def describe(self) -> str:
        return f"{self.remote or '?'} -> {self.local or '?'} from {self.remote_ip}"

    def connection_made(self, transport: object) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        refusal = self.manager.limits.admit(self.remote_ip, len(self.manager.incoming), self.manager.descriptors_left())
        if refusal is not None:
            log.warning("refusing a server connection from %s: %s", self.remote_ip, refusal)
            self.stream_error(StreamError(refusal, "too many connections"))
            return
        self.counted = True
        self.manager.incoming.add(self)

    def lost(self) -> None:
        if self.counted:
            self.manager.limits.per_ip.release(self.remote_ip)
        self.manager.incoming.discard(self)
        self.manager.forget_bidi(self)
        self.manager.requeue(self.unacknowledged())

    def before_error(self) -> None:
        if not self.header_sent:
            self._send_header()

    def _send_header(self) -> None:
        self.header_sent = True
        self.stream_id = new_stream_id()
        self.send_header(self.local, self.remote, self.stream_id)

    def sweep(self, now: float, idle: float, unauthenticated: float) -> None:
        if not self.pairs:
            if now - self.created > unauthenticated:
                self.stream_error(StreamError("connection-timeout", "authenticate sooner"))
        elif now - self.last_active > idle:
            self.end()

    # --- events -----------------------------------------------------------------------------------

    async def handle(self, event: object) -> None:
        if isinstance(event, Element):
            await self._element(event)
        elif isinstance(event, StreamOpen):
            self._stream_open(event)
        elif isinstance(event, StreamClose):
            self.end()

    def _stream_open(self, header: StreamOpen) -> None:
        local = _domain(header.get("to"))
        if self.local is None:
            self.local = local if local is not None and self.manager.is_local(local) else None
        self.remote = _domain(header.get("from")) or self.remote
        self.header_sent = False
        self._send_header()
        if local is None or local != self.local:
            raise StreamError("host-unknown", "this server does not serve that domain")
        if header.content_ns != ns.SERVER:
            raise StreamError("invalid-namespace", "expected jabber:server")
        if not (header.get("version") or "").startswith("1."):
            raise StreamError("unsupported-version", "XMPP 1.0 streams only")
        if self.remote is not None and not self.manager.policy.allowed(self.remote):
            raise StreamError("policy-violation", f"no federation with {self.remote}")
        if self.secure:
            self.certificate = self.peer_certificate()
        self.send(self._features())

    def _features(self) -> Element:
        features = Element(ns.qname(ns.STREAM, "features"))
        if not self.pairs and self.manager.config.bidi:
            SubElement(features, BIDI_FEATURE)
        if not self.secure:
            tls = SubElement(features, ns.qname(ns.TLS, "starttls"))
            if self.manager.policy.require_encryption:
                SubElement(tls, ns.qname(ns.TLS, "required"))
                return features
        if self._external_possible():
            mechs = SubElement(features, ns.qname(ns.SASL, "mechanisms"))
            SubElement(mechs, ns.qname(ns.SASL, "mechanism")).text = "EXTERNAL"
        features.append(dialback.feature())
        if self.sm is None:
            SubElement(features, sm.FEATURE)
        return features

    def _external_possible(self) -> bool:
        return not self.sasl_done and self.remote is not None and self._certified(self.remote)

    def _certified(self, domain: str) -> bool:
        """The peer presented a certificate that chains to a trusted CA and names `domain`."""
        return self.certificate is not None and names_domain(self.certificate, domain)

    async def _element(self, el: Element) -> None:
        tag = el.tag
        if tag in KINDS:
            await self._stanza(el)
        elif tag == dialback.RESULT:
            self._dialback_result(el)
        elif tag == dialback.VERIFY:
            self._dialback_verify(el)
        elif tag == STARTTLS:
            await self._starttls()
        elif tag == AUTH:
            self._sasl_external(el)
        elif tag == BIDI and not self.pairs and self.manager.config.bidi:
            self.bidi = True
        elif tag == sm.ENABLE:
            self._enable_sm()
        elif not self.stream_management(el):
            raise StreamError("unsupported-stanza-type", f"unexpected element {tag}")

    # --- TLS and SASL EXTERNAL --------------------------------------------------------------------

    async def _starttls(self) -> None:
        if self.secure:
            raise StreamError("policy-violation", "TLS is already in place")
        # Ask for a certificate only where it has to verify; see s2s.certs on why not from everyone.
        request = self.remote is not None and self.manager.policy.certificate_mode(self.remote) == VERIFY
        context = self.manager.tls.server(self.manager.host_of(self.local), request)
        if await self.proceed_with_tls(context, self.server.config.limits.unauthenticated_timeout):
            self.header_sent = False

    def _sasl_external(self, el: Element) -> None:
        if el.get("mechanism") != "EXTERNAL" or not self._external_possible():
            self._sasl_failure("invalid-mechanism")
            return
        text = (el.text or "").strip()
        try:
            authzid = base64.b64decode(text, validate=True).decode() if text not in ("", "=") else self.remote
        except (binascii.Error, ValueError):
            self._sasl_failure("incorrect-encoding")
            return
        if _domain(authzid) != self.remote:
            self._sasl_failure("invalid-authzid")
            return
        self.write(serialize(Element(ns.qname(ns.SASL, "success"))))
        self.sasl_done = True
        self._authorize(self.remote, self.local, "external")
        self.parser.reset()
        self.header_sent = False

    def _sasl_failure(self, condition: str) -> None:
        failure = Element(ns.qname(ns.SASL, "failure"))
        SubElement(failure, ns.qname(ns.SASL, condition))
        self.send(failure)

    def _authorize(self, remote: str, local: str, method: str) -> None:
        if not self.pairs:
            self.spend_for(remote)
        self.pairs.add((remote, local))
        self.methods[remote, local] = method
        log.info("%s authenticated for %s -> %s (%s%s) from %s", remote, remote, local, method,
                 ", bidirectional" if self.bidi else "", self.remote_ip)
        if self.bidi:
            self.manager.bidi[local, remote] = self

    # --- dialback ---------------------------------------------------------------------------------

    def _dialback_result(self, el: Element) -> None:
        remote, local = _domain(el.get("from")), _domain(el.get("to"))
        if remote is None or local is None or el.get("type") is not None:
            raise StreamError("bad-format", "a dialback request needs 'from' and 'to' and no 'type'")
        if not self.manager.is_local(local):
            self.write(dialback.element("result", local, remote, error="item-not-found"))
        elif not self.secure and self.manager.policy.require_encryption:
            self.write(dialback.element("result", local, remote, error="policy-violation"))
        elif not self.manager.policy.allowed(remote):
            self.write(dialback.element("result", local, remote, error="not-allowed"))
        elif (remote, local) in self.pairs or self._certified(remote):
            self._dialback_valid(remote, local)
        elif self.checking >= MAX_CHECKS:
            # Each check may open a connection to the claimed domain: a peer must not make us open many.
            self.write(dialback.element("result", local, remote, error="resource-constraint"))
        else:
            self.checking += 1
            self.manager.spawn(self._check_key(remote, local, el.text or ""))

    async def _check_key(self, remote: str, local: str, key: str) -> None:
        try:
            result = await self.manager.verify(local, remote, self.stream_id, key)
        finally:
            self.checking -= 1
        if self.closing:
            return
        if result == "valid":
            self._dialback_valid(remote, local)
        elif result == "invalid":
            log.warning("dialback key for %s -> %s from %s is invalid", remote, local, self.remote_ip)
            self.write(dialback.element("result", local, remote, type="invalid"))
            self.end()  # XEP-0220 2.2.1: a spoofing attempt ends the stream
        else:
            self.write(dialback.element("result", local, remote, error=result))

    def _dialback_valid(self, remote: str, local: str) -> None:
        if (remote, local) not in self.pairs:
            self._authorize(remote, local, "dialback")
        self.write(dialback.element("result", local, remote, type="valid"))

    def _dialback_verify(self, el: Element) -> None:
        """We are the authoritative server: was this key made by us, for this stream of ours?"""
        receiving, originating, stream_id = _domain(el.get("from")), _domain(el.get("to")), el.get("id")
        if receiving is None or originating is None or not stream_id or el.get("type") is not None:
            raise StreamError("bad-format", "a dialback verification needs 'from', 'to', 'id' and no 'type'")
        if not self.manager.is_local(originating):
            self.write(dialback.element("verify", originating, receiving, id=stream_id, error="item-not-found"))
            return
        valid = dialback.key_valid(self.manager.secret(originating), receiving, originating, stream_id, el.text or "")
        self.write(dialback.element("verify", originating, receiving, id=stream_id,
                                    type="valid" if valid else "invalid"))

    # --- stanzas ----------------------------------------------------------------------------------

    def _enable_sm(self) -> None:
        if not self.pairs or self.sm is not None:
            self.send(sm.failed("unexpected-request"))
            return
        self.sm = sm.StreamManagement()
        self.sm_receiving = True
        self.send(Element(sm.ENABLED))

    async def _stanza(self, el: Element) -> None:
        if not self.pairs:
            raise StreamError("not-authorized", "authenticate first")
        self.count_received()
        await self.deliver(el, self.pairs)
