"""The `Cluster` of a member: the API the other parts use, starting and stopping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from server.cluster.directory import ClusterSessions, Directory
from server.cluster.membership import Membership
from server.cluster.transport import FIELD, FRAME, REDIS_ERRORS, FallbackLock, Transport, alive_key, connect, tag
from server.jid import JID
from server.sessions import Session
from server.stanza import Stanza
from server.stream.writer import serialize

if TYPE_CHECKING:
    from server.config import ClusterConfig
    from server.host import Host
    from server.server import Server

log = logging.getLogger("parley.cluster")


class Cluster(Transport, Membership, Directory):
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
        self.sharded = config.sharded  # on a Redis Cluster: keys hash-tagged per member and per account
        # This process's incarnation of the member, in its heartbeat key: a member restarted under the same id
        # before its heartbeat lapsed is noticed by the others (lost, then up) as the value changes.
        self.instance = f"{os.getpid()}.{secrets.token_hex(4)}"
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
        server.hooks.add("host/added", self.follow_answers)
        self._members: list[str] = [self.member]  # live members as of the last heartbeat, this one included
        self._instances: dict[str, str] = {}  # the process of each other member, as of its last heartbeat
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

    def slot(self, name: str) -> str:
        """`name` (a key, or the prefix of keys) made a hash tag on a Redis Cluster, so that the keys built on it
        share one hash slot and may go together into a transaction or a script; unchanged on one Redis."""
        return tag(name, self.sharded)

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

    # On a Redis Cluster a member's keys and channel share the hash slot of its id, and an account's directory
    # keys the slot of its bare JID: the accounts, and with them the directory's load, spread over the shards.

    def channel(self, member: str) -> str:
        return f"{self.prefix}:m:{self.slot(member)}"

    def sessions_key(self, member: str) -> str:
        return f"{self.prefix}:sessions:{self.slot(member)}"

    def alive_key(self, member: str) -> str:
        return alive_key(self.prefix, member, self.sharded)

    def members_key(self) -> str:
        return f"{self.prefix}:members"

    def where_key(self, bare: JID | str) -> str:
        """The members holding sessions of an account."""
        return f"{self.prefix}:where:{self.slot(str(bare))}"

    def watch_key(self, bare: JID | str) -> str:
        """The members watching an account's sessions (told as they change)."""
        return f"{self.prefix}:watch:{self.slot(str(bare))}"

    def watching_key(self, member: str) -> str:
        """The accounts a member watches: what is left to clear when it is gone."""
        return f"{self.prefix}:watching:{self.slot(member)}"

    # --- starting and stopping -------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe before the others' sessions are read (in `attach`), so no change falls between the two."""
        # RESP2: redis-py's RESP3 parser formats every pub/sub message it reads into a debug log line.
        self._redis = connect(self.url, protocol=2, socket_connect_timeout=3)
        await self.subscribe()
        self._stale = await self._take_sessions(self.member)
        await self._clear(self.member, self._stale)
        await self._announce()
        self._steady_since = time.monotonic()
        await self._read_members(start=True)
        self.connected = True
        for member in self._members:
            if member != self.member:
                self._queue(member, f"x{FIELD}{self.instance}")
        await self._count()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._send_loop()), loop.create_task(self._heartbeat())]

    def follow_answers(self, host: Host) -> None:
        """Every host, configured or a tenant added at run time: answers to other members' queries go back to
        them before this member's modules see them."""
        for event in ("iq-result/host", "iq-error/host", "iq-result/bare", "iq-error/bare"):
            host.hooks.add(event, self.answer_elsewhere, priority=1000)

    async def attach(self, _server: Server) -> None:
        """Once the hosts and the storage exist (again after a restart): the others' sessions are read and their
        changes followed, the cached documents set here are announced, and the sessions a dead predecessor left
        are ended."""
        self.server.storage.kv.watch_cached(self.document_changed)
        if not self._following:
            self._following = True
            self._tasks.append(asyncio.get_running_loop().create_task(self._dispatch_loop()))
            self._tasks.append(asyncio.get_running_loop().create_task(self._receive_loop()))
        stale, self._stale = self._stale, []
        for state in stale:
            await self._end_stale(state)


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
                    self.publish(pipe, member, f"{self.member}{FRAME}b")
                await pipe.execute()
            except REDIS_ERRORS:
                log.warning("cluster: could not remove %s's keys; the others forget it when they lapse", self.member)
            with contextlib.suppress(*REDIS_ERRORS):
                await self._pubsub.aclose()
            await self._redis.aclose()
