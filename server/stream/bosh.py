"""BOSH (XEP-0124, XEP-0206) without I/O: the request bodies, the rid window and the held requests.

A BOSH session carries one client stream over a series of HTTP requests. The client numbers its requests
('rid'); the connection manager handles their payloads in rid order whatever order they arrive in, holds up
to 'hold' of them open until it has something to send (or 'wait' seconds pass), and answers a request it
sees again with the same body, so that a response lost with its HTTP connection can be fetched again.

`BoshSession` decides all of that from what it is told (a request with its rid, output to send, the time)
and says what to answer to which rid; the HTTP front end (extensions/bosh.py) keeps the sockets and the
timers. `parse_body` reads one request body with the stream parser's rules (restricted XML, stanza size,
nesting depth).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element

from server import ns
from server.stream.errors import StreamError
from server.stream.parser import StreamClose, StreamOpen, StreamParser
from server.stream.writer import escape_attr

HTTPBIND = "http://jabber.org/protocol/httpbind"
XBOSH = "urn:xmpp:xbosh"
BODY = ns.qname(HTTPBIND, "body")
RESTART = ns.qname(XBOSH, "restart")
XMPP_VERSION = ns.qname(XBOSH, "version")
VERSION = (1, 11)  # of XEP-0124 implemented here
MAX_RID = 2**53 - 1
_SLICE = 4096  # rids are integers JavaScript can count exactly
# The HTTP status of a body that cannot be read (XEP-0124 17.1), besides its terminal condition: a body the
# connection manager cannot read may not even name a session, or a version that would say which to use.
LEGACY_STATUS = {"bad-request": 400, "item-not-found": 404, "policy-violation": 403}


class BoshError(Exception):
    """A terminal binding condition (XEP-0124 17.2): the session ends with it."""

    def __init__(self, condition: str, text: str = "", sid: str | None = None) -> None:
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.sid = sid  # the session a body that could not be read names, when it got as far as its 'sid'


@dataclass
class Body:
    """One request: the <body/> element's attributes and the stanzas it carries."""

    attrs: dict[str, str]
    children: list[Element] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        return self.attrs.get(name)

    @property
    def sid(self) -> str | None:
        return self.attrs.get("sid")

    def rid(self) -> int:
        return _integer(self.attrs.get("rid"), "rid", 0, MAX_RID)

    @property
    def restart(self) -> bool:
        return self.attrs.get(RESTART) in ("true", "1")

    @property
    def terminate(self) -> bool:
        return self.attrs.get("type") == "terminate"

    @property
    def empty(self) -> bool:
        """Carries nothing for the stream: the client only gives the server a request to answer on."""
        return not self.children and not self.restart and not self.terminate and "pause" not in self.attrs


class _BodyParser(StreamParser):
    """The stream parser with <body/> for a root: its rules for what the body holds, stanzas made canonical
    (a stanza the client left in the body's namespace is taken as jabber:client, as in a stream)."""

    def __init__(self, max_size: int, max_depth: int) -> None:
        super().__init__(HTTPBIND, max_size, max_depth)
        self.header: StreamOpen | None = None

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        if self._depth == 0:
            if "{" + name != BODY:
                raise StreamError("bad-format", "expected <body xmlns='http://jabber.org/protocol/httpbind'/>")
            self._opened = True
            self._depth = 1
            self._mark = self._fed
            self.header = StreamOpen({self._name(k): v for k, v in attrs.items()}, HTTPBIND)
            return
        super()._start(name, attrs)

    def sid(self) -> str | None:
        return self.header.get("sid") if self.header else None


def parse_body(data: bytes, max_size: int, max_depth: int) -> Body:
    """The request body; BoshError('bad-request') when it is not one well-formed <body/> within XMPP's
    restricted XML, 'policy-violation' when it is over the size or depth limits. The error names the
    session (`sid`) when the body got as far as its attributes, so that only that session ends."""
    parser = _BodyParser(max_size, max_depth)
    events: list[object] = []
    try:
        # Fed in slices, as a socket would deliver it: the parser checks a stanza's size between slices.
        for start in range(0, len(data), _SLICE):
            events += parser.feed(data[start:start + _SLICE])
    except StreamError as exc:
        condition = "policy-violation" if exc.condition == "policy-violation" else "bad-request"
        raise BoshError(condition, exc.text or exc.condition, parser.sid()) from None
    if parser.header is None or not any(isinstance(e, StreamClose) for e in events):
        raise BoshError("bad-request", "not one complete <body/>", parser.sid())
    return Body(dict(parser.header.attrs), [e for e in events if isinstance(e, Element)])


def _integer(value: str | None, name: str, low: int, high: int) -> int:
    try:
        number = int(value or "")
    except ValueError:
        raise BoshError("bad-request", f"'{name}' must be an integer") from None
    if not low <= number <= high:
        raise BoshError("bad-request", f"'{name}' out of range")
    return number


def _version(text: str | None) -> tuple[int, int] | None:
    try:
        major, minor = (text or "").split(".")
        return int(major), int(minor)
    except ValueError:
        return None


@dataclass(frozen=True)
class Limits:
    """The connection manager's bounds, from its configuration."""

    max_wait: int = 60
    max_hold: int = 1
    inactivity: int = 60
    polling: int = 5
    max_pause: int = 120


@dataclass(frozen=True)
class Params:
    """What one session was granted (the session creation response's attributes)."""

    wait: int
    hold: int
    requests: int
    inactivity: int
    polling: int
    max_pause: int
    ver: tuple[int, int] | None  # the client's 'ver' capped at ours; None: a client from before 1.6

    @classmethod
    def negotiate(cls, body: Body, limits: Limits) -> Params:
        """The client's 'wait' and 'hold' within our bounds (XEP-0124 7.1); 'requests' is one more than 'hold'."""
        wait = _integer(body.get("wait") or str(limits.max_wait), "wait", 0, 1 << 31)
        hold = _integer(body.get("hold") or "1", "hold", 0, 1 << 31)
        hold = min(hold, limits.max_hold)
        ver = _version(body.get("ver"))
        return cls(min(wait, limits.max_wait), hold, hold + 1, limits.inactivity, limits.polling, limits.max_pause,
                   min(ver, VERSION) if ver else None)

    def attributes(self) -> dict[str, str]:
        attrs = {"wait": str(self.wait), "hold": str(self.hold), "requests": str(self.requests),
                 "inactivity": str(self.inactivity), "polling": str(self.polling), "maxpause": str(self.max_pause)}
        if self.ver is not None:
            attrs["ver"] = f"{self.ver[0]}.{self.ver[1]}"
        return attrs


def body_text(attrs: dict[str, str], payload: str = "") -> str:
    """A response <body/>: our namespace, the stream prefix declared for <stream:features/> and errors."""
    parts = [f'<body xmlns="{HTTPBIND}" xmlns:stream="{ns.STREAM}"']
    for name, value in attrs.items():
        parts.append(f' {name}="{escape_attr(value)}"')
    parts.append(f">{payload}</body>" if payload else "/>")
    return "".join(parts)


def terminal(condition: str | None, payload: str = "") -> str:
    """The body that ends a session; `condition` None when it ends as the client or server asked."""
    attrs = {"type": "terminate"}
    if condition:
        attrs["condition"] = condition
    return body_text(attrs, payload)


@dataclass(frozen=True)
class Answer:
    """The body to answer the request numbered `rid` with."""

    rid: int
    body: str


@dataclass
class Received:
    """What to do with a request: answer it at once with `replay`, or wait for its Answer (a request sent again
    while unanswered waits for the same one); `ready` are the
    requests (this one and any it unblocked) whose payloads are next in rid order, to be handled now, and
    `answers` those of the held requests that are due now."""

    replay: str | None = None
    ready: list[tuple[int, Body]] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)


class BoshSession:
    """One session's requests and output. Every method takes the time (`now`, in seconds) from the caller."""

    def __init__(self, sid: str, params: Params, first: Body, greeting: dict[str, str], now: float) -> None:
        self.sid = sid
        self.params = params
        self.next_rid = first.rid()  # the first request's payload (the stream's start) is handled like any
        self.ended = False
        self.inactivity = params.inactivity  # what a 'pause' may lengthen until the next request
        self.idle_since = now  # when the last held request was answered
        self._waiting: dict[int, Body] = {}  # received out of order, waiting for the rids before them
        self._held: dict[int, float] = {}  # handled, waiting for output: rid -> when it must be answered empty
        self._answered: OrderedDict[int, str] = OrderedDict()  # the last `requests` answers, for replays
        self._output: list[str] = []
        self.output_size = 0  # characters in _output: what waits for a request to carry it
        self._greeting = greeting  # the creation response's attributes, sent with the first answer
        self._last_request: float | None = None  # when the last request came (none yet: the first is coming)

    # --- requests ---------------------------------------------------------------------------------

    def receive(self, rid: int, body: Body, now: float) -> Received:
        """Take a request; BoshError when it ends the session (XEP-0124 14.3, 11, 10)."""
        if self.ended:
            raise BoshError("item-not-found", "the session has ended")
        if rid in self._answered:
            return Received(replay=self._answered[rid])
        if rid in self._held or rid in self._waiting:
            return Received()  # sent again over a new connection: both get the answer when it comes
        if rid < self.next_rid:
            raise BoshError("item-not-found", f"rid {rid} was answered too long ago to be sent again")
        if rid >= self.next_rid + self.params.requests:
            raise BoshError("item-not-found", f"rid {rid} is beyond the window of {self.params.requests}")
        extra = body.terminate or "pause" in body.attrs  # one more request is allowed to pause or end
        if len(self._held) + len(self._waiting) + 1 > self.params.requests + extra:
            raise BoshError("policy-violation", f"more than {self.params.requests} requests at once")
        if self.params.hold == 0 and body.empty and not self._held and self._last_request is not None \
                and now - self._last_request < self.params.polling:
            raise BoshError("policy-violation", f"polled again within {self.params.polling} s")
        self._last_request = now
        self._waiting[rid] = body
        received = Received()
        while self.next_rid in self._waiting:
            ready = self._waiting.pop(self.next_rid)
            self._held[self.next_rid] = now + self.params.wait
            received.ready.append((self.next_rid, ready))
            self.next_rid += 1
            self.inactivity = self.params.inactivity
            if "pause" in ready.attrs:
                received.answers += self._pause(ready, now)
        received.answers += self._due(now)
        return received

    def _pause(self, body: Body, now: float) -> list[Answer]:
        """XEP-0124 10: the client goes away for up to 'pause' seconds; every held request is answered now."""
        pause = _integer(body.get("pause"), "pause", 0, 1 << 31)
        if pause > self.params.max_pause:
            raise BoshError("policy-violation", f"pause longer than {self.params.max_pause} s")
        self.inactivity = pause
        return [self._answer(rid, now) for rid in sorted(self._held)]

    # --- output -----------------------------------------------------------------------------------

    def write(self, data: str) -> None:
        self._output.append(data)
        self.output_size += len(data)

    def take_output(self) -> list[str]:
        """What was written and not yet answered with (the session ended without a request to carry it)."""
        output, self._output = self._output, []
        self.output_size = 0
        return output

    def flush(self, now: float) -> list[Answer]:
        """Answers due now: output on the oldest held request, and held requests beyond 'hold'."""
        return self._due(now)

    def tick(self, now: float) -> list[Answer]:
        """Held requests that waited 'wait' seconds, answered empty (or with what is there)."""
        return [self._answer(rid, now) for rid, until in sorted(self._held.items()) if until <= now]

    def expired(self, now: float) -> bool:
        """No request held for longer than the inactivity period: the client is gone (XEP-0124 8)."""
        return not self._held and now - self.idle_since >= self.inactivity

    def next_deadline(self) -> float:
        """When `tick` or `expired` has something to say next."""
        if self._held:
            return min(self._held.values())
        return self.idle_since + self.inactivity

    def terminate(self, condition: str | None, now: float) -> list[Answer]:
        """End the session: every request held or waiting gets the terminal body, the oldest with the output."""
        self.ended = True
        answers = []
        for rid in sorted([*self._held, *self._waiting]):
            self._held.pop(rid, None)
            self._waiting.pop(rid, None)
            body = terminal(condition, "".join(self.take_output()))
            self._keep(rid, body)
            answers.append(Answer(rid, body))
        return answers

    # --- answers ----------------------------------------------------------------------------------

    def _due(self, now: float) -> list[Answer]:
        answers = []
        while self._held and (self._output or len(self._held) > self.params.hold):
            answers.append(self._answer(min(self._held), now))
        return answers

    def _answer(self, rid: int, now: float) -> Answer:
        del self._held[rid]
        attrs, self._greeting = self._greeting, {}
        body = body_text(attrs, "".join(self.take_output()))
        self._keep(rid, body)
        if not self._held:
            self.idle_since = now
        return Answer(rid, body)

    def _keep(self, rid: int, body: str) -> None:
        self._answered[rid] = body
        while len(self._answered) > self.params.requests:
            self._answered.popitem(last=False)
