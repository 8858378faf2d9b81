"""XEP-0198 Stream Management for clients: acks both ways, and sessions that survive a dropped connection.

After <enable/> every stanza written to the session is counted and kept until the client acknowledges it
(one <r/> outstanding at a time, sent behind the first unacknowledged stanza), and every stanza the
client sends is counted for our <a h/>. Stanzas that CSI holds back count only when they are written.

With resume='true', a connection that drops without a closing </stream:stream> leaves the session
DETACHED (`session.detached`): it stays registered and available, so contacts see no change and stanzas
routed to it wait in its queue. For each one queued while detached, the host event 'sm/queued'
(session, element) is fired with `hooks.fire` in a task of its own (so handlers may be coroutines; their
result is ignored), which is how push notifications learn that a phone needs waking. A client that
authenticates again and sends <resume previd h/> within 'resume_timeout' seconds gets the session back
on its new connection, with everything it had not acknowledged sent again exactly once. Otherwise, when
the timeout passes, the queue outgrows 'max_queue', or the session is replaced, it ends as any other.

When a managed session ends, what the client never acknowledged is not lost: it goes, oldest first, to
the session's `undelivered` stanzas, which the server hands to the offline module when the session ends
(chat and normal messages to another resource or back to offline storage, in their order, iq requests
refused). A message that another resource already got (a message to the bare JID given to several
resources, or copied by carbons) is not among them. A client that tries to resume a session that has
ended gets <failed h/> with the count of its stanzas the server handled (XEP-0198 section 5), as long
as the server remembers the session (the last `ENDED_KEPT` ended sessions).

In a cluster a client may come back on another member (node or worker) than the one that kept its session:
the resumption id names the member that issued it, and the member the client came back to asks that one
(frame kind "sm/HOST") for the session. The owner hands over the session's shared state (presence, priority,
roster interest, directed presence, the shared state of the modules) with its counters and unacknowledged
queue and drops it without ending it; the new member carries it on. The old owner remembers where the
session went, so that a later resumption elsewhere finds it there.

The session's `room` tells a long sender (offline delivery) how many stanzas the queue can take before
it holds half of 'max_queue', asking the client for an acknowledgement when it is full, so that a backlog
goes in pages as the client acknowledges them and never overflows the queue.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
from collections import OrderedDict
from typing import TYPE_CHECKING
from weakref import WeakSet
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.jid import JID
from server.module import Module
from server.options import Option
from server.sessions import Session
from server.stanza import Stanza, parse_stored
from server.stream.errors import StreamError
from server.stream.sm import (
    ACK,
    ENABLE,
    ENABLED,
    FEATURE,
    REQUEST,
    RESUME,
    RESUMED,
    SM,
    HandledCountTooHigh,
    StreamManagement,
    ack_element,
    failed,
    parse_h,
    request_element,
)
from server.stream.writer import serialize

if TYPE_CHECKING:
    from server.c2s import C2SConnection

NAME = "stream_management"
REQUEST_XML = serialize(request_element())
RESUME_TIMEOUT = 300.0
MAX_QUEUE = 500
ENDED_KEPT = 10_000  # ended resumable sessions whose 'h' a failed resumption is told
MOVED_KEPT = 10_000  # sessions handed over to another member, remembered so that their next resumption finds them
ASK_TIMEOUT = 5.0  # seconds a member waits for another to hand over a session
MEMBER_MARK = "~"  # between a resumption id's random part and the member that issued it (never in either)


class Managed:
    """Stream management of one session: its counters and queue, and the connection carrying it, if any."""

    def __init__(self, module: StreamManagementModule, session: Session, conn: C2SConnection,
                 resume_id: str | None, timeout: float) -> None:
        self.module = module
        self.session = session
        self.conn: C2SConnection | None = conn
        self.id = resume_id
        self.timeout = timeout
        self.state: StreamManagement[tuple[str, Element | None]] = StreamManagement()
        self.requested = False  # an <r/> is out and not answered yet
        self.timer: asyncio.TimerHandle | None = None
        self.shared: WeakSet[Element] = WeakSet()  # messages that other resources of the account got too
        self.changed = asyncio.Event()  # set when the client acknowledges, resumes, or the session ends

    def outbox(self, data: str, el: Element | None) -> None:
        self.state.sent((data, el))
        if len(self.state) > self.module.max_queue:
            self.module.log.info("%s: more than %d unacknowledged stanzas", self.session.jid, self.module.max_queue)
            self.close("resource-constraint")
        elif self.session.detached:
            self.module.queued(self.session, el if el is not None else parse_stored(data))
        else:
            self.session.transmit(data)
            if not self.requested:
                self.requested = True
                self.session.transmit(REQUEST_XML)

    async def room(self, wait: bool) -> int:
        """How many more stanzas the queue can take before it holds half of 'max_queue' (the other half is
        for live traffic), once it can take any and the client is connected if `wait`; 0 when it cannot
        (now, or at all since the session is closed). Asks the client for an acknowledgement when full."""
        limit = max(1, self.module.max_queue // 2)
        while not self.session.closed:
            free = limit - len(self.state)
            if free > 0 and not self.session.detached:
                return free
            if not self.session.detached and not self.requested:
                self.requested = True
                self.session.transmit(REQUEST_XML)
            if not wait:
                break
            self.changed.clear()
            await self.changed.wait()
        return 0

    def hibernate(self) -> bool:
        self.conn = None
        self.session.detached = True
        self.timer = asyncio.get_running_loop().call_later(self.timeout, self.expire)
        self.module.log.info("%s detached; resumable for %g s", self.session.jid, self.timeout)
        return True

    def expire(self) -> None:
        self.module.log.info("%s was not resumed in time", self.session.jid)
        self.close(None)

    def close(self, condition: str | None) -> None:
        """The session's way to its connection's close; a detached session just ends."""
        if self.conn is not None:
            self.conn.close_session(condition)
        elif not self.session.closed:
            # Out of the registry at once, so that nothing more is routed to a session that is going.
            self.session.closed = True
            self.module.server.sessions.remove(self.session)
            self.module.server.end_session_soon(self.session)

    def resume_on(self, conn: C2SConnection) -> Element:
        """Carry the session on `conn`; the <resumed/> to send, before `replay`."""
        old, self.conn = self.conn, conn
        if old is not None:
            old.session = None  # its end no longer concerns the session
            old.stream_error(StreamError("conflict", "the session was resumed on another connection"))
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        session = self.session
        conn.take_session(session)
        session.attach(conn.write, self.close)
        session.detached = False
        session.remote_ip = conn.remote_ip
        return Element(RESUMED, {"previd": self.id or "", "h": str(self.state.handled)})

    def replay(self) -> None:
        """Send again what the client had not acknowledged, once it was told of the resumption."""
        session = self.session
        pending = self.state.unacked
        for data, _ in pending:
            session.transmit(data)
        self.requested = bool(pending)
        if pending:
            session.transmit(REQUEST_XML)
        self.changed.set()


class StreamManagementModule(Module):
    name = NAME
    options = (
        Option("resume_timeout", float, RESUME_TIMEOUT,
               "seconds a client that lost its connection may resume its session", minimum=0),
        Option("max_queue", int, MAX_QUEUE, "stanzas kept unacknowledged for a session before it is ended",
               minimum=1),
    )

    def setup(self) -> None:
        self.resume_timeout = self.option("resume_timeout")
        self.max_queue = self.option("max_queue")
        self._resumable: dict[str, Managed] = {}
        self._ended: OrderedDict[str, tuple[JID, int]] = OrderedDict()  # resumption id -> (account, our 'h')
        self._moved: OrderedDict[str, str] = OrderedDict()  # resumption id -> member the session went to
        self._asks: dict[str, asyncio.Future[dict[str, object]]] = {}  # our requests to other members
        cluster = self.server.cluster
        if cluster is not None:
            cluster.on(f"sm/{self.host.name}", self.from_member)
        self.hook("c2s/features", self.features)
        self.hook("c2s/element", self.element)
        self.hook("sasl2/features", self.sasl2_features)
        self.hook("bind2/features", self.bind2_features)
        self.hook("sasl2/inline", self.sasl2_inline)
        self.hook("bind2/inline", self.bind2_inline)
        self.hook("c2s/handled", self.handled)
        self.hook("message/deliver", self.delivering, priority=-5)  # after carbons, which names its copies
        self.hook("session/closed", self.session_closed)

    async def stop(self) -> None:
        for managed in self._resumable.values():
            if managed.timer is not None:
                managed.timer.cancel()

    def features(self, conn: C2SConnection, features: Element, stage: str) -> None:
        if stage == "post-auth":
            SubElement(features, FEATURE)

    def sasl2_features(self, conn: C2SConnection, inline: Element) -> None:
        SubElement(inline, FEATURE)  # <resume/> inline in SASL2's <authenticate/> (XEP-0198 section 5)

    def bind2_features(self, conn: C2SConnection, inline: Element) -> None:
        SubElement(inline, ns.qname(ns.BIND2, "feature"), {"var": SM})

    async def sasl2_inline(self, conn: C2SConnection, el: Element) -> Element | None:
        """<resume/> in <authenticate/>: its answer goes into the <success/>, the replay after it."""
        if el.tag != RESUME:
            return None
        answer, managed = await self.resume(conn, el)
        if managed is not None:
            conn.after_success.append(managed.replay)
        return answer

    def bind2_inline(self, conn: C2SConnection, el: Element) -> Element | None:
        return self.enable(conn, el) if el.tag == ENABLE else None

    async def element(self, conn: C2SConnection, el: Element) -> bool | None:
        if el.tag == ENABLE:
            conn.send(self.enable(conn, el))
        elif el.tag == RESUME:
            answer, managed = await self.resume(conn, el)
            conn.send(answer)
            if managed is not None:
                managed.replay()
        else:
            managed = conn.session.data.get(NAME) if conn.session is not None else None
            if not isinstance(managed, Managed) or el.tag not in (ACK, REQUEST):
                return None
            if el.tag == REQUEST:
                conn.send(ack_element(managed.state.handled))
            else:
                self.acknowledged(managed, el)
        return True

    def handled(self, session: Session) -> None:
        managed = session.data.get(NAME)
        if isinstance(managed, Managed):
            managed.state.received()

    # --- enabling and resuming --------------------------------------------------------------------

    def enable(self, conn: C2SConnection, el: Element) -> Element:
        """Manage the connection's session; the <enabled/> (or <failed/>) to send."""
        session = conn.session
        if session is None or NAME in session.data:
            # XEP-0198 3: after authentication and resource binding, and only once.
            return failed("not-authorized" if conn.username is None else "unexpected-request")
        resumable = el.get("resume") in ("true", "1")
        timeout = self.resume_timeout
        wanted = el.get("max") or ""
        if wanted.isdigit():
            timeout = min(timeout, float(wanted))
        managed = Managed(self, session, conn, self.new_id() if resumable else None, timeout)
        session.data[NAME] = managed
        session.attach(conn.write, managed.close)
        session.outbox = managed.outbox
        session.room = managed.room
        enabled = Element(ENABLED)
        if managed.id is not None:
            self._resumable[managed.id] = managed
            session.hibernate = managed.hibernate
            enabled.attrib.update({"id": managed.id, "resume": "true", "max": str(math.ceil(timeout))})
        return enabled

    def new_id(self) -> str:
        """A resumption id; in a cluster it names this member, which the client may come back to elsewhere."""
        token = secrets.token_urlsafe(18)
        cluster = self.server.cluster
        return token if cluster is None else f"{token}{MEMBER_MARK}{cluster.member}"

    async def resume(self, conn: C2SConnection, el: Element) -> tuple[Element, Managed | None]:
        """The <resumed/> and the session to replay once it is sent, or the <failed/> and None."""
        if conn.username is None or conn.session is not None:
            # XEP-0198 5: after authentication, instead of resource binding.
            return failed("not-authorized" if conn.username is None else "unexpected-request"), None
        previd = el.get("previd") or ""
        account = JID.make(conn.username, conn.host.name)
        managed = self._resumable.get(previd)
        if managed is None and previd not in self._ended:
            taken = await self.take_from_elsewhere(conn, previd, account)
            if isinstance(taken, Element):
                return taken, None
            managed = taken
        if managed is None or managed.session.closed or managed.session.bare != account:
            return failed("item-not-found", self._last_h(previd, account)), None
        try:
            h = parse_h(el.get("h"))
        except ValueError:
            return failed("bad-request"), None
        try:
            managed.state.acknowledge(h)
        except HandledCountTooHigh:
            managed.close(None)  # the client lost track; what it did not get goes elsewhere
            raise
        self.log.info("%s resumed from %s", managed.session.jid, conn.remote_ip)
        return managed.resume_on(conn), managed

    def acknowledged(self, managed: Managed, el: Element) -> None:
        try:
            h = parse_h(el.get("h"))
        except ValueError as exc:
            raise StreamError("invalid-xml", str(exc)) from None
        managed.state.acknowledge(h)
        managed.requested = False
        managed.changed.set()

    def _last_h(self, previd: str, account: JID) -> int | None:
        """Our 'h' of the account's session `previd` that cannot be resumed, if it is still known."""
        managed = self._resumable.get(previd)
        if managed is not None and managed.session.bare == account:
            return managed.state.handled
        ended = self._ended.get(previd)
        return ended[1] if ended is not None and ended[0] == account else None

    # --- resumption on another member of a cluster ----------------------------------------------------

    async def take_from_elsewhere(self, conn: C2SConnection, previd: str,
                                  account: JID) -> Managed | Element | None:
        """The session `previd` taken over from the member that holds it (the one that issued the id, or where
        that one says it went); a <failed/> when the owner knows it ended; None when no member has it."""
        cluster = self.server.cluster
        owner = self._moved.get(previd) or (previd.rpartition(MEMBER_MARK)[2] if MEMBER_MARK in previd else "")
        for _ in range(3):  # the member that issued the id, then where it says the session went
            if cluster is None or owner == cluster.member or owner not in cluster.members():
                return None
            ask = secrets.token_hex(8)
            answer = self._asks[ask] = asyncio.get_running_loop().create_future()
            cluster.send(owner, f"sm/{self.host.name}", json.dumps(
                {"op": "take", "ask": ask, "id": previd, "account": str(account)}))
            try:
                given = await asyncio.wait_for(answer, ASK_TIMEOUT)
            except TimeoutError:
                self.log.warning("%s: %s did not answer for session %s", account, owner, previd)
                return None
            finally:
                self._asks.pop(ask, None)
            if given.get("moved"):
                owner = str(given["moved"])
                continue
            if not given.get("state"):
                h = given.get("h")
                return failed("item-not-found", h if isinstance(h, int) else None)
            if conn.closing:
                return None  # the client went while we asked: what was handed over goes to offline storage
            return self.carry_on(conn, previd, given)
        return None

    def carry_on(self, conn: C2SConnection, previd: str, given: dict[str, object]) -> Managed:
        """A session handed over by another member, bound on `conn` as it was there."""
        state = given["state"]
        assert isinstance(state, dict)
        jid = JID.parse(state["jid"])
        sessions = self.server.sessions
        existing = sessions.get(jid)
        if existing is not None:  # a session that bound the resource meanwhile: the resumed one wins
            sessions.remove(existing)
            existing.close("conflict")
        session = Session(jid, self.host, conn.write, conn.close_session, conn.remote_ip)
        session.started = state["started"]
        session.priority = state["priority"]
        session.interested = state["interested"]
        session.presence = parse_stored(state["presence"]) if state["presence"] else None
        for target in state["directed"]:
            session.directed.add(JID.parse(target))
        for name, value in state["data"].items():
            session.data[name] = value
        managed = Managed(self, session, conn, previd, float(given["timeout"]))  # type: ignore[arg-type]
        managed.conn = None  # `resume_on` carries it on `conn`
        counters = given["counters"]
        assert isinstance(counters, list)
        managed.state.handled, managed.state.send_count, managed.state.acknowledged = counters
        for data in given["unacked"]:  # type: ignore[attr-defined]
            managed.state._unacked.append((data, None))
        session.data[NAME] = managed
        session.outbox = managed.outbox
        session.room = managed.room
        session.hibernate = managed.hibernate
        self._resumable[previd] = managed
        self._moved.pop(previd, None)  # back where it was once: it is here now
        session.detached = True  # until `resume_on` carries it on `conn`
        sessions.add(session)
        self.log.info("%s taken over from another member", jid)
        return managed

    async def from_member(self, sender: str, payload: str) -> None:
        """A frame of another member: a request for one of our sessions, or the answer to ours."""
        request = json.loads(payload)
        if request["op"] == "answer":
            answer = self._asks.get(request["ask"])
            if answer is not None and not answer.done():
                answer.set_result(request)
            return
        reply: dict[str, object] = {"op": "answer", "ask": request["ask"]}
        reply.update(self.hand_over(request["id"], JID.parse(request["account"]), sender))
        assert self.server.cluster is not None
        self.server.cluster.send(sender, f"sm/{self.host.name}", json.dumps(reply))

    def hand_over(self, previd: str, account: JID, to: str) -> dict[str, object]:
        """Give the session `previd` to member `to`: its state, counters and unacknowledged queue; it leaves
        this member without ending (contacts and rooms see no change). Where it went, if it moved on."""
        if previd in self._moved:
            return {"moved": self._moved[previd]}
        managed = self._resumable.get(previd)
        if managed is None or managed.session.closed or managed.session.bare != account:
            return {"h": self._last_h(previd, account)}
        session = managed.session
        if managed.conn is not None:  # the client came back elsewhere before this member saw it go
            old, managed.conn = managed.conn, None
            old.session = None
            old.stream_error(StreamError("conflict", "the session was resumed on another member of the cluster"))
        if managed.timer is not None:
            managed.timer.cancel()
        del self._resumable[previd]
        self._moved[previd] = to
        while len(self._moved) > MOVED_KEPT:
            self._moved.popitem(last=False)
        state = {"jid": str(session.jid), "priority": session.priority, "interested": session.interested,
                 "presence": serialize(session.presence) if session.presence is not None else None,
                 "directed": sorted(map(str, session.directed)), "started": session.started,
                 "data": {name: True for name in self.server.sessions.shared  # type: ignore[attr-defined]
                          if session.data.get(name)}}
        unacked = [data for data, _ in managed.state.unacked]
        counters = [managed.state.handled, managed.state.send_count, managed.state.acknowledged]
        session.outbox = session.hibernate = session.room = None
        session.closed = session.ended = True  # gone from here, without 'session/closed': it lives on elsewhere
        self.server.sessions.remove(session)
        self.log.info("%s handed over to %s", session.jid, to)
        return {"state": state, "counters": counters, "unacked": unacked, "timeout": managed.timeout}

    # --- detached sessions ------------------------------------------------------------------------

    def queued(self, session: Session, el: Element) -> None:
        self.spawn(self._notify_queued(session, el))

    async def _notify_queued(self, session: Session, el: Element) -> None:
        try:
            await self.host.hooks.fire("sm/queued", session, el)
        except Exception:
            self.log.exception("sm/queued handler failed for %s", session.jid)

    def delivering(self, stanza: Stanza, sessions: list[Session]) -> None:
        """Remember which messages a managed session shares with other sessions of the account (the router
        chose several, or a module copied it to others), which need no handing on if it loses them."""
        if len(sessions) < 2 and not stanza.copies:
            return
        for session in sessions:
            managed = session.data.get(NAME)
            if isinstance(managed, Managed):
                managed.shared.add(stanza.el)

    async def session_closed(self, session: Session) -> None:
        managed = session.data.get(NAME)
        if not isinstance(managed, Managed):
            return
        if managed.timer is not None:
            managed.timer.cancel()
        if managed.id is not None:
            self._resumable.pop(managed.id, None)
            self._ended[managed.id] = (session.bare, managed.state.handled)
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)
        session.outbox = session.hibernate = session.room = None
        managed.changed.set()
        stanzas = [el if el is not None else parse_stored(data) for data, el in managed.state.take_unacked()]
        stanzas += session.undelivered
        session.undelivered.clear()
        session.undelivered.extend(el for el in stanzas if el not in managed.shared)
