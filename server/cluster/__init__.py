"""A cluster: nodes (machines, each with its own listeners) of one or more worker processes, routing to each
other's sessions over Redis and sharing one PostgreSQL database.

Every process is a *member*, named `"{node}/{worker}"` (e.g. `"n1/0"`), found by the others through its
heartbeat in Redis (`membership`). Other parts talk to a member with `Cluster.send` and their own frame kinds
(`Cluster.on`), and hear of members coming and going from the server hooks `cluster/member-up` and
`cluster/member-lost`. Redis is one server or a Redis Cluster (`redis_url = "redis+cluster://..."`), whose
shards carry the members' channels (sharded pub/sub) and the directory's keys (`transport`).

The package's modules: `core` (the `Cluster` of a member: its API, starting and stopping), `transport` (the
Redis connection, frames and pub/sub), `membership` (heartbeats, members up and lost), `directory` (the session
directory, `ClusterSessions`), `serve` (the supervisor of a node's worker processes).

Services that keep state in memory (group chat, publish-subscribe) spread their rooms and nodes over the
members: each is served by the member that owns it (server/ownership.py). What a member caches of data any
member may change (rosters, blocklists, archive preferences) is dropped on the others when one changes it:
the roster module announces its changes ('roster/changed') and hears of the others' ('roster/stale'), the
key-value store tells of the cached documents set through it (`KeyValueStore.watch_cached`, `forget_cached`).
"""

from server.cluster.core import Cluster
from server.cluster.directory import ClusterSessions, shared_session_state
from server.cluster.serve import check_redis, supervise
from server.cluster.transport import FIELD, FRAME, FallbackLock, _resolve, session_state

__all__ = ["FIELD", "FRAME", "Cluster", "ClusterSessions", "FallbackLock", "_resolve", "check_redis",
           "session_state", "shared_session_state", "supervise"]
