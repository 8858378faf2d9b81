"""The c2s negotiation table (server/c2s_state.py): every state against every input, every step, and the
refusals as a client sees them over a real socket."""

from __future__ import annotations

import pytest

from server.c2s_state import (
    ACCEPTS,
    TRANSITIONS,
    Action,
    Event,
    Input,
    NegotiationError,
    Refusal,
    Reply,
    State,
    advance,
    input_of,
    outcome,
)
from tests.conftest import Harness, RawClient
from tests.test_c2s import SASL, STREAMS, scram_login, stream_error_condition, tls_raw

P, N, S, A, B, C = (State.PLAIN, State.TLS_NEGOTIATING, State.SECURED, State.AUTHENTICATED, State.BOUND,
                    State.CLOSED)
NOT_AUTHORIZED = Refusal(Reply.STREAM_ERROR, "not-authorized", "authenticate first")
AGAIN = Refusal(Reply.STREAM_ERROR, "policy-violation", "already authenticated")
NO_EXCHANGE = Refusal(Reply.SASL_FAILURE, "malformed-request", "no authentication in progress")
ABORTED = Refusal(Reply.SASL_FAILURE, "aborted")
NO_TLS = Refusal(Reply.TLS_FAILURE)
SASL2_NEEDS_TLS = Refusal(Reply.SASL2_FAILURE, "encryption-required", "SASL2 is offered over TLS only")
NO_SASL2 = Refusal(Reply.SASL2_FAILURE, "malformed-request", "no authentication in progress")
SASL2_ABORTED = Refusal(Reply.SASL2_FAILURE, "aborted")
IGNORE = Action.IGNORE

# Written out row by row (not derived from the module), so that a change to the table shows here.
EXPECTED: dict[Input, dict[State, Action | Refusal]] = {
    Input.OPEN: {P: Action.OPEN, N: IGNORE, S: Action.OPEN, A: Action.OPEN, B: Action.OPEN, C: IGNORE},
    Input.CLOSE: {P: Action.CLOSE, N: IGNORE, S: Action.CLOSE, A: Action.CLOSE, B: Action.CLOSE, C: IGNORE},
    Input.STARTTLS: {P: Action.STARTTLS, N: IGNORE, S: NO_TLS, A: NO_TLS, B: NO_TLS, C: IGNORE},
    Input.AUTH: {P: Action.SASL_AUTH, N: IGNORE, S: Action.SASL_AUTH, A: AGAIN, B: AGAIN, C: IGNORE},
    Input.RESPONSE: {P: Action.SASL_RESPONSE, N: IGNORE, S: Action.SASL_RESPONSE, A: NO_EXCHANGE, B: NO_EXCHANGE,
                     C: IGNORE},
    Input.ABORT: {P: ABORTED, N: IGNORE, S: ABORTED, A: ABORTED, B: ABORTED, C: IGNORE},
    Input.AUTHENTICATE: {P: SASL2_NEEDS_TLS, N: IGNORE, S: Action.SASL2_AUTH, A: AGAIN, B: AGAIN, C: IGNORE},
    Input.SASL2_RESPONSE: {P: SASL2_NEEDS_TLS, N: IGNORE, S: Action.SASL2_RESPONSE, A: NO_SASL2, B: NO_SASL2,
                           C: IGNORE},
    Input.SASL2_ABORT: {P: SASL2_ABORTED, N: IGNORE, S: SASL2_ABORTED, A: SASL2_ABORTED, B: SASL2_ABORTED,
                        C: IGNORE},
    Input.SASL2_TASK: {P: SASL2_NEEDS_TLS, N: IGNORE, S: Action.SASL2_TASK, A: NO_SASL2, B: NO_SASL2, C: IGNORE},
    Input.IQ: {P: Action.UNAUTHENTICATED_IQ, N: IGNORE, S: Action.UNAUTHENTICATED_IQ, A: Action.BIND,
               B: Action.STANZA, C: IGNORE},
    Input.STANZA: {P: NOT_AUTHORIZED, N: IGNORE, S: NOT_AUTHORIZED, A: NOT_AUTHORIZED, B: Action.STANZA, C: IGNORE},
    Input.OTHER: {P: Action.ELEMENT, N: IGNORE, S: Action.ELEMENT, A: Action.ELEMENT, B: Action.NONZA, C: IGNORE},
}

STEPS: dict[State, dict[Event, State]] = {
    P: {Event.TLS_STARTED: N, Event.SASL_SUCCESS: A},
    N: {Event.TLS_DONE: S},
    S: {Event.SASL_SUCCESS: A},
    A: {Event.SESSION_BOUND: B},
    B: {},
    C: {},
}


def test_the_tables_cover_every_state_and_input() -> None:
    assert set(EXPECTED) == set(Input)
    assert all(set(row) == set(State) for row in EXPECTED.values())
    assert set(ACCEPTS) == set(State) and all(set(row) == set(Input) for row in ACCEPTS.values())
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("what", list(Input))
def test_every_state_and_input(state: State, what: Input) -> None:
    assert outcome(state, what) == EXPECTED[what][state]


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_every_step(state: State, event: Event) -> None:
    if event is Event.CLOSE:
        assert advance(state, event) is State.CLOSED  # from anywhere, any number of times
    elif event in STEPS[state]:
        assert advance(state, event) is STEPS[state][event]
    else:
        with pytest.raises(NegotiationError):
            advance(state, event)


@pytest.mark.parametrize(("tag", "what"), [
    ("{urn:ietf:params:xml:ns:xmpp-tls}starttls", Input.STARTTLS),
    ("{urn:ietf:params:xml:ns:xmpp-sasl}auth", Input.AUTH),
    ("{urn:ietf:params:xml:ns:xmpp-sasl}response", Input.RESPONSE),
    ("{urn:ietf:params:xml:ns:xmpp-sasl}abort", Input.ABORT),
    ("{urn:xmpp:sasl:2}authenticate", Input.AUTHENTICATE),
    ("{urn:xmpp:sasl:2}response", Input.SASL2_RESPONSE),
    ("{urn:xmpp:sasl:2}abort", Input.SASL2_ABORT),
    ("{urn:xmpp:sasl:2}next", Input.SASL2_TASK),
    ("{urn:xmpp:sasl:2}task-data", Input.SASL2_TASK),
    ("{jabber:client}iq", Input.IQ),
    ("{jabber:client}message", Input.STANZA),
    ("{jabber:client}presence", Input.STANZA),
    ("{urn:xmpp:sm:3}enable", Input.OTHER),
    ("{urn:ietf:params:xml:ns:xmpp-tls}proceed", Input.OTHER),
    ("{jabber:server}message", Input.OTHER),
])
def test_input_of_a_tag(tag: str, what: Input) -> None:
    assert input_of(tag) is what


# --- the refusals over a real socket ----------------------------------------------------------------


async def in_state(server: Harness, state: State) -> RawClient:
    """A raw client stream in `state`: over TLS, then authenticated (restarted), then bound."""
    raw = await tls_raw(server)
    if state is State.SECURED:
        await raw.open()
        await raw.expect(f"{{{STREAMS}}}features")
        return raw
    await server.add_user("carol")
    result = await scram_login(raw, "carol", "secret")
    assert getattr(result, "tag", None) == f"{{{SASL}}}success"
    raw.parser.reset()
    await raw.open()
    await raw.expect(f"{{{STREAMS}}}features")
    if state is State.BOUND:
        await raw.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
        await raw.expect("{jabber:client}iq")
    return raw


STARTTLS = "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
AUTH = f"<auth xmlns='{SASL}' mechanism='PLAIN'>AGNhcm9sAHNlY3JldA==</auth>"
RESPONSE = f"<response xmlns='{SASL}'>eA==</response>"
ABORT = f"<abort xmlns='{SASL}'/>"


@pytest.mark.parametrize(("state", "data", "condition"), [
    (State.SECURED, "<message to='bob@localhost'><body>hi</body></message>", "not-authorized"),
    (State.SECURED, "<foo xmlns='urn:unknown'/>", "unsupported-stanza-type"),
    (State.AUTHENTICATED, AUTH, "policy-violation"),
    (State.AUTHENTICATED, "<message to='bob@localhost'><body>hi</body></message>", "not-authorized"),
    (State.AUTHENTICATED, "<iq type='get' id='v'><query xmlns='jabber:iq:version'/></iq>", "not-authorized"),
    (State.AUTHENTICATED, "<foo xmlns='urn:unknown'/>", "unsupported-stanza-type"),
    (State.BOUND, AUTH, "policy-violation"),
])
async def test_a_refused_element_ends_the_stream(server: Harness, state: State, data: str, condition: str) -> None:
    raw = await in_state(server, state)
    await raw.send(data)
    assert stream_error_condition(await raw.closed()) == condition


@pytest.mark.parametrize("state", [State.SECURED, State.AUTHENTICATED, State.BOUND])
async def test_starttls_over_tls_gets_a_tls_failure(server: Harness, state: State) -> None:
    raw = await in_state(server, state)
    await raw.send(STARTTLS)
    assert (await raw.next()).tag == "{urn:ietf:params:xml:ns:xmpp-tls}failure"
    await raw.closed()


@pytest.mark.parametrize(("state", "data", "condition"), [
    (State.SECURED, ABORT, "aborted"),
    (State.SECURED, RESPONSE, "malformed-request"),
    (State.AUTHENTICATED, ABORT, "aborted"),
    (State.AUTHENTICATED, RESPONSE, "malformed-request"),
    (State.BOUND, ABORT, "aborted"),
    (State.BOUND, RESPONSE, "malformed-request"),
])
async def test_sasl_out_of_place_gets_a_sasl_failure_and_the_stream_goes_on(
        server: Harness, state: State, data: str, condition: str) -> None:
    raw = await in_state(server, state)
    await raw.send(data)
    failure = await raw.expect(f"{{{SASL}}}failure")
    assert failure.find(f"{{{SASL}}}{condition}") is not None
    await raw.send("<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>" if state is State.BOUND else ABORT)
    answer = await raw.next()
    assert answer.tag == ("{jabber:client}iq" if state is State.BOUND else f"{{{SASL}}}failure")
