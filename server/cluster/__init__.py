"""A cluster: nodes (machines, each with its own listeners) of one or more worker processes, routing to each
other's sessions over Redis and sharing one PostgreSQL database.

Every process is a *member*, named `"{node}/{worker}"` (e.g. `"n1/0"`). Members find each other through Redis:
each refreshes a heartbeat key with a time to live and lists itself in the members set; the others read that
set and those keys at every heartbeat, so the cluster has no fixed size. A member whose key lapsed (or that
said goodbye) is lost: the server hooks `cluster/member-up` and `cluster/member-lost` tell the other parts, its
sessions are forgotten, and one survivor ends them (contacts see them go). Other parts talk to a member with
`Cluster.send` and their own frame kinds (`Cluster.on`).

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
