"""The web session's plumbing without a server: the client behind a request (server/http.py `HttpServer.peer`;
forwarding headers count only from trusted proxies, the nearest untrusted address is the client, TLS a proxy
terminated counts as TLS) and the message transport of server/web_session.py."""

from __future__ import annotations

import asyncio
import ipaddress
from types import SimpleNamespace
from typing import Any
from unittest import mock

from aiohttp.test_utils import make_mocked_request

from server.http import HttpServer, Peer
from server.web_session import HIGH_WATER, MessageTransport


def peer(headers: dict[str, str], remote: str = "127.0.0.1", trusted: tuple[str, ...] = ("127.0.0.1", "10.0.0.0/8"),
         tls: bool = False) -> Peer:
    extra = {"peername": (remote, 40000), "sslcontext": object() if tls else None}
    transport = mock.Mock()
    transport.get_extra_info = lambda name, default=None: extra.get(name, default)
    config = SimpleNamespace(trusted_proxies=[ipaddress.ip_network(net) for net in trusted])
    http = HttpServer(SimpleNamespace(config=config))  # type: ignore[arg-type]
    request: Any = make_mocked_request("GET", "/", headers=headers, transport=transport)
    return http.peer(request)


def test_headers_from_anyone_else_are_ignored() -> None:
    assert peer({"X-Forwarded-For": "203.0.113.5", "X-Forwarded-Proto": "https"}, remote="198.51.100.1") == \
        Peer("198.51.100.1", False)
    assert peer({}, remote="198.51.100.1", tls=True) == Peer("198.51.100.1", True)  # HTTPS of our own


def test_the_nearest_untrusted_hop_is_the_client() -> None:
    assert peer({"X-Forwarded-For": "203.0.113.5, 10.0.0.2"}) == Peer("203.0.113.5", False)
    # A client that writes its own X-Forwarded-For cannot hide behind it: the proxy appended the real address.
    assert peer({"X-Forwarded-For": "1.2.3.4, 198.51.100.9", "X-Forwarded-Proto": "https"}) == \
        Peer("198.51.100.9", True)
    assert peer({}) == Peer("127.0.0.1", False)  # a trusted peer that forwards nothing is the client


def test_rfc_7239_forwarded() -> None:
    assert peer({"Forwarded": 'for="[2001:db8::1]:4711";proto=https'}) == Peer("2001:db8::1", True)
    assert peer({"Forwarded": "for=192.0.2.60;proto=http, for=10.1.2.3"}) == Peer("192.0.2.60", False)
    assert peer({"Forwarded": "for=unknown"}) == Peer("127.0.0.1", False)  # nothing better known than the proxy


async def test_a_client_that_does_not_read_pauses_its_session() -> None:
    """The socket is the HTTP server's: the session hears of a full buffer from the message transport."""
    socket = mock.Mock()
    socket.get_write_buffer_size.return_value = HIGH_WATER + 1
    socket.is_closing.return_value = False
    protocol = mock.Mock()
    sent: list[bytes] = []
    transport = MessageTransport(socket, Peer("192.0.2.1", False), sent.extend, lambda: None)
    transport.set_protocol(protocol)
    transport.write(b"<a/>\0<b/>\0")
    assert sent == [b"<a/>", b"<b/>"]  # one message each
    protocol.pause_writing.assert_called_once()
    transport.write(b"<c/>\0")
    protocol.pause_writing.assert_called_once()  # paused once, until it drains
    socket.get_write_buffer_size.return_value = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not protocol.resume_writing.called:
        assert loop.time() < deadline, "never resumed"
        await asyncio.sleep(0.01)
