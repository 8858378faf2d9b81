"""Characters XML cannot carry (U+0001, U+FFFE, lone surrogates...): the writer never writes them, what is
stored with them from before still reads, and the configuration and imports refuse them. The HTTP API and
parleyctl refusals are in their own test files."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from xml.etree.ElementTree import Element, SubElement, fromstring

import pytest
from slixmpp import ClientXMPP

from ejabberd_compat.piefxis import ImportReport, PiefxisError, read_xml
from ejabberd_compat.sql_import import _parse, stored_room
from server import ns
from server.config import ConfigError, load_config
from server.registry import available
from server.stream.writer import NOT_XML, not_xml, serialize
from tests.conftest import Harness

FORBIDDEN = ("\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1f", "\ud800", "\udfff", "\ufffe", "\uffff")


def test_not_xml_names_the_first_forbidden_character() -> None:
    assert not_xml("tab\tnewline\ncr\r, é, \u200d, \ufffd, \U0001f600, \ue000") is None
    for char in FORBIDDEN:
        assert not_xml(f"a{char}b\x01") == f"U+{ord(char):04X}"


@pytest.mark.parametrize("char", FORBIDDEN)
def test_the_writer_never_writes_what_xml_cannot_carry(char: str) -> None:
    message = Element(ns.qname(ns.CLIENT, "message"), {"to": "bob@localhost", "id": f"i{char}d"})
    SubElement(message, ns.qname(ns.CLIENT, "body")).text = f"a{char}b"
    SubElement(message, "{urn:x}extra", {"{urn:y}attr": char}).tail = char
    xml = serialize(message)
    assert NOT_XML.search(xml) is None
    parsed = fromstring(f'<w xmlns="{ns.CLIENT}">{xml}</w>')[0]  # what a client's parser reads
    assert (parsed.get("id"), parsed.findtext(ns.qname(ns.CLIENT, "body"))) == ("i\ufffdd", "a\ufffdb")


def test_the_writer_leaves_valid_text_as_it_is() -> None:
    message = Element(ns.qname(ns.CLIENT, "message"), {"to": "bob@localhost"})
    SubElement(message, ns.qname(ns.CLIENT, "body")).text = "line\n\ttab \U0001f600 \u200d \ufffd <&>"
    assert serialize(message) == ('<message to="bob@localhost"><body>line\n\ttab \U0001f600 \u200d \ufffd '
                                  '&lt;&amp;&gt;</body></message>')


async def online(server: Harness, name: str) -> tuple[ClientXMPP, asyncio.Queue]:
    await server.add_user(name)
    client = await server.client(f"{name}@localhost", plugins=("xep_0199",))
    inbox = server.inbox(client)
    available = asyncio.Event()
    client.add_event_handler("presence_available", lambda p: p["from"] == client.boundjid and available.set())
    client.send_presence()
    await asyncio.wait_for(available.wait(), 5)
    return client, inbox


def chat(to: str, body: str) -> Element:
    message = Element(ns.qname(ns.CLIENT, "message"), {"from": "localhost", "to": to, "type": "chat"})
    SubElement(message, ns.qname(ns.CLIENT, "body")).text = body
    return message


async def test_an_online_recipient_stays_connected(server: Harness) -> None:
    """A stanza that got U+0001 past every front end reaches the client with U+FFFD, not as bytes its
    parser refuses with not-well-formed."""
    client, inbox = await online(server, "bob")
    await server.server.router.send(chat("bob@localhost", "a\x01b"))
    assert (await asyncio.wait_for(inbox.get(), 5))["body"] == "a\ufffdb"
    await client.plugin["xep_0199"].send_ping("localhost", timeout=5)
    assert client.is_connected()


async def test_an_offline_message_stored_with_such_characters_is_delivered(server: Harness) -> None:
    """What an earlier version stored as it was reads with U+FFFD: the login works and the message comes."""
    await server.add_user("carol")
    await server.server.storage.offline.push(
        "localhost", "carol", '<message from="localhost" to="carol@localhost" type="chat"><body>a\x01b</body>'
                              '</message>', datetime.now(UTC), sys.maxsize)
    client = await server.client("carol@localhost", plugins=("xep_0199",))
    inbox = server.inbox(client)
    client.send_presence()
    assert (await asyncio.wait_for(inbox.get(), 5))["body"] == "a\ufffdb"
    await client.plugin["xep_0199"].send_ping("localhost", timeout=5)
    assert await server.server.storage.offline.pop_all("localhost", "carol") == []


def test_the_configuration_refuses_them_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "parley.toml"
    path.write_text('[module_options.announce]\nwelcome = "Hello\\u0001"\n')
    with pytest.raises(ConfigError, match=r"module_options\.announce\.welcome.*U\+0001, a character XML"):
        load_config(path, known_modules=available())


def test_a_piefxis_file_with_them_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "user.xml"
    path.write_text("<server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'><user name='a' password='p'>"
                    "<query xmlns='vcard-temp'><FN>&#1;</FN></query></user></host></server-data>")
    with pytest.raises(PiefxisError, match="not well-formed XML: reference to invalid character number"):
        read_xml(path)


def test_ejabberd_rows_with_them_are_reported_not_imported() -> None:
    report = ImportReport()
    assert _parse("<message><body>a\x01b</body></message>", "offline message of alice", report) is None
    assert report.problems == ["offline message of alice contains U+0001, a character XML does not allow; "
                               "not imported"]
    with pytest.raises(ValueError, match="room options contains U\\+0002"):
        stored_room("lobby", [("title", "Lob\x02by")], datetime.now(UTC))
