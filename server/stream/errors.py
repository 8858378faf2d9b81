"""Protocol errors as exceptions, so a handler can stop at any depth and the edge turns them into XML.

Stream errors (RFC 6120 4.9) end the stream; stanza errors (RFC 6120 8.3) answer one stanza.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element, SubElement

from server import ns

STREAM_CONDITIONS = frozenset(
    {
        "bad-format", "bad-namespace-prefix", "conflict", "connection-timeout", "host-gone",
        "host-unknown", "improper-addressing", "internal-server-error", "invalid-from",
        "invalid-namespace", "invalid-xml", "not-authorized", "not-well-formed", "policy-violation",
        "remote-connection-failed", "reset", "resource-constraint", "restricted-xml", "see-other-host",
        "system-shutdown", "undefined-condition", "unsupported-encoding", "unsupported-feature",
        "unsupported-stanza-type", "unsupported-version",
    }
)

# RFC 6120 8.3.3: the error type that goes with each condition by default.
STANZA_CONDITIONS: dict[str, str] = {
    "bad-request": "modify",
    "conflict": "cancel",
    "feature-not-implemented": "cancel",
    "forbidden": "auth",
    "gone": "cancel",
    "internal-server-error": "cancel",
    "item-not-found": "cancel",
    "jid-malformed": "modify",
    "not-acceptable": "modify",
    "not-allowed": "cancel",
    "not-authorized": "auth",
    "policy-violation": "modify",
    "recipient-unavailable": "wait",
    "redirect": "modify",
    "registration-required": "auth",
    "remote-server-not-found": "cancel",
    "remote-server-timeout": "wait",
    "resource-constraint": "wait",
    "service-unavailable": "cancel",
    "subscription-required": "auth",
    "undefined-condition": "cancel",
    "unexpected-request": "wait",
}


class StreamError(Exception):
    """Raised anywhere during stream processing; the connection sends it and closes."""

    def __init__(self, condition: str, text: str | None = None) -> None:
        if condition not in STREAM_CONDITIONS:
            raise ValueError(f"unknown stream error condition {condition!r}")
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text

    def to_element(self) -> Element:
        err = Element(ns.qname(ns.STREAM, "error"))
        SubElement(err, ns.qname(ns.STREAMS_ERR, self.condition))
        if self.text:
            SubElement(err, ns.qname(ns.STREAMS_ERR, "text")).text = self.text
        return err


class StanzaError(Exception):
    """Raised by a handler to answer the stanza it was given with an error."""

    def __init__(self, condition: str, text: str | None = None, type: str | None = None,
                 extra: Element | None = None) -> None:
        if condition not in STANZA_CONDITIONS:
            raise ValueError(f"unknown stanza error condition {condition!r}")
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text
        self.type = type or STANZA_CONDITIONS[condition]
        self.extra = extra

    def to_element(self) -> Element:
        err = Element(ns.qname(ns.CLIENT, "error"), {"type": self.type})
        SubElement(err, ns.qname(ns.STANZAS_ERR, self.condition))
        if self.text:
            SubElement(err, ns.qname(ns.STANZAS_ERR, "text")).text = self.text
        if self.extra is not None:
            err.append(self.extra)
        return err
