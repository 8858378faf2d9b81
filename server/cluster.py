"""A cluster: nodes (machines, each with its own listeners) of one or more worker processes, routing to each
other's sessions over Redis and sharing one PostgreSQL database.

Every process is a *member*, named `"{node}/{worker}"` (e.g. `"n1/0"`). Members find each other through Redis:
each refreshes a heartbeat key with a time to live and lists itself in the members set; the others read that
set and those keys at every heartbeat, so the cluster has no fixed size. A member whose key lapsed (or that
said goodbye) is lost: the server hooks `cluster/member-up` and `cluster/member-lost` tell the other parts, its
sessions are forgotten, and one survivor ends them (contacts see them go). Other parts talk to a member with
`Cluster.send` and their own frame kinds (`Cluster.on`).

Each member's session directory (`ClusterSessions`, chosen when the server is composed) keeps its own
sessions and those of the other members for the accounts it needs: its own users' and the ones it routes to
(a bounded number, least recently used first out). Redis says which members hold each account's sessions
(`where:` sets) and which watch it (`watch:` sets); a member looks an account up when routing first needs it
(`SessionDirectory.ensure`): it registers as a watcher and reads the holders in one transaction, then asks
each holder, which answers in its channel with the sessions' states, in order with every later change. A
member that gets an account's first session registers as a holder and reads the watchers in one transaction
too, so a watcher is either found by the holder or finds it. A session on another member is an ordinary
`Session` in the directory whose output goes to Redis instead of a socket, so the router, presence, roster
pushes and carbons choose among all of a user's resources unchanged. Members tell the watchers of an account
about its sessions (bound, priority and presence, roster interest, directed presence, the per-session state
of the modules that declare it shared with `Module.shared_session_state`, closed) as those change, and
forward stanzas to the member holding the session.

Every member has one Redis pub/sub channel, and everything another member tells it (session changes
and stanzas alike) goes through that channel in the order it happened: a session is known to be
available on the other side before any stanza that follows from it arrives. Messages queued in the
same turn of the event loop are sent as one publication, which keeps Redis off the hot path. The frames
whose handling awaits (stanzas to route, other parts' frames) are handled one at a time apart from the
rest, which the receiving loop handles as they come: a lookup that routing waits for is answered meanwhile.

Services that keep state in memory (group chat, publish-subscribe) spread their rooms and nodes over the
members: each is served by the member that owns it (server/ownership.py). What a member caches of data any
member may change (rosters, blocklists, archive preferences) is dropped on the others when one changes it:
the roster module announces its changes ('roster/changed') and hears of the others' ('roster/stale'), the
key-value store tells of the cached documents set through it (`KeyValueStore.watch_cached`, `forget_cached`).

Each member also keeps its sessions in a Redis hash that a starting member reads. A member started in place
of a dead one (same node and worker number) ends the sessions that one left; the sessions of a member that
is lost are ended by one survivor (whichever takes its hash first), after it told the others to forget the
member. A member that stalled past its heartbeat announces its sessions again when it resumes.

While Redis is out of reach a member serves its own users alone: what is for other members is dropped, their
stanzas bounced with remote-server-timeout, locks are local; when Redis answers again it subscribes again,
publishes its sessions afresh, tells the others to forget what they knew of it, and reads theirs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import select
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any
from xml.etree.ElementTree import Element

import redis
import redis.asyncio as aioredis

from server.config import ConfigError
from server.jid import JID
from server.registry import resolve
from server.router import highest
from server.sessions import Session, SessionRegistry
from server.stanza import KINDS, Stanza, parse_stored
from server.stream.errors import StanzaError
from server.stream.writer import serialize

if TYPE_CHECKING:
    from server.config import ClusterConfig, Config
    from server.server import Server

log = logging.getLogger("parley.cluster")

HEARTBEAT = 2.0  # seconds between heartbeats
HEARTBEAT_TTL = 6  # seconds without a heartbeat after which a member is lost and its sessions forgotten
FRAME, FIELD = "\x01", "\x00"  # neither may occur in XML 1.0, nor unescaped in JSON
STANZA = f"s{FIELD}"  # the start of a frame that carries a stanza for a session
PENDING_IQ_LIMIT = 10000
LOCK_TTL = 10.0  # seconds
CACHED_USERS = 10000  # accounts without a session on a member whose sessions elsewhere it keeps in memory
ASK_TIMEOUT = 2.0  # seconds a lookup waits for the members holding the account's sessions


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
    """The session directory of a member: its own sessions, plus those of the other members for the accounts it
    was asked about (`ensure`): its own users' and the ones it routes to, at most `limit` accounts without a
    session here (the least recently used go).

    It watches its own sessions: as their shared state changes, the cluster tells the members that watch their
    account. It is chosen when the server is composed, and the `Cluster` made for that server connects to it.
    """

    cluster: Cluster  # set by the Cluster of this member

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.shared = shared_session_state(config)
        self.limit = CACHED_USERS
        self.remote: dict[JID, tuple[str, Session]] = {}  # sessions of other members: (member, session)
        # This member's own sessions by full JID text: a stanza from another member finds its session with
        # one lookup of the text it came with, without making a JID of it.
        self.local: dict[str, Session] = {}
        # Accounts whose sessions on every member this one knows, least recently used first.
        self.known: OrderedDict[JID, None] = OrderedDict()
        self.watching: dict[JID, asyncio.Task[None]] = {}  # accounts being looked up
        self.answers: dict[tuple[JID, str], asyncio.Future[None]] = {}  # (account, asked member) -> its answer
        # Accounts with a session here -> the other members that watch them (told of their sessions' changes).
        self.homed: dict[JID, set[str]] = {}

    def add(self, session: Session) -> None:
        session.watcher = self
        super().add(session)
        self.local[str(session.jid)] = session
        if session.bare not in self.homed:
            self.homed[session.bare] = set()
            self.cluster.home(session.bare)
            if session.bare not in self.known:
                self.watch_soon(session.bare)
        self.changed(session)

    def changed(self, session: Session) -> None:
        self.cluster.changed(session)

    def remove(self, session: Session) -> None:
        entry = self.remote.get(session.jid)
        if entry is not None and entry[1] is session:
            del self.remote[session.jid]  # replaced by a local login (c2s closes it on its member)
        elif self.get(session.jid) is session:
            self.cluster.gone(session)
        if self.local.get(str(session.jid)) is session:
            del self.local[str(session.jid)]
        super().remove(session)
        if session.bare in self.homed and not self.here(session.bare):
            del self.homed[session.bare]
            self.cluster.unhome(session.bare)
            self._evict()

    def here(self, bare: JID) -> list[Session]:
        """The account's sessions on this member."""
        return [s for s in self.of(bare) if not s.elsewhere]

    def all(self) -> list[Session]:
        """Sessions connected to this member: the ones it ends when it stops."""
        return list(self.local.values())

    def count(self) -> int:
        """Sessions on every member: this one's, and the others' as of the last heartbeat."""
        return len(self.local) + sum(self.cluster.counts.values())

    async def users(self, domain: str | None = None) -> list[JID]:
        return list(dict.fromkeys(jid.bare for jid in await self.everywhere(domain)))

    async def everywhere(self, domain: str | None = None) -> list[JID]:
        """Read from the members' published sessions (this member's own only while Redis is out of reach)."""
        found = {s.jid for s in self.local.values()}
        if self.cluster.connected:
            try:
                found.update(JID.parse(jid.decode()) for jid in await self.cluster.published())
            except (redis.RedisError, OSError) as exc:
                self.cluster.disconnected(f"reading the sessions failed: {exc}")
        return [jid for jid in found if domain is None or jid.domain == domain]

    # --- the accounts this member knows --------------------------------------------------------------

    async def ensure(self, bare: JID) -> None:
        lookup = self._lookup(bare)
        if lookup is not None:
            await asyncio.shield(lookup)

    async def ensure_all(self, bares: Iterable[JID]) -> None:
        lookups = {lookup for lookup in map(self._lookup, bares) if lookup is not None}
        if lookups:
            await asyncio.shield(asyncio.gather(*lookups))

    def _lookup(self, bare: JID) -> asyncio.Task[None] | None:
        """None when the account is known (cached, or not ours to know: another server's, or Redis out of
        reach); otherwise its lookup, one however many ask."""
        if bare in self.known:
            self.known.move_to_end(bare)
            return None
        if bare.local is None or bare.domain not in self.cluster.server.hosts or not self.cluster.connected:
            return None
        return self.watch_soon(bare)

    def watch_soon(self, bare: JID) -> asyncio.Task[None]:
        task = self.watching.get(bare)
        if task is None:
            task = self.watching[bare] = asyncio.get_running_loop().create_task(self._watch(bare))
        return task

    async def _watch(self, bare: JID) -> None:
        """Register as a watcher of the account, then ask the members that hold its sessions for their states:
        they answer in their channel, in order with every change after it (a member that gets the account's
        first session after the registration finds this one among the watchers)."""
        try:
            try:
                holders = await self.cluster.watch(bare)
            except (redis.RedisError, OSError) as exc:
                self.cluster.disconnected(f"looking up {bare} failed: {exc}")
                return
            loop = asyncio.get_running_loop()
            asked = [m for m in holders if m != self.cluster.member and self.cluster.live(m)]
            for member in asked:
                self.answers[(bare, member)] = loop.create_future()
                self.cluster.ask(member, bare)
            if asked:
                await asyncio.wait([self.answers[(bare, m)] for m in asked], timeout=ASK_TIMEOUT)
            self.known[bare] = None
            self._evict()
        finally:
            for member in list(self.answers):
                if member[0] == bare:
                    del self.answers[member]
            self.watching.pop(bare, None)

    def watches(self, bare: JID) -> bool:
        """News of the account's sessions is for this member."""
        return bare in self.known or bare in self.watching

    def answered(self, member: str, bare: JID) -> None:
        answer = self.answers.get((bare, member))
        if answer is not None and not answer.done():
            answer.set_result(None)

    def _evict(self) -> None:
        """Forget the least recently used accounts without a session here, beyond the limit."""
        spare = len(self.known) - len(self.homed) - self.limit
        turns = len(self.known)
        while spare > 0 and turns > 0:
            turns -= 1
            bare, _ = self.known.popitem(last=False)
            if bare in self.homed:
                self.known[bare] = None  # kept while it has sessions here
                continue
            spare -= 1
            for session in self.of(bare):
                if session.elsewhere:
                    del self.remote[session.jid]
                    super().remove(session)
            self.cluster.unwatch(bare)
            self.cluster.forget_roster(bare)

    def forget(self) -> None:
        """Redis was out of reach: what this member knew of the others' sessions may be stale."""
        for jid, (member, _) in list(self.remote.items()):
            self.drop_remote(member, jid)
        self.known.clear()
        for bare in self.homed:
            self.watch_soon(bare)

    # --- news from the other members ---------------------------------------------------------------

    def put_remote(self, member: str, state: dict[str, Any]) -> Session | None:
        """Mirror a session of another member; the session when this is news of it becoming available."""
        jid = JID.parse(state["jid"])
        host = self.cluster.server.hosts.get(jid.domain)
        current = self.get(jid)
        if host is None or (current is not None and self.remote.get(jid, (None, None))[1] is not current):
            return None  # a local session holds that resource: ours wins, the other member is closing it
        entry = self.remote.get(jid)
        if entry is None or entry[0] != member:
            session = Session(jid, host, self.cluster.forwarder(member, jid),
                              self.cluster.closer(member, jid))
            session.elsewhere = True
            self.remote[jid] = (member, session)
            super().add(session)
        else:
            session = entry[1]
        was_available = session.presence is not None
        session.priority = state["priority"]
        session.interested = state["interested"]
        session.presence = parse_stored(state["presence"]) if state["presence"] else None
        session.data = dict(state["data"])
        session.started = state["started"]
        return session if session.presence is not None and not was_available else None

    def drop_remote(self, member: str, jid: JID) -> None:
        entry = self.remote.get(jid)
        if entry is None or entry[0] != member:
            return
        del self.remote[jid]
        entry[1].closed = entry[1].ended = True
        super().remove(entry[1])
        if not self.of(jid.bare):
            self.cluster.forget_roster(jid.bare)

    def drop_member(self, member: str) -> None:
        for jid in [jid for jid, (m, _) in self.remote.items() if m == member]:
            self.drop_remote(member, jid)
        for (_, asked), answer in self.answers.items():
            if asked == member and not answer.done():
                answer.set_result(None)
        for watchers in self.homed.values():
            watchers.discard(member)

    def members_of(self) -> dict[str, int]:
        """How many sessions each other member has, as of the last heartbeat."""
        return dict(self.cluster.counts)


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
            except (redis.RedisError, OSError) as exc:
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
        with contextlib.suppress(redis.RedisError, OSError):  # lapsed or unreachable: it expires by itself
            await held.release()


class Cluster:
    """This member's side of the cluster: Redis connections, membership, the outgoing queue and the incoming
    dispatch. The API other parts use: `member`, `node`, `members()`, `key()`, `redis`, `send()`, `on()`,
    `route_elsewhere()`, `lock()`, and the server hooks `cluster/member-up` and `cluster/member-lost`."""

    def __init__(self, server: Server, index: int, config: ClusterConfig) -> None:
        self.server = server
        self.index = index  # this worker's number on its node
        self.node = config.node_name
        self.member = f"{self.node}/{index}"
        self.url = config.redis_url
        self.prefix = config.prefix
        if not isinstance(server.sessions, ClusterSessions):
            raise TypeError("a worker's server needs the cluster's session directory: compose it with [cluster]")
        self.sessions = server.sessions
        self.sessions.cluster = self
        server.cluster = self
        if index != 0:
            # parleyctl reaches worker 0 (its room commands act on rooms wherever they are owned); the other
            # sockets are spare
            server.control.path = server.control.path.with_name(f"worker{index}-{server.control.path.name}")
        server.hooks.add("roster/changed", self.roster_changed)
        server.hooks.add("server/started", self.attach)
        self._members: list[str] = [self.member]  # live members as of the last heartbeat, this one included
        self._handlers: dict[str, Callable[[str, str], Awaitable[None]]] = {}
        # Frames waiting for the next publication, per member; the lists stay while the member lives, so that
        # forwarders hold them.
        self._out: dict[str, list[str]] = {}
        self._gone: set[str] = set()  # JIDs of this member's sessions that ended since the last publication
        self._homing: set[JID] = set()  # accounts with a first session here, to register in Redis
        self._unhomed: set[JID] = set()  # accounts whose last session here ended
        self._unwatched: set[JID] = set()  # accounts this member no longer watches
        self.counts: dict[str, int] = {}  # sessions of each other member, as of the last heartbeat
        self._lookups: list[tuple[JID, asyncio.Future[list[str]]]] = []  # accounts to look up this turn
        self._looking: set[asyncio.Task[None]] = set()
        self._later: asyncio.Queue[tuple[str, str | Session]] = asyncio.Queue()  # frames whose handling awaits
        self._dirty: dict[JID, Session] = {}
        self._wake = asyncio.Event()
        self._pending_iq: dict[tuple[str, str], str] = {}  # (to, id) of a server's query -> asking member
        self._redis: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sending = False
        self._stale: list[dict[str, Any]] = []  # sessions of this member's previous process, if it died
        self._following = False  # reading the other members' channel messages
        self.connected = False  # Redis answers; while not, this member serves its own users alone
        self._steady_since = 0.0  # monotonic time since which Redis has answered without a break
        self._reconnecting: asyncio.Task[None] | None = None
        self.local_locks: dict[str, asyncio.Lock] = {}

    # --- the API of the other parts --------------------------------------------------------------------

    @property
    def redis(self) -> aioredis.Redis:
        """This member's Redis client, for keys and locks of other parts (its commands fail while Redis is out)."""
        assert self._redis is not None, "the cluster has not started"
        return self._redis

    def key(self, name: str) -> str:
        """A Redis key under the cluster's prefix."""
        return f"{self.prefix}:{name}"

    def members(self) -> list[str]:
        """The live members, this one included, sorted: as of the last heartbeat."""
        return list(self._members)

    def nodes(self) -> list[str]:
        """The nodes of the live members, sorted."""
        return sorted({member.partition("/")[0] for member in self._members})

    def on(self, kind: str, handler: Callable[[str, str], Awaitable[None]]) -> None:
        """Frames of `kind` from other members go to `handler(sender, payload)`. Other parts' kinds are words;
        the cluster's own are single letters."""
        if len(kind) < 2 or FIELD in kind or FRAME in kind:
            raise ValueError(f"{kind!r}: a frame kind of another part is a word")
        self._handlers[kind] = handler

    def send(self, member: str, kind: str, payload: str) -> None:
        """Queue a frame for another member: in order per member, one publication per turn of the event loop.
        Dropped, with a log line, when the member is not live or Redis is out of reach. `payload` must not
        hold the character \\x01 (XML and JSON cannot)."""
        if member not in self._out:
            log.info("cluster: %s frame for %s dropped: no such member", kind, member)
            return
        self._queue(member, f"{kind}{FIELD}{payload}")

    def route_elsewhere(self, member: str, st: Stanza) -> None:
        """Hand a stanza to another member, whose router routes it as if it had arrived there."""
        if member not in self._out:
            log.info("cluster: stanza for %s dropped: no such member", member)
            return
        self._queue(member, f"r{FIELD}{serialize(st.el)}")

    def lock(self, name: str) -> FallbackLock:
        """A lock held by one member at a time; it expires should its holder die with it. While Redis is out of
        reach it is a lock of this process only."""
        return FallbackLock(self, name)

    # --- Redis keys ------------------------------------------------------------------------------------

    def channel(self, member: str) -> str:
        return f"{self.prefix}:m:{member}"

    def sessions_key(self, member: str) -> str:
        return f"{self.prefix}:sessions:{member}"

    def alive_key(self, member: str) -> str:
        return f"{self.prefix}:alive:{member}"

    def members_key(self) -> str:
        return f"{self.prefix}:members"

    def where_key(self, bare: JID) -> str:
        """The members holding sessions of an account."""
        return f"{self.prefix}:where:{bare}"

    def watch_key(self, bare: JID) -> str:
        """The members watching an account's sessions (told as they change)."""
        return f"{self.prefix}:watch:{bare}"

    def watching_key(self, member: str) -> str:
        """The accounts a member watches: what is left to clear when it is gone."""
        return f"{self.prefix}:watching:{member}"

    # --- starting and stopping -------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe before the others' sessions are read (in `attach`), so no change falls between the two."""
        # RESP2: redis-py's RESP3 parser formats every pub/sub message it reads into a debug log line.
        self._redis = aioredis.from_url(self.url, protocol=2, socket_connect_timeout=3)
        self._pubsub = self._redis.pubsub()
        await self._pubsub.subscribe(self.channel(self.member))
        self._stale = await self._take_sessions(self.member)
        await self._clear(self.member, self._stale)
        await self._announce()
        self._steady_since = time.monotonic()
        await self._read_members(start=True)
        self.connected = True
        for member in self._members:
            if member != self.member:
                self._queue(member, "x")
        await self._count()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._send_loop()), loop.create_task(self._heartbeat())]

    async def _take_sessions(self, member: str) -> list[dict[str, Any]]:
        """The sessions a member published, read and deleted at once: only one taker ends them."""
        assert self._redis is not None
        pipe = self._redis.pipeline(transaction=True)
        pipe.hgetall(self.sessions_key(member))
        pipe.delete(self.sessions_key(member))
        found, _ = await pipe.execute()
        return [json.loads(value) for value in found.values()]

    async def _announce(self) -> None:
        assert self._redis is not None
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self.alive_key(self.member), os.getpid(), ex=HEARTBEAT_TTL)
        pipe.sadd(self.members_key(), self.member)
        await pipe.execute()

    async def attach(self, _server: Server) -> None:
        """Once the hosts and the storage exist (again after a restart): the others' sessions are read and their
        changes followed, answers to other members' queries go back to them before this member's modules see
        them, the cached documents set here are announced, and the sessions a dead predecessor left are ended."""
        self.server.storage.kv.watch_cached(self.document_changed)
        for host in self.server.hosts.values():
            for event in ("iq-result/host", "iq-error/host", "iq-result/bare", "iq-error/bare"):
                host.hooks.add(event, self.answer_elsewhere, priority=1000)
        if not self._following:
            self._following = True
            self._tasks.append(asyncio.get_running_loop().create_task(self._dispatch_loop()))
            self._tasks.append(asyncio.get_running_loop().create_task(self._receive_loop()))
        stale, self._stale = self._stale, []
        for state in stale:
            await self._end_stale(state)

    # --- the session directory's lookups ----------------------------------------------------------------

    def live(self, member: str) -> bool:
        return member in self._out

    async def watch(self, bare: JID) -> list[str]:
        """Register this member as a watcher of the account, and read which members hold its sessions: in one
        transaction, so that a member registering the account's first session either is read here or finds
        this one among the watchers. The lookups of one turn of the event loop go together."""
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        if not self._lookups:
            asyncio.get_running_loop().call_soon(self._look_up)
        self._lookups.append((bare, future))
        return await future

    def _look_up(self) -> None:
        batch, self._lookups = self._lookups, []
        task = asyncio.get_running_loop().create_task(self._look_up_batch(batch))
        self._looking.add(task)
        task.add_done_callback(self._looking.discard)

    async def _look_up_batch(self, batch: list[tuple[JID, asyncio.Future[list[str]]]]) -> None:
        assert self._redis is not None
        pipe = self._redis.pipeline(transaction=True)
        for bare, _ in batch:
            pipe.sadd(self.watch_key(bare), self.member)
            pipe.sadd(self.watching_key(self.member), str(bare))
            pipe.smembers(self.where_key(bare))
        try:
            results = await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), holders in zip(batch, results[2::3], strict=True):
            if not future.done():
                future.set_result([m.decode() for m in holders])

    async def _clear(self, member: str, stale: list[dict[str, Any]]) -> None:
        """A member is gone (or this one replaces its dead predecessor): it holds no account's sessions and
        watches none."""
        assert self._redis is not None
        watched = await self._redis.smembers(self.watching_key(member))
        pipe = self._redis.pipeline(transaction=False)
        for bare in {JID.parse(state["jid"]).bare for state in stale}:
            pipe.srem(self.where_key(bare), member)
        for bare in watched:
            pipe.srem(f"{self.prefix}:watch:{bare.decode()}", member)
        pipe.delete(self.watching_key(member))
        await pipe.execute()

    def ask(self, member: str, bare: JID) -> None:
        """Ask a member for its sessions of an account; it answers with their states, then 'W'."""
        self._queue(member, f"w{FIELD}{bare}")

    def home(self, bare: JID) -> None:
        """The account's first session here: registered in Redis (and its watchers read) before its news goes."""
        self._homing.add(bare)
        self._unhomed.discard(bare)
        self._wake.set()

    def unhome(self, bare: JID) -> None:
        self._unhomed.add(bare)
        self._wake.set()

    def unwatch(self, bare: JID) -> None:
        self._unwatched.add(bare)
        self._wake.set()

    async def published(self) -> list[bytes]:
        """The full JIDs of the sessions the other live members published."""
        assert self._redis is not None
        pipe = self._redis.pipeline(transaction=False)
        others = [m for m in self._members if m != self.member]
        for member in others:
            pipe.hkeys(self.sessions_key(member))
        return [jid for found in await pipe.execute() for jid in found]

    def _tell(self, member: str, bare: JID) -> None:
        """Queue the states of the account's sessions here for a member that watches it."""
        for session in self.sessions.here(bare):
            self._dirty[session.jid] = session
            self._queue(member, f"u{FIELD}{session.jid}")

    async def _register(self) -> None:
        """Accounts with a first session here: listed as held here, and their watchers told their sessions."""
        assert self._redis is not None
        homing = [bare for bare in self._homing if bare in self.sessions.homed]
        self._homing.clear()
        if not homing:
            return
        pipe = self._redis.pipeline(transaction=True)
        for bare in homing:
            pipe.sadd(self.where_key(bare), self.member)
            pipe.smembers(self.watch_key(bare))
        results = await pipe.execute()
        for bare, watchers in zip(homing, results[1::2], strict=True):
            known = self.sessions.homed.get(bare)
            if known is None:
                self._unhomed.add(bare)
                continue
            for member in {m.decode() for m in watchers} - known - {self.member}:
                known.add(member)
                self._tell(member, bare)

    async def _end_stale(self, state: dict[str, Any]) -> None:
        """End a session whose process died: its contacts and the user's other resources learn it is gone."""
        jid = JID.parse(state["jid"])
        host = self.server.hosts.get(jid.domain)
        if host is None:
            return
        await self.sessions.ensure(jid.bare)  # the user's other resources see it go too
        if self.sessions.get(jid) is not None:
            return
        session = Session(jid, host, lambda data: None, lambda condition: None)
        session.presence = parse_stored(state["presence"]) if state["presence"] else None
        session.directed = {JID.parse(target) for target in state["directed"]}
        await self.server.end_session(session)

    async def stop(self) -> None:
        """Send what is queued (the goodbyes of this member's sessions), say goodbye, then close."""
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
                pipe = self._redis.pipeline(transaction=False)
                pipe.delete(self.sessions_key(self.member), self.alive_key(self.member))
                pipe.srem(self.members_key(), self.member)
                for bare in self.sessions.homed:
                    pipe.srem(self.where_key(bare), self.member)
                for bare in self.sessions.known:
                    pipe.srem(self.watch_key(bare), self.member)
                pipe.delete(self.watching_key(self.member))
                for member in self._out:
                    pipe.publish(self.channel(member), f"{self.member}{FRAME}b")
                await pipe.execute()
            except (redis.RedisError, OSError):
                log.warning("cluster: could not remove %s's keys; the others forget it when they lapse", self.member)
            with contextlib.suppress(redis.RedisError, OSError):
                await self._pubsub.aclose()
            await self._redis.aclose()

    # --- membership --------------------------------------------------------------------------------------

    async def _read_members(self, start: bool = False) -> None:
        """Which members are live now: those of the members set whose heartbeat key is there. Members new since
        the last reading are up; those gone are lost (their sessions forgotten here, ended by one survivor)."""
        assert self._redis is not None
        listed = sorted(m.decode() if isinstance(m, bytes) else m
                        for m in await self._redis.smembers(self.members_key()))
        alive = await self._redis.mget([self.alive_key(m) for m in listed]) if listed else []
        live = sorted({m for m, value in zip(listed, alive, strict=True) if value is not None} | {self.member})
        lapsed = [m for m, value in zip(listed, alive, strict=True) if value is None and m != self.member]
        before = set(self._members)
        self._members = live
        for member in live:
            if member not in before or (start and member != self.member):
                self._member_up(member)
        for member in before - set(live):
            self._member_lost(member)
        # Ending a lapsed member's sessions is left to a survivor that has heard from Redis without a break
        # for longer than a heartbeat's life: after an outage, the others have had time to show up again.
        if lapsed and time.monotonic() - self._steady_since > HEARTBEAT_TTL + HEARTBEAT:
            for member in lapsed:
                await self._reap(member)

    def _member_up(self, member: str) -> None:
        if member == self.member:
            return
        self._out.setdefault(member, [])
        log.info("cluster: member %s is up", member)
        self.server.hooks.notify("cluster/member-up", member)

    def _member_lost(self, member: str) -> None:
        if member == self.member:
            return
        log.warning("cluster: member %s is lost; forgetting its sessions", member)
        self._out.pop(member, None)
        self.sessions.drop_member(member)
        self.server.hooks.notify("cluster/member-lost", member)

    async def _reap(self, member: str) -> None:
        """End the sessions of a member that died, as it would have ended them: their contacts see them go."""
        assert self._redis is not None
        stale = await self._take_sessions(member)
        await self._redis.srem(self.members_key(), member)
        await self._clear(member, stale)
        for other in self._out:  # before the presence that ends its sessions: nothing more goes its way
            self._queue(other, f"l{FIELD}{member}")
        if stale:
            log.warning("cluster: ending %d sessions of lost member %s", len(stale), member)
        for state in stale:
            try:
                await self._end_stale(state)
            except Exception:
                log.exception("cluster: could not end %s of lost member %s", state.get("jid"), member)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            if not self.connected:
                continue
            try:
                await self._beat()
            except (redis.RedisError, OSError) as exc:
                self.disconnected(f"heartbeat failed: {exc}")

    async def _beat(self) -> None:
        assert self._redis is not None
        if not await self._redis.set(self.alive_key(self.member), os.getpid(), ex=HEARTBEAT_TTL, xx=True):
            # This member stalled for so long that the others forgot it (and may have ended its sessions'
            # presence): it tells them about its sessions again.
            log.warning("cluster: %s's heartbeat had lapsed; announcing its sessions again", self.member)
            await self._republish()
        else:
            await self._redis.sadd(self.members_key(), self.member)
        await self._read_members()
        await self._count()

    async def _count(self) -> None:
        """How many sessions each other member has (for `count` and the admin commands)."""
        assert self._redis is not None
        others = [m for m in self._members if m != self.member]
        pipe = self._redis.pipeline(transaction=False)
        for member in others:
            pipe.hlen(self.sessions_key(member))
        self.counts = dict(zip(others, await pipe.execute(), strict=True)) if others else {}

    async def _republish(self) -> None:
        """Publish this member's sessions afresh and tell every member to forget what it knew of them. If
        their published states are gone, another member may have ended them as those of a lost member: their
        presence goes out again, so that contacts see them back."""
        assert self._redis is not None
        local = self.sessions.all()
        taken = bool(local) and not await self._redis.exists(self.sessions_key(self.member))
        await self._announce()
        await self._redis.delete(self.sessions_key(self.member))
        await self._read_members()
        for member in self._members:
            if member != self.member:
                self._queue(member, "x")
        for bare, watchers in self.sessions.homed.items():
            watchers.clear()  # told again, once read again
            self._homing.add(bare)
        for session in local:
            self.changed(session)
        if taken:
            for session in local:
                if session.presence is not None and not session.closed:
                    presence = copy.deepcopy(session.presence)
                    presence.attrib.pop("to", None)
                    await self.server.router.route(Stanza(presence, "presence", session.jid, None, origin=session))

    # --- Redis out of reach ------------------------------------------------------------------------------

    def disconnected(self, what: str) -> None:
        """Redis stopped answering: this member goes on serving its own users, bounces what is for the others
        and tries again until Redis is back, then resynchronises."""
        if not self.connected:
            return
        self.connected = False
        log.error("cluster: %s; serving this member's users alone until Redis is back", what)
        self._wake.set()
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())
            self._tasks.append(self._reconnecting)

    async def _reconnect(self) -> None:
        assert self._redis is not None
        delay = 0.2
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, HEARTBEAT)
            try:
                await self._redis.ping()
                self._steady_since = time.monotonic()
                with contextlib.suppress(redis.RedisError, OSError):
                    await self._pubsub.aclose()
                self._pubsub = self._redis.pubsub()
                await self._pubsub.subscribe(self.channel(self.member))
                self.connected = True  # what the resynchronisation queues goes out
                await self._resync()
            except (redis.RedisError, OSError) as exc:
                self.connected = False
                log.debug("cluster: Redis still out of reach: %s", exc)
                continue
            log.warning("cluster: Redis is back; %s announced its sessions again", self.member)
            self._wake.set()
            self._tasks.append(asyncio.get_running_loop().create_task(self._receive_loop()))
            return

    async def _resync(self) -> None:
        """After an outage: forget every other member's sessions (read again as they are needed), and publish
        this one's."""
        self.sessions.forget()
        await self._republish()

    # --- outgoing ----------------------------------------------------------------------------------

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
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.connected:
                await self._drop_queued()
                continue
            if self._homing:
                try:
                    await self._register()
                except (redis.RedisError, OSError) as exc:
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
                    pipe.publish(self.channel(member), f"{self.member}{FRAME}{FRAME.join(frames)}")
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
            except (redis.RedisError, OSError) as exc:
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
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            except (redis.RedisError, OSError) as exc:
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
        elif kind == "x":
            self.sessions.drop_member(sender)
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


def check_redis(config: Config) -> None:
    """Before the workers start: Redis answers, and no other node is live when this one's storage is SQLite (a
    file on this machine that another node cannot share). Nothing is deleted: the keys of this node's previous
    run are taken by its workers as they start (and the sessions they describe ended), the other nodes' are
    theirs."""
    cluster = config.cluster
    client = redis.Redis.from_url(cluster.redis_url, socket_connect_timeout=5)
    try:
        listed = sorted(m.decode() for m in client.smembers(f"{cluster.prefix}:members"))
        alive = client.mget([f"{cluster.prefix}:alive:{m}" for m in listed]) if listed else []
    except redis.RedisError as exc:
        raise ConfigError("cluster.redis_url", f"cannot use Redis at {cluster.redis_url}: {exc}") from None
    finally:
        client.close()
    others = sorted({m.partition("/")[0] for m, value in zip(listed, alive, strict=True) if value is not None}
                    - {cluster.node_name})
    if others and config.storage.url.startswith("sqlite"):
        raise ConfigError("storage.url", f"node(s) {', '.join(others)} already run on Redis prefix "
                          f"{cluster.prefix!r}: the nodes of a cluster share one PostgreSQL database, not SQLite")


def supervise(config: Config, serve: Callable[[int, int], None], started: Callable[[], None]) -> int:
    """Fork the workers and keep them running: `serve(index, ready_fd)` runs one and writes a byte to
    `ready_fd` once it listens. A worker that dies is restarted; SIGTERM or SIGINT stops them all, SIGHUP goes
    to every worker (each reloads the configuration)."""
    workers = config.cluster.workers
    check_redis(config)
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
