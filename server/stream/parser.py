"""Incremental XML stream parser: bytes in, events out, no I/O (the h11 shape).

Events are `StreamOpen`, a completed top-level `Element` (stanza or nonza) and `StreamClose`.
The parser enforces XMPP's restricted XML (RFC 6120 11.1): a DTD, comment, processing instruction
or entity declaration is a `restricted-xml` stream error, so entity bombs never expand. It also
bounds stanza size and nesting depth, counting bytes as they arrive so a hostile peer cannot make
it buffer more than one limit's worth.

Stanza namespaces are made canonical: the content namespace of a server stream (jabber:server)
becomes jabber:client, so modules see one namespace whatever link a stanza came over; the
writer puts the right one back on the way out.
"""

from __future__ import annotations

import pyexpat
from dataclasses import dataclass
from xml.etree.ElementTree import Element
from xml.sax.saxutils import quoteattr

from server import ns
from server.stream.errors import StreamError

_STREAM_TAG = ns.qname(ns.STREAM, "stream")


@dataclass(frozen=True, slots=True)
class StreamOpen:
    """The peer's stream header: its attributes (namespaced ones in Clark notation)."""

    attrs: dict[str, str]
    content_ns: str | None

    def get(self, name: str) -> str | None:
        return self.attrs.get(name)


@dataclass(frozen=True, slots=True)
class StreamClose:
    """The peer sent </stream:stream>."""


TEXT_BUFFER = 1024


class StreamParser:
    """One direction of one XMPP stream. Call `reset()` at each stream restart (TLS, SASL)."""

    def __init__(self, content_ns: str = ns.CLIENT, max_stanza_size: int = 262144, max_depth: int = 64) -> None:
        self.content_ns = content_ns
        self.max_stanza_size = max_stanza_size
        self.max_depth = max_depth
        self._rewrite = f"{{{content_ns}}}" if content_ns != ns.CLIENT else None
        self.reset()

    def reset(self) -> None:
        self._parser: pyexpat.XMLParserType | None = self._expat()
        self._events: list[object] = []
        self._stack: list[Element] = []
        self._depth = 0
        self._opened = False
        self._closed = False
        self._default_ns: str | None = None
        self._declared: list[tuple[str | None, str]] = []  # the stream header's namespaces, for `_resume`
        self._fed = 0
        self._mark = 0  # byte offset where the current stanza (or pending token) started

    def _expat(self) -> pyexpat.XMLParserType:
        p = pyexpat.ParserCreate("UTF-8", "}")
        # Text comes in one piece per TEXT_BUFFER bytes: a buffer of that size stays with every connection
        # (the default, 8 KiB, was a third of an idle session's memory); `_text` joins the pieces.
        p.buffer_size = TEXT_BUFFER
        p.buffer_text = True
        p.ordered_attributes = False
        p.SetParamEntityParsing(pyexpat.XML_PARAM_ENTITY_PARSING_NEVER)
        if hasattr(p, "SetReparseDeferralEnabled"):
            # expat >= 2.6 would otherwise hold back a stanza split across reads.
            p.SetReparseDeferralEnabled(False)
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.CharacterDataHandler = self._text
        p.StartNamespaceDeclHandler = self._ns_decl
        p.XmlDeclHandler = self._xml_decl
        p.StartDoctypeDeclHandler = self._restricted
        p.EntityDeclHandler = self._restricted
        p.CommentHandler = self._restricted
        p.ProcessingInstructionHandler = self._restricted
        p.ExternalEntityRefHandler = self._restricted
        p.NotationDeclHandler = self._restricted
        p.UnparsedEntityDeclHandler = self._restricted
        return p

    def rest(self) -> None:
        """Let go of expat's parser between two stanzas: with the tables it grew, some 10 KiB of an idle
        stream's 20. The next `feed` makes another, which reads a header like the peer's first. Kept in the
        middle of a stanza or of a token (expat holds its start); text is never held between two `feed`s."""
        p = self._parser
        if p is None or not self._opened or self._closed or self._depth != 1 or p.CurrentByteIndex != self._fed:
            return
        self._parser = None

    def _resume(self) -> pyexpat.XMLParserType:
        """A new parser for a stream that `rest` left between stanzas: it reads a stream header declaring
        the peer's namespaces, whose event is dropped, and byte offsets start again after it."""
        p = self._parser = self._expat()
        prefix = next((prefix for prefix, uri in self._declared if uri == ns.STREAM and prefix), None)
        tag = f"{prefix}:stream" if prefix else "stream"
        declared = "".join(f" xmlns:{prefix}={quoteattr(uri)}" if prefix else f" xmlns={quoteattr(uri)}"
                           for prefix, uri in self._declared)
        header = f"<{tag}{declared}>".encode()
        self._declared, self._depth = [], 0
        p.Parse(header, False)
        self._events.clear()
        self._fed = self._mark = len(header)
        return p

    def feed(self, data: bytes) -> list[object]:
        """Parse a chunk; return the events it completed. Raises StreamError on bad input.

        Whatever follows the peer's </stream:stream> is ignored: the stream is closing, and some clients
        (Profanity on quit) still send a few bytes.
        """
        if self._closed:
            return []
        parser = self._parser or self._resume()
        self._fed += len(data)
        try:
            parser.Parse(data, False)
        except pyexpat.ExpatError as exc:
            if not self._closed:
                raise StreamError("not-well-formed", self._explain(exc, data)) from None
        if self._fed - self._mark > self.max_stanza_size:
            raise StreamError("policy-violation", f"stanza larger than {self.max_stanza_size} bytes")
        events, self._events = self._events, []
        return events

    def _explain(self, exc: pyexpat.ExpatError, data: bytes) -> str:
        if not self._opened and self._fed == len(data) and data[:2] == b"\x16\x03":
            return "a TLS handshake where a stream header was expected: Direct TLS to a STARTTLS port?"
        return pyexpat.ErrorString(exc.code)

    def _restricted(self, *args: object) -> None:
        raise StreamError("restricted-xml", "DTDs, comments, processing instructions and entities are not allowed")

    def _xml_decl(self, version: str | None, encoding: str | None, standalone: int) -> None:
        if encoding and encoding.lower() not in ("utf-8", "utf8"):
            raise StreamError("unsupported-encoding", "only UTF-8 is supported")

    def _ns_decl(self, prefix: str | None, uri: str) -> None:
        if self._depth == 0:
            self._declared.append((prefix, uri))
            if not prefix:
                self._default_ns = uri

    def _name(self, name: str) -> str:
        if "}" not in name:
            return name
        if self._rewrite and name.startswith(self.content_ns + "}"):
            return "{" + ns.CLIENT + name[len(self.content_ns):]
        return "{" + name

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        depth = self._depth
        tag = "{" + name if "}" in name else name
        if depth == 0:
            if tag != _STREAM_TAG:
                condition = "invalid-namespace" if tag.endswith("stream") else "bad-format"
                raise StreamError(condition, "expected a stream header")
            self._opened = True
            self._depth = 1
            self._mark = self._fed
            self._events.append(StreamOpen({self._name(k): v for k, v in attrs.items()}, self._default_ns))
            return
        if depth >= self.max_depth:
            raise StreamError("policy-violation", "elements nested too deeply")
        if self._rewrite:
            tag = self._name(name)
        if attrs and "}" in "".join(attrs):
            attrs = {self._name(k): v for k, v in attrs.items()}
        if depth == 1:
            if "}" not in tag:
                raise StreamError("invalid-namespace", "top-level element without a namespace")
            self._mark = self._parser.CurrentByteIndex
            el = Element(tag, attrs)
        else:
            el = Element(tag, attrs)
            self._stack[-1].append(el)
        self._stack.append(el)
        self._depth = depth + 1

    def _end(self, name: str) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._closed = True
            self._events.append(StreamClose())
            return
        el = self._stack.pop()
        if self._depth == 1:
            self._events.append(el)
            self._mark = self._parser.CurrentByteIndex

    def _text(self, data: str) -> None:
        if self._depth <= 1:
            if data.strip():
                raise StreamError("bad-format", "text outside stanzas")
            self._mark = self._parser.CurrentByteIndex
            return
        el = self._stack[-1]
        if len(el):
            last = el[-1]
            last.tail = (last.tail or "") + data
        else:
            el.text = (el.text or "") + data
