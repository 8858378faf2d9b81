"""Client sessions and the registry of who is connected.

A Session is what routing sees of a logged-in resource. It is kept apart from the TCP connection
so that a session can outlive its connection (stream management resumption) and so that routing
code never touches a socket.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from server.jid import JID
from server.stanza import parse_stored
from server.stream.writer import serialize

if TYPE_CHECKING:
    from server.host import Host

log = logging.getLogger("parley.sessions")


class Session:
    """One bound resource of one account."""

    def __init__(self, jid: JID, host: Host, write: Callable[[str], None], close: Callable[[str | None], None],
                 remote_ip: str = "") -> None:
        self.jid = jid
        self.bare = jid.bare
        self.host = host
        self.remote_ip = remote_ip
        self.priority = 0
        self.presence: Element | None = None  # last broadcast available presence; None while unavailable
        self.interested = False  # requested the roster, so gets roster pushes and subscription requests
        self.directed: set[JID] = set()  # JIDs that got directed presence from this session
        self.started = time.time()
        self.last_active = time.monotonic()
        self.closed = False  # no more output: the connection is gone or going
        self.ended = False  # 'session/closed' has run
        self.data: dict[str, object] = {}  # per-session state owned by modules, keyed by module name
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
        self.undelivered: deque[Element] = deque()
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


class SessionRegistry:
    """All bound sessions of the server, keyed by bare JID then resource."""

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

    def users(self, domain: str | None = None) -> list[JID]:
        return [b for b in self._by_bare if domain is None or b.domain == domain]
