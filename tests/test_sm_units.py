"""The sans-IO XEP-0198 state: counting, acknowledgement arithmetic mod 2^32, errors."""

from __future__ import annotations

import pytest

from server import ns
from server.stream.sm import (
    MODULUS,
    SM,
    HandledCountTooHigh,
    StreamManagement,
    ack_element,
    failed,
    parse_h,
)
from server.stream.writer import serialize


def test_acknowledge_drops_what_the_peer_has_in_order() -> None:
    sm: StreamManagement[str] = StreamManagement()
    for item in "abcde":
        sm.sent(item)
    assert sm.acknowledge(2) == ["a", "b"]
    assert sm.unacked == ["c", "d", "e"]
    assert sm.acknowledge(2) == []  # the same 'h' again acknowledges nothing new
    assert sm.acknowledge(5) == ["c", "d", "e"]
    assert len(sm) == 0 and sm.send_count == 5


def test_counters_wrap_at_two_to_the_32() -> None:
    sm: StreamManagement[int] = StreamManagement()
    sm.send_count = sm.acknowledged = MODULUS - 2
    sm.handled = MODULUS - 1
    for item in range(4):
        sm.sent(item)
    sm.received()
    assert sm.send_count == 2 and sm.handled == 0
    assert sm.acknowledge(MODULUS - 1) == [0]
    assert sm.acknowledge(1) == [1, 2]
    assert sm.unacked == [3]


def test_acknowledging_more_than_was_sent_is_the_xep_stream_error() -> None:
    sm: StreamManagement[str] = StreamManagement()
    sm.sent("a")
    with pytest.raises(HandledCountTooHigh) as caught:
        sm.acknowledge(2)
    assert sm.unacked == ["a"] and sm.acknowledged == 0  # nothing changed
    err = caught.value.to_element()
    assert err.find(ns.qname(ns.STREAMS_ERR, "undefined-condition")) is not None
    detail = err.find(ns.qname(SM, "handled-count-too-high"))
    assert detail is not None and detail.get("h") == "2" and detail.get("send-count") == "1"


def test_take_unacked_empties_the_queue() -> None:
    sm: StreamManagement[str] = StreamManagement()
    sm.sent("a")
    sm.sent("b")
    assert sm.take_unacked() == ["a", "b"]
    assert sm.unacked == [] and sm.send_count == 2


@pytest.mark.parametrize("text", [None, "", "-1", "1.5", "x", str(MODULUS)])
def test_parse_h_refuses_what_is_not_an_unsigned_int(text: str | None) -> None:
    with pytest.raises(ValueError):
        parse_h(text)


def test_parse_h_and_elements() -> None:
    assert parse_h(" 42 ") == 42 and parse_h(str(MODULUS - 1)) == MODULUS - 1
    assert serialize(ack_element(7)) == '<a xmlns="urn:xmpp:sm:3" h="7"/>'
    assert serialize(failed("item-not-found")) == \
        '<failed xmlns="urn:xmpp:sm:3"><item-not-found xmlns="urn:ietf:params:xml:ns:xmpp-stanzas"/></failed>'
