"""Ownership of service entities (rooms, publish-subscribe nodes) in a cluster: one live member at a time.

An entity is named by an owner key the service derives from a stanza (`Service.owner_key`: a room's bare
JID, a pubsub service's JID and node). Its owner holds a lease in Redis, `SET key owner NX PX lease`, and
renews it while it serves the entity; the value names the member and this process's incarnation, so that
a member restarted under the same id takes over at once what its dead predecessor held. Every takeover
draws a fencing token from one counter (INCR), so a later owner always has a larger token than an earlier
one.

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

`Placement` wires this into a server: every stanza for an owned entity is served here if this member
holds it, else forwarded to its live owner, else (no live owner) the entity is taken here and loaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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

# KEYS: owner key, fence counter. ARGV: our value, lease ms, our member's prefix ("member#").
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
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return {1, tostring(token)}
"""
# KEYS: owner keys. ARGV: lease ms, then one 'value|token' per key. Returns 1/0 per key.
_RENEW = """
local held = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
    held[i] = 1
  else
    held[i] = 0
  end
end
return held
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
    token: int  # the fencing token of this takeover: larger than any earlier owner's of any entity
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
        self._task: asyncio.Task[None] | None = None
        self._scripts = {name: client.register_script(text) for name, text in
                         (("claim", _CLAIM), ("renew", _RENEW), ("guarded", _GUARDED), ("release", _RELEASE))}

    def owner_key(self, key: str) -> str:
        return f"{self.prefix}:owner:{key}"

    def state_key(self, key: str) -> str:
        return f"{self.prefix}:state:{key}"

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

    async def claim(self, key: str) -> tuple[Lease | None, str]:
        """Take or renew the lease on `key`: (lease, '') when this member holds it now, (None, owner member)
        when another one does. Raises RedisError or OSError when Redis cannot be reached."""
        started = time.monotonic()
        taken, detail = await asyncio.wait_for(self._scripts["claim"](
            keys=[self.owner_key(key), f"{self.prefix}:fence"],
            args=[self.value, int(self.lease * 1000), self.member + SEP]), REDIS_TIMEOUT)
        detail = detail.decode() if isinstance(detail, bytes) else str(detail)
        if not taken:
            return None, detail.split(SEP, 1)[0]
        lease = Lease(key, int(detail), self._valid_for(started))
        self.held[key] = lease
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
        start = len(self.owner_key(""))
        return [key.decode()[start:] async for key in self.redis.scan_iter(self.owner_key(pattern), count=1000)]

    async def release(self, key: str, forget_state: bool = False) -> None:
        """Give the entity up (it is empty, or this member stops): the next stanza's member takes it at once."""
        lease = self.held.pop(key, None)
        if lease is None:
            return
        try:
            await asyncio.wait_for(self._scripts["release"](
                keys=[self.owner_key(key), self.state_key(key)],
                args=[self._tag(lease), "1" if forget_state else "0"]), REDIS_TIMEOUT)
        except redis_failures():
            log.warning("ownership: could not release %s; its lease lapses by itself", key)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._renew_loop())

    async def stop(self) -> None:
        """Release every lease, then stop renewing."""
        for key in list(self.held):
            await self.release(key)
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
            results = await asyncio.wait_for(self._scripts["renew"](
                keys=[self.owner_key(lease.key) for lease in leases],
                args=[int(self.lease * 1000), *map(self._tag, leases)]), wait)
        except redis_failures() as exc:
            self.healthy = False  # retried sooner
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

    def _drop(self, keys: list[str]) -> None:
        for key in keys:
            if self.held.pop(key, None) is not None:
                self.on_lost(key)


class Owned(Protocol):
    """What a service does for `Placement` (server.service.Service implements it)."""

    domain: str
    idle_release: float | None  # seconds after which an entity nobody used is given up (None: never)

    def owner_key(self, st: Stanza) -> str | None: ...
    async def take(self, lease: Lease) -> None: ...
    def lost(self, key: str) -> None: ...
    async def act(self, key: str, action: str, argument: str) -> None: ...
    async def refuse(self, st: Stanza, error: StanzaError) -> None: ...


class Placement:
    """Where a stanza to an owned entity is served: here, at its live owner, or here after taking it over."""

    def __init__(self, server: Server) -> None:
        cluster = server.cluster
        assert cluster is not None
        self.server = server
        self.cluster = cluster
        from server.cluster.transport import connect, is_cluster_url, tag

        url = server.config.cluster.redis_url
        client = connect(url, protocol=2, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)
        # On a Redis Cluster every lease key is in one hash slot: a script uses a lease's keys and the fence together.
        self.ownership = Ownership(client, tag(cluster.key("own"), is_cluster_url(url)), cluster.member,
                                   on_lost=self._lost)
        self.services: dict[str, Owned] = {}  # by domain
        self._ready: dict[str, Owned] = {}  # the entities held and loaded here, by key
        self._used: dict[str, float] = {}  # when each was last served, for `Owned.idle_release`
        self._sweeper: asyncio.Task[None] | None = None
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        cluster.on("own", self._act_here)

    def add(self, service: Owned) -> None:
        self.services[service.domain] = service

    async def remove(self, service: Owned) -> None:
        """A service stops: its entities are released; with the last one, this member stops renewing."""
        for key in [key for key, owner in self._ready.items() if owner is service]:
            await self.release(key)
        self.services.pop(service.domain, None)
        if not self.services:
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

    async def _locate(self, service: Owned, key: str) -> str | None:
        """None when this member holds `key` (taken now if need be), the live owner's id, or '' when no
        member can serve it now (Redis unreachable, or a dead owner's lease not lapsed in time)."""
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                return await self._claim(service, key)
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]

    async def _claim(self, service: Owned, key: str) -> str | None:
        deadline = time.monotonic() + self.ownership.lease + 1
        while True:
            if self.holds(key):
                return None
            try:
                lease, owner = await self.ownership.claim(key)
            except redis_failures() as exc:
                log.warning("ownership: cannot claim %s: %s", key, exc)
                return ""
            if lease is not None:
                try:
                    await service.take(lease)
                except BaseException:
                    await self.ownership.release(key)
                    raise
                if self.ownership.holds(key) is not lease:
                    service.lost(key)  # lost while loading
                    continue
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
