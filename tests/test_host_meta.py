"""XEP-0156 host-meta (extensions/host_meta.py): XML and JSON per virtual host, the URLs of the web transports
each host loads, behind a proxy or not, readable from any page (CORS)."""

from __future__ import annotations

import ipaddress
import json
from types import SimpleNamespace
from typing import Any
from xml.etree.ElementTree import fromstring

import aiohttp
import pytest

from server.config import DEFAULT_MODULES
from tests.browser_support import web_listener
from tests.conftest import Harness

XRD = "{http://docs.oasis-open.org/ns/xri/xrd-1.0}"
WS = "urn:xmpp:alt-connections:websocket"
BOSH = "urn:xmpp:alt-connections:xbosh"
WEB = pytest.mark.parley_config(modules=[*DEFAULT_MODULES, "websocket", "host_meta"])


async def get(url: str, host: str, headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as http, http.get(url, headers={"Host": host, **(headers or {})}) as response:
        return response.status, await response.text(), response.headers


@WEB
async def test_host_meta_lists_the_websocket_url_in_xml_and_json(server: Harness) -> None:
    base = await web_listener(server)
    port = base.rsplit(":", 1)[1]
    status, body, headers = await get(base + "/.well-known/host-meta", f"localhost:{port}",
                                      {"Origin": "https://anywhere.example"})
    assert status == 200 and headers["Content-Type"].startswith("application/xrd+xml")
    assert headers["Access-Control-Allow-Origin"] == "*"
    links = {link.get("rel"): link.get("href") for link in fromstring(body).iter(f"{XRD}Link")}
    assert links == {WS: f"ws://localhost:{port}/xmpp-websocket"}
    status, body, headers = await get(base + "/.well-known/host-meta.json", f"localhost:{port}")
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    assert json.loads(body) == {"links": [{"rel": WS, "href": f"ws://localhost:{port}/xmpp-websocket"}]}
    async with aiohttp.ClientSession() as http, http.options(base + "/.well-known/host-meta",
                                                             headers={"Host": f"localhost:{port}"}) as preflight:
        assert preflight.status == 204 and preflight.headers["Access-Control-Allow-Origin"] == "*"


@WEB
async def test_each_host_has_its_own_and_a_proxy_gets_its_public_urls(server: Harness) -> None:
    base = await web_listener(server)
    server.server.hosts["example.test"].config_options["host_meta.public_url"] = "https://example.test/"
    server.server.hosts["example.test"].config_options["websocket.path"] = "/ws"
    status, body, _ = await get(base + "/.well-known/host-meta.json", "example.test")
    assert status == 200
    assert json.loads(body)["links"] == [{"rel": WS, "href": "wss://example.test/ws"}]
    assert (await get(base + "/.well-known/host-meta", "unknown.example"))[0] == 404  # no such virtual host
    # A trusted proxy that terminated TLS: the request's own Host, as wss.
    server.server.config.trusted_proxies = [ipaddress.ip_network("127.0.0.0/8")]
    _, body, _ = await get(base + "/.well-known/host-meta.json", "localhost", {"X-Forwarded-Proto": "https"})
    assert json.loads(body)["links"] == [{"rel": WS, "href": "wss://localhost/xmpp-websocket"}]


@pytest.mark.parley_config(modules=[*DEFAULT_MODULES, "host_meta"])
async def test_no_transport_no_link(server: Harness) -> None:
    base = await web_listener(server)
    _, body, _ = await get(base + "/.well-known/host-meta.json", "localhost")
    assert json.loads(body) == {"links": []}


@WEB
async def test_the_bosh_url_is_listed_where_the_bosh_module_is_loaded(server: Harness) -> None:
    base = await web_listener(server)
    modules = server.server.hosts["localhost"].modules
    modules["bosh"] = SimpleNamespace()  # stands for extensions/bosh.py, built elsewhere
    try:
        _, body, _ = await get(base + "/.well-known/host-meta", "localhost")
    finally:
        del modules["bosh"]
    links = {link.get("rel"): link.get("href") for link in fromstring(body).iter(f"{XRD}Link")}
    assert links == {WS: "ws://localhost/xmpp-websocket", BOSH: "http://localhost/http-bind"}
