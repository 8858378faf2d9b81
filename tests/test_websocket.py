"""XMPP over WebSocket (RFC 7395, extensions/websocket.py) with a raw aiohttp client: framing, SASL by the
connection's security, a chat with a TCP user, stream management across WebSockets, and every error, each
closing only its own session."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from typing import Any

import aiohttp
import aiosasl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from extensions.websocket import FramedParser, standalone, text_frames
from server.config import DEFAULT_MODULES
from server.jid import JID
from server.stream.errors import StreamError
from server.stream.parser import StreamClose, StreamOpen
from tests.browser_support import FRAMING, SASL, STREAMS, Closed, WsClient, web_listener, ws_client
from tests.conftest import Harness
from tests.test_scram_plus_independent import XmppSasl

WEB = pytest.mark.parley_config(modules=[*DEFAULT_MODULES, "websocket"])
SM = "urn:xmpp:sm:3"


def mechanisms(features: Any) -> set[str]:
    return {m.text for m in features.iter(f"{{{SASL}}}mechanism")}


def stream_error(elements: list[Any]) -> str:
    """The condition of the stream error among `elements`, checked to be followed by <close/>."""
    tags = [el.tag for el in elements]
    assert tags[-1] == f"{{{FRAMING}}}close", tags
    error = next(el for el in elements if el.tag == f"{{{STREAMS}}}error")
    return error[0].tag.split("}")[1]


async def scram(client: WsClient, user: str, password: str = "secret", mechanism: str = "SCRAM-SHA-256",
                binding: Any = None) -> None:
    async def credentials() -> tuple[str, str]:
        return user, password

    method = aiosasl.SCRAMPLUS(credentials, binding) if binding else aiosasl.SCRAM(credentials)
    token = method.any_supported([mechanism])
    await method.authenticate(aiosasl.SASLStateMachine(XmppSasl(client)), token)  # checks the server's proof


async def logged_in(client: WsClient, user: str, resource: str = "web") -> str:
    features = await client.open()
    assert "SCRAM-SHA-256" in mechanisms(features)
    await scram(client, user)
    return await client.bind(resource)


# --- the sans-IO framing -----------------------------------------------------------------------------


def test_each_message_is_one_element_and_open_close_stand_for_the_stream() -> None:
    parser = FramedParser()
    opened = parser.feed(f"<open xmlns='{FRAMING}' to='localhost' version='1.0' xml:lang='de'/>".encode())
    assert opened == [StreamOpen({"to": "localhost", "version": "1.0",
                                  "{http://www.w3.org/XML/1998/namespace}lang": "de"}, "jabber:client")]
    [message] = parser.feed(b"<message xmlns='jabber:client' to='a@b'><body>hi</body></message>")
    assert message.tag == "{jabber:client}message" and message.findtext("{jabber:client}body") == "hi"
    assert parser.feed(b" ") == []
    assert parser.feed(f"<close xmlns='{FRAMING}'/>".encode()) == [StreamClose()]


@pytest.mark.parametrize("message", [b"<message xmlns='jabber:client'>", b"<a xmlns='x'/><b xmlns='x'/>", b"",
                                     b"</stream:stream>", b"<message xmlns='jabber:client'/><a"])
def test_anything_but_one_complete_element_is_not_well_formed(message: bytes) -> None:
    with pytest.raises(StreamError) as error:
        FramedParser().feed(message)
    assert error.value.condition == "not-well-formed"


def test_restricted_xml_and_size_limits_apply_to_each_message() -> None:
    with pytest.raises(StreamError) as error:
        FramedParser().feed(b"<!-- hi --><message xmlns='jabber:client'/>")
    assert error.value.condition == "restricted-xml"
    with pytest.raises(StreamError) as error:
        FramedParser().feed(b"text")
    assert error.value.condition == "bad-format"
    body = b"x" * 200
    with pytest.raises(StreamError) as error:
        FramedParser(max_stanza_size=100).feed(b"<message xmlns='jabber:client'><body>%s</body></message>" % body)
    assert error.value.condition == "policy-violation"


def test_what_the_server_writes_stands_alone() -> None:
    assert standalone("<message to=\"a@b\"><body>x</body></message>") == \
        "<message xmlns=\"jabber:client\" to=\"a@b\"><body>x</body></message>"
    assert standalone("<iq/>") == "<iq xmlns=\"jabber:client\"/>"
    assert standalone("<stream:features><x xmlns=\"y\"/></stream:features>") == \
        f"<stream:features xmlns:stream=\"{STREAMS}\"><x xmlns=\"y\"/></stream:features>"
    assert standalone("<r xmlns=\"urn:xmpp:sm:3\"/>") == "<r xmlns=\"urn:xmpp:sm:3\"/>"


def test_text_frames() -> None:
    assert text_frames([b"ab"]) == b"\x81\x02ab"
    assert text_frames([b"x" * 200])[:4] == b"\x81\x7e\x00\xc8"
    assert text_frames([b"x" * 70000])[:10] == b"\x81\x7f" + (70000).to_bytes(8, "big")


# --- sessions over a real WebSocket ------------------------------------------------------------------


@WEB
async def test_a_websocket_user_chats_with_a_tcp_user(server: Harness) -> None:
    base = await web_listener(server)
    await server.add_user("juliet")
    romeo = await server.client(await server.add_user("romeo"))
    inbox = server.inbox(romeo)
    async with ws_client(base.replace("http", "ws") + "/xmpp-websocket") as juliet:
        jid = await logged_in(juliet, "juliet")
        assert jid == "juliet@localhost/web"
        await juliet.send("<presence xmlns='jabber:client'/>")
        await juliet.send(f"<message xmlns='jabber:client' to='{romeo.boundjid}' type='chat'><body>Wherefore</body>"
                          "</message>")
        got = await asyncio.wait_for(inbox.get(), 5)
        assert (got["body"], str(got["from"])) == ("Wherefore", jid)
        romeo.send_message(mto=jid, mbody="By a name", mtype="chat")
        reply = await juliet.expect("{jabber:client}message")
        assert reply.findtext("{jabber:client}body") == "By a name"
        await juliet.send(f"<close xmlns='{FRAMING}'/>")
        assert [el.tag for el in await juliet.closed()] == [f"{{{FRAMING}}}close"]
    # Every message was one element that declared its namespaces (WsClient parsed each alone).
    assert all(text.startswith("<") for text in juliet.received)


@WEB
async def test_a_websocket_session_has_roster_carbons_archive_and_csi(server: Harness) -> None:
    base = await web_listener(server)
    await server.add_user("juliet")
    await server.add_user("romeo")
    async with ws_client(base.replace("http", "ws") + "/xmpp-websocket") as web:
        await logged_in(web, "juliet")
        await web.send("<iq xmlns='jabber:client' type='get' id='r'><query xmlns='jabber:iq:roster'/></iq>")
        assert (await web.expect("{jabber:client}iq")).get("type") == "result"
        await web.send("<iq xmlns='jabber:client' type='set' id='c'><enable xmlns='urn:xmpp:carbons:2'/></iq>")
        assert (await web.expect("{jabber:client}iq")).get("type") == "result"
        await web.send("<presence xmlns='jabber:client'/>")
        phone = await server.client("juliet@localhost", resource="phone")
        phone.send_message(mto="romeo@localhost", mbody="sent from the phone", mtype="chat")
        carbon = await web.expect("{jabber:client}message")
        assert carbon.findtext(".//{jabber:client}body") == "sent from the phone"
        assert carbon.find("{urn:xmpp:carbons:2}sent") is not None
        await web.send("<iq xmlns='jabber:client' type='set' id='q'><query xmlns='urn:xmpp:mam:2' queryid='a'/></iq>")
        result = await web.expect("{jabber:client}message")
        assert result.find("{urn:xmpp:mam:2}result").get("queryid") == "a"
        assert result.findtext(".//{jabber:client}body") == "sent from the phone"
        assert (await web.expect("{jabber:client}iq")).get("type") == "result"
        await web.send("<inactive xmlns='urn:xmpp:csi:0'/>")
        await web.send("<active xmlns='urn:xmpp:csi:0'/>")
        await web.send("<iq xmlns='jabber:client' type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>")
        assert (await web.expect("{jabber:client}iq")).get("id") == "p"


@WEB
async def test_plain_only_over_tls_or_from_a_trusted_proxy_that_terminated_it(server: Harness) -> None:
    base = await web_listener(server)
    await server.add_user("juliet")
    url = base.replace("http", "ws") + "/xmpp-websocket"
    async with ws_client(url) as client:
        assert "PLAIN" not in mechanisms(await client.open())  # plain ws://, not from a trusted proxy
    async with ws_client(url, headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "192.0.2.7"}) as client:
        assert "PLAIN" not in mechanisms(await client.open())  # anyone can write those headers
    server.server.config.trusted_proxies = [ipaddress.ip_network("127.0.0.1/32")]
    async with ws_client(url, headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "192.0.2.7"}) as client:
        assert "PLAIN" in mechanisms(await client.open())
        assert (await client.plain("juliet", "secret")).tag == f"{{{SASL}}}success"
        await client.bind()
        [session] = server.server.sessions.of(JID.parse("juliet@localhost"))
        assert session.remote_ip == "192.0.2.7"  # limits and logs see the client, not the proxy


@WEB
async def test_scram_plus_with_tls_server_end_point_over_wss(server: Harness) -> None:
    base = await web_listener(server, tls="direct")
    await server.add_user("juliet")
    async with ws_client(base.replace("https", "wss") + "/xmpp-websocket") as client:
        features = await client.open()
        assert {"SCRAM-SHA-256-PLUS", "PLAIN"} <= mechanisms(features)
        transport = client.ws._response.connection.transport  # type: ignore[union-attr]
        der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        await scram(client, "juliet", mechanism="SCRAM-SHA-256-PLUS", binding=EndPoint(der))
        assert (await client.bind()).startswith("juliet@localhost/")


class EndPoint(aiosasl.channel_binding.ChannelBindingProvider):
    """RFC 5929 tls-server-end-point from the certificate the client saw."""

    def __init__(self, der: bytes) -> None:
        self.der = der

    @property
    def cb_name(self) -> bytes:
        return b"tls-server-end-point"

    def extract_cb_data(self) -> bytes:
        cert = x509.load_der_x509_certificate(self.der)
        algorithm = cert.signature_hash_algorithm
        if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
            algorithm = hashes.SHA256()
        return hashlib.new(algorithm.name, cert.public_bytes(Encoding.DER)).digest()


@WEB
async def test_stream_management_resumes_over_a_new_websocket(server: Harness) -> None:
    base = await web_listener(server)
    url = base.replace("http", "ws") + "/xmpp-websocket"
    await server.add_user("juliet")
    romeo = await server.client(await server.add_user("romeo"))
    async with ws_client(url) as first:
        jid = await logged_in(first, "juliet")
        await first.send(f"<enable xmlns='{SM}' resume='true'/>")
        previd = (await first.expect(f"{{{SM}}}enabled")).get("id")
        await first.send("<presence xmlns='jabber:client'/>")
        first.ws._response.connection.transport.abort()  # type: ignore[union-attr]  # cut, no <close/>
    romeo.send_message(mto=jid, mbody="while you were away", mtype="chat")
    async with ws_client(url) as second:
        await second.open()
        await scram(second, "juliet")
        await second.open()
        await second.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
        assert (await second.expect(f"{{{SM}}}resumed")).get("previd") == previd
        message = await second.expect("{jabber:client}message")
        assert message.findtext("{jabber:client}body") == "while you were away"


# --- errors: each ends its own session only -----------------------------------------------------------


@WEB
@pytest.mark.parametrize(("send", "condition"), [
    (b"\x00\x01binary", "bad-format"),
    ("<message xmlns='jabber:client'/><message xmlns='jabber:client'/>", "not-well-formed"),
    ("<message xmlns='jabber:client'><body>half", "not-well-formed"),
    ("<!-- a comment --><presence xmlns='jabber:client'/>", "restricted-xml"),
    ("<message xmlns='jabber:client'><body>" + "x" * 300_000 + "</body></message>", "policy-violation"),
    ("<unknown xmlns='urn:example'/>", "unsupported-stanza-type"),
])
async def test_bad_messages_get_the_stream_error_and_close_that_session(server: Harness, send: Any,
                                                                         condition: str) -> None:
    base = await web_listener(server)
    url = base.replace("http", "ws") + "/xmpp-websocket"
    await server.add_user("juliet")
    await server.add_user("nurse")
    async with ws_client(url) as bystander, ws_client(url) as client:
        await logged_in(bystander, "nurse")
        await logged_in(client, "juliet")
        await (client.ws.send_bytes(send) if isinstance(send, bytes) else client.send(send))
        assert stream_error(await client.closed()) == condition
        await bystander.send("<iq xmlns='jabber:client' type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>")
        assert (await bystander.expect("{jabber:client}iq")).get("type") == "result"


@WEB
async def test_the_xmpp_subprotocol_is_required(server: Harness) -> None:
    base = await web_listener(server)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with ws_client(base + "/xmpp-websocket", protocols=()):
            pass
    assert refused.value.status == 400
    async with aiohttp.ClientSession() as http, http.get(base + "/xmpp-websocket") as plain_get:
        assert plain_get.status == 400


@WEB
async def test_only_allowed_origins_may_open_sessions(server: Harness) -> None:
    base = await web_listener(server)
    url = base.replace("http", "ws") + "/xmpp-websocket"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with ws_client(url, headers={"Origin": "https://evil.example"}):
            pass
    assert refused.value.status == 403
    async with ws_client(url, headers={"Origin": base}) as same_origin:  # the endpoint's own origin
        await same_origin.open()
    server.server.hosts["localhost"].config_options["websocket.allowed_origins"] = ("https://chat.example",)
    async with ws_client(url, headers={"Origin": "https://chat.example"}) as listed:
        await listed.open()


@WEB
@pytest.mark.parley_config(modules=[*DEFAULT_MODULES, "websocket"],
                           limits={"unauthenticated_timeout": 1.0, "max_connections_per_ip": 2})
async def test_unauthenticated_timeout_and_connections_per_address(server: Harness) -> None:
    base = await web_listener(server)
    url = base.replace("http", "ws") + "/xmpp-websocket"
    async with ws_client(url) as idle:
        await idle.open()
        assert stream_error(await idle.closed(timeout=10)) == "connection-timeout"
    async with ws_client(url) as one, ws_client(url) as two, ws_client(url) as three:
        await one.open()
        await two.open()
        with pytest.raises((Closed, aiohttp.ClientConnectionResetError)):  # cut at once, past the cap
            await three.open()


@WEB
async def test_a_server_that_stops_says_system_shutdown(server: Harness) -> None:
    base = await web_listener(server)
    await server.add_user("juliet")
    async with ws_client(base.replace("http", "ws") + "/xmpp-websocket") as client:
        await logged_in(client, "juliet")
        stopping = asyncio.ensure_future(server.server.stop())
        assert stream_error(await client.closed()) == "system-shutdown"
        await stopping
        await server.server.start()  # for the fixture, which stops it again


@pytest.mark.parley_config(modules=[*DEFAULT_MODULES, "websocket"], limits={"c2s_rate": 2000, "c2s_burst": 2000})
async def test_input_over_the_read_rate_waits_and_is_not_lost(server: Harness) -> None:
    base = await web_listener(server)
    await server.add_user("juliet")
    async with ws_client(base.replace("http", "ws") + "/xmpp-websocket") as client:
        await logged_in(client, "juliet")
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(4):  # 4,000 bytes at 2,000 a second, the burst mostly spent by the login
            await client.send(f"<iq xmlns='jabber:client' type='get' id='{i}{'x' * 900}'>"
                              "<ping xmlns='urn:xmpp:ping'/></iq>")
        answered = [(await client.expect("{jabber:client}iq", timeout=10)).get("id")[0] for _ in range(4)]
        assert answered == ["0", "1", "2", "3"]
        assert loop.time() - started > 1.0  # held back by the budget, as a TCP client's input is


@WEB
async def test_pings_keep_connections_up_and_drop_clients_that_stopped_answering(server: Harness) -> None:
    base = await web_listener(server)
    server.server.hosts["localhost"].config_options["websocket.ping_interval"] = 0.4
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(base + "/xmpp-websocket", protocols=("xmpp",), autoping=False) as silent:
        kinds = []
        while (message := await silent.receive(5)).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                                                 aiohttp.WSMsgType.CLOSING):
            kinds.append(message.type)
        assert aiohttp.WSMsgType.PING in kinds  # pinged, never answered: dropped


@WEB
async def test_see_other_uri_sends_clients_elsewhere(server: Harness) -> None:
    base = await web_listener(server)
    for host in server.server.hosts.values():
        host.config_options["websocket.see_other_uri"] = "wss://other.example/xmpp-websocket"
    async with ws_client(base.replace("http", "ws") + "/xmpp-websocket") as client:
        await client.send(f"<open xmlns='{FRAMING}' to='localhost' version='1.0'/>")
        [close] = await client.closed()
        assert close.tag == f"{{{FRAMING}}}close"
        assert close.get("see-other-uri") == "wss://other.example/xmpp-websocket"


async def test_the_http_api_sees_the_client_behind_a_trusted_proxy(server: Harness) -> None:
    """Allowed networks are the client's: a proxy on loopback must not open the API to the whole internet."""
    base = await web_listener(server)
    server.server.config.trusted_proxies = [ipaddress.ip_network("127.0.0.1/32")]
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/api/registered_users", json={"host": "localhost"},
                             headers={"X-Forwarded-For": "203.0.113.9"}) as forwarded:
            assert forwarded.status == 403
        async with http.post(base + "/api/registered_users", json={"host": "localhost"}) as direct:
            assert direct.status == 401  # from loopback itself: on to authentication
