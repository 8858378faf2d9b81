"""XEP-0198 Stream Management counters and queue for one stream, without I/O.

The same state serves a client stream and a server-to-server link: whoever owns the stream counts the
stanzas it handled from the peer (`handled`), gives every stanza it writes to `sent`, answers the peer's
<r/> with `ack_element(handled)` and gives the 'h' of the peer's <a/> (or <resume/>, <resumed/>) to
`acknowledge`, which returns what the peer now has. What is still in `unacked` after the stream dies is
what the peer may not have: resend it on resumption, deliver it elsewhere otherwise.

Counters wrap at 2^32 (XEP-0198 section 4): an 'h' acknowledges (h - last h) mod 2^32 stanzas, so
counting across the wrap needs no special case. An 'h' that acknowledges more than was sent is the
peer's error, raised as the stream error XEP-0198 names (`HandledCountTooHigh`).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.stream.errors import StreamError

SM = "urn:xmpp:sm:3"
ENABLE = ns.qname(SM, "enable")
ENABLED = ns.qname(SM, "enabled")
RESUME = ns.qname(SM, "resume")
RESUMED = ns.qname(SM, "resumed")
FAILED = ns.qname(SM, "failed")
ACK = ns.qname(SM, "a")
REQUEST = ns.qname(SM, "r")
FEATURE = ns.qname(SM, "sm")

MODULUS = 2 ** 32

T = TypeVar("T")


def parse_h(text: str | None) -> int:
    """An 'h' attribute: an xs:unsignedInt; ValueError otherwise."""
    if text is None or not text.strip().isdigit():
        raise ValueError(f"'h' must be an unsigned integer, not {text!r}")
    value = int(text)
    if value >= MODULUS:
        raise ValueError(f"'h' {value} is out of range")
    return value


class HandledCountTooHigh(StreamError):
    """The peer acknowledged stanzas that were never sent (XEP-0198 section 4, 'undefined-condition')."""

    def __init__(self, h: int, send_count: int) -> None:
        super().__init__("undefined-condition", f"acknowledged {h} stanzas, sent {send_count}")
        self.h = h
        self.send_count = send_count

    def to_element(self) -> Element:
        err = super().to_element()
        SubElement(err, ns.qname(SM, "handled-count-too-high"), {"h": str(self.h), "send-count": str(self.send_count)})
        return err


class StreamManagement(Generic[T]):
    """Counters and unacknowledged queue of one managed stream; `T` is whatever the owner resends."""

    def __init__(self) -> None:
        self.handled = 0  # stanzas handled from the peer, mod 2^32: our 'h'
        self.send_count = 0  # stanzas sent to the peer, mod 2^32
        self.acknowledged = 0  # the peer's last 'h'
        self._unacked: deque[T] = deque()

    @property
    def unacked(self) -> list[T]:
        """Sent and not acknowledged, oldest first."""
        return list(self._unacked)

    def __len__(self) -> int:
        return len(self._unacked)

    def received(self) -> None:
        """One more stanza from the peer has been handled."""
        self.handled = (self.handled + 1) % MODULUS

    def sent(self, item: T) -> None:
        """One more stanza went (or is queued to go) to the peer."""
        self.send_count = (self.send_count + 1) % MODULUS
        self._unacked.append(item)

    def acknowledge(self, h: int) -> list[T]:
        """Take the peer's 'h': drop and return the stanzas it acknowledges."""
        count = (h - self.acknowledged) % MODULUS
        if count > len(self._unacked):
            raise HandledCountTooHigh(h, self.send_count)
        self.acknowledged = h
        return [self._unacked.popleft() for _ in range(count)]

    def take_unacked(self) -> list[T]:
        """Empty the queue, for a stream that ends for good: the caller delivers these elsewhere."""
        items = list(self._unacked)
        self._unacked.clear()
        return items


def ack_element(h: int) -> Element:
    return Element(ACK, {"h": str(h)})


def request_element() -> Element:
    return Element(REQUEST)


def failed(condition: str, h: int | None = None) -> Element:
    """<failed/> with a stanza error condition (RFC 6120 8.3.3), and our 'h' when it is known."""
    el = Element(FAILED, {"h": str(h)} if h is not None else {})
    SubElement(el, ns.qname(ns.STANZAS_ERR, condition))
    return el
