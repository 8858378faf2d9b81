"""Client sessions and the directory of who is connected.

A Session is what routing sees of a logged-in resource. It is kept apart from the TCP connection
so that a session can outlive its connection (stream management resumption) and so that routing
code never touches a socket.

The session directory says where each user's sessions are. A server gets one when it is composed:
`SessionRegistry` when it runs in one process, the cluster's (`server.cluster.ClusterSessions`) when
worker processes share the users. The latter watches the state of its sessions that routing on the other
workers reads, through `Session.watcher`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Container, Iterable
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from xml.etree.ElementTree import Element

from server.jid import JID
from server.stanza import parse_stored
from server.stream.writer import serialize

if TYPE_CHECKING:
    from server.config import Config
    from server.host import Host

log = logging.getLogger("parley.sessions")


class SessionWatcher(Protocol):
    """Told when the shared state of a session changes: what routing on other worker processes reads of it
    (priority, presence, roster interest, directed presence, and `data` of the modules in `shared`)."""

    shared: Container[str]  # the names of the modules whose `Session.data` entry is shared

    def changed(self, session: Session) -> None: ...


def _watched(name: str) -> Any:
    """An attribute of the shared state: set, it tells the session's watcher.

    A property rather than a `__setattr__` override, so that the attributes set for every stanza
    (`last_active`) cost what they cost with no watcher; the getter is a C function, no Python frame.
    """
    key = f"_{name}"

    def set_(session: Session, value: object) -> None:
        setattr(session, key, value)
        if session.watcher is not None:
            session.watcher.changed(session)

    return property(attrgetter(key), set_)


class SessionData(dict[str, object]):
    """Session.data: a module's entry, when the module declares it shared, tells the session's watcher as it
    is set or removed."""

    __slots__ = ("session",)  # no instance dictionary beside the dictionary itself: one of each per session

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session

    def __setitem__(self, key: str, value: object) -> None:
        super().__setitem__(key, value)
        self._changed(key)

    def pop(self, key: str, *default: Any) -> Any:
        value = super().pop(key, *default)
        self._changed(key)
        return value

    def _changed(self, key: str) -> None:
        watcher = self.session.watcher
        if watcher is not None and key in watcher.shared:
            watcher.changed(self.session)


class DirectedPresence(set[JID]):
    """Session.directed, which tells the session's watcher as it changes: a worker that takes over from a dead
    one ends that one's sessions everywhere their presence went (rooms among them)."""

    __slots__ = ("session",)

    def __init__(self, session: Session, jids: Iterable[JID] = ()) -> None:
        super().__init__(jids)
        self.session = session

    def add(self, jid: JID) -> None:
        super().add(jid)
        self._changed()

    def discard(self, jid: JID) -> None:
        super().discard(jid)
        self._changed()

    def clear(self) -> None:
        super().clear()
        self._changed()

    def __isub__(self, other: Any) -> DirectedPresence:
        super().__isub__(other)
        self._changed()
        return self

    def _changed(self) -> None:
        if self.session.watcher is not None:
            self.session.watcher.changed(self.session)


def _nothing(*args: object) -> None:
    """What a closed session writes and closes with: nothing (see `Session.closed`)."""


def _set_closed(session: Session, value: bool) -> None:
    session._closed = value
    if value:
        # No more output: the session lets go of its connection, so that one whose end waits (for storage,
        # on a busy server) does not keep the connection's buffers in memory (256 KiB of them with TLS).
        session._write = session._close = _nothing
        session.room = None


class Session:
    """One bound resource of one account."""

    # One per connected resource: no instance dictionary (about 1 KiB each); offline storage keeps weak references.
    __slots__ = ("__weakref__", "_close", "_closed", "_interested", "_presence", "_priority", "_write", "bare", "data",
                 "detached", "directed", "elsewhere", "ended", "flushed", "hibernate", "hold", "host", "jid",
                 "last_active", "outbox", "remote_ip", "room", "started", "undelivered", "watcher")

    # No more output: the connection is gone or going. Set, the session lets go of the connection.
    closed: bool = property(attrgetter("_closed"), _set_closed)  # type: ignore[assignment]
    priority: int = _watched("priority")
    presence: Element | None = _watched("presence")  # last broadcast available presence; None while unavailable
    interested: bool = _watched("interested")  # requested the roster: gets roster pushes and subscription requests

    def __init__(self, jid: JID, host: Host, write: Callable[[str], None], close: Callable[[str | None], None],
                 remote_ip: str = "") -> None:
        # Set by the session directory when other processes read this session's shared state.
        self.watcher: SessionWatcher | None = None
        self.elsewhere = False  # a session of another process of a cluster, as this one knows it
        self.jid = jid
        self.bare = jid.bare
        self.host = host
        self.remote_ip = remote_ip
        self._priority = 0
        self._presence: Element | None = None
        self._interested = False
        self.directed: set[JID] = DirectedPresence(self)  # JIDs that got directed presence from this session
        self.started = time.time()
        self.last_active = time.monotonic()
        self._closed = False
        self.ended = False  # 'session/closed' has run
        # Per-session state owned by modules, keyed by module name.
        self.data: dict[str, object] = SessionData(self)
        # Set by a module that keeps stanzas back from the client for a while (client state indication):
        # it gets each stanza with its serialized form and returns True when it took it.
        self.hold: Callable[[Element, str], bool] | None = None
        # Set by stream management: takes every stanza written to the client, to count it and keep it
        # until acknowledged, and writes it with `transmit` unless the client is away (`detached`).
        self.outbox: Callable[[str, Element | None], None] | None = None
        # Set by stream management for a resumable session: called when the connection drops without a
        # closing stream; True when the session stays, detached, waiting for the client to resume.
        self.hibernate: Callable[[], bool] | None = None
        self.detached = False  # the connection is gone; stanzas wait in stream management's queue
        # Flow control for a long stream of stanzas (an offline backlog): room(wait) returns how many more
        # the client can take now, once it can take any if `wait`, else at once (0: none now). Set by the
        # connection (its socket's write buffer), and by stream management (the client's acknowledgements).
        self.room: Callable[[bool], Awaitable[int]] | None = None
        # Stanzas that were on their way to the client when it went, oldest first: what was sent to the
        # closed session, and what stream management says the client never acknowledged. The server hands
        # them to the 'session/undelivered' hook when the session ends, so that none vanishes.
        self.undelivered: list[Element] = []  # a list: an empty deque takes 600 bytes
        self.flushed = False  # 'session/undelivered' has had them: stragglers are handed on one by one
        self._write = write
        self._close = close

    @property
    def available(self) -> bool:
        return self.presence is not None

    def send(self, el: Element) -> None:
        if self.closed:
            self._keep(el)
        else:
            self.send_raw(serialize(el), el)

    def send_raw(self, data: str, el: Element | None = None) -> None:
        """Send serialized XML, e.g. from a fan-out that serializes a stanza once for many sessions.

        `el` is the stanza `data` serializes ('to' aside), so that `hold` can judge it; without it the
        data goes out as it is (as when `hold` lets go of what it took).
        """
        if el is not None:
            self.host.server.stats.sent[el.tag] += 1
        if self.closed:
            self._keep(el if el is not None else parse_stored(data))
        elif el is None or self.hold is None or not self.hold(el, data):
            if self.outbox is None:
                self._write(data)
            else:
                self.outbox(data, el)

    def _keep(self, el: Element) -> None:
        """A stanza for a session that is closed: kept for the hand-on when it ends, or handed on now if it has."""
        self.undelivered.append(el)
        if self.flushed:
            self.host.server.hand_on_soon(self)

    async def ready(self, most: int, wait: bool = True) -> int:
        """How many more stanzas (at most `most`) the client can take, once it can take any if `wait`; 0 once
        the session is closed, or when it has no room now and `wait` is False.

        For whoever writes many stanzas at once (an offline backlog), so that they go as fast as the client
        takes them and not faster than stream management's queue or the connection's buffer allows.
        """
        room = most if self.closed or self.room is None else await self.room(wait)
        return 0 if self.closed else min(most, room)

    def transmit(self, data: str) -> None:
        """Write to the client's connection as it is, stream management's nonzas included."""
        self._write(data)

    def attach(self, write: Callable[[str], None], close: Callable[[str | None], None]) -> None:
        """Carry on over another connection (stream management resumption)."""
        self._write = write
        self._close = close

    def close(self, condition: str | None = None) -> None:
        """End the session, with a stream error condition if given."""
        self._close(condition)

    def __repr__(self) -> str:
        return f"<Session {self.jid}>"


@runtime_checkable
class SessionDirectory(Protocol):
    """Where each user's sessions are: what routing, presence, roster pushes and the admin commands look up.

    Routing looks up sessions for every stanza, so an implementation answers `get`, `of` and `available`
    from memory, a dictionary access or two. Sessions of other processes, if any, are found like local ones
    once `ensure` has been awaited for their account: a directory may keep in memory only the accounts it
    was asked about (the cluster's keeps its own users and those it routes to).
    """

    async def ensure(self, bare: JID) -> None:
        """Until the sessions of the account, wherever they are, are known to `get`, `of`, `available` and
        `interested`: awaited by routing before it looks an account up."""

    async def ensure_all(self, bares: Iterable[JID]) -> None:
        """`ensure` for many accounts at once (a room's occupants): looked up together, not one after another."""

    def add(self, session: Session) -> None:
        """A session bound a resource (a session that had it must have been removed first)."""

    def remove(self, session: Session) -> None:
        """A session is going: nothing more is routed to it. A session that replaced it stays."""

    def get(self, jid: JID) -> Session | None:
        """The session of a full JID."""

    def of(self, bare: JID) -> list[Session]:
        """All sessions of an account."""

    def available(self, bare: JID) -> list[Session]:
        """The sessions of an account that sent available presence."""

    def interested(self, bare: JID) -> list[Session]:
        """The sessions of an account that asked for the roster (they get roster pushes)."""

    def all(self) -> list[Session]:
        """The sessions this process serves: the ones it ends when it stops."""

    def count(self) -> int:
        """How many sessions there are, on every process."""

    async def users(self, domain: str | None = None) -> list[JID]:
        """The accounts with a session (of `domain`, if given), on every process."""

    async def everywhere(self, domain: str | None = None) -> list[JID]:
        """The full JIDs of the sessions (of `domain`, if given), on every process."""


class SessionRegistry:
    """The session directory of a server in one process: its sessions, keyed by bare JID then resource."""

    def __init__(self) -> None:
        self._by_bare: dict[JID, dict[str, Session]] = {}

    def add(self, session: Session) -> None:
        self._by_bare.setdefault(session.bare, {})[session.jid.resource or ""] = session

    def remove(self, session: Session) -> None:
        resources = self._by_bare.get(session.bare)
        if resources and resources.get(session.jid.resource or "") is session:
            del resources[session.jid.resource or ""]
            if not resources:
                del self._by_bare[session.bare]

    def get(self, jid: JID) -> Session | None:
        resources = self._by_bare.get(jid.bare)
        return resources.get(jid.resource or "") if resources else None

    def of(self, bare: JID) -> list[Session]:
        resources = self._by_bare.get(bare)
        return list(resources.values()) if resources else []

    def available(self, bare: JID) -> list[Session]:
        resources = self._by_bare.get(bare)
        return [s for s in resources.values() if s.presence is not None] if resources else []

    def interested(self, bare: JID) -> list[Session]:
        resources = self._by_bare.get(bare)
        return [s for s in resources.values() if s.interested] if resources else []

    def all(self) -> list[Session]:
        return [s for resources in self._by_bare.values() for s in resources.values()]

    def count(self) -> int:
        return sum(len(r) for r in self._by_bare.values())

    async def ensure(self, bare: JID) -> None:
        return None

    async def ensure_all(self, bares: Iterable[JID]) -> None:
        return None

    async def users(self, domain: str | None = None) -> list[JID]:
        return [b for b in self._by_bare if domain is None or b.domain == domain]

    async def everywhere(self, domain: str | None = None) -> list[JID]:
        return [s.jid for s in self.all() if domain is None or s.jid.domain == domain]


def session_directory(config: Config) -> SessionDirectory:
    """The directory the configuration asks for: this process's own, or, in a cluster (several worker processes
    or a named node), the one the members share (which the member's `server.cluster.Cluster` connects)."""
    if not config.cluster.active:
        return SessionRegistry()
    from server.cluster import ClusterSessions  # the Redis client: loaded for a cluster only

    return ClusterSessions(config)
