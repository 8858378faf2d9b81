"""Serialization of stanzas inside a stream, without I/O.

Written here rather than with `ElementTree.tostring` because that is an order of magnitude slower and
declares namespaces with generated prefixes. Inside a stream the stream's content namespace is the
default namespace, so a stanza in the canonical jabber:client namespace is written without `xmlns`
and takes jabber:client or jabber:server from the stream it is written into.

What XML cannot carry (NOT_XML) is never written: the front ends that take text from outside XML refuse
it, and should some reach an element anyway, the writer puts U+FFFD in its place and logs it, rather than
send bytes that make the peer close the stream or store a stanza that cannot be read back.
"""

from __future__ import annotations

import logging
import re
from xml.etree.ElementTree import Element

from server import ns

log = logging.getLogger("parley.stream")

# The characters XML 1.0 (section 2.2) forbids even as character references: the C0 controls but tab,
# newline and carriage return, lone surrogates (which strings decoded from JSON may hold), U+FFFE, U+FFFF.
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
REPLACEMENT = "\ufffd"
# Maps each C0 control XML forbids to NUL (itself one of them), so that one `in` finds them all afterwards.
_C0_TO_NUL = bytes.maketrans(bytes(c for c in range(0x20) if c not in b"\t\n\r"),
                             bytes(0x20 - 3))


def not_xml(text: str) -> str | None:
    """The first character of `text` that XML cannot carry, named as U+XXXX, or None when there is none."""
    found = NOT_XML.search(text)
    return f"U+{ord(found.group()):04X}" if found else None

_XML_PREFIX = f"{{{ns.XML}}}"
_STREAM_PREFIX = f"{{{ns.STREAM}}}"


def escape_text(s: str) -> str:
    if "&" in s:
        s = s.replace("&", "&amp;")
    if "<" in s:
        s = s.replace("<", "&lt;")
    if ">" in s:
        s = s.replace(">", "&gt;")
    return s


def escape_attr(s: str) -> str:
    if "&" in s:
        s = s.replace("&", "&amp;")
    if "<" in s:
        s = s.replace("<", "&lt;")
    if '"' in s:
        s = s.replace('"', "&quot;")
    if "\n" in s or "\r" in s or "\t" in s:
        s = s.replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;")
    return s


def _attrs(el: Element, out: list[str]) -> None:
    extra = 0
    for key, value in el.attrib.items():
        if key[0] != "{":
            out.append(f' {key}="{escape_attr(value)}"')
        elif key.startswith(_XML_PREFIX):
            out.append(f' xml:{key[len(_XML_PREFIX):]}="{escape_attr(value)}"')
        else:
            uri, local = key[1:].split("}", 1)
            extra += 1
            out.append(f' xmlns:a{extra}="{escape_attr(uri)}" a{extra}:{local}="{escape_attr(value)}"')


_split_cache: dict[str, tuple[str, str]] = {}


def _split(tag: str) -> tuple[str, str]:
    """(namespace, local name) of a Clark-notation tag; memoised because stanzas reuse a few tags."""
    parts = _split_cache.get(tag)
    if parts is None:
        parts = tuple(tag[1:].split("}", 1)) if tag[0] == "{" else ("", tag)  # type: ignore[assignment]
        if len(_split_cache) < 4096:
            _split_cache[tag] = parts
    return parts


def _write(el: Element, default_ns: str, out: list[str]) -> None:
    uri, local = _split(el.tag)
    if uri == ns.STREAM:
        name = "stream:" + local
        out.append("<" + name)
    elif uri == default_ns:
        name = local
        out.append("<" + name)
    else:
        name = local
        out.append(f'<{name} xmlns="{escape_attr(uri)}"')
        default_ns = uri
    if el.attrib:
        _attrs(el, out)
    text = el.text
    if not len(el) and not text:
        out.append("/>")
    else:
        out.append(">")
        if text:
            out.append(escape_text(text))
        for child in el:
            _write(child, default_ns, out)
            if child.tail:
                out.append(escape_text(child.tail))
        out.append(f"</{name}>")


def _is_xml(xml: str) -> bool:
    """Whether XML can carry every character of `xml`; this runs for every stanza, so it avoids a regular
    expression, several times slower. The controls are found in the UTF-8 bytes with a byte translation
    and one `in`; U+FFFE and U+FFFF with `in` on the string, which answers at once for a string of Latin-1
    characters only (most stanzas), as it cannot hold them."""
    try:
        data = xml.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return b"\0" not in data.translate(_C0_TO_NUL) and "\ufffe" not in xml and "\uffff" not in xml


def serialize(el: Element) -> str:
    """Write a top-level element as it appears inside a client or server stream.

    One check of the written text finds what XML cannot carry, wherever it is (text, attribute, name):
    cheaper than a check in each escape, and the markup written here never holds such characters."""
    out: list[str] = []
    _write(el, ns.CLIENT, out)
    xml = "".join(out)
    if _is_xml(xml):
        return xml
    log.warning("%s to %s held %s, which XML cannot carry; written as U+FFFD", _split(el.tag)[1], el.get("to"),
                not_xml(xml))
    return NOT_XML.sub(REPLACEMENT, xml)


def stream_header(*, content_ns: str, from_: str | None, to: str | None, stream_id: str | None,
                  version: str = "1.0", lang: str = "en", extra: str = "") -> str:
    """The opening tag of our side of a stream; `extra` holds further namespace declarations."""
    parts = ["<?xml version='1.0'?><stream:stream", f' xmlns="{content_ns}"',
             f' xmlns:stream="{ns.STREAM}"']
    if extra:
        parts.append(" " + extra)
    if from_:
        parts.append(f' from="{escape_attr(from_)}"')
    if to:
        parts.append(f' to="{escape_attr(to)}"')
    if stream_id:
        parts.append(f' id="{stream_id}"')
    parts.append(f' version="{version}" xml:lang="{lang}">')
    return "".join(parts)


STREAM_FOOTER = "</stream:stream>"
