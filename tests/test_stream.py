"""The sans-IO stream parser and writer: bytes in, events out."""

from __future__ import annotations

import pytest

from server.stream.errors import StreamError
from server.stream.parser import StreamClose, StreamOpen, StreamParser
from server.stream.writer import serialize, stream_header

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")


def opened(**kwargs: int) -> StreamParser:
    parser = StreamParser(**kwargs)
    events = parser.feed(HEADER)
    assert isinstance(events[0], StreamOpen)
    return parser


def test_header_and_stanza_split_at_every_byte() -> None:
    parser = StreamParser()
    data = HEADER + b"<message to='a@b'><body>hi &amp; bye</body></message></stream:stream>"
    events = []
    for i in range(len(data)):
        events += parser.feed(data[i:i + 1])
    assert isinstance(events[0], StreamOpen)
    assert events[0].get("to") == "localhost" and events[0].content_ns == "jabber:client"
    assert events[1].tag == "{jabber:client}message"
    assert events[1].find("{jabber:client}body").text == "hi & bye"
    assert isinstance(events[2], StreamClose)


def test_whitespace_keepalive_between_stanzas_is_ignored() -> None:
    parser = opened()
    assert parser.feed(b"   \n ") == []
    assert len(parser.feed(b"<presence/> <presence/>")) == 2


@pytest.mark.parametrize("data", [
    b"<!DOCTYPE x [<!ENTITY a 'b'>]>",
    b"<!-- a comment -->",
    b"<?php echo 1 ?>",
])
def test_restricted_xml_before_header(data: bytes) -> None:
    with pytest.raises(StreamError) as err:
        StreamParser().feed(data + HEADER)
    assert err.value.condition == "restricted-xml"


def test_entity_bomb_is_refused_without_expansion() -> None:
    bomb = (b"<?xml version='1.0'?><!DOCTYPE s [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;'>"
            b"<!ENTITY c '&b;&b;&b;&b;&b;&b;&b;'>]>")
    with pytest.raises(StreamError) as err:
        StreamParser().feed(bomb + HEADER)
    assert err.value.condition == "restricted-xml"


@pytest.mark.parametrize("data", [b"<!-- c -->", b"<?pi x?>"])
def test_restricted_xml_inside_stream(data: bytes) -> None:
    with pytest.raises(StreamError) as err:
        opened().feed(data)
    assert err.value.condition == "restricted-xml"


def test_undefined_entity_is_not_well_formed() -> None:
    with pytest.raises(StreamError) as err:
        opened().feed(b"<message><body>&lol;</body></message>")
    assert err.value.condition == "not-well-formed"


def test_mismatched_tags() -> None:
    with pytest.raises(StreamError) as err:
        opened().feed(b"<message><body></message>")
    assert err.value.condition == "not-well-formed"


def test_stanza_size_limit_counts_bytes_as_they_arrive() -> None:
    parser = opened(max_stanza_size=1000)
    parser.feed(b"<message><body>")
    with pytest.raises(StreamError) as err:
        for _ in range(100):
            parser.feed(b"x" * 100)
    assert err.value.condition == "policy-violation"


def test_many_small_stanzas_in_one_chunk_are_not_one_big_stanza() -> None:
    parser = opened(max_stanza_size=1000)
    assert len(parser.feed(b"<presence/>" * 500)) == 500


def test_depth_limit() -> None:
    with pytest.raises(StreamError) as err:
        opened(max_depth=10).feed(b"<message>" + b"<x xmlns='y'>" * 20)
    assert err.value.condition == "policy-violation"


def test_wrong_stream_namespace() -> None:
    with pytest.raises(StreamError) as err:
        StreamParser().feed(b"<stream:stream xmlns:stream='urn:wrong' xmlns='jabber:client'>")
    assert err.value.condition == "invalid-namespace"


def test_non_utf8_encoding_declaration() -> None:
    with pytest.raises(StreamError) as err:
        StreamParser().feed(b"<?xml version='1.0' encoding='ISO-8859-1'?>" + HEADER[21:])
    assert err.value.condition == "unsupported-encoding"


def test_server_stream_namespace_is_made_canonical_and_written_back() -> None:
    parser = StreamParser(content_ns="jabber:server")
    parser.feed(b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>")
    (el,) = parser.feed(b"<message to='a@b'><body>x</body><forwarded xmlns='urn:xmpp:forward:0'>"
                        b"<message xmlns='jabber:client'><body>in</body></message></forwarded></message>")
    assert el.tag == "{jabber:client}message"
    assert el[0].tag == "{jabber:client}body"
    assert serialize(el) == ('<message to="a@b"><body>x</body><forwarded xmlns="urn:xmpp:forward:0">'
                             '<message xmlns="jabber:client"><body>in</body></message></forwarded></message>')


def test_writer_escapes_and_round_trips() -> None:
    parser = opened()
    text = "<&>\"' \u00e9\U0001F600"
    (el,) = parser.feed(b"<message to='a@b' xml:lang='fr'><body/><x xmlns='urn:x' xmlns:p='urn:p' p:a='1'/></message>")
    el.find("{jabber:client}body").text = text
    el.set("id", 'q"<&')
    out = serialize(el)
    (back,) = opened().feed(out.encode())
    assert back.find("{jabber:client}body").text == text
    assert back.get("id") == 'q"<&'
    assert back.get("{http://www.w3.org/XML/1998/namespace}lang") == "fr"
    assert back.find("{urn:x}x").get("{urn:p}a") == "1"


def test_stream_prefix_for_stream_namespace() -> None:
    from xml.etree.ElementTree import Element

    assert serialize(Element("{http://etherx.jabber.org/streams}features")) == "<stream:features/>"
    header = stream_header(content_ns="jabber:client", from_="localhost", to=None, stream_id="abc")
    events = StreamParser().feed(header.encode())
    assert events[0].get("from") == "localhost" and events[0].get("id") == "abc"
