"""Which members a cluster has: heartbeats with a time to live, members up and lost.

Every process is a *member*, named `"{node}/{worker}"` (e.g. `"n1/0"`). Members find each other through Redis:
each refreshes a heartbeat key with a time to live and lists itself in the members set; the others read that
set and those keys at every heartbeat, so the cluster has no fixed size. A member whose key lapsed (or that
said goodbye) is lost: the server hooks `cluster/member-up` and `cluster/member-lost` tell the other parts, its
sessions are forgotten, and one survivor ends them (contacts see them go). A heartbeat holds the instance of
the member's process: a member restarted under its id before its heartbeat could lapse is lost, then up, for
the others.

Each member also keeps its sessions in a Redis hash that a starting member reads. A member started in place
of a dead one (same node and worker number) ends the sessions that one left; the sessions of a member that
is lost are ended by one survivor (whichever takes its hash first), after it told the others to forget the
member. A member that stalled past its heartbeat announces its sessions again when it resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from server.cluster.transport import FIELD, REDIS_ERRORS, stopping
from server.jid import JID
from server.sessions import Session
from server.stanza import Stanza, parse_stored

if TYPE_CHECKING:
    from server.cluster.directory import ClusterSessions
    from server.server import Server

log = logging.getLogger("parley.cluster")

HEARTBEAT = 2.0  # seconds between heartbeats
HEARTBEAT_TTL = 6  # seconds without a heartbeat after which a member is lost and its sessions forgotten


class Membership:
    """The heartbeats of `Cluster`: this member's, and its reading of the others'."""

    member: str
    instance: str
    sharded: bool
    server: Server
    _instances: dict[str, str]
    sessions: ClusterSessions
    counts: dict[str, int]
    _redis: aioredis.Redis | None
    _out: dict[str, list[str]]
    _members: list[str]
    _homing: set[JID]
    _steady_since: float
    connected: bool
    _pubsub: Any
    _tasks: list[asyncio.Task[None]]
    _reconnecting: asyncio.Task[None] | None

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
        pipe.set(self.alive_key(self.member), self.instance, ex=HEARTBEAT_TTL)
        pipe.sadd(self.members_key(), self.member)
        await pipe.execute()

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

    # --- membership --------------------------------------------------------------------------------------

    async def _read_members(self, start: bool = False) -> None:
        """Which members are live now: those of the members set whose heartbeat key is there. Members new since
        the last reading are up; those gone are lost (their sessions forgotten here, ended by one survivor); and
        those whose heartbeat names another process than before were restarted: lost, then up."""
        assert self._redis is not None
        listed = sorted(m.decode() if isinstance(m, bytes) else m
                        for m in await self._redis.smembers(self.members_key()))
        keys = [self.alive_key(m) for m in listed]
        # A Redis Cluster serves the members' heartbeat keys from different shards: read shard by shard.
        alive = (await (self._redis.mget_nonatomic(keys) if self.sharded else self._redis.mget(keys))  # type: ignore[attr-defined]
                 if listed else [])
        live = sorted({m for m, value in zip(listed, alive, strict=True) if value is not None} | {self.member})
        lapsed = [m for m, value in zip(listed, alive, strict=True) if value is None and m != self.member]
        before = set(self._members)
        self._members = live
        for member, value in zip(listed, alive, strict=True):
            if value is not None and member != self.member:
                self.incarnation(member, value.decode(), member in before and not start)
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

    def incarnation(self, member: str, instance: str, known: bool) -> None:
        """The process a member runs in, from its heartbeat or its greeting ('x'). When a `known` member comes
        back as another process before its heartbeat could lapse (restarted at once), it is lost and up again:
        what the others knew of the dead process (its sessions, the rooms it served) goes."""
        previous = self._instances.get(member)
        if known and previous is not None and previous != instance and member in self._out:
            log.warning("cluster: member %s was restarted", member)
            self._member_lost(member)
            self._member_up(member)
        self._instances[member] = instance

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
        self._instances.pop(member, None)
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
        while not stopping():
            await asyncio.sleep(HEARTBEAT)
            if not self.connected:
                continue
            try:
                await self._beat()
            except REDIS_ERRORS as exc:
                self.disconnected(f"heartbeat failed: {exc}")

    async def _beat(self) -> None:
        assert self._redis is not None
        if not await self._redis.set(self.alive_key(self.member), self.instance, ex=HEARTBEAT_TTL, xx=True):
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
                self._queue(member, f"x{FIELD}{self.instance}")
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
                with contextlib.suppress(*REDIS_ERRORS):
                    await self._pubsub.aclose()
                await self.subscribe()
                self.connected = True  # what the resynchronisation queues goes out
                await self._resync()
            except REDIS_ERRORS as exc:
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
