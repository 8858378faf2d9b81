"""What a session and a stream parser keep in memory: a session that is closed lets go of its connection,
and a parser's text buffer is small, its pieces joined."""

from __future__ import annotations

import asyncio
import gc
import ssl
import tracemalloc
import weakref
from typing import Any
from xml.etree.ElementTree import Element

import pytest

from server import ns
from server.jid import JID
from server.sessions import Session
from server.stream import edge
from server.stream.errors import StreamError
from server.stream.parser import TEXT_BUFFER, StreamParser
from tests.conftest import Harness


class Connection:
    """Stands for a client connection: what a session writes to and closes."""

    def __init__(self) -> None:
        self.written: list[str] = []

    def write(self, data: str) -> None:
        self.written.append(data)

    def close_session(self, condition: str | None) -> None:
        """Nothing to close here."""

    async def room(self, wait: bool) -> int:
        return 1


class Host:
    """What Session.send_raw reads of its host: the server's counters."""

    def __init__(self) -> None:
        self.server: Any = type("Server", (), {"stats": type("Stats", (), {"sent": {"message": 0}})()})()


def test_a_closed_session_lets_go_of_its_connection() -> None:
    """A session whose end waits (for storage, on a busy server) must not keep its connection, and with it
    the connection's buffers (256 KiB with TLS), in memory."""
    conn = Connection()
    session = Session(JID.parse("alice@localhost/home"), Host(), conn.write, conn.close_session)  # type: ignore[arg-type]
    session.room = conn.room
    session.send(Element("message", {"to": "alice@localhost/home"}))
    assert len(conn.written) == 1
    session.closed = True
    gone = weakref.ref(conn)
    del conn
    gc.collect()
    assert gone() is None
    session.send(Element("message", {"to": "alice@localhost/home"}))  # kept for the hand-on, not written
    assert [el.tag for el in session.undelivered] == ["message"]
    session.close("conflict")  # harmless once closed


def test_long_text_arrives_whole_through_the_small_text_buffer() -> None:
    parser = StreamParser()
    parser.feed(b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
    body = "x&amp;y" * (3 * TEXT_BUFFER)
    events = parser.feed(f"<message><body>{body}</body>tail{body}</message>".encode())
    message = events[-1]
    assert isinstance(message, Element)
    assert message[0].text == body.replace("&amp;", "&")
    assert message[0].tail == "tail" + body.replace("&amp;", "&")


async def test_a_tls_stream_that_ended_is_freed_before_the_close_grace_period(server: Harness) -> None:
    """The timer that cuts a peer CLOSE_GRACE seconds after the server closes must not hold a stream that
    ended in time: it held each connection's TLS object and buffers, all of a login storm's for 10 s."""
    raw = await server.raw()
    await raw.starttls()
    await raw.open()
    await raw.expect("{http://etherx.jabber.org/streams}features")
    await raw.send("</stream:stream>")
    await raw.closed()
    raw.writer.close()
    for _ in range(100):
        if not server.server.connections:
            break
        await asyncio.sleep(0.02)
    assert not server.server.connections
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, ssl.SSLObject) and o.server_side]


HEADER = b"<?xml version='1.0'?><s:stream xmlns='jabber:server' xmlns:s='http://etherx.jabber.org/streams' " \
         b"xmlns:db='jabber:server:dialback' to='example.org' version='1.0'>"


def test_a_parser_at_rest_gives_back_expat_and_reads_on_as_before() -> None:
    """Between stanzas a parser can let go of expat's (two thirds of an idle stream's memory); the stream
    goes on with the peer's namespaces, prefixes and limits."""
    tracemalloc.start()
    parsers = [StreamParser(ns.SERVER, max_stanza_size=100) for _ in range(50)]
    for parser in parsers:
        parser.feed(HEADER)
        assert [el.tag for el in parser.feed(b"<message><body>hi</body></message> ")] == [f"{{{ns.CLIENT}}}message"]
    busy = tracemalloc.get_traced_memory()[0]
    for parser in parsers:
        parser.rest()
    rested = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert (busy - rested) / len(parsers) > 8000
    parser = parsers[0]
    events = parser.feed(b"<db:result from='a.example' to='example.org'>k")
    assert events == []
    parser.rest()  # in the middle of a stanza: kept
    events = parser.feed(b"ey</db:result><iq type='get' id='1'/><presence")
    assert [el.tag for el in events] == ["{jabber:server:dialback}result", f"{{{ns.CLIENT}}}iq"]
    assert events[0].text == "key"
    parser.rest()  # in the middle of a tag: kept
    assert [el.tag for el in parser.feed(b"/>")] == [f"{{{ns.CLIENT}}}presence"]
    parser.rest()
    with pytest.raises(StreamError) as limit:
        parser.feed(b"<message><body>" + b"x" * 200)
    assert limit.value.condition == "policy-violation"
    with pytest.raises(StreamError) as text:
        parsers[1].feed(b" text")
    assert text.value.condition == "bad-format"
    assert parsers[2].feed(b"</s:stream>")[0].__class__.__name__ == "StreamClose"


async def test_the_parser_of_a_quiet_client_rests(server: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edge, "REST_AFTER", 0.05)
    raw = await server.raw()
    await raw.open()
    await raw.expect("{http://etherx.jabber.org/streams}features")
    await asyncio.sleep(0.2)
    (conn,) = server.server.connections
    assert conn.parser._parser is None
    await raw.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    await raw.expect("{urn:ietf:params:xml:ns:xmpp-tls}proceed")
