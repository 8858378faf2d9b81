"""What a message archive keeps (XEP-0313): one rule for users' archives (extensions/mam.py) and rooms'
(extensions/muc/archive.py), so that a client catching up from either finds the same kinds of message.

A message is kept when it carries something a client shows or acts on later - a body, a reaction
(XEP-0444), a chat marker (XEP-0333), a retraction (XEP-0424) or anything else fastened to an earlier
message (XEP-0422) - or when it asks to be with a XEP-0334 <store/> hint. A <no-store/> or
<no-permanent-store/> hint keeps any message out. Which message types an archive takes is its own affair.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from xml.etree.ElementTree import Element

from server import ns

NO_STORE = (ns.qname(ns.HINTS, "no-store"), ns.qname(ns.HINTS, "no-permanent-store"))
STORE = ns.qname(ns.HINTS, "store")
MARKERS = "urn:xmpp:chat-markers:0"
KEPT = (
    ns.qname(ns.CLIENT, "body"),
    ns.qname("urn:xmpp:reactions:0", "reactions"),
    *(ns.qname(MARKERS, marker) for marker in ("received", "displayed", "acknowledged")),
    ns.qname("urn:xmpp:message-retract:1", "retract"),
    ns.qname("urn:xmpp:fasten:0", "apply-to"),
)


def worth_archiving(el: Element) -> bool:
    """Whether a message's content belongs in an archive, by the rule above (one pass over its children:
    it is asked twice for every message, by the sender's archive and the recipient's)."""
    tags = {child.tag for child in el}
    if not tags.isdisjoint(NO_STORE):
        return False
    return STORE in tags or not tags.isdisjoint(KEPT)


class Turn:
    """A client's message in its connection's order, so that the connection may read on while it waits for
    its archive commit.

    Waiting for one message's commit before reading the next would leave a group commit at most one message
    per connection. So the archive `park`s a message once its rows are queued: its connection then handles
    the messages after it each in a task of its own, and this one goes on waiting. Order is kept: a message
    is routed only once the one before it is `released` (parked or finished), so its rows are queued after
    that one's; it goes on to delivery only `in_order`, after the one before it did, and to its sessions or
    offline storage only once the router is done delivering that one (`earlier_delivered`: hooks on the way
    may wait for the database, and two reads or stores in flight could be answered out of order); and it counts as
    handled only `after_earlier` ones are done, and whatever is not such a message waits until they all
    are. So stream management counts, and acknowledges, only messages whose rows are committed.
    """

    __slots__ = ("_on_park", "before", "delivered", "done", "el", "passed", "released")

    def __init__(self, el: Element, before: Turn | None = None,
                 on_park: Callable[[Turn], None] | None = None) -> None:
        self.el = el
        self.before = before  # the connection's message before this one, while it is in flight
        self.released: asyncio.Future[None] | None = None  # parked or finished (futures made when tracked)
        self.passed: asyncio.Future[None] | None = None  # on its way to delivery, or finished
        self.delivered: asyncio.Future[None] | None = None  # the router is done delivering it, or finished
        self.done: asyncio.Future[None] | None = None  # finished, and so are the ones before
        self._on_park = on_park

    def track(self) -> None:
        """Make the futures that later messages wait on."""
        if self.done is None:
            loop = asyncio.get_running_loop()
            self.released, self.passed, self.delivered, self.done = (loop.create_future() for _ in range(4))

    def park(self) -> None:
        """The message's rows are queued: the messages after it may be routed."""
        self.track()
        assert self.released is not None
        if not self.released.done():
            self.released.set_result(None)
            if self._on_park is not None:
                self._on_park(self)

    async def after_released(self) -> None:
        """Wait until the message before this one has queued its rows, or is finished."""
        before = self.before
        if before is not None and before.released is not None and not before.released.done():
            await asyncio.shield(before.released)

    async def in_order(self) -> None:
        """Wait until the message before this one went on to its delivery; then this one goes on to its own.

        Messages committed together wake in the order they were queued, so this seldom waits."""
        before = self.before
        if before is not None and before.passed is not None and not before.passed.done():
            await asyncio.shield(before.passed)
        if self.passed is not None and not self.passed.done():
            self.passed.set_result(None)

    async def after_earlier(self) -> None:
        """Wait until the messages before this one are done."""
        before = self.before
        if before is not None and before.done is not None and not before.done.done():
            await asyncio.shield(before.done)

    def finished(self) -> None:
        """The message is handled: done once the earlier ones are, so that they are done in order."""
        if self.done is None or self.done.done():
            return
        for future in (self.released, self.passed, self.delivered):
            if future is not None and not future.done():
                future.set_result(None)
        before = self.before
        if before is None or before.done is None or before.done.done():
            self._complete()
        else:
            before.done.add_done_callback(self._complete)

    def _complete(self, _: object = None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)
        self.before = None  # a long session's messages must not hold on to each other


class Reading:
    """The message a connection's reading task handles itself, whose Turn is made only when an archive asks
    for it (`turn_of`): a message that no archive parks costs its connection two assignments.

    It holds its connection's `on_park` weakly: it lives in the connection's task context, which every timer
    made from that task copies, and a cancelled timer stays in the event loop's queue until its time; held
    strongly, a closed connection (and its TLS buffers) would stay with it."""

    __slots__ = ("_on_park", "el", "turn")

    def __init__(self, on_park: Callable[[Turn], None]) -> None:
        self.el: Element | None = None
        self.turn: Turn | None = None
        self._on_park = weakref.WeakMethod(on_park)  # type: ignore[arg-type]

    @property
    def on_park(self) -> Callable[[Turn], None] | None:
        return self._on_park()


# In the task handling a client's message: its Turn, or its connection's Reading (set by the c2s connection).
TURN: ContextVar[Turn | Reading | None] = ContextVar("parley_turn", default=None)


def turn_of(el: Element) -> Turn | None:
    """The Turn of the message `el` when it is a client's, being handled in this task."""
    current = TURN.get()
    if current is None or current.el is not el:
        return None
    if isinstance(current, Turn):
        return current
    if current.turn is None:
        current.turn = Turn(el, on_park=current.on_park)
    return current.turn


def _current(el: Element) -> Turn | None:
    """The Turn of `el` if it is the client's message handled in this task and one was made for it."""
    current = TURN.get()
    if current is None or current.el is not el:
        return None
    return current if isinstance(current, Turn) else current.turn


def delivered(el: Element) -> None:
    """The router is done delivering `el` (to sessions, to offline storage, or bounced)."""
    turn = _current(el)
    if turn is not None and turn.delivered is not None and not turn.delivered.done():
        turn.delivered.set_result(None)


async def earlier_delivered(el: Element) -> None:
    """Before `el` goes to sessions or offline storage: wait until the message its sender sent before it is
    delivered."""
    turn = _current(el)
    before = turn.before if turn is not None else None
    if before is not None and before.delivered is not None and not before.delivered.done():
        await asyncio.shield(before.delivered)
