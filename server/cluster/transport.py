"""How the members of a cluster talk: over Redis, in frames.

Every member has one Redis pub/sub channel, and everything another member tells it (session changes
and stanzas alike) goes through that channel in the order it happened: a session is known to be
available on the other side before any stanza that follows from it arrives. Messages queued in the
same turn of the event loop are sent as one publication, which keeps Redis off the hot path. The frames
whose handling awaits (stanzas to route, other parts' frames) are handled one at a time apart from the
rest, which the receiving loop handles as they come: a lookup that routing waits for is answered meanwhile.

While Redis is out of reach a member serves its own users alone: what is for other members is dropped, their
stanzas bounced with remote-server-timeout, locks are local; when Redis answers again it subscribes again,
publishes its sessions afresh, tells the others to forget what they knew of it, and reads theirs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from xml.etree.ElementTree import Element

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException

from server.config import REDIS_CLUSTER_SCHEMES
from server.jid import JID
from server.router import highest
from server.sessions import Session
from server.stanza import KINDS, Stanza, parse_stored
from server.stream.errors import StanzaError
from server.stream.writer import serialize

if TYPE_CHECKING:
    from server.cluster.core import Cluster
    from server.cluster.directory import ClusterSessions
    from server.server import Server

log = logging.getLogger("parley.cluster")

FRAME, FIELD = "\x01", "\x00"  # neither may occur in XML 1.0, nor unescaped in JSON
STANZA = f"s{FIELD}"  # the start of a frame that carries a stanza for a session
PENDING_IQ_LIMIT = 10000
LOCK_TTL = 10.0  # seconds
# What a call to Redis raises when Redis is out of reach: a Redis Cluster's client may also raise its own
# RedisClusterException (no node reachable while it maps the slots), which is no RedisError.
REDIS_ERRORS = (redis.RedisError, RedisClusterException, OSError)
READ_WAIT = 1.0  # seconds a read of a Redis Cluster's sharded pub/sub waits before it polls again


def is_cluster_url(url: str) -> bool:
    """The URL names a Redis Cluster (redis+cluster://, rediss+cluster://) rather than one Redis."""
    return url.startswith(REDIS_CLUSTER_SCHEMES)


def connect(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio client of the Redis at `url`: one server, or (redis+cluster://, rediss+cluster://) a Redis
    Cluster, whose client learns the other nodes from the one named and sends each command to the shard that
    serves its key's hash slot."""
    if is_cluster_url(url):
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url.replace("+cluster", "", 1), **options)  # type: ignore[return-value]
    return aioredis.from_url(url, **options)


def connect_sync(url: str, **options: Any) -> redis.Redis:
    """`connect`, for the supervisor's check before the workers start."""
    if is_cluster_url(url):
        return redis.RedisCluster.from_url(url.replace("+cluster", "", 1), **options)  # type: ignore[return-value]
    return redis.Redis.from_url(url, **options)


def stopping() -> bool:
    """True once the current task was asked to stop: redis-py may turn the cancellation of a command into a
    connection error, which a loop that rides out Redis errors would otherwise swallow, and never end."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def alive_key(prefix: str, member: str, sharded: bool) -> str:
    """A member's heartbeat key: there while it lives, holding the instance of its process."""
    return f"{prefix}:alive:{tag(member, sharded)}"


def tag(name: str, sharded: bool) -> str:
    """A part of a key name that decides its hash slot on a Redis Cluster (in braces: the keys that carry the same
    one are served by one shard, so a transaction or a script may use them together); as it is on one Redis."""
    return f"{{{name}}}" if sharded else name


def session_state(session: Session) -> str:
    """What the other workers are told of a local session (its watcher is the worker's directory)."""
    shared = session.watcher.shared if session.watcher is not None else ()
    return json.dumps({
        "jid": str(session.jid), "priority": session.priority, "interested": session.interested,
        "presence": serialize(session.presence) if session.presence is not None else None,
        "data": {k: True for k in shared if session.data.get(k)}, "started": session.started,
        "directed": sorted(map(str, session.directed)),
    })


class FallbackLock:
    """The cluster-wide lock of a name, or, while Redis is out of reach, a lock of this process only: what one
    process does for its own users goes on through an outage (the cluster-wide part resumes with Redis)."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self._held: Any = None

    async def __aenter__(self) -> None:
        if self.cluster.connected:
            lock = self.cluster.redis.lock(self.cluster.key(f"lock:{self.name}"), timeout=LOCK_TTL, sleep=0.002,
                                           blocking_timeout=LOCK_TTL)
            try:
                await lock.acquire()
                self._held = lock
                return
            except REDIS_ERRORS as exc:
                self.cluster.disconnected(f"lock {self.name}: {exc}")
        local = self.cluster.local_locks.setdefault(self.name, asyncio.Lock())
        await local.acquire()
        self._held = local

    async def __aexit__(self, *_exc: object) -> None:
        held, self._held = self._held, None
        if isinstance(held, asyncio.Lock):
            held.release()
            if not held.locked() and not held._waiters:  # type: ignore[attr-defined]
                self.cluster.local_locks.pop(self.name, None)
            return
        with contextlib.suppress(*REDIS_ERRORS):  # lapsed or unreachable: it expires by itself
            await held.release()



class Transport:
    """The outgoing queue and the incoming dispatch of `Cluster`, and what it does while Redis is away."""

    member: str
    server: Server
    sessions: ClusterSessions
    connected: bool
    sharded: bool
    _redis: aioredis.Redis | None
    _pubsub: Any
    _out: dict[str, list[str]]
    _members: list[str]
    _handlers: dict[str, Callable[[str, str], Awaitable[None]]]
    _gone: set[str]
    _homing: set[JID]
    _unhomed: set[JID]
    _unwatched: set[JID]
    _later: asyncio.Queue[tuple[str, str | Session]]
    _dirty: dict[JID, Session]
    _wake: asyncio.Event
    _pending_iq: dict[tuple[str, str], str]
    _tasks: list[asyncio.Task[None]]
    _sending: bool

    # --- outgoing ----------------------------------------------------------------------------------

    async def subscribe(self) -> None:
        """A fresh subscription to this member's channel: on a Redis Cluster a shard channel (SSUBSCRIBE), read
        from the shard that serves its slot, so that each publication to it goes to that shard only."""
        assert self._redis is not None
        self._pubsub = self._redis.pubsub()
        if self.sharded:
            await self._pubsub.ssubscribe(self.channel(self.member))
        else:
            await self._pubsub.subscribe(self.channel(self.member))

    def publish(self, pipe: Any, member: str, data: str) -> None:
        """Queue a publication to a member's channel on a pipeline (SPUBLISH on a Redis Cluster: classic PUBLISH
        would be copied to every shard over the cluster bus). Its result is the number of subscribers."""
        if self.sharded:
            pipe.spublish(self.channel(member), data)
        else:
            pipe.publish(self.channel(member), data)

    def _queue(self, member: str, frame: str) -> None:
        frames = self._out.get(member)
        if frames is None:
            return  # not a live member: nothing to tell it
        if not frames:  # otherwise the send loop has been woken already and not yet taken the frames
            self._wake.set()
        frames.append(frame)

    def changed(self, session: Session) -> None:
        """A local session's state changed; its latest state goes out in the place of this first change."""
        if session.jid not in self._dirty:
            self._dirty[session.jid] = session
            self._wake.set()  # its state goes to Redis even with no other member to tell
            for member in self.sessions.homed.get(session.bare, ()):
                self._queue(member, f"u{FIELD}{session.jid}")

    def gone(self, session: Session) -> None:
        self._dirty.pop(session.jid, None)
        self._gone.add(str(session.jid))
        self._wake.set()
        for member in self.sessions.homed.get(session.bare, ()):
            self._queue(member, f"d{FIELD}{session.jid}")

    def forwarder(self, member: str, jid: JID) -> Callable[[str], None]:
        """The output of a session on another member: `_queue` inlined, as this runs once per stanza."""
        prefix = f"s{FIELD}{jid}{FIELD}"
        frames, wake = self._out.setdefault(member, []), self._wake.set

        def forward(data: str) -> None:
            if not frames:
                wake()
            frames.append(prefix + data)

        return forward

    def closer(self, member: str, jid: JID) -> Callable[[str | None], None]:
        return lambda condition: self._queue(member, f"c{FIELD}{jid}{FIELD}{condition or ''}")

    def roster_changed(self, user: JID) -> None:
        for member in self._out:
            self._queue(member, f"i{FIELD}{user}")

    def document_changed(self, store: str, host: str, user: str) -> None:
        for member in self._out:
            self._queue(member, f"k{FIELD}{store}{FIELD}{host}{FIELD}{user}")

    async def _send_loop(self) -> None:
        """One publication per member per turn; session states are read now, at their place in the order."""
        assert self._redis is not None
        while not stopping():
            await self._wake.wait()
            self._wake.clear()
            if not self.connected:
                await self._drop_queued()
                continue
            if self._homing:
                try:
                    await self._register()
                except REDIS_ERRORS as exc:
                    self.disconnected(f"registering sessions in Redis failed: {exc}")
                    continue
            dirty, self._dirty = self._dirty, {}
            states = {str(jid): session_state(s) for jid, s in dirty.items() if not s.ended}
            pipe = self._redis.pipeline(transaction=False)
            batches: list[tuple[str, list[str]]] = []
            for member, frames in self._out.items():
                if frames:
                    if dirty:
                        frames[:] = [_resolve(frame, states) for frame in frames]
                    self.publish(pipe, member, f"{self.member}{FRAME}{FRAME.join(frames)}")
                    batches.append((member, list(frames)))
                    frames.clear()
            for jid, state in states.items():
                pipe.hset(self.sessions_key(self.member), jid, state)
            gone, self._gone = self._gone - states.keys(), set()
            if gone:
                pipe.hdel(self.sessions_key(self.member), *gone)
            for bare in self._unhomed - self.sessions.homed.keys():
                pipe.srem(self.where_key(bare), self.member)
            for bare in self._unwatched - self.sessions.known.keys() - self.sessions.watching.keys():
                pipe.srem(self.watch_key(bare), self.member)
                pipe.srem(self.watching_key(self.member), str(bare))
            self._unhomed, self._unwatched = set(), set()
            self._sending = True
            try:
                results = await pipe.execute()
            except REDIS_ERRORS as exc:
                self.disconnected(f"publishing to Redis failed: {exc}")
                for _, frames in batches:
                    await self._bounce(frames)
                continue
            finally:
                self._sending = False
            for (member, frames), listeners in zip(batches, results, strict=False):
                if listeners == 0:  # nobody reads its channel: it died, before its heartbeat could lapse
                    await self._unheard(member, frames)

    async def _unheard(self, member: str, frames: list[str]) -> None:
        """Frames that reached no one: the member is lost, and the stanzas for it are routed as if it had found
        their sessions gone (messages to the user's other resources or offline storage)."""
        if member in self._members:
            self._members = [m for m in self._members if m != member]
            self._member_lost(member)
        for frame in frames:
            kind, _, rest = frame.partition(FIELD)
            try:
                if kind == "s":
                    jid, _, data = rest.partition(FIELD)
                    el = parse_stored(data)
                    await self._undeliverable(Stanza(el, KINDS[el.tag], JID.parse(el.get("from") or ""),
                                                     JID.parse(jid)))
                elif kind == "r":
                    await self.server.router.route(_stanza(rest))
            except Exception:
                log.exception("cluster: could not reroute %r for lost member %s", frame[:200], member)

    async def _drop_queued(self) -> None:
        """While Redis is out of reach: what was for other members goes nowhere; their stanzas bounce."""
        self._dirty.clear()
        self._gone.clear()
        self._unwatched.clear()
        for frames in self._out.values():
            taken = list(frames)
            frames.clear()
            await self._bounce(taken)

    async def _bounce(self, frames: list[str]) -> None:
        for frame in frames:
            kind, _, rest = frame.partition(FIELD)
            if kind == "s":
                st = _stanza(rest.partition(FIELD)[2])
            elif kind == "r":
                st = _stanza(rest)
            else:
                continue
            if st.kind != "presence" and (st.kind != "iq" or st.type in ("get", "set")):
                try:
                    await self.server.router.bounce(st, StanzaError("remote-server-timeout"))
                except Exception:
                    log.exception("cluster: could not bounce %r", frame[:200])

    # --- incoming ----------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            try:
                if self.sharded:
                    message = await self._pubsub.get_sharded_message(ignore_subscribe_messages=True,
                                                                     timeout=READ_WAIT)
                else:
                    message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            except REDIS_ERRORS as exc:
                self.disconnected(f"reading from Redis failed: {exc}")
                return
            if message is None:
                continue
            frames = message["data"].decode().split(FRAME)
            sender = frames[0]
            for frame in frames[1:]:
                try:
                    if (not frame.startswith(STANZA) or not self._deliver(sender, frame)) and \
                            not self._handle(sender, frame):
                        self._later.put_nowait((sender, frame))
                except Exception:
                    log.exception("cluster: could not handle %r from %s", frame[:200], sender)

    async def _dispatch_loop(self) -> None:
        """The frames whose handling awaits (stanzas to route, the other parts' frames), one at a time in their
        order: apart from the receiving loop, which must go on reading the answers their lookups may wait for."""
        while True:
            sender, frame = await self._later.get()
            try:
                if isinstance(frame, Session):
                    # What this member's users told the user's other member (a probe answered, a broadcast)
                    # came from this member's sessions as known there, which may predate theirs becoming
                    # available.
                    await frame.host.hooks.fire_all("session/available-elsewhere", frame)
                else:
                    await self._dispatch(sender, frame)
            except Exception:
                log.exception("cluster: could not handle %r from %s", str(frame)[:200], sender)

    def _deliver(self, sender: str, frame: str) -> bool:
        """A stanza for a session of this member, handed over at once as the sender serialized it (parsed
        only for an iq, whose answer may have to go back, or for a session that holds stanzas back);
        False when that session has gone."""
        _, jid_text, data = frame.split(FIELD, 2)
        session = self.sessions.local.get(jid_text)
        if session is None:
            return False
        if data.startswith("<iq") or session.hold is not None:
            el = parse_stored(data)
            if el.get("type") in ("get", "set") and el.tag.endswith("}iq"):
                self._expect_answer(sender, el)
            session.send_raw(data, el)
        else:
            session.send_raw(data)
        return True

    async def _dispatch(self, sender: str, frame: str) -> None:
        kind, _, rest = frame.partition(FIELD)
        if kind == "s":
            jid, _, data = rest.partition(FIELD)
            el = parse_stored(data)
            await self._undeliverable(Stanza(el, KINDS[el.tag], JID.parse(el.get("from") or ""), JID.parse(jid)))
        elif kind == "r":
            await self.server.router.route(_stanza(rest))
        elif (handler := self._handlers.get(kind)) is not None:
            await handler(sender, rest)
        else:
            log.warning("cluster: frame of unknown kind %r from %s", kind, sender)

    def _handle(self, sender: str, frame: str) -> bool:
        """A frame of the cluster's own that needs no waiting, handled as it arrives; False for the others."""
        kind, _, rest = frame.partition(FIELD)
        if kind == "u":
            if sender not in self._out:  # a member that started since the last heartbeat
                self._members = sorted({*self._members, sender})
                self._member_up(sender)
            state = json.loads(rest)
            bare = JID.parse(state["jid"]).bare
            if not self.sessions.watches(bare):
                self._queue(sender, f"n{FIELD}{bare}")  # forgotten here: no more news of it
                return True
            available = self.sessions.put_remote(sender, state)
            if available is not None:
                self._later.put_nowait((sender, available))
        elif kind == "d":
            self.sessions.drop_remote(sender, JID.parse(rest))
        elif kind == "w":  # a member watches an account: its sessions here, then the end of the answer
            bare = JID.parse(rest)
            watchers = self.sessions.homed.get(bare)
            if watchers is not None:
                watchers.add(sender)
                self._tell(sender, bare)
            self._queue(sender, f"W{FIELD}{bare}")
        elif kind == "W":
            self.sessions.answered(sender, JID.parse(rest))
        elif kind == "n":
            self.sessions.homed.get(JID.parse(rest), set()).discard(sender)
        elif kind == "x":  # a member (re)started or reconnected: what was known of its sessions is stale
            self.sessions.drop_member(sender)
            if rest:
                self.incarnation(sender, rest, True)
            if sender not in self._out:
                self._members = sorted({*self._members, sender})
                self._member_up(sender)
        elif kind in ("b", "l"):  # goodbye: the member stopped; or another found it lost
            lost = sender if kind == "b" else rest
            if lost in self._members:
                self._members = [m for m in self._members if m != lost]
                self._member_lost(lost)
        elif kind == "c":
            text, _, condition = rest.partition(FIELD)
            jid = JID.parse(text)
            session = self.sessions.get(jid)
            if session is not None and jid not in self.sessions.remote:
                session.close(condition or None)
        elif kind == "i":
            self.forget_roster(JID.parse(rest))
        elif kind == "k":
            self.server.storage.kv.forget_cached(*rest.split(FIELD))
        else:
            return False
        return True

    def _expect_answer(self, sender: str, el: Element) -> None:
        """A query from a server or account address on another member: its answer must go back there."""
        asker = el.get("from") or ""
        if "/" not in asker and el.get("id"):
            if len(self._pending_iq) >= PENDING_IQ_LIMIT:
                del self._pending_iq[next(iter(self._pending_iq))]
            self._pending_iq[(el.get("to") or "", el.get("id") or "")] = sender

    def answer_elsewhere(self, st: Stanza) -> bool | None:
        """An answer from a client of this member to a query another member sent: route it there."""
        member = self._pending_iq.pop((str(st.from_), st.id or ""), None)
        if member is None:
            return None
        self._queue(member, f"r{FIELD}{serialize(st.el)}")
        return True

    async def _undeliverable(self, st: Stanza) -> None:
        """A stanza forwarded to a session that was gone, or to a member that was lost. A message has been
        delivered once already, where its sender's member chose that session ('message/deliver': the
        recipient's archive took it, carbons copied it): like what a local session that ended never got, it
        goes on to the user's other resources or to offline storage, without being delivered (and archived)
        again."""
        router = self.server.router
        host = self.server.hosts.get(st.to.domain)
        if host is None:
            return
        mtype = st.type or "normal"
        if st.kind == "message" and mtype not in ("error", "groupchat"):
            candidates = router.candidates(st.to.bare)
            sessions = candidates if mtype == "headline" else highest(candidates)
            if sessions or mtype != "headline":
                await router.hand_on(host, st, sessions)
        elif st.kind == "iq" and st.type in ("get", "set"):
            await router.bounce(st, StanzaError("service-unavailable"))

    def forget_roster(self, user: JID) -> None:
        """Another member changed the user's roster, or the user's last session elsewhere ended: what this
        member cached of it is stale ('roster/stale' on the user's host)."""
        host = self.server.hosts.get(user.domain)
        if host is not None:
            host.hooks.notify("roster/stale", user)



def _resolve(frame: str, states: dict[str, str]) -> str:
    """A state placeholder becomes the session's state as of now; a session that ended sends nothing."""
    if not frame.startswith(f"u{FIELD}"):
        return frame
    state = states.get(frame[2:])
    return f"u{FIELD}{state}" if state is not None else f"d{FIELD}{frame[2:]}"


def _stanza(xml: str) -> Stanza:
    el = parse_stored(xml)
    to = el.get("to")
    return Stanza(el, KINDS[el.tag], JID.parse(el.get("from") or ""), JID.parse(to) if to else None)
