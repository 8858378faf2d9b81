"""Several worker processes sharing the listening ports, routing to each other's sessions over Redis.

Each worker's session directory (`ClusterSessions`, chosen when the server is composed) keeps its own
sessions and a mirror of the other workers' sessions. A session on another worker is an ordinary `Session`
in the directory whose output goes to Redis instead of a socket, so the router, presence, roster pushes and
carbons choose among all of a user's resources unchanged. Workers tell each other about their sessions
(bound, priority and presence, roster interest, directed presence, the per-session state of the modules
that declare it shared with `Module.shared_session_state`, closed) as those change, and forward stanzas to
the worker holding the session.

Every worker has one Redis pub/sub channel, and everything another worker tells it (session changes
and stanzas alike) goes through that channel in the order it happened: a session is known to be
available on the other side before any stanza that follows from it arrives. Messages queued in the
same turn of the event loop are sent as one publication, which keeps Redis off the hot path.

Services that keep state in memory (group chat, publish-subscribe) run on worker 0; the others forward
what is addressed to them. What a worker caches of data any worker may change (rosters, blocklists,
archive preferences) is dropped on the others when one changes it: the roster module announces its
changes ('roster/changed') and hears of the others' ('roster/stale'), the key-value store tells of the
cached documents set through it (`KeyValueStore.watch_cached`, `forget_cached`).
Each worker also keeps its sessions in a Redis hash that a starting worker reads, and refreshes a
heartbeat key; the sessions of a worker whose heartbeat lapsed are forgotten (and announced again should
it only have stalled). A worker started in place of a dead one ends the sessions that one left, so that
contacts and rooms see them go.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from xml.etree.ElementTree import Element

import redis
import redis.asyncio as aioredis

from server.config import ConfigError
from server.jid import JID
from server.registry import resolve
from server.sessions import Session, SessionRegistry
from server.stanza import KINDS, Stanza, parse_stored
from server.stream.errors import StanzaError
from server.stream.writer import serialize

if TYPE_CHECKING:
    from server.config import ClusterConfig, Config
    from server.server import Server

log = logging.getLogger("parley.cluster")

SERVICE_WORKER = 0  # where group chat and publish-subscribe keep their state
HEARTBEAT = 2.0  # seconds between heartbeats
HEARTBEAT_TTL = 6  # seconds without a heartbeat after which a worker's sessions are forgotten
FRAME, FIELD = "\x01", "\x00"  # neither may occur in XML 1.0, nor unescaped in JSON
PENDING_IQ_LIMIT = 10000
LOCK_TTL = 10.0  # seconds


def session_state(session: Session) -> str:
    """What the other workers are told of a local session (its watcher is the worker's directory)."""
    shared = session.watcher.shared if session.watcher is not None else ()
    return json.dumps({
        "jid": str(session.jid), "priority": session.priority, "interested": session.interested,
        "presence": serialize(session.presence) if session.presence is not None else None,
        "data": {k: True for k in shared if session.data.get(k)}, "started": session.started,
        "directed": sorted(map(str, session.directed)),
    })


def shared_session_state(config: Config) -> frozenset[str]:
    """The modules, among those configured on any host, that declare their per-session state shared."""
    return frozenset(cls.name for host in config.hosts.values() for cls in resolve(host.modules)
                     if cls.shared_session_state)


class ClusterSessions(SessionRegistry):
    """The session directory of a worker: its own sessions plus the mirror of the other workers' sessions.

    It watches its own sessions: as their shared state changes, the cluster tells the other workers. It is
    chosen when the server is composed, and the `Cluster` made for that server connects to it.
    """

    cluster: Cluster  # set by the Cluster of this worker

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.shared = shared_session_state(config)
        self.remote: dict[JID, tuple[int, Session]] = {}
        # This worker's own sessions by full JID text: a stanza from another worker finds its session with
        # one lookup of the text it came with, without making a JID of it.
        self.local: dict[str, Session] = {}

    def add(self, session: Session) -> None:
        session.watcher = self
        super().add(session)
        self.local[str(session.jid)] = session
        self.changed(session)

    def changed(self, session: Session) -> None:
        self.cluster.changed(session)

    def remove(self, session: Session) -> None:
        entry = self.remote.get(session.jid)
        if entry is not None and entry[1] is session:
            del self.remote[session.jid]  # replaced by a local login (c2s closes it on its worker)
        elif self.get(session.jid) is session:
            self.cluster.gone(session)
        if self.local.get(str(session.jid)) is session:
            del self.local[str(session.jid)]
        super().remove(session)

    def all(self) -> list[Session]:
        """Sessions connected to this worker: the ones it ends when it stops."""
        return list(self.local.values())

    def put_remote(self, worker: int, state: dict[str, Any]) -> None:
        jid = JID.parse(state["jid"])
        host = self.cluster.server.hosts.get(jid.domain)
        current = self.get(jid)
        if host is None or (current is not None and self.remote.get(jid, (None, None))[1] is not current):
            return  # a local session holds that resource: ours wins, the other worker is closing it
        entry = self.remote.get(jid)
        if entry is None or entry[0] != worker:
            session = Session(jid, host, self.cluster.forwarder(worker, jid),
                              self.cluster.closer(worker, jid))
            self.remote[jid] = (worker, session)
            super().add(session)
        else:
            session = entry[1]
        session.priority = state["priority"]
        session.interested = state["interested"]
        session.presence = parse_stored(state["presence"]) if state["presence"] else None
        session.data = dict(state["data"])
        session.started = state["started"]

    def drop_remote(self, worker: int, jid: JID) -> None:
        entry = self.remote.get(jid)
        if entry is None or entry[0] != worker:
            return
        del self.remote[jid]
        entry[1].closed = entry[1].ended = True
        super().remove(entry[1])
        if not self.of(jid.bare):
            self.cluster.forget_roster(jid.bare)

    def drop_worker(self, worker: int) -> None:
        for jid in [jid for jid, (w, _) in self.remote.items() if w == worker]:
            self.drop_remote(worker, jid)


class PinnedServices(dict[str, Callable[[Stanza], Awaitable[None]]]):
    """server.services on a worker other than the service worker: every service is a forwarder to it."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__()
        self.cluster = cluster

    def __setitem__(self, domain: str, handler: Callable[[Stanza], Awaitable[None]]) -> None:
        super().__setitem__(domain, self.cluster.to_service)


class Cluster:
    """This worker's side of the cluster: Redis connections, the outgoing queue and the incoming dispatch."""

    def __init__(self, server: Server, index: int, config: ClusterConfig) -> None:
        self.server = server
        self.index = index
        self.workers = config.workers
        self.url = config.redis_url
        self.prefix = config.prefix
        if not isinstance(server.sessions, ClusterSessions):
            raise TypeError("a worker's server needs the cluster's session directory: compose it with [cluster]")
        self.sessions = server.sessions
        self.sessions.cluster = self
        server.cluster = self
        if index != SERVICE_WORKER:
            server.services = PinnedServices(self)
            # parleyctl reaches worker 0, whose room commands act on the rooms; the other sockets are spare
            server.control.path = server.control.path.with_name(f"worker{index}-{server.control.path.name}")
        server.hooks.add("roster/changed", self.roster_changed)
        server.hooks.add("server/started", self.attach)
        # Frames waiting for the next publication, per worker; the lists stay, so forwarders hold them.
        self._out: dict[int, list[str]] = {worker: [] for worker in self.others()}
        self._gone: set[str] = set()  # JIDs of this worker's sessions that ended since the last publication
        self._dirty: dict[JID, Session] = {}
        self._wake = asyncio.Event()
        self._pending_iq: dict[tuple[str, str], int] = {}  # (to, id) of a server's query -> asking worker
        self._redis: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sending = False
        self._stale: list[dict[str, Any]] = []  # sessions of this worker's previous process, if it died
        self._following = False  # reading the other workers' channel messages

    def channel(self, worker: int) -> str:
        return f"{self.prefix}:w{worker}"

    def sessions_key(self, worker: int) -> str:
        return f"{self.prefix}:sessions:{worker}"

    def alive_key(self, worker: int) -> str:
        return f"{self.prefix}:alive:{worker}"

    async def start(self) -> None:
        """Subscribe before the others' sessions are read (in `attach`), so no change falls between the two."""
        # RESP2: redis-py's RESP3 parser formats every pub/sub message it reads into a debug log line.
        self._redis = aioredis.from_url(self.url, protocol=2)
        self._pubsub = self._redis.pubsub()
        await self._pubsub.subscribe(self.channel(self.index))
        stale = await self._redis.hgetall(self.sessions_key(self.index))
        self._stale = [json.loads(value) for value in stale.values()]
        await self._redis.delete(self.sessions_key(self.index))
        await self._redis.set(self.alive_key(self.index), os.getpid(), ex=HEARTBEAT_TTL)
        for worker in self.others():
            self._queue(worker, "x")
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._send_loop()), loop.create_task(self._heartbeat())]

    async def attach(self, _server: Server) -> None:
        """Once the hosts and the storage exist (again after a restart): the others' sessions are read and their
        changes followed, answers to other workers' queries go back to them before this worker's modules see
        them, the cached documents set here are announced, and the sessions a dead predecessor left are ended."""
        if self.index == 0 and any("pep" in host.modules for host in self.server.hosts.values()):
            log.warning("cluster: PEP notifications reach only the contacts on the publisher's worker")
        self.server.storage.kv.watch_cached(self.document_changed)
        for host in self.server.hosts.values():
            for event in ("iq-result/host", "iq-error/host", "iq-result/bare", "iq-error/bare"):
                host.hooks.add(event, self.answer_elsewhere, priority=1000)
        if not self._following:
            self._following = True
            assert self._redis is not None
            for worker in self.others():
                for value in (await self._redis.hgetall(self.sessions_key(worker))).values():
                    self.sessions.put_remote(worker, json.loads(value))
            self._tasks.append(asyncio.get_running_loop().create_task(self._receive_loop()))
        stale, self._stale = self._stale, []
        for state in stale:
            await self._end_stale(state)

    async def _end_stale(self, state: dict[str, Any]) -> None:
        """End a session whose process died: its contacts and the user's other resources learn it is gone."""
        jid = JID.parse(state["jid"])
        host = self.server.hosts.get(jid.domain)
        if host is None or self.sessions.get(jid) is not None:
            return
        session = Session(jid, host, lambda data: None, lambda condition: None)
        session.presence = parse_stored(state["presence"]) if state["presence"] else None
        session.directed = {JID.parse(target) for target in state["directed"]}
        await self.server.end_session(session)

    async def stop(self) -> None:
        """Send what is queued (the goodbyes of this worker's sessions), then close."""
        self._wake.set()
        for _ in range(50):
            if not any(self._out.values()) and not self._dirty and not self._sending:
                break
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._redis is not None:
            try:
                await self._redis.delete(self.sessions_key(self.index), self.alive_key(self.index))
            except (redis.RedisError, OSError):
                log.warning("cluster: could not remove worker %d's keys; the next start clears them", self.index)
            await self._pubsub.aclose()
            await self._redis.aclose()

    def lock(self, name: str) -> Any:
        """A lock held by one worker at a time; it expires should its holder die with it."""
        assert self._redis is not None
        return self._redis.lock(f"{self.prefix}:lock:{name}", timeout=LOCK_TTL, sleep=0.002,
                                blocking_timeout=LOCK_TTL)

    def others(self) -> list[int]:
        return [w for w in range(self.workers) if w != self.index]

    # --- outgoing ----------------------------------------------------------------------------------

    def _queue(self, worker: int, frame: str) -> None:
        frames = self._out[worker]
        if not frames:  # otherwise the send loop has been woken already and not yet taken the frames
            self._wake.set()
        frames.append(frame)

    def changed(self, session: Session) -> None:
        """A local session's state changed; its latest state goes out in the place of this first change."""
        if session.jid not in self._dirty:
            self._dirty[session.jid] = session
            for worker in self.others():
                self._queue(worker, f"u{FIELD}{session.jid}")

    def gone(self, session: Session) -> None:
        self._dirty.pop(session.jid, None)
        self._gone.add(str(session.jid))
        for worker in self.others():
            self._queue(worker, f"d{FIELD}{session.jid}")

    def forwarder(self, worker: int, jid: JID) -> Callable[[str], None]:
        """The output of a session on another worker: `_queue` inlined, as this runs once per stanza."""
        prefix = f"s{FIELD}{jid}{FIELD}"
        frames, wake = self._out[worker], self._wake.set

        def forward(data: str) -> None:
            if not frames:
                wake()
            frames.append(prefix + data)

        return forward

    def closer(self, worker: int, jid: JID) -> Callable[[str | None], None]:
        return lambda condition: self._queue(worker, f"c{FIELD}{jid}{FIELD}{condition or ''}")

    async def to_service(self, st: Stanza) -> None:
        self._queue(SERVICE_WORKER, f"v{FIELD}{serialize(st.el)}")

    def roster_changed(self, user: JID) -> None:
        for worker in self.others():
            self._queue(worker, f"i{FIELD}{user}")

    def document_changed(self, store: str, host: str, user: str) -> None:
        for worker in self.others():
            self._queue(worker, f"k{FIELD}{store}{FIELD}{host}{FIELD}{user}")

    async def _send_loop(self) -> None:
        """One publication per worker per turn; session states are read now, at their place in the order."""
        assert self._redis is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            dirty, self._dirty = self._dirty, {}
            states = {str(jid): session_state(s) for jid, s in dirty.items() if not s.ended}
            pipe = self._redis.pipeline(transaction=False)
            for worker, frames in self._out.items():
                if frames:
                    if dirty:
                        frames[:] = [_resolve(frame, states) for frame in frames]
                    pipe.publish(self.channel(worker), f"{self.index}{FRAME}{FRAME.join(frames)}")
                    frames.clear()
            for jid, state in states.items():
                pipe.hset(self.sessions_key(self.index), jid, state)
            gone, self._gone = self._gone - states.keys(), set()
            if gone:
                pipe.hdel(self.sessions_key(self.index), *gone)
            self._sending = True
            try:
                await pipe.execute()
            except (redis.RedisError, OSError) as exc:
                self._lost(f"publishing to Redis failed: {exc}")
                return
            finally:
                self._sending = False

    async def _heartbeat(self) -> None:
        assert self._redis is not None
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                if not await self._redis.set(self.alive_key(self.index), os.getpid(), ex=HEARTBEAT_TTL, xx=True):
                    # This worker stalled for so long that the others forgot its sessions: tell them again.
                    await self._redis.set(self.alive_key(self.index), os.getpid(), ex=HEARTBEAT_TTL)
                    for session in self.sessions.all():
                        self.changed(session)
                known = {w for w, _ in self.sessions.remote.values()}
                for worker in known:
                    if not await self._redis.exists(self.alive_key(worker)):
                        log.warning("cluster: worker %d stopped answering; forgetting its sessions", worker)
                        self.sessions.drop_worker(worker)
            except (redis.RedisError, OSError) as exc:
                self._lost(f"heartbeat failed: {exc}")
                return

    def _lost(self, what: str) -> None:
        """Without Redis this worker would misroute: it stops, and the parent process starts a new one."""
        log.critical("cluster: %s; stopping worker %d", what, self.index)
        os.kill(os.getpid(), signal.SIGTERM)

    # --- incoming ----------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            except (redis.RedisError, OSError) as exc:
                self._lost(f"reading from Redis failed: {exc}")
                return
            if message is None:
                continue
            frames = message["data"].decode().split(FRAME)
            sender = int(frames[0])
            for frame in frames[1:]:
                try:
                    if frame[0] != "s" or not self._deliver(sender, frame):
                        await self._dispatch(sender, frame)
                except Exception:
                    log.exception("cluster: could not handle %r from worker %s", frame[:200], sender)

    def _deliver(self, sender: int, frame: str) -> bool:
        """A stanza for a session of this worker, handed over at once as the sender serialized it (parsed
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

    async def _dispatch(self, sender: int, frame: str) -> None:
        kind, _, rest = frame.partition(FIELD)
        if kind == "s":
            jid, _, data = rest.partition(FIELD)
            el = parse_stored(data)
            await self._undeliverable(Stanza(el, KINDS[el.tag], JID.parse(el.get("from") or ""), JID.parse(jid)))
        elif kind == "u":
            self.sessions.put_remote(sender, json.loads(rest))
        elif kind == "d":
            self.sessions.drop_remote(sender, JID.parse(rest))
        elif kind == "x":
            self.sessions.drop_worker(sender)
        elif kind == "c":
            text, _, condition = rest.partition(FIELD)
            jid = JID.parse(text)
            session = self.sessions.get(jid)
            if session is not None and jid not in self.sessions.remote:
                session.close(condition or None)
        elif kind == "v":
            st = _stanza(rest)
            await self.server.services[st.to.domain](st)
        elif kind == "r":
            await self.server.router.route(_stanza(rest))
        elif kind == "i":
            self.forget_roster(JID.parse(rest))
        elif kind == "k":
            self.server.storage.kv.forget_cached(*rest.split(FIELD))

    def _expect_answer(self, sender: int, el: Element) -> None:
        """A query from a server or account address on another worker: its answer must go back there."""
        asker = el.get("from") or ""
        if "/" not in asker and el.get("id"):
            if len(self._pending_iq) >= PENDING_IQ_LIMIT:
                del self._pending_iq[next(iter(self._pending_iq))]
            self._pending_iq[(el.get("to") or "", el.get("id") or "")] = sender

    def answer_elsewhere(self, st: Stanza) -> bool | None:
        """An answer from a client of this worker to a query another worker sent: route it there."""
        worker = self._pending_iq.pop((str(st.from_), st.id or ""), None)
        if worker is None:
            return None
        self._queue(worker, f"r{FIELD}{serialize(st.el)}")
        return True

    async def _undeliverable(self, st: Stanza) -> None:
        router = self.server.router
        host = self.server.hosts.get(st.to.domain)
        if host is None:
            return
        mtype = st.type or "normal"
        if st.kind == "message" and mtype not in ("error", "groupchat"):
            await router.deliver_to_bare(host, st, mtype)
        elif st.kind == "iq" and st.type in ("get", "set"):
            await router.bounce(st, StanzaError("service-unavailable"))

    def forget_roster(self, user: JID) -> None:
        """Another worker changed the user's roster, or the user's last session elsewhere ended: what this
        worker cached of it is stale ('roster/stale' on the user's host)."""
        host = self.server.hosts.get(user.domain)
        if host is not None:
            host.hooks.notify("roster/stale", user)


def _resolve(frame: str, states: dict[str, str]) -> str:
    """A state placeholder becomes the session's state as of now; a session that ended sends nothing."""
    if frame[0] != "u":
        return frame
    state = states.get(frame[2:])
    return f"u{FIELD}{state}" if state is not None else f"d{FIELD}{frame[2:]}"


def _stanza(xml: str) -> Stanza:
    el = parse_stored(xml)
    to = el.get("to")
    return Stanza(el, KINDS[el.tag], JID.parse(el.get("from") or ""), JID.parse(to) if to else None)


def clear(config: ClusterConfig) -> None:
    """Forget what an earlier run left in Redis (after a crash it would describe sessions that are gone)."""
    client = redis.Redis.from_url(config.redis_url, socket_connect_timeout=5)
    try:
        keys = list(client.scan_iter(f"{config.prefix}:*"))
        if keys:
            client.delete(*keys)
    except redis.RedisError as exc:
        raise ConfigError("cluster.redis_url", f"cannot use Redis at {config.redis_url}: {exc}") from None
    finally:
        client.close()


def supervise(config: Config, serve: Callable[[int, int], None], started: Callable[[], None]) -> int:
    """Fork the workers and keep them running: `serve(index, ready_fd)` runs one and writes a byte to
    `ready_fd` once it listens. A worker that dies is restarted; SIGTERM or SIGINT stops them all, SIGHUP goes
    to every worker (each reloads the configuration)."""
    workers = config.cluster.workers
    clear(config.cluster)
    ready_read, ready_write = os.pipe()
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's own handler is in place
            code = 1
            try:
                serve(index, ready_write)
                code = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            os.kill(pid, signal.SIGTERM)

    def reload(_signum: int, _frame: object) -> None:
        log.info("SIGHUP: passed on to %d workers", len(children))
        for pid in list(children):
            os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    for index in range(workers):
        spawn(index)
    ready, failed = 0, False
    while ready < workers and not stopping:
        if select.select([ready_read], [], [], 0.5)[0]:
            ready += len(os.read(ready_read, workers - ready))
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid:
            log.error("worker %d exited while starting", children.pop(pid))
            failed = True
            stop(0, None)
    if not stopping:
        started()
    while children:
        pid, status = os.wait()
        index = children.pop(pid)
        if not stopping:
            log.error("worker %d exited (status %d); restarting it", index, status)
            time.sleep(1.0)
            spawn(index)
    return 1 if failed else 0
