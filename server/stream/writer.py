"""Serialization of stanzas inside a stream, without I/O.

Written here rather than with `ElementTree.tostring` because that is an order of magnitude slower and
declares namespaces with generated prefixes. Inside a stream the stream's content namespace is the
default namespace, so a stanza in the canonical jabber:client namespace is written without `xmlns`
and takes jabber:client or jabber:server from the stream it is written into.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element

from server import ns

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


def serialize(el: Element) -> str:
    """Write a top-level element as it appears inside a client or server stream."""
    out: list[str] = []
    _write(el, ns.CLIENT, out)
    return "".join(out)


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
