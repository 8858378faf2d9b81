"""The client behind a request (server/http.py `HttpServer.peer`): forwarding headers count only from trusted
proxies, the nearest untrusted address is the client, and TLS a proxy terminated counts as TLS."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace
from typing import Any
from unittest import mock

from aiohttp.test_utils import make_mocked_request

from server.http import HttpServer, Peer


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
