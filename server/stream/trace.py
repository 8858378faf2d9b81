"""The XML each connection receives and sends, on the `parley.xml` logger at debug level, secrets masked.

An operator turns it on to see what a client and the server said to each other, so the trace may end up in
a bug report: SASL payloads (PLAIN carries the password, SCRAM's messages allow an offline guess), the
<password/> of in-band registration (XEP-0077) and of jabber:iq:auth, a component's <handshake/>, and the
values of password fields in data forms (XEP-0077, XEP-0133) are replaced by `***`. Masking works on what
Parley's writer produces: received stanzas are traced as serialized again, so the patterns below always see
double-quoted attributes and escaped text.
"""

from __future__ import annotations

import logging
import re
from xml.etree.ElementTree import Element

from server import ns
from server.stream.parser import StreamClose, StreamOpen
from server.stream.writer import escape_attr, serialize

log = logging.getLogger("parley.xml")

MASK = "***"
_XML_NS = f"{{{ns.XML}}}"
_ATTRS = r'(?:\s+[^\s=>/]+="[^"]*")*'
# Elements whose whole text is a secret, whatever their namespace.
_SECRET_TEXT = re.compile(rf"(<(auth|response|challenge|success|password|handshake){_ATTRS}\s*>)[^<]+(</\2>)")
_FIELD = re.compile(rf"<field({_ATTRS})\s*>(.*?)</field>", re.DOTALL)
_VALUE = re.compile(r"(<value\s*>)[^<]+(</value>)")
_PRIVATE_FIELD = re.compile(r'\stype="text-private"|\svar="[^"]*password[^"]*"', re.IGNORECASE)


def enabled() -> bool:
    return log.isEnabledFor(logging.DEBUG)


def mask(xml: str) -> str:
    """`xml` with every secret's text replaced by ***."""
    xml = _SECRET_TEXT.sub(rf"\1{MASK}\3", xml)
    if "<field" in xml:
        xml = _FIELD.sub(_mask_field, xml)
    return xml


def _mask_field(match: re.Match[str]) -> str:
    if not _PRIVATE_FIELD.search(match.group(1)):
        return match.group(0)
    values = _VALUE.sub(rf"\1{MASK}\2", match.group(2))
    return f"<field{match.group(1)}>{values}</field>"


def _event_text(event: object) -> str:
    if isinstance(event, Element):
        return serialize(event)
    if isinstance(event, StreamOpen):
        attrs = "".join(f' {name.replace(_XML_NS, "xml:")}="{escape_attr(value)}"'
                        for name, value in event.attrs.items())
        return f"<stream:stream{attrs}>"
    if isinstance(event, StreamClose):
        return "</stream:stream>"
    return repr(event)


def received(conn: object, events: list[object]) -> None:
    """Trace parsed input; call only when `enabled()`."""
    for event in events:
        log.debug("%r RECV %s", conn, mask(_event_text(event)))


def sent(conn: object, data: str) -> None:
    """Trace output; call only when `enabled()`."""
    log.debug("%r SEND %s", conn, mask(data))
