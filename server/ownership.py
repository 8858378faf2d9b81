"""Ownership of service entities (rooms, publish-subscribe nodes) in a cluster: one live member at a time.

An entity is named by an owner key the service derives from a stanza (`Service.owner_key`: a room's bare
JID, a pubsub service's JID and node). Its owner holds a lease in Redis, `SET key owner NX PX lease`, and
renews it while it serves the entity; the value names the member and this process's incarnation, so that
a member restarted under the same id takes over at once what its dead predecessor held. Every takeover
draws a fencing token from Redis's clock (microseconds), so a later owner has a larger token than an earlier
one as long as that clock does not go back.

Redis Cluster: every script touches the keys of one entity only (its lease and its state hash, under the
entity's hash tag), and each member's list of what it holds is a key of its own, so no operation spans two
hash slots; renewals are one script per lease, sent together.

Fencing of writes: before the owner writes the entity's state (PostgreSQL, or the state hash in Redis
below) it checks that its lease is still valid locally and, for PostgreSQL, that Redis still names it with
its token (`Ownership.guard`, one script). The token is not written into PostgreSQL: the storage layer is
shared with single-process Parley and has no token column, and the rooms' writes are rare (configuration,
affiliations) so a round trip to Redis per write costs nothing that matters. The window left (a process
paused between the check and the write) is smaller than a lease, which the local check already bounds.

A member stops serving before its lease can expire: leases are valid locally until the start of the last
successful renewal plus the lease minus a margin, so a member cut off from Redis (a partition) drops its
entities (`on_lost`) and refuses their stanzas while the others wait for the lease to lapse in Redis, and
two members never serve one entity.

State the next owner needs (a room's occupants) is kept in a Redis hash per entity, written by the owner
only (each write is a script that checks the lease first), read by whoever takes the entity over.

Each member also lists what it holds, in a hash of its own (`held:{member}`: owner key -> service domain),
so that the survivors know what a lost member held once its leases are gone from Redis.

`Placement` wires this into a server: every stanza for an owned entity is served here if this member
holds it, else forwarded to its live owner, else (no live owner) the entity is taken here and loaded.
When a member is lost (`cluster/member-lost`) the survivors take its entities over at once, without waiting
for a stanza: each takes those that rendezvous hashing gives it (`successor`), so that they spread over the
survivors and every survivor makes the same choice without a word to the others; what is left after
`RESCUE_AFTER` (its successor died too, or saw another set of members) is taken by whoever comes first.
A lost member's leases have lapsed by then (`LEASE` is shorter than the heartbeat's time to live), so the
entities come back within that time to live, the heartbeat and one load.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from server.stream.errors import StanzaError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from server.server import Server
    from server.stanza import Stanza

log = logging.getLogger("parley.ownership")

LEASE = 4.0  # seconds an owner's claim lasts in Redis without renewal
MARGIN = 0.25  # of the lease: the owner considers it lost this much earlier than Redis does
REDIS_TIMEOUT = 1.0  # seconds a Redis call may take before the member counts it as failed
SEP = "#"  # between the member and the incarnation in a lease's value
TAKEOVER_CONCURRENCY = 16  # entities of a lost member loaded at once by one survivor
RESCUE_AFTER = 5.0  # seconds after which a survivor takes what a lost member's other successors did not

# KEYS: owner key. ARGV: our value, lease ms, our member's prefix ("member#").
# Taken when free or left by a dead incarnation of this member; renewed when ours; else the owner's value.
_CLAIM = """
local current = redis.call('GET', KEYS[1])
if current then
  local sep = string.find(current, '|', 1, true)
  local holder = string.sub(current, 1, sep - 1)
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, string.sub(current, sep + 1)}
  end
  if string.sub(holder, 1, #ARGV[3]) ~= ARGV[3] then
    return {0, holder}
  end
end
local now = redis.call('TIME')
local token = now[1] .. string.format('%06d', now[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return {1, token}
"""
# KEYS: owner key. ARGV: lease ms, our 'value|token'. 1 if renewed, 0 if not ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  return 1
end
return 0
"""
# KEYS: owner key, [state hash]. ARGV: 'value|token', then field/value pairs to set, '' values deleted.
_GUARDED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
for i = 2, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[2], ARGV[i])
  else
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] == '1' then
    redis.call('DEL', KEYS[2])
  end
  return 1
end
return 0
"""


class NotOwner(Exception):
    """A write by a member that no longer owns the entity: refused."""


def redis_failures() -> tuple[type[Exception], ...]:
    """What a call to Redis raises when Redis is away or slow. The client is imported here, when a cluster
    first talks to Redis, so that a single process does not load it (some 6 MiB of resident memory)."""
    import redis

    return (redis.RedisError, OSError, TimeoutError)


@dataclass
class Lease:
    key: str
    token: int  # the fencing token of this takeover: Redis's clock in microseconds, larger than earlier owners'
    deadline: float  # monotonic time until which this member may act as the owner


class Ownership:
    """This member's leases, under a Redis key prefix that every member of the cluster shares."""

    def __init__(self, client: aioredis.Redis, prefix: str, member: str, lease: float = LEASE,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.redis = client
        self.prefix = prefix
        self.member = member
        self.value = f"{member}{SEP}{secrets.token_hex(6)}"
        self.lease = lease
        self.on_lost = on_lost or (lambda key: None)
        self.held: dict[str, Lease] = {}
        self.healthy = True  # False while renewals fail
        self.stopped = False  # set by stop(): a member shutting down takes nothing more
        self._task: asyncio.Task[None] | None = None
        self._loaded = False  # the pipelines' scripts are in Redis's script cache
        self._scripts = {name: client.register_script(text) for name, text in
                         (("claim", _CLAIM), ("renew", _RENEW), ("guarded", _GUARDED), ("release", _RELEASE))}

    def owner_key(self, key: str) -> str:
        return f"{self.prefix}:owner:{{{key}}}"

    def state_key(self, key: str) -> str:
        return f"{self.prefix}:state:{{{key}}}"

    def held_key(self, member: str) -> str:
        """What a member holds (owner key -> the service's domain): one key per member, under its own hash tag."""
        return f"{self.prefix}:held:{{{member}}}"

    async def held_by(self, member: str) -> dict[str, str]:
        """The entities a member listed as held (by a lost member: what it held when it died), with their
        services' domains."""
        raw = await asyncio.wait_for(self.redis.hgetall(self.held_key(member)), REDIS_TIMEOUT)
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def forget_held(self, member: str, keys: Iterable[str]) -> None:
        """Take entities off a lost member's list: they were taken over, or are no longer anyone's."""
        keys = list(keys)
        if keys:
            await asyncio.wait_for(self.redis.hdel(self.held_key(member), *keys), REDIS_TIMEOUT)

    def _valid_for(self, started: float) -> float:
        return started + self.lease * (1 - MARGIN)

    def holds(self, key: str) -> Lease | None:
        """The lease on `key` if this member holds it and may still act on it."""
        lease = self.held.get(key)
        if lease is None:
            return None
        if time.monotonic() >= lease.deadline:
            self._drop([key])
            return None
        return lease

    async def claim(self, key: str, service: str = "") -> tuple[Lease | None, str]:
        """Take or renew the lease on `key` (an entity of the service at domain `service`): (lease, '') when
        this member holds it now, (None, owner member) when another one does. Raises RedisError or OSError when
        Redis cannot be reached, ConnectionError once this member stops (what it took then would outlive it)."""
        if self.stopped:
            raise ConnectionError("this member is stopping")
        started = time.monotonic()
        taken, detail = await asyncio.wait_for(self._scripts["claim"](
            keys=[self.owner_key(key)],
            args=[self.value, int(self.lease * 1000), self.member + SEP]), REDIS_TIMEOUT)
        detail = detail.decode() if isinstance(detail, bytes) else str(detail)
        if not taken:
            return None, detail.split(SEP, 1)[0]
        lease = Lease(key, int(detail), self._valid_for(started))
        if key not in self.held:
            await asyncio.wait_for(self.redis.hset(self.held_key(self.member), key, service), REDIS_TIMEOUT)
        self.held[key] = lease
        if self.stopped:  # stop() ran while Redis answered: give it back at once
            await self.release(key)
            raise ConnectionError("this member is stopping")
        self.healthy = True
        self.start()
        return lease, ""

    def _tag(self, lease: Lease) -> str:
        return f"{self.value}|{lease.token}"

    async def guard(self, lease: Lease) -> None:
        """Before the owner persists the entity: NotOwner unless this lease is still the current one."""
        await self.record(lease, {})

    async def record(self, lease: Lease, fields: dict[str, str | None]) -> None:
        """Set (or, for None, delete) fields of the entity's state hash, only while `lease` is the current
        one; NotOwner otherwise (and for any Redis failure: the write cannot be known to be fenced)."""
        if time.monotonic() >= lease.deadline or self.held.get(lease.key) is not lease:
            raise NotOwner(lease.key)
        args: list[str] = [self._tag(lease)]
        for field, value in fields.items():
            args += [field, value or ""]
        try:
            done = await asyncio.wait_for(self._scripts["guarded"](
                keys=[self.owner_key(lease.key), self.state_key(lease.key)], args=args), REDIS_TIMEOUT)
        except redis_failures() as exc:
            raise NotOwner(lease.key) from exc
        if not done:
            self._drop([lease.key])
            raise NotOwner(lease.key)

    async def state(self, key: str) -> dict[str, str]:
        """The entity's state hash, as its last owner left it."""
        raw = await asyncio.wait_for(self.redis.hgetall(self.state_key(key)), REDIS_TIMEOUT)
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def owner(self, key: str) -> str | None:
        """The member that owns `key` now, if any."""
        value = await asyncio.wait_for(self.redis.get(self.owner_key(key)), REDIS_TIMEOUT)
        return value.decode().split(SEP, 1)[0] if value else None

    async def owned(self, pattern: str) -> list[str]:
        """The keys matching a glob pattern that some member owns now."""
        start = len(self.owner_key("")) - 1
        return [key.decode()[start:-1] async for key in self.redis.scan_iter(self.owner_key(pattern), count=1000)]

    async def release(self, key: str, forget_state: bool = False) -> None:
        """Give the entity up (it is empty, or this member stops): the next stanza's member takes it at once."""
        lease = self.held.pop(key, None)
        if lease is None:
            return
        try:
            pipe = await self._pipeline()
            await self._scripts["release"](keys=[self.owner_key(key), self.state_key(key)],
                                           args=[self._tag(lease), "1" if forget_state else "0"], client=pipe)
            pipe.hdel(self.held_key(self.member), key)
            await asyncio.wait_for(pipe.execute(), REDIS_TIMEOUT)
        except redis_failures():
            self._loaded = False
            log.warning("ownership: could not release %s; its lease lapses by itself", key)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._renew_loop())

    async def stop(self) -> None:
        """Release every lease, then stop renewing; this member's list of what it holds goes too (what is left
        in it was lost to others meanwhile)."""
        self.stopped = True
        for key in list(self.held):
            await self.release(key)
        try:
            await asyncio.wait_for(self.redis.delete(self.held_key(self.member)), REDIS_TIMEOUT)
        except redis_failures():
            log.warning("ownership: could not remove the list of what %s held", self.member)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 4 if self.healthy else self.lease / 16)
            await self.renew()

    async def renew(self) -> None:
        """Extend every lease held; one lost to another member is dropped (`on_lost`), and so is one about to
        run out while Redis does not answer: the wait for Redis never outlasts the leases."""
        if not self.held:
            return
        leases = list(self.held.values())
        started = time.monotonic()
        wait = max(0.01, min(REDIS_TIMEOUT, min(lease.deadline for lease in leases) - started))
        try:
            results = await asyncio.wait_for(self._renew_all(leases), wait)
        except redis_failures() as exc:
            self.healthy = False  # retried sooner
            self._loaded = False
            soon = time.monotonic() + self.lease / 8
            expired = [lease.key for lease in leases if soon >= lease.deadline]
            if expired:
                log.error("ownership: Redis unreachable (%s); no longer serving %d entities", exc or "timeout",
                          len(expired))
                self._drop(expired)
            return
        self.healthy = True
        deadline = self._valid_for(started)
        lost = []
        for lease, ok in zip(leases, results, strict=True):
            if ok:
                lease.deadline = deadline
            elif self.held.get(lease.key) is lease:
                lost.append(lease.key)
        if lost:
            log.warning("ownership: %d leases were taken over: %s", len(lost), ", ".join(lost[:5]))
            self._drop(lost)
            try:
                await self.forget_held(self.member, lost)
            except redis_failures():
                pass  # whoever reads the list checks each entry's owner

    async def _pipeline(self) -> Any:
        """A pipeline for the renew and release scripts. redis-py loads a pipeline's scripts into one Redis, not
        into a Redis Cluster's masters (each has its own script cache): they are loaded into all first, and again
        after a failure (a master may have restarted with an empty cache)."""
        if not self._loaded:
            for name in ("renew", "release"):
                await self.redis.script_load(self._scripts[name].script)
            self._loaded = True
        return self.redis.pipeline(transaction=False)

    async def _renew_all(self, leases: list[Lease]) -> list[int]:
        pipe = await self._pipeline()
        for lease in leases:
            await self._scripts["renew"](keys=[self.owner_key(lease.key)],
                                         args=[int(self.lease * 1000), self._tag(lease)], client=pipe)
        return list(await pipe.execute())

    def _drop(self, keys: list[str]) -> None:
        for key in keys:
            if self.held.pop(key, None) is not None:
                self.on_lost(key)


class Owned(Protocol):
    """What a service does for `Placement` (server.service.Service implements it)."""

    domain: str
    idle_release: float | None  # seconds after which an entity nobody used is given up (None: never)

    def owner_key(self, st: Stanza) -> str | None: ...
    # Load the entity; False when there is nothing to serve (none, or a room nobody is in); the lease is kept
    # for the stanza that made this member take it, let go when taken over from a lost member.
    async def take(self, lease: Lease) -> bool: ...
    def lost(self, key: str) -> None: ...
    async def act(self, key: str, action: str, argument: str) -> None: ...
    async def refuse(self, st: Stanza, error: StanzaError) -> None: ...


def successor(key: str, members: Iterable[str]) -> str:
    """The member that takes `key` over when its owner is lost (rendezvous hashing): the highest hash of member
    and key. A lost member's entities spread evenly over the survivors, each survivor finds the same answer
    alone, and a change of members moves only the entities that the member who came or went wins."""
    return max(members, key=lambda member: hashlib.blake2b(f"{member}\n{key}".encode(), digest_size=8).digest())


class Placement:
    """Where a stanza to an owned entity is served: here, at its live owner, or here after taking it over."""

    def __init__(self, server: Server) -> None:
        cluster = server.cluster
        assert cluster is not None
        self.server = server
        self.cluster = cluster
        from server.cluster.transport import connect  # one Redis, or a Redis Cluster (redis+cluster://)

        client = connect(server.config.cluster.redis_url, protocol=2, socket_timeout=REDIS_TIMEOUT,
                         socket_connect_timeout=REDIS_TIMEOUT)
        self.ownership = Ownership(client, cluster.key("own"), cluster.member, on_lost=self._lost)
        self.services: dict[str, Owned] = {}  # by domain
        self._ready: dict[str, Owned] = {}  # the entities held and loaded here, by key
        self._used: dict[str, float] = {}  # when each was last served, for `Owned.idle_release`
        self._sweeper: asyncio.Task[None] | None = None
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._rescues: set[asyncio.Task[Any]] = set()  # takeovers of lost members' entities under way
        self.rescue_after = RESCUE_AFTER
        cluster.on("own", self._act_here)
        server.hooks.add("cluster/member-lost", self._member_lost)
        server.hooks.add("server/started", self._started)

    def add(self, service: Owned) -> None:
        self.services[service.domain] = service

    async def remove(self, service: Owned) -> None:
        """A service stops: its entities are released; with the last one, this member stops renewing."""
        for key in [key for key, owner in self._ready.items() if owner is service]:
            await self.release(key)
        self.services.pop(service.domain, None)
        if not self.services:
            self.server.hooks.remove("cluster/member-lost", self._member_lost)
            self.server.hooks.remove("server/started", self._started)
            for task in self._rescues:
                task.cancel()
            await asyncio.gather(*self._rescues, return_exceptions=True)
            if self._sweeper is not None:
                self._sweeper.cancel()
                await asyncio.gather(self._sweeper, return_exceptions=True)
            await self.ownership.stop()
            await self.ownership.redis.aclose()
            _placements.pop(self.server, None)

    def holds(self, key: str) -> Lease | None:
        """The lease on an entity held and loaded here."""
        return self.ownership.holds(key) if key in self._ready else None

    async def admit(self, service: Owned, st: Stanza) -> bool:
        """Whether `st` is served here; if not, it has been forwarded to the owner or refused."""
        key = service.owner_key(st)
        if key is None:
            return True
        if self.holds(key):
            self._used[key] = time.monotonic()
            return True
        owner = await self._locate(service, key)
        if owner is None:
            return True
        if owner == "":
            await service.refuse(st, StanzaError("remote-server-timeout", "this service is not reachable now"))
        else:
            self.cluster.route_elsewhere(owner, st)
        return False

    async def _locate(self, service: Owned, key: str, keep_absent: bool = True) -> str | None:
        """None when this member holds `key` (taken now if need be), the live owner's id, or '' when no
        member can serve it now (Redis unreachable, or a dead owner's lease not lapsed in time). Without
        `keep_absent`, an entity that turns out not to exist is let go at once (None, and not held)."""
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                return await self._claim(service, key, keep_absent)
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]

    async def _claim(self, service: Owned, key: str, keep_absent: bool) -> str | None:
        deadline = time.monotonic() + self.ownership.lease + 1
        while True:
            if self.holds(key):
                return None
            try:
                lease, owner = await self.ownership.claim(key, service.domain)
            except redis_failures() as exc:
                log.warning("ownership: cannot claim %s: %s", key, exc)
                return ""
            if lease is not None:
                try:
                    present = await service.take(lease)
                except BaseException:
                    await self.ownership.release(key)
                    raise
                if self.ownership.holds(key) is not lease:
                    service.lost(key)  # lost while loading
                    continue
                if present is False and not keep_absent:
                    service.lost(key)
                    await self.ownership.release(key, forget_state=True)
                    return None
                self._ready[key] = service
                self._used[key] = time.monotonic()
                if service.idle_release is not None and self._sweeper is None:
                    self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
                return None
            if owner in self.cluster.members() and owner != self.cluster.member:
                return owner
            if time.monotonic() >= deadline:  # a dead owner's lease lapses within LEASE
                return ""
            await asyncio.sleep(0.1)

    def _member_lost(self, member: str) -> None:
        """A member is lost: its entities are taken over now, by this member and the other survivors."""
        self._in_background(self.take_over(member))

    async def _started(self, _server: Server) -> None:
        """A member started in place of a dead one (same node and worker) takes back at once what that one held:
        the others saw no member lost, and its leases are this member's to take (`_CLAIM`)."""
        self._in_background(self._rescue(self.cluster.member, lambda key: True))

    def _in_background(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._rescues.add(task)
        task.add_done_callback(self._rescues.discard)

    async def take_over(self, lost: str) -> None:
        """Take over, and load, the entities of a lost member that this one succeeds to (`successor` among the
        live members); after `rescue_after` seconds, whatever of its list nobody took yet."""
        started = time.monotonic()
        me = self.cluster.member
        taken = await self._rescue(lost, lambda key: successor(key, self.cluster.members()) == me)
        if taken:
            log.warning("ownership: took over %d entities of lost member %s in %.2f s", taken, lost,
                        time.monotonic() - started)
        await asyncio.sleep(self.rescue_after)
        taken = await self._rescue(lost, lambda key: True)
        if taken:
            log.warning("ownership: took over %d more entities of lost member %s, left by its successors", taken,
                        lost)

    async def _rescue(self, lost: str, ours: Callable[[str], bool]) -> int:
        """Take those of the lost member's entities that `ours` picks (unless a live member owns them already),
        a few at a time; those now owned by another member or by none are struck off its list. How many were
        taken here."""
        try:
            held = await self.ownership.held_by(lost)
        except redis_failures() as exc:
            log.warning("ownership: cannot read what lost member %s held: %s", lost, exc)
            return 0
        gate = asyncio.Semaphore(TAKEOVER_CONCURRENCY)
        settled: list[str] = []
        taken = 0

        async def rescue(key: str, service: Owned) -> None:
            nonlocal taken
            async with gate:
                try:
                    owner = await self._locate(service, key, keep_absent=False)
                except Exception:
                    log.exception("ownership: could not take over %s from lost member %s", key, lost)
                    return
            if owner in ("", lost):
                return
            if owner is None and self.holds(key) is not None:
                taken += 1
                if lost == self.cluster.member:
                    return  # this member's again (its predecessor's): it stays on the list
            settled.append(key)

        await asyncio.gather(*(rescue(key, self.services[domain]) for key, domain in held.items()
                               if domain in self.services and ours(key)))
        try:
            await self.ownership.forget_held(lost, settled)
        except redis_failures():
            pass  # struck off by the next reader
        return taken

    async def act(self, service: Owned, key: str, action: str, argument: str) -> None:
        """Run `action` on the entity where it is owned (taking it here if nobody owns it)."""
        owner = await self._locate(service, key)
        if owner is None:
            await service.act(key, action, argument)
        elif owner == "":
            raise StanzaError("remote-server-timeout", "this service is not reachable now")
        else:
            self.cluster.send(owner, "own", json.dumps([service.domain, key, action, argument]))

    async def _act_here(self, sender: str, payload: str) -> None:
        domain, key, action, argument = json.loads(payload)
        service = self.services.get(domain)
        if service is not None:
            await self.act(service, key, action, argument)

    async def _sweep(self) -> None:
        """Give up the entities that went unused for their service's `idle_release`: what a member renews stays
        bounded by what it serves."""
        while True:
            await asyncio.sleep(self.ownership.lease)
            now = time.monotonic()
            for key, service in list(self._ready.items()):
                idle = service.idle_release
                if idle is not None and now - self._used.get(key, now) > idle:
                    await self.release(key)

    async def release(self, key: str, forget_state: bool = False) -> None:
        """Give up an entity served here (it emptied, went unused, or the service stops)."""
        self._ready.pop(key, None)
        self._used.pop(key, None)
        await self.ownership.release(key, forget_state)

    def _lost(self, key: str) -> None:
        self._used.pop(key, None)
        service = self._ready.pop(key, None)
        if service is not None:
            service.lost(key)


_placements: weakref.WeakKeyDictionary[Server, Placement] = weakref.WeakKeyDictionary()


def placement_of(server: Server) -> Placement | None:
    """The server's placement of owned entities, shared by its services: None in a single process."""
    if server.cluster is None:
        return None
    found = _placements.get(server)
    if found is None:
        found = _placements[server] = Placement(server)
    return found
