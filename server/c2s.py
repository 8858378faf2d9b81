"""Client-to-server connections: the asyncio edge around the sans-IO parser and SASL machines.

One C2SConnection per TCP connection. Negotiation follows RFC 6120: stream header, STARTTLS (or Direct
TLS from the start, XEP-0368), SASL, stream restart, resource binding. Where it stands is one `State`,
and what each state accepts is the table of server/c2s_state.py, consulted for every event but the
stanzas of a bound session. After binding, stanzas get the session's full JID stamped as 'from' and go
to the router. Reading, ordering and writing are the shared StreamEdge's (server/stream/edge.py).

Modules see the stream through hooks on the host: 'c2s/features' (conn, features, stage); 'c2s/element'
(conn, element) for a top-level element that is neither a stanza nor negotiation, before or after
binding (stream management's <enable/>, <resume/>, <r/>, <a/>); 'c2s/nonza' (session, element) for the
rest once bound (CSI); 'c2s/handled' (session) after each stanza from the client. A connection that drops
without a closing stream ends its session unless `session.hibernate` keeps it for a resumption.

SASL2 (XEP-0388, over TLS only) authenticates and sets the session up in one step (server/sasl2.py for
the request, Bind2 and FAST tokens). Modules take part through hooks: 'sasl2/features' (conn, inline) and
'bind2/features' (conn, inline) to offer what they do inline; 'sasl2/inline' (conn, element) for a child
of <authenticate/> (stream management's <resume/>) and 'bind2/inline' (conn, element) for a child of
Bind2's <bind/> once the session is bound (<enable/> of carbons or stream management, CSI's <inactive/>),
each returning the element that goes into the <success/> (or <bound/>), True when there is none, or None
when not theirs. A module that must write after the <success/> (a resumption's unacknowledged stanzas)
appends to `conn.after_success`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.accounts import verify_plain
from server.archiving import TURN, Reading, Turn
from server.c2s_state import NOT_AUTHORIZED, Action, Event, Input, Refusal, Reply, State, advance, input_of, outcome
from server.jid import JID, JIDError
from server.limits import TokenBucket, login_keys
from server.router import parse_jid_attr
from server.sasl import SaslFailure
from server.sasl.channel_binding import tls_exporter, tls_server_end_point
from server.sasl.ht import HT_MECHANISMS, ht_binding, parse_ht, responder_proof
from server.sasl.plain import parse_plain
from server.sasl.scram import ScramServer, credentials_from_salted
from server.sasl2 import (
    ADDITIONAL_DATA,
    AUTHENTICATION,
    AUTHORIZATION_IDENTIFIER,
    BIND2,
    BIND2_INLINE,
    BIND2_TAG,
    FAST,
    FAST_MECHANISM,
    INLINE,
    MECHANISM,
    SUCCESS,
    TOKEN,
    UPGRADE,
    UPGRADE_SHA256,
    FastTokens,
    Request,
    fast_key,
    parse_request,
    random_resource,
    stable_resource,
    wants_new_token,
)
from server.sessions import Session
from server.stanza import KINDS, MESSAGE, Stanza, error_reply, reply
from server.storage.accounts import Account
from server.storage.engine import storage_condition, storage_error_text
from server.storage.fast import FastToken
from server.stream.edge import StreamEdge
from server.stream.errors import StanzaError, StreamError
from server.stream.parser import StreamOpen, StreamParser
from server.stream.writer import STREAM_FOOTER, serialize, stream_header

if TYPE_CHECKING:
    from server.host import Host
    from server.server import Server

log = logging.getLogger("parley.c2s")

SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1")
# Wrong credentials one stream may try before it is closed. Negotiation refusals (a mechanism or
# channel-binding type we lack, the 'y' flag while -PLUS is offered) do not count: clients walk down
# their list of mechanisms through them.
MAX_SASL_FAILURES = 3
MAX_RESOURCES = 10
BIND = ns.qname(ns.BIND, "bind")
SESSION = ns.qname(ns.SESSION, "session")
BOUND = State.BOUND
PIPELINED = ("chat", "normal")  # message types read on past while earlier ones wait for the archive


def _sasl(name: str, text: str | None = None, namespace: str = ns.SASL) -> Element:
    el = Element(ns.qname(namespace, name))
    if text is not None:
        el.text = text
    return el


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _b64decode(text: str | None) -> bytes:
    if not text or text == "=":
        return b""
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SaslFailure("incorrect-encoding") from None


@dataclass
class Upgrade:
    """An upgrade task under way: the account it upgrades, the FAST token the login used, the salt sent."""

    account: Account
    used: FastToken | None
    salt: bytes | None = None


class C2SConnection(StreamEdge):
    # The sessions metric's label: 'tcp', or 'direct_tls' for a Direct TLS listener's connection. A subclass
    # for another carrier is labelled by its class name without 'Connection' (WebSocketConnection:
    # 'websocket') unless it names its own.
    transport_label = "tcp"
    backpressure = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "transport_label" not in cls.__dict__:
            cls.transport_label = cls.__name__.removesuffix("Connection").lower()

    def __init__(self, server: Server, direct_tls: bool) -> None:
        limits = server.config.limits
        super().__init__(StreamParser(ns.CLIENT, limits.max_stanza_size, limits.max_depth),
                         TokenBucket(limits.c2s_rate, limits.c2s_burst))
        self.server = server
        self.limits = limits
        self.secure = direct_tls
        if direct_tls and type(self) is C2SConnection:
            self.transport_label = "direct_tls"
        self.state = State.SECURED if direct_tls else State.PLAIN
        self.remote_ip = ""
        self.host: Host | None = None
        self.stream_id = ""
        self.header_sent = False
        self.lang = "en"
        self.username: str | None = None
        self.session: Session | None = None
        self.created = time.monotonic()
        self._counted_ip = False
        self._scram: ScramServer | None = None
        self._sasl_failures = 0
        self._mechanism = ""  # the SASL mechanism tried last, for metrics
        self._channel_bindings: dict[str, bytes] = {}
        self._sasl2: Request | None = None  # the <authenticate/> under way
        self._upgrade: Upgrade | None = None  # its upgrade task (XEP-0480), between the proof and the success
        self.after_success: list[Callable[[], None]] = []  # what modules write after a SASL2 <success/>
        self._last: Turn | None = None  # the last message handled past a parked one, until done (Turn)
        self._turns: set[asyncio.Task[None]] = set()
        self._reading = Reading(self._park)  # the message the reading task handles itself
        self.task_context = contextvars.Context()
        self.task_context.run(TURN.set, self._reading)

    def __repr__(self) -> str:
        who = f" {self.session.jid}" if self.session is not None else ""
        return f"<C2SConnection #{self.conn_id} {self.remote_ip}{who}>"

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote_ip = peer[0] if peer else ""
        self._bound_write_buffer()  # a Direct TLS listener's transport
        if not self.server.admit(self):
            transport.abort()
            self.closing = True
            self.state = advance(self.state, Event.CLOSE)
            return
        self._counted_ip = True
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        deliberate = self.closing  # the stream was closed or an error sent, not cut off
        self.closing = True
        self.state = advance(self.state, Event.CLOSE)
        self.server.forget(self)
        if self._counted_ip:
            self.server.ip_counter.release(self.remote_ip)
            self._counted_ip = False
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
        self.wake_writer()
        if self.session is not None:
            session, self.session = self.session, None
            if deliberate or session.hibernate is None or not session.hibernate():
                session.closed = True
                self.server.end_session_soon(session)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.server.output.held(self, 0)

    def flush(self) -> None:
        """Write, and count what the client does not read fast enough against the server's output budget."""
        super().flush()
        if self._write_paused and self.transport is not None and not self.closing:
            self.server.hold_output(self, self.unsent())

    def output_timeout(self) -> float:
        return self.limits.output_timeout

    def cut(self, condition: str, text: str) -> None:
        """As the edge's, and the session leaves the connection now rather than when the client lets it go (up
        to CLOSE_GRACE later), so that nothing piles up, parsed, for a client that does not read: a resumable
        one waits for the client to resume (it did not close its stream: XEP-0198 7), stream management
        queueing what comes meanwhile; any other ends, what comes going to other resources or offline."""
        session = self.session
        super().cut(condition, text)
        if session is not None and self.session is session:
            self.session = None
            session.closed = False  # as close() marked it: not closed if it waits for a resumption
            if session.hibernate is None or not session.hibernate():
                session.closed = True
                self.server.end_session_soon(session)

    async def room(self, wait: bool) -> int:
        """The session's flow control without stream management: any number of stanzas, once the socket's
        write buffer has drained below its high mark (asyncio's pause_writing/resume_writing)."""
        self.flush()
        if wait:
            await self.writable()
        return 0 if self._write_paused else sys.maxsize

    def close(self) -> None:
        self.state = advance(self.state, Event.CLOSE)
        if self.session is not None:
            self.session.closed = True  # what is sent to it from now on is handed on when it ends
        super().close()

    def _send_header(self) -> None:
        if not self.header_sent:
            self.header_sent = True
            self.stream_id = secrets.token_hex(8)
            self.write(stream_header(content_ns=ns.CLIENT, from_=self.host.name if self.host else None,
                                     to=None, stream_id=self.stream_id, lang=self.lang))

    def before_error(self) -> None:
        self._send_header()

    def close_session(self, condition: str | None) -> None:
        if condition:
            self.stream_error(StreamError(condition))
        else:
            self.write(STREAM_FOOTER)
            self.close()

    # --- negotiation ------------------------------------------------------------------------------

    async def handle(self, event: object) -> None:
        last = self._last
        if last is not None:
            assert last.done is not None
            if last.done.done():
                self._last = None
            elif self._overlaps(event):
                self._spawn(event)  # type: ignore[arg-type]
                return
            else:
                await self._settled()
        try:
            await self._handle(event)
        except SaslFailure as exc:
            in_sasl2 = isinstance(event, Element) and event.tag.startswith(f"{{{ns.SASL2}}}")
            self._sasl_fail(exc, ns.SASL2 if in_sasl2 else ns.SASL)

    async def _handle(self, event: object) -> None:
        if self.state is BOUND and isinstance(event, Element) and event.tag in KINDS:
            await self._stanza(event)  # the table's (BOUND, stanza) entry without the look-up: most of the traffic
            return
        if isinstance(event, Element):
            what = input_of(event.tag)
        else:
            what = Input.OPEN if isinstance(event, StreamOpen) else Input.CLOSE
        done = outcome(self.state, what)
        if isinstance(done, Refusal):
            self._refuse(done)
            return
        match done:
            case Action.OPEN:
                self._stream_open(event)
            case Action.CLOSE:
                self.write(STREAM_FOOTER)
                self.close()
            case Action.STARTTLS:
                await self._negotiate_tls()
            case Action.SASL_AUTH:
                await self._sasl_auth(event)
            case Action.SASL_RESPONSE:
                await self._sasl_response(event)
            case Action.SASL2_AUTH:
                await self._sasl2_auth(event)
            case Action.SASL2_RESPONSE:
                await self._sasl2_response(event)
            case Action.SASL2_TASK:
                await self._sasl2_task(event)
            case Action.UNAUTHENTICATED_IQ:
                if await self.host.hooks.fire("c2s/unauthenticated-iq", self, event) is None:
                    self._refuse(NOT_AUTHORIZED)
            case Action.BIND:
                await self._bind_stage_iq(event)
            case Action.STANZA:
                await self._stanza(event)
            case Action.ELEMENT:
                await self._element(event, None)
            case Action.NONZA:
                await self._element(event, self.session)

    def _overlaps(self, event: object) -> bool:
        """Whether `event` may be handled while earlier messages wait for their archive commit: a chat or
        normal message to a local account, which is delivered after them (server/archiving.py's Turn)."""
        if self.state is not BOUND or not isinstance(event, Element) or event.tag != MESSAGE \
                or event.get("type", "normal") not in PIPELINED:
            return False
        return (event.get("to") or "").partition("/")[0].rpartition("@")[2] in self.server.hosts

    def _park(self, turn: Turn) -> None:
        """A message handled by the reading task waits for its archive commit: read on in a new task."""
        self._last = turn
        self.read_on()

    def _spawn(self, el: Element) -> None:
        """Handle a message behind a parked one in a task of its own, in its turn."""
        turn = Turn(el, self._last)
        turn.track()
        self._last = turn
        task = asyncio.get_running_loop().create_task(self._in_turn(el, turn))
        self._turns.add(task)
        task.add_done_callback(self._turns.discard)

    async def _in_turn(self, el: Element, turn: Turn) -> None:
        try:
            await turn.after_released()
            if not self.closing and self.session is not None:
                await self.guarded(self._stanza(el, turn))
        finally:
            turn.finished()

    async def _settled(self) -> None:
        """Wait until the messages handled behind a parked one are done."""
        last = self._last
        if last is not None and last.done is not None:
            await asyncio.shield(last.done)
            if self._last is last:
                self._last = None

    async def finish(self) -> None:
        await super().finish()
        await self._settled()

    def _refuse(self, refusal: Refusal) -> None:
        """Answer an input the state does not allow; stream errors and SASL failures are raised, as those
        the actions raise."""
        if refusal.reply is Reply.STREAM_ERROR:
            raise StreamError(refusal.condition, refusal.text)
        if refusal.reply in (Reply.SASL_FAILURE, Reply.SASL2_FAILURE):
            raise SaslFailure(refusal.condition, refusal.text)
        self.write(serialize(Element(ns.qname(ns.TLS, "failure"))) + STREAM_FOOTER)
        self.close()

    async def _element(self, el: Element, session: Session | None) -> None:
        """A top-level element that is neither a stanza nor negotiation: the modules' ('c2s/element', and
        'c2s/nonza' once `session` is bound), or an unsupported-stanza-type stream error."""
        if await self.host.hooks.fire("c2s/element", self, el) is not None:
            return
        if session is None or await self.host.hooks.fire("c2s/nonza", session, el) is None:
            raise StreamError("unsupported-stanza-type", f"unexpected element {el.tag}")

    def _stream_open(self, header: StreamOpen) -> None:
        self.lang = header.get(ns.LANG) or self.lang
        to = header.get("to")
        host = None
        if to:
            try:
                host = self.server.hosts.get(JID.parse(to).domain)
            except JIDError:
                host = None
        if self.host is None:
            self.host = host
        self.header_sent = False
        self._send_header()
        if host is None or host is not self.host:
            raise StreamError("host-unknown", "this server does not serve that domain")
        if header.content_ns != ns.CLIENT:
            raise StreamError("invalid-namespace", "expected jabber:client")
        if not (header.get("version") or "").startswith("1."):
            raise StreamError("unsupported-version", "XMPP 1.0 streams only")
        if self.secure:
            self._tls_established()
        self.send(self._features())

    def _tls_available(self) -> bool:
        return not self.secure and self.server.tls is not None

    def _features(self) -> Element:
        features = Element(ns.qname(ns.STREAM, "features"))
        if self.state is not State.AUTHENTICATED:
            if self._tls_available():
                tls = SubElement(features, ns.qname(ns.TLS, "starttls"))
                if self.server.config.require_encryption:
                    SubElement(tls, ns.qname(ns.TLS, "required"))
                    return features
            mechs = SubElement(features, ns.qname(ns.SASL, "mechanisms"))
            for mech in self._mechanisms():
                SubElement(mechs, ns.qname(ns.SASL, "mechanism")).text = mech
            if self._channel_bindings:
                cb = SubElement(features, ns.qname(ns.SASL_CB, "sasl-channel-binding"))
                for cb_type in self._channel_bindings:
                    SubElement(cb, ns.qname(ns.SASL_CB, "channel-binding"), {"type": cb_type})
            if self.secure:
                features.append(self._sasl2_feature())
            self.server.fire_features(self, features, "pre-auth")
        else:
            SubElement(features, BIND)
            SubElement(SubElement(features, SESSION), ns.qname(ns.SESSION, "optional"))
            self.server.fire_features(self, features, "post-auth")
        return features

    def _mechanisms(self) -> list[str]:
        mechs: list[str] = []
        if self._channel_bindings:
            mechs += [m + "-PLUS" for m in SCRAM_MECHANISMS]
        mechs += SCRAM_MECHANISMS
        if self.secure or self.server.config.allow_unencrypted_plain:
            mechs.append("PLAIN")
        return mechs

    def _fast_mechanisms(self) -> list[str]:
        return [m for m in HT_MECHANISMS if ht_binding(m) is None or ht_binding(m) in self._channel_bindings]

    def _sasl2_feature(self) -> Element:
        """SASL2's mechanisms and what may come inline: Bind2 with the modules' features, FAST, the rest."""
        auth = Element(AUTHENTICATION)
        for mech in self._mechanisms():
            SubElement(auth, MECHANISM).text = mech
        inline = SubElement(auth, INLINE)
        self.host.hooks.notify("bind2/features", self, SubElement(SubElement(inline, BIND2), BIND2_INLINE))
        fast = SubElement(inline, FAST)
        for mech in self._fast_mechanisms():
            SubElement(fast, FAST_MECHANISM).text = mech
        self.host.hooks.notify("sasl2/features", self, inline)
        SubElement(auth, UPGRADE).text = UPGRADE_SHA256
        return auth

    async def _negotiate_tls(self) -> None:
        self.state = advance(self.state, Event.TLS_STARTED)
        await self._starttls()
        if self.state is State.TLS_NEGOTIATING:  # neither refused (closed) nor cut meanwhile
            self.state = advance(self.state, Event.TLS_DONE if self.secure else Event.CLOSE)

    async def _starttls(self) -> None:
        if not self._tls_available() or self.username is not None:
            self.write(serialize(Element(ns.qname(ns.TLS, "failure"))) + STREAM_FOOTER)
            self.close()
            return
        if await self.proceed_with_tls(self.server.tls.context(self.host.name), self.limits.unauthenticated_timeout):
            self.header_sent = False

    def _tls_established(self) -> None:
        """Channel-binding data for SCRAM-*-PLUS (RFC 5929, RFC 9266), once the host is known."""
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None or self.host is None or self._channel_bindings:
            return
        bindings = {}
        exporter = tls_exporter(ssl_object)
        if exporter is not None:
            bindings["tls-exporter"] = exporter
        bindings["tls-server-end-point"] = tls_server_end_point(self.server.tls.cert_der(self.host.name))
        self._channel_bindings = bindings

    # --- SASL -------------------------------------------------------------------------------------

    def _throttle_keys(self, user: str | None) -> list[str]:
        return login_keys(self.remote_ip, f"{user}@{self.host.name}" if user else None)

    def _check_throttle(self, user: str | None) -> None:
        throttle = self.server.auth_throttle
        wait = max((throttle.blocked_for(k) for k in self._throttle_keys(user)), default=0.0)
        if wait > 0:
            raise SaslFailure("temporary-auth-failure",
                              f"too many failed attempts; try again in {int(wait) + 1} s")

    async def _sasl_auth(self, el: Element) -> None:
        self._sasl2 = self._upgrade = None  # a SASL2 exchange the client gave up for this one
        done = await self._begin(el.get("mechanism", ""), _b64decode(el.text))
        if isinstance(done, bytes):
            self.send(_sasl("challenge", _b64(done)))
        else:
            self._auth_succeeded(*done)

    def _hash_offer(self) -> bool:
        """Whether SCRAM's challenge carries XEP-0474's hash of what was offered. Always in SASL2, whose clients
        are newer; in legacy SASL only when configured: Strophe.js before 2.0 (Converse.js 10 and older, and
        the web apps built on it) refuses any attribute it does not know there, as ejabberd 24.02 found."""
        return self._sasl2 is not None or self.server.config.scram_downgrade_protection

    async def _begin(self, mechanism: str, initial: bytes) -> bytes | tuple[str, bool, bytes]:
        """Start `mechanism`: SCRAM's challenge, or PLAIN's (user, disabled, additional data)."""
        if self.host is None:
            raise StreamError("host-unknown")
        if not self.secure and self._tls_available() and self.server.config.require_encryption:
            raise SaslFailure("encryption-required")
        if mechanism not in self._mechanisms():
            raise SaslFailure("invalid-mechanism")
        self._check_throttle(None)
        self._mechanism = mechanism
        if mechanism == "PLAIN":
            authzid, authcid, password = parse_plain(initial)
            user = self._prepare_user(authcid)
            self._check_authzid(authzid, user)
            self._check_throttle(user)
            account = await self.server.storage.accounts.get(self.host.name, user)
            if account is None or not await verify_plain(self.server.storage, account, password):
                self._auth_failed(user)
                raise SaslFailure("not-authorized")
            return user, account.disabled, b""
        scram = ScramServer(mechanism, self._channel_bindings, bool(self._channel_bindings), self.server.secret,
                            offered=(self._mechanisms(), list(self._channel_bindings)) if self._hash_offer() else None)
        user = self._prepare_user(scram.start(initial))
        self._check_authzid(scram.authzid, user)
        self._check_throttle(user)
        account = await self.server.storage.accounts.get(self.host.name, user)
        hash_name = "SHA-256" if "SHA-256" in mechanism else "SHA-1"
        creds = account.credentials.get(hash_name) if account else None
        self._scram = scram
        self._scram_account = (user, account.disabled if account else False)
        return scram.challenge(creds)

    async def _sasl_response(self, el: Element) -> None:
        self._auth_succeeded(*self._finish_scram(el.text))

    def _finish_scram(self, response: str | None) -> tuple[str, bool, bytes]:
        scram, self._scram = self._scram, None
        if scram is None:
            raise SaslFailure("malformed-request", "no authentication in progress")
        user, disabled = self._scram_account
        try:
            final = scram.finish(_b64decode(response))
        except SaslFailure:
            self._auth_failed(user)
            raise
        return user, disabled, final

    def _prepare_user(self, authcid: str) -> str:
        try:
            local = JID.make(authcid, self.host.name).local
        except JIDError:
            raise SaslFailure("not-authorized") from None
        if not local:
            raise SaslFailure("not-authorized")
        return local

    def _check_authzid(self, authzid: str | None, user: str) -> None:
        if authzid and authzid not in (user, f"{user}@{self.host.name}"):
            raise SaslFailure("invalid-authzid")

    def _auth_failed(self, user: str) -> None:
        """Wrong credentials: counted for the throttle and against this stream."""
        for key in self._throttle_keys(user):
            self.server.auth_throttle.failed(key)
        self._sasl_failures += 1
        self.server.stats.authenticated(self._mechanism, "failure")
        log.info("authentication failed for %s@%s from %s", user, self.host.name, self.remote_ip)

    def _authenticated(self, user: str, disabled: bool) -> None:
        if disabled:
            raise SaslFailure("account-disabled")
        for key in self._throttle_keys(user):
            self.server.auth_throttle.succeeded(key)
        self.server.stats.authenticated(self._mechanism, "success")
        self.state = advance(self.state, Event.SASL_SUCCESS)
        self.username = user
        log.info("%s@%s authenticated from %s", user, self.host.name, self.remote_ip)

    def _auth_succeeded(self, user: str, disabled: bool, additional: bytes) -> None:
        self._authenticated(user, disabled)
        self.send(_sasl("success", _b64(additional) if additional else None))
        self.parser.reset()
        self.header_sent = False

    def _sasl_fail(self, exc: SaslFailure, namespace: str = ns.SASL) -> None:
        self._scram = None
        self._sasl2 = None
        self._upgrade = None
        failure = _sasl("failure", namespace=namespace)
        SubElement(failure, ns.qname(ns.SASL, exc.condition))
        if exc.text:
            SubElement(failure, ns.qname(namespace, "text")).text = exc.text
        self.send(failure)
        if self._sasl_failures >= MAX_SASL_FAILURES:
            self.stream_error(StreamError("policy-violation", "too many failed authentication attempts"))

    # --- SASL2, Bind2, FAST -----------------------------------------------------------------------

    async def _sasl2_auth(self, el: Element) -> None:
        request = parse_request(el)
        initial = _b64decode(request.initial)
        self._sasl2, self._upgrade = request, None
        if request.mechanism in self._fast_mechanisms():
            self._mechanism = request.mechanism
            await self._fast_login(request, initial)
            return
        if request.initial is None:
            raise SaslFailure("malformed-request", "send the initial response with <authenticate/>")
        done = await self._begin(request.mechanism, initial)
        if isinstance(done, bytes):
            self.send(_sasl("challenge", _b64(done), ns.SASL2))
        else:
            await self._sasl2_succeeded(*done)

    async def _sasl2_response(self, el: Element) -> None:
        if self._sasl2 is None:
            raise SaslFailure("malformed-request", "no authentication in progress")
        await self._sasl2_succeeded(*self._finish_scram(el.text))

    def _fast(self) -> FastTokens:
        return FastTokens(self.server.storage.fast, fast_key(self.server.config.data_dir))

    async def _fast_login(self, request: Request, initial: bytes) -> None:
        """A login with a FAST token: one round trip, the token proved over the mechanism's binding."""
        if self.host is None:
            raise StreamError("host-unknown")
        self._check_throttle(None)
        authcid, proof = parse_ht(initial)
        user = self._prepare_user(authcid)
        self._check_throttle(user)
        if request.agent is None or not request.fast:
            raise SaslFailure("malformed-request", "a FAST login needs the user-agent id and <fast/>")
        cb_type = ht_binding(request.mechanism)
        cb_data = self._channel_bindings[cb_type] if cb_type else b""
        try:
            used, token = await self._fast().check(self.host.name, user, request.agent, request.mechanism,
                                                   proof, cb_data, request.fast_count)
        except SaslFailure:
            self._auth_failed(user)
            raise
        account = await self.server.storage.accounts.get(self.host.name, user)
        if account is None:
            raise SaslFailure("not-authorized")
        if request.invalidate:
            await self.server.storage.fast.revoke(self.host.name, user, request.agent)
        await self._sasl2_succeeded(user, account.disabled, responder_proof(token, cb_data), used)

    async def _sasl2_succeeded(self, user: str, disabled: bool, additional: bytes,
                               used: FastToken | None = None) -> None:
        """The credentials are right: the upgrade task first if the client can do it and the account has
        SHA-1 keys only (XEP-0480), else the <success/>."""
        if UPGRADE_SHA256 in self._sasl2.upgrades and not disabled:
            account = await self.server.storage.accounts.get(self.host.name, user)
            if account is not None and "SHA-256" not in account.credentials:
                self._upgrade = Upgrade(account, used)
                proceed = _sasl("continue", namespace=ns.SASL2)
                if additional:
                    SubElement(proceed, ADDITIONAL_DATA).text = _b64(additional)
                SubElement(SubElement(proceed, ns.qname(ns.SASL2, "tasks")), ns.qname(ns.SASL2, "task")).text = \
                    UPGRADE_SHA256
                self.send(proceed)
                return
        await self._sasl2_success(user, disabled, additional, used)

    async def _sasl2_task(self, el: Element) -> None:
        """XEP-0480's SCRAM upgrade: <next/> gets a new salt and the iteration count, <task-data/> brings
        the client's SaltedPassword, from which the account's SHA-256 keys are made."""
        task = self._upgrade
        if task is None or self._sasl2 is None:
            raise SaslFailure("malformed-request", "no task in progress")
        iterations = self.server.config.scram_iterations
        if el.tag == ns.qname(ns.SASL2, "next"):
            if el.get("task") != UPGRADE_SHA256 or task.salt is not None:
                raise SaslFailure("malformed-request", f"the task to do is {UPGRADE_SHA256}")
            task.salt = os.urandom(16)
            data = _sasl("task-data", namespace=ns.SASL2)
            SubElement(data, ns.qname(ns.SCRAM_UPGRADE, "salt"), {"iterations": str(iterations)}).text = \
                _b64(task.salt)
            self.send(data)
            return
        salted = el.findtext(ns.qname(ns.SCRAM_UPGRADE, "hash"))
        if task.salt is None or salted is None:
            raise SaslFailure("malformed-request", f"send <next task='{UPGRADE_SHA256}'/>, then the hash")
        try:
            keys = credentials_from_salted("SHA-256", task.salt, iterations, _b64decode(salted.strip()))
        except ValueError as exc:
            raise SaslFailure("malformed-request", str(exc)) from None
        account = task.account
        await self.server.storage.accounts.set_credentials(account.host, account.username,
                                                           [*account.credentials.values(), keys])
        self._upgrade = None
        log.info("%s@%s has SHA-256 keys now (XEP-0480)", account.username, account.host)
        await self._sasl2_success(account.username, account.disabled, b"", task.used)

    async def _sasl2_success(self, user: str, disabled: bool, additional: bytes,
                             used: FastToken | None = None) -> None:
        """The <success/>, with what was asked inline: a FAST token, a resumption or a Bind2 session."""
        request, self._sasl2 = self._sasl2, None
        self._authenticated(user, disabled)
        success = Element(SUCCESS)
        if additional:
            SubElement(success, ADDITIONAL_DATA).text = _b64(additional)
        identifier = SubElement(success, AUTHORIZATION_IDENTIFIER)
        for child in request.inline:
            answer = await self.host.hooks.fire("sasl2/inline", self, child)
            if isinstance(answer, Element):
                success.append(answer)
        bound = None
        if self.session is None and request.bind is not None:
            bound = await self._bind2(request)
            success.append(bound)
        identifier.text = str(self.session.jid if self.session is not None else JID.make(user, self.host.name))
        mechanism = wants_new_token(request, used)
        if mechanism in self._fast_mechanisms():
            token, expires = await self._fast().issue(self.host.name, user, request.agent, mechanism, used)
            expiry = expires.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            SubElement(success, TOKEN, {"token": token, "expiry": expiry})
        self.send(success)
        after, self.after_success = self.after_success, []
        for step in after:
            step()
        if bound is not None:
            await self.host.hooks.fire("session/bound", self.session)

    async def _bind2(self, request: Request) -> Element:
        """Bind2 (XEP-0386): a resource of the server's choosing (stable per device), then the modules'
        inline requests on the new session."""
        bind = request.bind
        tag = (bind.findtext(BIND2_TAG) or "").strip() or None
        account = f"{self.username}@{self.host.name}"
        resource = stable_resource(tag, account, request.agent) if request.agent else random_resource(tag)
        await self.server.sessions.ensure(JID.make(self.username, self.host.name))  # as in _bind_stage_iq
        try:
            self._bind_resource(resource)
        except StanzaError as exc:
            raise StreamError("policy-violation", exc.text or exc.condition) from None
        bound = Element(ns.qname(ns.BIND2, "bound"))
        for child in bind:
            if child.tag == BIND2_TAG:
                continue
            answer = await self.host.hooks.fire("bind2/inline", self, child)
            if isinstance(answer, Element):
                bound.append(answer)
        return bound

    # --- resource binding -------------------------------------------------------------------------

    async def _bind_stage_iq(self, el: Element) -> None:
        payload = el[0] if len(el) == 1 else None
        if el.get("type") != "set" or payload is None or payload.tag != BIND:
            raise StreamError("not-authorized", "bind a resource first")
        # The account's sessions on other members of a cluster: a resource bound there conflicts.
        await self.server.sessions.ensure(JID.make(self.username, self.host.name))
        try:
            jid = self._bind(payload)
        except StanzaError as exc:
            self.send(error_reply(el, exc))
            return
        answer = reply(el)
        SubElement(SubElement(answer, BIND), ns.qname(ns.BIND, "jid")).text = str(jid)
        self.send(answer)
        await self.host.hooks.fire("session/bound", self.session)

    def _bind(self, payload: Element) -> JID:
        requested = (payload.findtext(ns.qname(ns.BIND, "resource")) or "").strip()
        return self._bind_resource(requested or f"parley-{secrets.token_hex(6)}")

    def _bind_resource(self, resource: str) -> JID:
        try:
            jid = JID.make(self.username, self.host.name, resource)
        except JIDError as exc:
            raise StanzaError("bad-request", f"invalid resource: {exc}") from None
        sessions = self.server.sessions
        existing = sessions.get(jid)
        if existing is not None:
            log.info("resource conflict for %s: replacing the older session", jid)
            sessions.remove(existing)
            existing.close("conflict")
        elif len(sessions.of(jid.bare)) >= MAX_RESOURCES:
            raise StanzaError("resource-constraint", f"at most {MAX_RESOURCES} resources per account")
        session = Session(jid, self.host, self.write, self.close_session, self.remote_ip)
        session.room = self.room
        self.take_session(session)
        sessions.add(session)
        return jid

    def take_session(self, session: Session) -> None:
        """Carry `session` from now on: the one bound here, or one that stream management resumes here."""
        self.state = advance(self.state, Event.SESSION_BOUND)
        self.session = session

    # --- stanzas ----------------------------------------------------------------------------------

    async def _stanza(self, el: Element, turn: Turn | None = None) -> None:
        """A stanza of the bound session, to the router; 'c2s/handled' once it is handled (not when it ends
        the stream). A message has its `turn` (given when it is handled behind a parked one)."""
        session = self.session
        session.last_active = time.monotonic()
        claimed = el.get("from")
        if claimed and claimed != str(session.jid):
            try:
                ok = JID.parse(claimed) in (session.jid, session.bare)
            except JIDError:
                ok = False
            if not ok:
                raise StreamError("invalid-from", "'from' does not match your address")
        el.set("from", str(session.jid))
        kind = KINDS[el.tag]
        stats = self.server.stats
        stats.received[el.tag] += 1
        if kind == "iq" and len(el) == 1 and el[0].tag == SESSION and el.get("type") == "set" \
                and el.get("to") in (None, self.host.name):
            session.send(reply(el))
        else:
            try:
                to = parse_jid_attr(el.get("to"))
            except StanzaError as exc:
                if el.get("type") != "error":
                    session.send(error_reply(el, exc))
            else:
                stanza = Stanza(el, kind, session.jid, to, session)
                token = None
                reading = self._reading
                if turn is not None:
                    token = TURN.set(turn)
                elif kind == "message":
                    reading.el = el  # TURN is `reading` in the reading tasks' context
                began = time.perf_counter()
                try:
                    try:
                        await self.server.router.route(stanza)
                        if kind == "message":
                            stats.delivery.observe(time.perf_counter() - began)
                    except Exception as exc:
                        # A storage failure (a full disk) fails this stanza, not the stream and the stanzas
                        # after it.
                        condition = storage_condition(exc)
                        if condition is None:
                            raise
                        log.warning("storage failed for <%s/> from %s: %s", kind, session.jid,
                                    storage_error_text(exc))
                        await self.server.router.bounce(stanza, StanzaError(condition))
                    if turn is not None and turn.before is not None:
                        await turn.after_earlier()  # counted as handled in order
                finally:
                    if token is not None:
                        TURN.reset(token)
                    elif reading.el is el:
                        turn, reading.el, reading.turn = reading.turn, None, None
                    if turn is not None:
                        turn.finished()
        self.host.hooks.notify("c2s/handled", session)
