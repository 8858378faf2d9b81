"""XEP-0156 connection discovery over HTTP: /.well-known/host-meta (XRD) and host-meta.json (JRD), per host.

A web client that knows only the user's domain fetches https://DOMAIN/.well-known/host-meta and finds the
WebSocket and BOSH URLs of that host: those of the websocket and bosh modules the host loads. The URLs
start with `public_url` when it is set (a reverse proxy's address), else with the scheme and Host the
request came with, as the client reached us. Any page may read them (CORS allows every origin): they only
say where the public endpoints are.
"""

from __future__ import annotations

import json
from xml.etree.ElementTree import Element, SubElement, tostring

from aiohttp import web

from extensions.websocket import DEFAULT_PATH as DEFAULT_WEBSOCKET_PATH
from server.module import Module
from server.options import Option

XRD = "http://docs.oasis-open.org/ns/xri/xrd-1.0"
WEBSOCKET_REL = "urn:xmpp:alt-connections:websocket"
BOSH_REL = "urn:xmpp:alt-connections:xbosh"
DEFAULT_BOSH_PATH = "/http-bind"
CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "GET, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": "86400"}


class HostMeta(Module):
    name = "host_meta"
    options = (
        Option("public_url", str, None,
               "the base URL clients reach the http listener at, e.g. https://example.org behind a proxy "
               "(default: the scheme and Host of each request)"),
    )

    def setup(self) -> None:
        self.add_http("GET", "/.well-known/host-meta", self.xrd, this_host=True)
        self.add_http("GET", "/.well-known/host-meta.json", self.jrd, this_host=True)
        self.add_http("OPTIONS", "/.well-known/host-meta", self.preflight, this_host=True)
        self.add_http("OPTIONS", "/.well-known/host-meta.json", self.preflight, this_host=True)

    def links(self, request: web.Request) -> list[tuple[str, str]]:
        """(rel, href) of every web transport this host serves."""
        base = self.option("public_url")
        if base is None:
            secure = self.server.http.peer(request).secure
            base = f"{'https' if secure else 'http'}://{request.host}"
        base = base.rstrip("/")
        links = []
        if "websocket" in self.host.modules:
            ws_base = "ws" + base.removeprefix("http")  # http -> ws, https -> wss
            links.append((WEBSOCKET_REL, ws_base + self._path_of("websocket", DEFAULT_WEBSOCKET_PATH)))
        if "bosh" in self.host.modules:
            links.append((BOSH_REL, base + self._path_of("bosh", DEFAULT_BOSH_PATH)))
        return links

    def _path_of(self, module: str, default: str) -> str:
        """The HTTP path a transport module of this host serves: its 'path' option as configured."""
        return str(self.host.config_options.get(f"{module}.path", default))

    async def xrd(self, request: web.Request) -> web.Response:
        root = Element("XRD", {"xmlns": XRD})
        for rel, href in self.links(request):
            SubElement(root, "Link", {"rel": rel, "href": href})
        body = "<?xml version='1.0' encoding='utf-8'?>\n" + tostring(root, encoding="unicode")
        return web.Response(text=body, content_type="application/xrd+xml", headers=CORS)

    async def jrd(self, request: web.Request) -> web.Response:
        links = [{"rel": rel, "href": href} for rel, href in self.links(request)]
        return web.Response(text=json.dumps({"links": links}), content_type="application/json", headers=CORS)

    async def preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=CORS)
