"""BOSH (XEP-0124, XEP-0206): client streams over HTTP long-polling, for browsers, at /http-bind.

A BOSH session is an ordinary client session: `BoshConnection` is a C2SConnection, so SASL, binding and
every stanza go through c2s's negotiation table, limits and hooks; what it writes goes to the session's
output instead of a socket, and waits there for a request to carry it (server/stream/bosh.py decides which
request answers with what). The stream header is the session creation response, a stream restart is
`xmpp:restart`, the closing tag a terminate body, a stream error a `remote-stream-error` body.

Limits are c2s's: each session counts as a connection against the per-address and total caps, its request
bodies against the read-rate budget, each body against the stanza size and restricted-XML rules, and it
must bind within the unauthenticated timeout. PLAIN is offered only over HTTPS, or from a trusted proxy that
terminated TLS (`trusted_proxies`).
Stream management is not offered: BOSH's rids carry requests across broken connections, and a session
whose client goes (no request for 'inactivity' seconds) ends, its unsent stanzas handed on like those of
any session (another resource, or offline storage).

The module is loaded per host but serves one path for all of them (the body's 'to' names the host); the
first host that loads it serves, with its options.

In a cluster a session's requests may reach any member (the kernel spreads a node's connections over its
workers, a load balancer its nodes): the sid names the member holding the session, and another member passes
each request there ('bosh/HOST' frames) and answers the client with the holder's answer, so long-polling
works as in one process. A request for a session of a member that is gone gets item-not-found.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, SubElement

from aiohttp import web

from server import ns
from server.c2s import C2SConnection
from server.jid import JID, JIDError
from server.module import Module
from server.options import Option
from server.stanza import parse_stored
from server.stream.bosh import (
    LEGACY_STATUS,
    XBOSH,
    XMPP_VERSION,
    Answer,
    Body,
    BoshError,
    BoshSession,
    Limits,
    Params,
    parse_body,
    terminal,
)
from server.stream.edge import WRITE_BUFFER_LIMIT, WRITE_HIGH_WATER
from server.stream.errors import StreamError
from server.stream.parser import StreamClose, StreamOpen
from server.stream.sm import SM
from server.stream.writer import STREAM_FOOTER

if TYPE_CHECKING:
    from server.host import Host

log = logging.getLogger("parley.bosh")

CONTENT_TYPE = "text/xml; charset=utf-8"
_QUALIFY = ("<message", "<presence", "<iq")
FORWARD_MARGIN = 10  # seconds beyond the longest wait that a request passed to another member may take
# How long a member that passed a request on waits for the holder to say it has it before passing it again: a
# frame published just after the holder died may reach no one (or a process started in its place knows none of
# its sessions, and says so, when asked again).
TAKEN_TIMEOUT = 2.0


def qualified(data: str) -> str:
    """A stanza as written into a stream takes jabber:client from it; inside a <body/> it says so itself."""
    for tag in _QUALIFY:
        if data.startswith(tag) and data[len(tag)] in " />" and not data.startswith(" xmlns=", len(tag)):
            return f'{tag} xmlns="{ns.CLIENT}"{data[len(tag):]}'
    return data


class BoshConnection(C2SConnection):
    """The client stream of one BOSH session, fed from HTTP requests and written to their answers."""

    def __init__(self, module: BoshModule, host: Host, sid: str, machine: BoshSession, remote_ip: str,
                 secure: bool) -> None:
        super().__init__(module.server, direct_tls=secure)
        self.module = module
        self.host = host
        self.sid = sid
        self.machine = machine
        self.remote_ip = remote_ip
        self._waiters: dict[int, list[asyncio.Future[str]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._terminal: str | None = None  # the condition the session ends with, once it is known
        self._ending = False  # output from now on goes with the terminal body, not before it

    def __repr__(self) -> str:
        who = f" {self.session.jid}" if self.session is not None else ""
        return f"<BoshConnection #{self.conn_id} {self.sid} {self.remote_ip}{who}>"

    def admitted(self) -> bool:
        """Count against the server's connection caps as a socket would."""
        if not self.server.admit(self):
            return False
        self._counted_ip = True
        self.server.connections.add(self)
        return True

    # --- requests ---------------------------------------------------------------------------------

    async def request(self, rid: int, body: Body, size: int) -> str:
        """The answer to one HTTP request of this session, when it is due."""
        try:
            received = self.machine.receive(rid, body, time.monotonic())
        except BoshError as exc:
            self.end(exc.condition)
            return terminal(exc.condition)
        if received.replay is not None:
            return received.replay
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(rid, []).append(waiter)
        self._answer(received.answers)
        delay = self.bucket.consume(size)
        if delay > 0:
            await asyncio.sleep(delay)  # over the read-rate budget: handled once paid for, as on a socket
        for _, ready in received.ready:
            self._take(ready)
        self._schedule()
        return await waiter

    def _take(self, body: Body) -> None:
        """Hand a request's payload to the stream, in the shapes c2s reads from a socket."""
        events: list[object] = []
        if body.restart:
            events.append(StreamOpen({"to": self.host.name, "version": "1.0", ns.LANG: self.lang}, ns.CLIENT))
        events += body.children
        if body.terminate:
            events.append(StreamClose())
        if events and not self.closing:
            self._events.extend(events)
            if self._worker is None:
                self._worker = asyncio.get_running_loop().create_task(self._drain())

    def start(self, lang: str | None) -> None:
        """The session's stream starts with its creation request."""
        self._events.append(StreamOpen({"to": self.host.name, "version": "1.0", ns.LANG: lang or "en"}, ns.CLIENT))
        self._worker = asyncio.get_running_loop().create_task(self._drain())

    def _answer(self, answers: list[Answer]) -> None:
        for answer in answers:
            for waiter in self._waiters.pop(answer.rid, ()):
                if not waiter.done():
                    waiter.set_result(answer.body)
        if self._write_paused and self.machine.output_size < WRITE_HIGH_WATER:
            self.resume_writing()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.machine.ended:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + self.machine.next_deadline() - time.monotonic(), self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = time.monotonic()
        self._answer(self.machine.tick(now))
        if self.machine.expired(now):
            log.info("%r: no request for %d s, the client is gone", self, self.machine.inactivity)
            self.close()
        else:
            self._schedule()

    # --- output: to the BOSH session instead of a socket ------------------------------------------

    def write(self, data: str) -> None:
        if self.closing:
            return
        if data.endswith(STREAM_FOOTER):
            data = data[:-len(STREAM_FOOTER)]
        if not data.strip():
            return  # the closing tag, whitespace keepalives: BOSH has its own
        self.machine.write(qualified(data))
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush)
        waiting = self.machine.output_size
        if waiting > WRITE_BUFFER_LIMIT:
            self.cut("policy-violation", f"more than {WRITE_BUFFER_LIMIT} bytes of output unread")
        elif waiting >= WRITE_HIGH_WATER:
            # Output waits for the client's next request: its input waits too, as a socket's peer's does
            # while the socket's buffer is full, and it is cut if it does not come within output_timeout.
            self.pause_writing()
            self.server.hold_output(self, waiting)

    def flush(self) -> None:
        self._flush_pending = False
        if not self._ending and not self.machine.ended:
            self._answer(self.machine.flush(time.monotonic()))
            self._schedule()

    async def room(self, wait: bool) -> int:
        return 1 << 30  # output waits in the session, whose requests the client keeps coming for

    def _send_header(self) -> None:
        """The session creation response stands for the stream header."""
        self.header_sent = True
        self.stream_id = self.sid

    def _tls_available(self) -> bool:
        return False  # HTTPS is the listener's; there is no STARTTLS inside BOSH

    def _tls_established(self) -> None:
        """No channel binding: the TLS session is the HTTP connection's, not the stream's."""

    def _features(self) -> Element:
        features = super()._features()
        for feature in [f for f in features if f.tag.startswith(f"{{{SM}}}")]:
            features.remove(feature)
        return features

    async def _element(self, el: Element, session: object) -> None:
        if el.tag.startswith(f"{{{SM}}}"):
            failed = Element(ns.qname(SM, "failed"))
            SubElement(failed, ns.qname(ns.STANZAS_ERR, "feature-not-implemented"))
            self.send(failed)
            return
        await super()._element(el, session)  # type: ignore[arg-type]

    # --- the end ----------------------------------------------------------------------------------

    def unsent(self) -> int:
        return self.machine.output_size

    def cut(self, condition: str, text: str) -> None:
        self.machine.take_output()  # dropped, as what a socket's peer did not take is
        super().cut(condition, text)

    def stream_error(self, exc: StreamError) -> None:
        if not self.closing:
            self._terminal = "remote-stream-error"
        super().stream_error(exc)

    def close(self) -> None:
        if self.closing:
            return
        self._ending = True
        super().close()
        self.end(self._terminal)

    def end(self, condition: str | None) -> None:
        """End the BOSH session: its requests get the terminal body, its stream and XMPP session end, and
        what it had no request to carry goes back to the server like a closed session's stanzas."""
        if self.machine.ended:
            return
        self._answer(self.machine.terminate(condition, time.monotonic()))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.module.sessions.pop(self.sid, None)
        left = [parse_stored(data) for data in self.machine.take_output() if data.startswith(_QUALIFY)]
        if self.session is not None:
            self.session.closed = True
            self.session.undelivered.extend(left)
        self.closing = True
        self.connection_lost(None)


class BoshModule(Module):
    name = "bosh"
    options = (
        Option("path", str, "/http-bind", "the HTTP path of the BOSH endpoint on the http listeners"),
        Option("max_wait", int, 60, "longest a request is held open waiting for something to send (seconds)",
               minimum=1),
        Option("max_hold", int, 1, "most requests a client may have held open at once", minimum=0, maximum=10),
        Option("inactivity", int, 60, "seconds without any request before a session is ended", minimum=1),
        Option("polling", int, 5, "shortest interval between empty requests of a polling client (seconds)",
               minimum=0),
        Option("max_pause", int, 120, "longest a client may pause its session (seconds)", minimum=0),
        Option("cors_origins", tuple, ("*",),
               "web origins allowed to use BOSH from a browser (CORS); \"*\" for any"),
    )

    def setup(self) -> None:
        self.sessions: dict[str, BoshConnection] = {}
        self.limits = Limits(self.option("max_wait"), self.option("max_hold"), self.option("inactivity"),
                             self.option("polling"), self.option("max_pause"))
        path = self.option("path")
        self.add_http("POST", path, self.post)
        self.add_http("OPTIONS", path, self.preflight)
        self.add_http("GET", path, self.info)
        self.hook_global("server/stopping", self.stopping)
        self.frame_kind = f"bosh/{self.host.name}"
        # Requests passed on: the member, their answer, its word that it has them.
        self._asks: dict[int, tuple[str, asyncio.Future[tuple[str, int]], asyncio.Future[None]]] = {}
        self._ask_id = 0
        self._serving: dict[tuple[str, int], asyncio.Task[None]] = {}  # requests passed to us, until answered
        self._stopping = False
        if self.server.cluster is not None:
            self.server.cluster.on(self.frame_kind, self.from_member)
            self.hook_global("cluster/member-lost", self.member_lost)

    async def stopping(self, _: object) -> None:
        """End every session with 'system-shutdown' once it has handled what it read: their held requests
        are answered, so the HTTP server does not wait for them; so are the requests passed to other
        members, whose clients go on with another member."""
        self._stopping = True
        for _, answer, _ in self._asks.values():
            if not answer.done():
                answer.set_result((terminal("remote-connection-failed"), 200))
        sessions = list(self.sessions.values())
        await asyncio.gather(*(conn.finish() for conn in sessions))
        for conn in sessions:
            conn.stream_error(StreamError("system-shutdown"))

    async def stop(self) -> None:
        await self.stopping(None)

    # --- HTTP -------------------------------------------------------------------------------------

    def _cors(self, request: web.Request) -> dict[str, str]:
        allowed = self.option("cors_origins")
        origin = request.headers.get("Origin")
        if "*" in allowed:
            headers = {"Access-Control-Allow-Origin": "*"}
        elif origin in allowed:
            headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        else:
            return {}
        headers.update({"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                        "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": "7200"})
        return headers

    async def preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=200, headers=self._cors(request))

    async def info(self, request: web.Request) -> web.Response:
        return web.Response(text="Parley's BOSH endpoint: POST XEP-0124 bodies here.\n", headers=self._cors(request))

    def _reply(self, request: web.Request, text: str, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/xml", charset="utf-8",
                            headers=self._cors(request))

    async def post(self, request: web.Request) -> web.Response:
        data = await request.read()
        parsed = self._parse(data)
        if isinstance(parsed, Body) and parsed.sid is None:
            return await self._create(request, parsed, len(data))
        sid = parsed.sid
        holder = self._holder(sid) if sid else None
        if holder is not None:
            text, status = await self._forward(holder, data)
        else:
            text, status = await self._answer_here(parsed, len(data), self.server.http.peer(request).address)
        return self._reply(request, text, status)

    def _parse(self, data: bytes) -> Body | BoshError:
        limits = self.server.config.limits
        try:
            return parse_body(data, limits.max_stanza_size, limits.max_depth)
        except BoshError as exc:
            return exc

    async def _answer_here(self, parsed: Body | BoshError, size: int, client: str) -> tuple[str, int]:
        """The answer (text, HTTP status) to a request of a session of this process, whichever member the
        client sent it to."""
        if isinstance(parsed, BoshError):
            log.info("unreadable BOSH body from %s: %s", client, parsed)
            conn = self.sessions.get(parsed.sid or "")
            if conn is not None:
                conn.end(parsed.condition)  # only the session it names
            return terminal(parsed.condition), LEGACY_STATUS.get(parsed.condition, 400)
        conn = self.sessions.get(parsed.sid or "")
        if conn is None:
            return terminal("item-not-found"), 200
        try:
            rid = parsed.rid()
        except BoshError as exc:
            conn.end(exc.condition)
            return terminal(exc.condition), 200
        return await conn.request(rid, parsed, size), 200

    # --- in a cluster: a session's requests may reach any member ----------------------------------

    def _new_sid(self) -> str:
        """A session id that names the member holding the session, so that any member can pass it on."""
        token = secrets.token_urlsafe(18)
        cluster = self.server.cluster
        return token if cluster is None else f"{cluster.member.encode().hex()}.{token}"

    def _holder(self, sid: str) -> str | None:
        """The other member of the cluster that holds session `sid` (None: this one, or no cluster)."""
        cluster = self.server.cluster
        if cluster is None or "." not in sid:
            return None
        try:
            member = bytes.fromhex(sid.split(".", 1)[0]).decode()
        except ValueError:
            return None
        return None if member == cluster.member else member

    async def _forward(self, member: str, data: bytes) -> tuple[str, int]:
        """Hand a request to the member holding its session and give back its answer, which comes when the
        holder answers the request (a held one as late as the session's 'wait'). A member that is gone no
        longer has the session (item-not-found); one out of reach gets the client to start again."""
        cluster = self.server.cluster
        assert cluster is not None
        if member not in cluster.members():
            return terminal("item-not-found"), 200
        if not cluster.connected or self._stopping:
            return terminal("remote-connection-failed"), 200
        self._ask_id += 1
        ask = self._ask_id
        answer: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        taken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._asks[ask] = (member, answer, taken)
        # latin-1 carries any bytes through JSON unchanged, an invalid UTF-8 body included
        frame = json.dumps({"ask": ask, "data": data.decode("latin-1")})
        deadline = asyncio.get_running_loop().time() + self.limits.max_wait + FORWARD_MARGIN
        try:
            async with asyncio.timeout_at(deadline):
                while not taken.done() and not answer.done():
                    cluster.send(member, self.frame_kind, frame)
                    await asyncio.wait([taken, answer], timeout=TAKEN_TIMEOUT)
                return await answer
        except TimeoutError:
            log.info("BOSH request passed to %s: no answer within %d s", member,
                     self.limits.max_wait + FORWARD_MARGIN)
            return terminal("remote-connection-failed"), 200
        finally:
            self._asks.pop(ask, None)

    async def from_member(self, sender: str, payload: str) -> None:
        """A request another member received for one of our sessions, or the answer to one we passed on."""
        frame = json.loads(payload)
        if "taken" in frame or "answer" in frame:
            asked = self._asks.get(frame.get("taken", frame.get("answer")))
            if asked is not None:
                _, answer, taken = asked
                if not taken.done():
                    taken.set_result(None)
                if "answer" in frame and not answer.done():
                    answer.set_result((frame["text"], frame["status"]))
            return
        key = sender, frame["ask"]
        assert self.server.cluster is not None
        self.server.cluster.send(sender, self.frame_kind, json.dumps({"taken": frame["ask"]}))
        if key in self._serving:
            return  # passed again before our word that we had it arrived
        # Held as long as the session's 'wait': in a task, so that the member's other frames go on meanwhile.
        # Tasks start in the order they are made, so the session sees its requests in the order they came.
        task = asyncio.get_running_loop().create_task(self._serve(sender, frame["ask"], frame["data"]))
        self._serving[key] = task
        task.add_done_callback(lambda _: self._serving.pop(key, None))

    async def _serve(self, sender: str, ask: int, text: str) -> None:
        data = text.encode("latin-1")
        answer, status = await self._answer_here(self._parse(data), len(data), f"member {sender}")
        cluster = self.server.cluster
        assert cluster is not None
        cluster.send(sender, self.frame_kind, json.dumps({"answer": ask, "text": answer, "status": status}))

    def member_lost(self, member: str) -> None:
        """The sessions of a member that is gone went with it: the requests passed to it end them."""
        for held, answer, _ in list(self._asks.values()):
            if held == member and not answer.done():
                answer.set_result((terminal("item-not-found"), 200))

    async def _create(self, request: web.Request, body: Body, size: int) -> web.Response:
        """A session creation request (XEP-0124 7.1, XEP-0206 4)."""
        try:
            rid = body.rid()
            params = Params.negotiate(body, self.limits)
            host = self._host(body.get("to"))
        except BoshError as exc:
            return self._reply(request, terminal(exc.condition))
        sid = self._new_sid()
        peer = self.server.http.peer(request)  # behind a trusted proxy: the client, and TLS at the proxy
        greeting = {"sid": sid, "authid": sid, "from": host.name, **params.attributes(),
                    "secure": "true" if peer.secure else "false",
                    "xmlns:xmpp": XBOSH, "xmpp:version": "1.0", "xmpp:restartlogic": "true"}
        if body.get(XMPP_VERSION) is None:
            greeting.pop("xmpp:restartlogic")
        machine = BoshSession(sid, params, body, greeting, time.monotonic())
        conn = BoshConnection(self, host, sid, machine, peer.address, peer.secure)
        if not conn.admitted():
            return self._reply(request, terminal("policy-violation"))
        self.sessions[sid] = conn
        conn.start(body.get(ns.LANG))
        return self._reply(request, await conn.request(rid, body, size))

    def _host(self, to: str | None) -> Host:
        if not to:
            raise BoshError("improper-addressing", "no 'to'")
        try:
            host = self.server.hosts.get(JID.parse(to).domain)
        except JIDError:
            host = None
        if host is None or self.name not in host.modules:
            raise BoshError("host-unknown", f"{to} is not served here")
        return host


