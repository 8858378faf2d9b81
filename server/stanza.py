"""Stanza objects and reply helpers shared by the router and every module."""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, ParseError, SubElement, fromstring

from server import ns
from server.jid import JID
from server.stream.errors import StanzaError
from server.stream.writer import NOT_XML, REPLACEMENT

if TYPE_CHECKING:
    from server.sessions import Session

MESSAGE = ns.qname(ns.CLIENT, "message")
PRESENCE = ns.qname(ns.CLIENT, "presence")
IQ = ns.qname(ns.CLIENT, "iq")
KINDS = {MESSAGE: "message", PRESENCE: "presence", IQ: "iq"}

# Sent when a handler answered an iq itself and the router must not add a reply.
HANDLED = object()


class Stanza:
    """A routed stanza: the element plus what the router already worked out about it.

    `origin` is the local client session it came from (None for server-generated or remote stanzas).
    `pending` holds work a module started for the stanza that routing need not wait for but that must be
    done before the stanza counts as handled (see `defer`). `copies` are the sessions of a message's
    recipient that a module sent a copy to besides those the router delivered it to (carbons), so that a
    session that loses the message knows the account has it.
    """

    __slots__ = ("copies", "el", "from_", "kind", "origin", "pending", "to", "type")

    def __init__(self, el: Element, kind: str, from_: JID, to: JID | None, origin: Session | None = None) -> None:
        self.el = el
        self.kind = kind
        self.type = el.get("type")
        self.from_ = from_
        self.to = to
        self.origin = origin
        self.pending: list[Awaitable[object]] | None = None
        self.copies: tuple[Session, ...] = ()

    def defer(self, work: Awaitable[object]) -> None:
        """Let routing go on while `work` runs; the router waits for it before it is done with the stanza.

        The archive uses it so that the sender's copy of a message is written in the same transaction as
        the recipient's, instead of one commit after the other.
        """
        if self.pending is None:
            self.pending = []
        self.pending.append(work)

    @property
    def id(self) -> str | None:
        return self.el.get("id")

    def __repr__(self) -> str:
        return f"<Stanza {self.kind} type={self.type} from={self.from_} to={self.to}>"


def element(kind: str, **attrs: str | None) -> Element:
    """A new stanza element; attributes whose value is None are left out."""
    return Element(ns.qname(ns.CLIENT, kind), {k.rstrip("_"): v for k, v in attrs.items() if v is not None})


def reply(el: Element, type: str = "result") -> Element:
    """An answer addressed back to the sender, with the same id."""
    out = Element(el.tag, {"type": type})
    if el.get("id") is not None:
        out.set("id", el.get("id"))
    if el.get("from"):
        out.set("to", el.get("from"))
    if el.get("to"):
        out.set("from", el.get("to"))
    return out


def error_reply(el: Element, error: StanzaError) -> Element:
    """RFC 6120 8.3.1: the error stanza carries the original payload of an iq, then the error."""
    out = reply(el, "error")
    if el.tag == IQ and len(el):
        out.append(el[0])
    out.append(error.to_element())
    return out


def child(el: Element, tag: str) -> Element | None:
    return el.find(tag)


def text_of(el: Element, tag: str) -> str | None:
    found = el.find(tag)
    return found.text if found is not None else None


def xmpp_datetime(when: datetime) -> str:
    """XEP-0082 DateTime of an aware datetime, in UTC to the millisecond: '2024-05-01T12:00:00.000Z'."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_datetime(text: str) -> datetime:
    """A XEP-0082 DateTime, which must name its zone; ValueError otherwise."""
    when = datetime.fromisoformat(text.strip())
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return when.astimezone(UTC)


def add_delay(el: Element, from_: str, when: datetime, reason: str | None = None) -> Element:
    """Stamp a stanza kept for later delivery with XEP-0203 delayed delivery."""
    delay = SubElement(el, ns.qname(ns.DELAY, "delay"), {"from": from_, "stamp": xmpp_datetime(when)})
    if reason:
        delay.text = reason
    return delay


def parse_stored(xml: str) -> Element:
    """Stored stanzas are serialized inside jabber:client, so their top element has no xmlns.

    Before the writer replaced characters XML cannot carry, it stored them as they were: such a stanza is
    read with U+FFFD in their place rather than failing the login (or query) that reads it."""
    wrapped = f'<w xmlns="{ns.CLIENT}">{xml}</w>'
    try:
        return fromstring(wrapped)[0]
    except ParseError:
        if NOT_XML.search(xml) is None:
            raise
    return fromstring(NOT_XML.sub(REPLACEMENT, wrapped))[0]
