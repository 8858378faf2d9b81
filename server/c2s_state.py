"""The negotiation of a client stream as one table: what each state accepts, and where each step leads.

Sans-IO, as h11 keeps its states: nothing here reads a socket or a configuration, so the whole table can
be checked state by state. A C2SConnection (server/c2s.py) asks `outcome(state, input)` for every event it
reads, does the `Action` it gets or sends the `Refusal`, and moves on with `advance(state, event)` when a
step of the negotiation completes. What depends on the configuration or on the data (is TLS configured,
which mechanisms are offered, are the credentials right) is decided by the action, not by the table.

    PLAIN ──STARTTLS──> TLS_NEGOTIATING ──handshake──> SECURED      (Direct TLS starts in SECURED)
    PLAIN, SECURED ──SASL success──> AUTHENTICATED ──bind or resume──> BOUND
    SECURED ──SASL2 success──> AUTHENTICATED ──inline Bind2 or resume, in the same step──> BOUND

SASL2 (XEP-0388) needs TLS: a plain stream is not offered it and its <authenticate/> is refused. It has no
stream restart, and its success may carry Bind2's resource (XEP-0386) or stream management's resumption,
so one <authenticate/> may take a stream from SECURED to BOUND. An upgrade task (XEP-0480) runs between
the proof of the credentials and the <success/>: the stream stays SECURED until the task is done.
    any state ──close──> CLOSED

A stream restart (after TLS and after SASL) changes no state: the parser is reset, so a new stream header
is the next event, and the state says what that stream may carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from server import ns
from server.stanza import IQ, MESSAGE, PRESENCE


class State(Enum):
    PLAIN = "plain"  # not authenticated, over a connection without TLS: STARTTLS or SASL next
    TLS_NEGOTIATING = "tls-negotiating"  # <proceed/> sent, the TLS handshake under way: nothing is read
    SECURED = "secured"  # not authenticated, over TLS: SASL next
    AUTHENTICATED = "authenticated"  # SASL succeeded: resource binding (or stream management's resumption) next
    BOUND = "bound"  # a session is bound: stanzas go to the router
    CLOSED = "closed"  # the stream is closing or closed: nothing more is handled


class Input(Enum):
    """What the connection reads, by kind."""

    OPEN = "stream header"
    CLOSE = "stream close"
    STARTTLS = "starttls"
    AUTH = "sasl auth"
    RESPONSE = "sasl response"
    ABORT = "sasl abort"
    AUTHENTICATE = "sasl2 authenticate"
    SASL2_RESPONSE = "sasl2 response"
    SASL2_ABORT = "sasl2 abort"
    SASL2_TASK = "sasl2 next or task-data"  # an upgrade task (XEP-0480) between authentication and success
    IQ = "iq"
    STANZA = "message or presence"
    OTHER = "other element"  # stream management, client state indication, or unknown


class Action(Enum):
    """What the connection does with an input its state accepts."""

    OPEN = "open the stream, send features"
    CLOSE = "close the stream"
    STARTTLS = "proceed with TLS"
    SASL_AUTH = "start SASL"
    SASL_RESPONSE = "continue SASL"
    SASL2_AUTH = "start SASL2, with its inline requests"
    SASL2_RESPONSE = "continue SASL2"
    SASL2_TASK = "go on with the SASL2 task under way, else malformed-request"
    UNAUTHENTICATED_IQ = "'c2s/unauthenticated-iq' (registration), else not-authorized"
    BIND = "bind a resource, else not-authorized"
    STANZA = "route the session's stanza"
    ELEMENT = "'c2s/element', else unsupported-stanza-type"
    NONZA = "'c2s/element', then 'c2s/nonza', else unsupported-stanza-type"
    IGNORE = "nothing"


class Reply(Enum):
    STREAM_ERROR = "stream error"  # the stream ends
    SASL_FAILURE = "SASL failure"  # the stream goes on; the client may try again
    SASL2_FAILURE = "SASL2 failure"  # the same, in SASL2's <failure/>
    TLS_FAILURE = "TLS failure"  # <failure xmlns='...xmpp-tls'/>, then the stream ends


@dataclass(frozen=True)
class Refusal:
    """An input the state does not allow, and what the client gets for it."""

    reply: Reply
    condition: str = ""
    text: str | None = None


class Event(Enum):
    """A step of the negotiation that completed."""

    TLS_STARTED = "proceed sent"
    TLS_DONE = "handshake done"
    SASL_SUCCESS = "authenticated"
    SESSION_BOUND = "resource bound or session resumed"
    CLOSE = "closing"


Outcome = Action | Refusal

NOT_AUTHORIZED = Refusal(Reply.STREAM_ERROR, "not-authorized", "authenticate first")
ALREADY_AUTHENTICATED = Refusal(Reply.STREAM_ERROR, "policy-violation", "already authenticated")
NO_SASL_UNDER_WAY = Refusal(Reply.SASL_FAILURE, "malformed-request", "no authentication in progress")
ABORTED = Refusal(Reply.SASL_FAILURE, "aborted")
TLS_REFUSED = Refusal(Reply.TLS_FAILURE)
SASL2_NEEDS_TLS = Refusal(Reply.SASL2_FAILURE, "encryption-required", "SASL2 is offered over TLS only")
NO_SASL2_UNDER_WAY = Refusal(Reply.SASL2_FAILURE, "malformed-request", "no authentication in progress")
SASL2_ABORTED = Refusal(Reply.SASL2_FAILURE, "aborted")

_UNAUTHENTICATED: dict[Input, Outcome] = {
    Input.OPEN: Action.OPEN,
    Input.CLOSE: Action.CLOSE,
    Input.STARTTLS: Action.STARTTLS,
    Input.AUTH: Action.SASL_AUTH,
    Input.RESPONSE: Action.SASL_RESPONSE,
    Input.ABORT: ABORTED,
    Input.AUTHENTICATE: Action.SASL2_AUTH,
    Input.SASL2_RESPONSE: Action.SASL2_RESPONSE,
    Input.SASL2_ABORT: SASL2_ABORTED,
    Input.SASL2_TASK: Action.SASL2_TASK,
    Input.IQ: Action.UNAUTHENTICATED_IQ,
    Input.STANZA: NOT_AUTHORIZED,
    Input.OTHER: Action.ELEMENT,
}
_AUTHENTICATED: dict[Input, Outcome] = {
    Input.OPEN: Action.OPEN,
    Input.CLOSE: Action.CLOSE,
    Input.STARTTLS: TLS_REFUSED,
    Input.AUTH: ALREADY_AUTHENTICATED,
    Input.RESPONSE: NO_SASL_UNDER_WAY,
    Input.ABORT: ABORTED,
    Input.AUTHENTICATE: ALREADY_AUTHENTICATED,
    Input.SASL2_RESPONSE: NO_SASL2_UNDER_WAY,
    Input.SASL2_ABORT: SASL2_ABORTED,
    Input.SASL2_TASK: NO_SASL2_UNDER_WAY,
    Input.IQ: Action.BIND,
    Input.STANZA: NOT_AUTHORIZED,
    Input.OTHER: Action.ELEMENT,
}
_NOTHING: dict[Input, Outcome] = dict.fromkeys(Input, Action.IGNORE)

ACCEPTS: dict[State, dict[Input, Outcome]] = {
    State.PLAIN: {**_UNAUTHENTICATED, Input.AUTHENTICATE: SASL2_NEEDS_TLS, Input.SASL2_RESPONSE: SASL2_NEEDS_TLS,
                  Input.SASL2_TASK: SASL2_NEEDS_TLS},
    # The reader waits for the handshake: nothing is read in this state.
    State.TLS_NEGOTIATING: _NOTHING,
    State.SECURED: {**_UNAUTHENTICATED, Input.STARTTLS: TLS_REFUSED},
    State.AUTHENTICATED: _AUTHENTICATED,
    State.BOUND: {**_AUTHENTICATED, Input.IQ: Action.STANZA, Input.STANZA: Action.STANZA, Input.OTHER: Action.NONZA},
    State.CLOSED: _NOTHING,
}

TRANSITIONS: dict[State, dict[Event, State]] = {
    State.PLAIN: {Event.TLS_STARTED: State.TLS_NEGOTIATING, Event.SASL_SUCCESS: State.AUTHENTICATED},
    State.TLS_NEGOTIATING: {Event.TLS_DONE: State.SECURED},
    State.SECURED: {Event.SASL_SUCCESS: State.AUTHENTICATED},
    State.AUTHENTICATED: {Event.SESSION_BOUND: State.BOUND},
    State.BOUND: {},
    State.CLOSED: {},
}

_INPUTS = {
    ns.qname(ns.TLS, "starttls"): Input.STARTTLS,
    ns.qname(ns.SASL, "auth"): Input.AUTH,
    ns.qname(ns.SASL, "response"): Input.RESPONSE,
    ns.qname(ns.SASL, "abort"): Input.ABORT,
    ns.qname(ns.SASL2, "authenticate"): Input.AUTHENTICATE,
    ns.qname(ns.SASL2, "response"): Input.SASL2_RESPONSE,
    ns.qname(ns.SASL2, "abort"): Input.SASL2_ABORT,
    ns.qname(ns.SASL2, "next"): Input.SASL2_TASK,
    ns.qname(ns.SASL2, "task-data"): Input.SASL2_TASK,
    IQ: Input.IQ,
    MESSAGE: Input.STANZA,
    PRESENCE: Input.STANZA,
}


class NegotiationError(Exception):
    """A step the state does not allow: a fault of the server's code, never of the client."""


def input_of(tag: str) -> Input:
    """The kind of a top-level element, by its qualified name."""
    return _INPUTS.get(tag, Input.OTHER)


def outcome(state: State, what: Input) -> Outcome:
    """What the connection does with `what` in `state`: an action, or the refusal the client gets."""
    return ACCEPTS[state][what]


def advance(state: State, event: Event) -> State:
    """The state after `event`; closing is allowed from every state."""
    if event is Event.CLOSE:
        return State.CLOSED
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise NegotiationError(f"{event.name} in state {state.name}") from None
