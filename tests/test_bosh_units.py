"""The sans-IO BOSH session (server/stream/bosh.py): bodies, the rid window, held requests, replays, pauses
and the terminal conditions, with the time given by the test."""

from __future__ import annotations

import pytest

from extensions.bosh import qualified
from server.stream.bosh import BODY, HTTPBIND, Body, BoshError, BoshSession, Limits, Params, parse_body, terminal


def body(rid: int, payload: str = "", **attrs: str) -> Body:
    extra = "".join(f" {k}='{v}'" for k, v in attrs.items())
    return parse_body(f"<body xmlns='{HTTPBIND}' rid='{rid}' sid='s'{extra}>{payload}</body>".encode(), 65536, 16)


def session(hold: int = 1, wait: int = 30, now: float = 0.0, **limits: int) -> BoshSession:
    first = parse_body(f"<body xmlns='{HTTPBIND}' rid='100' hold='{hold}' wait='{wait}' ver='1.6' to='h'/>".encode(),
                       65536, 16)
    params = Params.negotiate(first, Limits(**limits))
    machine = BoshSession("s", params, first, {"sid": "s"}, now)
    received = machine.receive(100, first, now)
    assert [rid for rid, _ in received.ready] == [100]
    return machine


def test_parse_body_makes_stanzas_canonical_and_reads_restart() -> None:
    parsed = parse_body(f"<body xmlns='{HTTPBIND}' xmlns:xmpp='urn:xmpp:xbosh' rid='5' sid='x' xmpp:restart='true'>"
                        "<message to='a@b'/><iq xmlns='jabber:client' type='get'/></body>".encode(), 65536, 16)
    assert parsed.rid() == 5 and parsed.sid == "x" and parsed.restart and not parsed.empty
    assert [c.tag for c in parsed.children] == ["{jabber:client}message", "{jabber:client}iq"]


@pytest.mark.parametrize(("data", "condition", "sid"), [
    (b"<body xmlns='http://jabber.org/protocol/httpbind' sid='x' rid='1'><message>", "bad-request", "x"),
    (b"<body xmlns='http://jabber.org/protocol/httpbind' sid='x' rid='1'><!-- no --></body>", "bad-request", "x"),
    (b"<!DOCTYPE body [<!ENTITY a 'b'>]><body/>", "bad-request", None),
    (b"<html/>", "bad-request", None),
    (b"", "bad-request", None),
    (f"<body xmlns='{HTTPBIND}' sid='y'><a xmlns='c'>{'x' * 70000}</a></body>".encode(), "policy-violation", "y"),
])
def test_unreadable_bodies(data: bytes, condition: str, sid: str | None) -> None:
    with pytest.raises(BoshError) as caught:
        parse_body(data, 65536, 16)
    assert (caught.value.condition, caught.value.sid) == (condition, sid)


def test_negotiation_caps_what_the_client_asks() -> None:
    params = Params.negotiate(body(1, wait="3600", hold="5", ver="1.11"), Limits(max_wait=60, max_hold=2))
    assert (params.wait, params.hold, params.requests, params.ver) == (60, 2, 3, (1, 11))
    assert Params.negotiate(body(1, ver="2.0"), Limits()).ver == (1, 11)
    assert Params.negotiate(body(1), Limits()).ver is None
    with pytest.raises(BoshError):
        Params.negotiate(body(1, wait="soon"), Limits())


def test_first_answer_carries_the_greeting_and_output() -> None:
    machine = session()
    machine.write("<stream:features/>")
    [answer] = machine.flush(0.0)
    assert answer.rid == 100 and 'sid="s"' in answer.body and "<stream:features/>" in answer.body
    assert answer.body.startswith(f'<body xmlns="{HTTPBIND}"')


def test_held_beyond_hold_are_answered_empty_and_wait_expires() -> None:
    machine = session(hold=1, wait=10)
    assert [a.rid for a in machine.receive(101, body(101), 1.0).answers] == [100]
    assert machine.tick(5.0) == []
    [answer] = machine.tick(11.0)
    assert answer.rid == 101 and "<" not in answer.body[1:]


def test_output_goes_on_the_oldest_held_request() -> None:
    machine = session()
    machine.write("<message/>")
    assert [a.rid for a in machine.flush(0.0)] == [100]
    machine.write("<iq/>")
    assert machine.flush(0.0) == []  # nothing held: it waits for the next request
    [answer] = machine.receive(101, body(101), 1.0).answers  # what waits goes at once
    assert answer.rid == 101 and "<iq/>" in answer.body


def test_out_of_order_requests_are_handled_in_rid_order() -> None:
    machine = session(hold=1)
    machine.write("<stream:features/>")
    machine.flush(0.0)
    later = machine.receive(102, body(102, "<presence/>"), 1.0)
    assert later.ready == []
    earlier = machine.receive(101, body(101, "<message/>"), 1.0)
    assert [rid for rid, _ in earlier.ready] == [101, 102]


def test_replays_and_the_window() -> None:
    machine = session(hold=1)
    [first] = machine.receive(101, body(101), 1.0).answers
    assert machine.receive(100, body(100), 2.0).replay == first.body
    assert machine.receive(101, body(101), 2.0).ready == []  # unanswered: waits for the same answer
    with pytest.raises(BoshError) as caught:
        machine.receive(104, body(104), 2.0)
    assert caught.value.condition == "item-not-found"
    machine.receive(102, body(102), 3.0)
    machine.receive(103, body(103), 4.0)
    with pytest.raises(BoshError) as caught:
        machine.receive(100, body(100), 5.0)  # out of the replay cache by now
    assert caught.value.condition == "item-not-found"


def test_overactivity() -> None:
    machine = session(hold=1)
    machine.receive(101, body(101), 1.0)
    machine.receive(103, body(103), 1.0)
    with pytest.raises(BoshError) as caught:
        machine.receive(102, body(102), 1.0)
    assert caught.value.condition == "policy-violation"


def test_polling_too_often() -> None:
    machine = session(hold=0, polling=5)
    machine.flush(0.0)
    machine.receive(101, body(101), 6.0)
    with pytest.raises(BoshError) as caught:
        machine.receive(102, body(102), 7.0)
    assert caught.value.condition == "policy-violation"


def test_pause_answers_everything_and_lengthens_inactivity() -> None:
    machine = session(hold=1, inactivity=30, max_pause=120)
    received = machine.receive(101, body(101, pause="100"), 1.0)
    assert sorted(a.rid for a in received.answers) == [100, 101]
    assert not machine.expired(90.0) and machine.expired(101.0)
    with pytest.raises(BoshError) as caught:
        machine.receive(102, body(102, pause="1000"), 2.0)
    assert caught.value.condition == "policy-violation"


def test_inactivity_counts_from_the_last_answer() -> None:
    machine = session(hold=1, wait=10, inactivity=30)
    assert not machine.expired(100.0)  # a request is held
    machine.tick(10.0)
    assert machine.next_deadline() == 40.0
    assert not machine.expired(39.0) and machine.expired(40.0)


def test_terminate_answers_held_and_waiting_and_leaves_output() -> None:
    machine = session(hold=1)
    machine.receive(102, body(102), 1.0)
    machine.write("<message/>")
    answers = machine.terminate("remote-stream-error", 2.0)
    assert [a.rid for a in answers] == [100, 102]
    assert "<message/>" in answers[0].body and 'condition="remote-stream-error"' in answers[0].body
    assert machine.take_output() == []
    with pytest.raises(BoshError) as caught:
        machine.receive(103, body(103), 3.0)
    assert caught.value.condition == "item-not-found"


def test_terminal_body_and_qualified_stanzas() -> None:
    assert terminal(None).endswith('type="terminate"/>')
    parse_body(terminal("item-not-found").encode(), 1024, 4)  # one of ours reads back as a body
    assert f"{{{HTTPBIND}}}body" == BODY
    assert qualified("<message to='a'/>") == "<message xmlns=\"jabber:client\" to='a'/>"
    assert qualified("<iq/>") == '<iq xmlns="jabber:client"/>'
    assert qualified("<stream:features/>") == "<stream:features/>"
    assert qualified("<iqx/>") == "<iqx/>"
