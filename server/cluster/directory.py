"""The sharded session directory of a cluster member.

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
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from server.cluster.transport import FIELD, REDIS_ERRORS
from server.jid import JID
from server.registry import resolve
from server.sessions import Session, SessionRegistry
from server.stanza import parse_stored

if TYPE_CHECKING:
    from server.cluster.core import Cluster
    from server.config import Config

CACHED_USERS = 10000  # accounts without a session on a member whose sessions elsewhere it keeps in memory
ASK_TIMEOUT = 2.0  # seconds a lookup waits for the members holding the account's sessions


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
            except REDIS_ERRORS as exc:
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
            except REDIS_ERRORS as exc:
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



class Directory:
    """The Redis side of the directory, part of `Cluster`: which members hold and which watch each account."""

    member: str
    prefix: str
    sharded: bool
    sessions: ClusterSessions
    _redis: aioredis.Redis | None
    _out: dict[str, list[str]]
    _members: list[str]
    _lookups: list[tuple[JID, asyncio.Future[list[str]]]]
    _looking: set[asyncio.Task[None]]
    _homing: set[JID]
    _unhomed: set[JID]
    _unwatched: set[JID]
    _dirty: dict[JID, Session]
    _wake: asyncio.Event

    def live(self, member: str) -> bool:
        return member in self._out

    async def watch(self, bare: JID) -> list[str]:
        """Register this member as a watcher of the account, then read which members hold its sessions, so that
        a member registering the account's first session (which writes, then reads, the other set) either is
        read here or finds this one among the watchers. The lookups of one turn of the event loop go together.

        Both sets of an account are in one hash slot, so on a Redis Cluster one shard serves the write and the
        read in the order a connection sent them: that order is what the guarantee needs. On one Redis they go
        in one transaction; on a Redis Cluster, where a transaction cannot span the slots of several accounts
        (and of this member's `watching:` set), in a pipeline that keeps each shard's commands in order."""
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
        pipe = self._redis.pipeline(transaction=not self.sharded)
        for bare, _ in batch:
            pipe.sadd(self.watch_key(bare), self.member)
            pipe.sadd(self.watching_key(self.member), str(bare))
            pipe.smembers(self.where_key(bare))
        try:
            results = await pipe.execute()
        except REDIS_ERRORS as exc:
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
            pipe.srem(self.watch_key(bare.decode()), member)
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
        """Accounts with a first session here: listed as held here, and their watchers told their sessions (in
        one transaction on one Redis, in order per shard on a Redis Cluster: see `watch`)."""
        assert self._redis is not None
        homing = [bare for bare in self._homing if bare in self.sessions.homed]
        self._homing.clear()
        if not homing:
            return
        pipe = self._redis.pipeline(transaction=not self.sharded)
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
