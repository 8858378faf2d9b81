"""Client sessions and the registry of who is connected.

A Session is what routing sees of a logged-in resource. It is kept apart from the TCP connection
so that a session can outlive its connection (stream management resumption) and so that routing
code never touches a socket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from server.jid import JID
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
        self._write = write
        self._close = close

    @property
    def available(self) -> bool:
        return self.presence is not None

    def send(self, el: Element) -> None:
        if not self.closed:
            self.send_raw(serialize(el), el)

    def send_raw(self, data: str, el: Element | None = None) -> None:
        """Send serialized XML, e.g. from a fan-out that serializes a stanza once for many sessions.

        `el` is the stanza `data` serializes ('to' aside), so that `hold` can judge it; without it the
        data goes out as it is (as when `hold` lets go of what it took).
        """
        if not self.closed and (el is None or self.hold is None or not self.hold(el, data)):
            if self.outbox is None:
                self._write(data)
            else:
                self.outbox(data, el)

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
