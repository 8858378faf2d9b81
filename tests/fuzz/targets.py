"""Fuzz targets: each takes arbitrary bytes and fails (raises something other than the protocol's own
refusal, or trips an assertion) only on a defect.

A refusal the protocol defines (a stream error, a SASL failure, a JID or configuration error) is the
right answer to bad input and passes. Where an answer can be checked cheaply, it is: a stanza the parser
accepts survives the writer and a second parse unchanged; a prepared JID prepares to itself.

Run them coverage-guided with tests/fuzz/run.py (atheris); tests/test_fuzz.py runs each for a few
seconds and replays every input in tests/fuzz/crashes/.
"""

from __future__ import annotations

import contextlib
import importlib.util
import tomllib
from collections.abc import Callable
from xml.etree.ElementTree import Element

from server import ns
from server.config import ConfigError, parse_config
from server.forms import Field, build_form, find_form, first_value, form_type_of, read_form
from server.jid import JID, JIDError
from server.registry import available
from server.sasl import SaslFailure
from server.sasl.plain import parse_plain
from server.sasl.scram import ScramServer, derive_credentials
from server.stream.errors import StreamError
from server.stream.parser import StreamClose, StreamOpen, StreamParser
from server.stream.writer import serialize

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")
SCRAM_MECHANISMS = ("SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256-PLUS")
BINDINGS = {"tls-exporter": b"\x01" * 32, "tls-server-end-point": b"\x02" * 32}
CREDENTIALS = {name: derive_credentials("pencil", name, b"salt" * 4, 64) for name in ("SHA-1", "SHA-256")}
KNOWN_MODULES = available()


def _chunks(data: bytes, prefix: bytes = b"") -> list[bytes]:
    """`prefix` and the input but its first byte, in reads of the size that byte says, as reads from a
    socket split a stream."""
    step = data[0] % 17 + 1 if data else 1
    body = prefix + data[1:]
    return [body[i:i + step] for i in range(0, len(body), step)] or [b""]


def _same(a: Element, b: Element) -> bool:
    return (a.tag == b.tag and a.attrib == b.attrib and (a.text or "") == (b.text or "")
            and (a.tail or "") == (b.tail or "") and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b, strict=True)))


def _elements(data: bytes, prefix: bytes) -> list[Element]:
    """The top-level elements of a client stream of `prefix` and the input, read in the chunks it names."""
    parser = StreamParser(ns.CLIENT, max_stanza_size=1 << 16, max_depth=32)
    found: list[Element] = []
    try:
        for chunk in _chunks(data, prefix):
            found += [event for event in parser.feed(chunk) if isinstance(event, Element)]
    except StreamError:
        pass
    return found


def stream_parser(data: bytes) -> None:
    """Any bytes after a stream header: events or a StreamError; what is accepted round-trips the writer."""
    for content_ns in (ns.CLIENT, ns.SERVER):
        parser = StreamParser(content_ns, max_stanza_size=1 << 16, max_depth=32)
        with contextlib.suppress(StreamError):
            for chunk in _chunks(data):
                for event in parser.feed(chunk):
                    assert isinstance(event, Element | StreamOpen | StreamClose)
    for el in _elements(data, HEADER):
        if not el.tag.startswith("{jabber:client}"):
            continue  # the writer writes stanzas; other top-level elements go out as the modules build them
        again = StreamParser(ns.CLIENT, max_stanza_size=1 << 20, max_depth=64)
        events = again.feed(HEADER + serialize(el).encode())
        assert len(events) == 2 and _same(el, events[1]), (el, events)


def scram(data: bytes) -> None:
    """A SCRAM exchange with the client's two messages taken from the input."""
    if len(data) < 2:
        return
    mechanism = SCRAM_MECHANISMS[data[0] % len(SCRAM_MECHANISMS)]
    known_user = data[1] & 1
    first, _, final = data[2:].partition(b"\n")
    server = ScramServer(mechanism, BINDINGS, bool(data[1] & 2), b"secret", server_nonce="servernonce")
    try:
        server.start(first)
        challenge = server.challenge(CREDENTIALS[server.hash_name] if known_user else None)
        assert challenge.startswith(b"r=")
        server.finish(final)
    except SaslFailure:
        return
    raise AssertionError("a SCRAM exchange succeeded without the password")


def plain(data: bytes) -> None:
    try:
        authzid, authcid, password = parse_plain(data)
    except SaslFailure:
        return
    assert authcid and password and authzid != ""


def forms(data: bytes) -> None:
    """A submitted data form (any XML in a stanza): read as the modules read it, built again the same."""
    for el in _elements(b"\x10" + data + b"</iq>", HEADER + b"<iq type='set'>"):
        x = find_form(el)
        if x is None:
            continue
        values = read_form(x)
        form_type = form_type_of(x)
        fields = [Field(var, values=tuple(vs)) for var, vs in values.items() if var != "FORM_TYPE"]
        rebuilt = read_form(build_form("submit", fields, form_type=form_type))
        for var, vs in values.items():
            if var != "FORM_TYPE":
                assert rebuilt[var] == vs and first_value(rebuilt, var) == (vs[0] if vs else None)


def jid(data: bytes) -> None:
    """JID preparation (RFC 7622) is idempotent: a JID's string parses to the same JID."""
    text = data.decode("utf-8", "replace")
    try:
        parsed = JID.parse(text)
    except JIDError:
        return
    again = JID.parse(str(parsed))
    assert again == parsed and str(again) == str(parsed), (text, parsed, again)
    assert JID.make(parsed.local, parsed.domain, parsed.resource) == parsed


def config(data: bytes) -> None:
    """A configuration file: parsed, or a ConfigError that names the key."""
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return
    with contextlib.suppress(ConfigError):
        parse_config(document, known_modules=KNOWN_MODULES, data_dir="/nonexistent/parley-fuzz")


def bosh(data: bytes) -> None:
    """BOSH request bodies (server/stream/bosh.py), NUL-separated: the first creates a session, the others
    are its requests at a second each; every refusal is a BoshError, and the session answers each rid once."""
    from server.stream.bosh import BoshError, BoshSession, Limits, Params, parse_body

    answered: set[int] = set()
    try:
        bodies = [parse_body(part, 1 << 16, 32) for part in data.split(b"\0")[:16]]
        session = BoshSession("sid", Params.negotiate(bodies[0], Limits()), bodies[0], {}, 0.0)
        for now, body in enumerate(bodies, 1):
            received = session.receive(body.rid(), body, float(now))
            session.write("<message/>")
            for answer in [*received.answers, *session.flush(float(now)), *session.tick(float(now) + 0.5)]:
                assert answer.rid not in answered, f"rid {answer.rid} answered twice"
                answered.add(answer.rid)
    except BoshError:
        pass


def websocket(data: bytes) -> None:
    """WebSocket messages (RFC 7395), NUL-separated, through the framed parser of extensions/websocket.py:
    each is one complete element or a StreamError."""
    from extensions.websocket import FramedParser

    parser = FramedParser(ns.CLIENT, max_stanza_size=1 << 16, max_depth=32)
    for message in data.split(b"\0")[:32]:
        try:
            events = parser.feed(message)
        except StreamError:
            parser.reset()
            continue
        assert len(events) <= 1 and all(isinstance(e, Element | StreamOpen | StreamClose) for e in events)


# Transports that arrive with other work are fuzzed once their module is there (see docs/fuzzing.md).
_LATER = {"bosh": ("server.stream.bosh", bosh), "websocket": ("extensions.websocket", websocket)}

TARGETS: dict[str, Callable[[bytes], None]] = {
    "stream_parser": stream_parser,
    "scram": scram,
    "plain": plain,
    "forms": forms,
    "jid": jid,
    "config": config,
    **{name: target for name, (module, target) in _LATER.items() if importlib.util.find_spec(module) is not None},
}
