"""What the web tests share: an http listener on the test server, a raw WebSocket client (RFC 7395) that
checks every message it gets stands alone, and a real browser (Debian's Chromium driven by Playwright)
showing a web client that the test serves from tests/browser/node_modules (installed with `npm ci`)."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ParseError, fromstring

import aiohttp
from aiohttp import web

from server.config import ListenerConfig
from tests.conftest import Harness, free_port, insecure_context, unavailable

FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
STREAMS = "http://etherx.jabber.org/streams"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND = "urn:ietf:params:xml:ns:xmpp-bind"
BROWSER_DIR = Path(__file__).parent / "browser"
ARTIFACTS = Path(__file__).parent / "artifacts"  # screenshots and browser logs, not committed
# Where `PARLEY_README_SCREENSHOTS=1 scripts/test ...` copies the screenshots the README shows.
README_SCREENSHOTS = Path(__file__).parent.parent / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"


async def web_listener(server: Harness, tls: str = "none") -> str:
    """Add an http listener (plain or HTTPS) to the test server, restarted with it; its base URL."""
    port = free_port()
    server.server.config.listeners.append(ListenerConfig("http", "127.0.0.1", port, tls))
    await server.restart()
    return f"{'https' if tls == 'direct' else 'http'}://127.0.0.1:{port}"


class Closed(Exception):
    """The server ended the WebSocket."""


class WsClient:
    """A raw XMPP-over-WebSocket client: what it sends goes out as it is, one message each; every message it
    gets must be one XML document that declares its namespaces (parsed alone with ElementTree)."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http = http
        self.ws = ws
        self.received: list[str] = []

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    async def open(self, to: str = "localhost") -> Element:
        """Send <open/>; the server's <open/>, then its features."""
        await self.send(f"<open xmlns='{FRAMING}' to='{to}' version='1.0'/>")
        opened = await self.next()
        assert opened.tag == f"{{{FRAMING}}}open", opened.tag
        return await self.expect(f"{{{STREAMS}}}features")

    async def next(self, timeout: float = 5.0) -> Element:
        message = await self.ws.receive(timeout)
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            raise Closed(self.ws.close_code)
        assert message.type is aiohttp.WSMsgType.TEXT, message
        self.received.append(message.data)
        try:
            return fromstring(message.data)
        except ParseError as exc:
            raise AssertionError(f"not a standalone XML element: {message.data!r} ({exc})") from None

    async def expect(self, tag: str, timeout: float = 5.0) -> Element:
        while (el := await self.next(timeout)).tag != tag:
            pass
        return el

    async def closed(self, timeout: float = 5.0) -> list[Element]:
        """Everything the server sends until it closes the WebSocket."""
        got = []
        try:
            while True:
                got.append(await self.next(timeout))
        except Closed:
            return got

    async def plain(self, user: str, password: str) -> Element:
        """SASL PLAIN; the server's answer."""
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        await self.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>")
        return await self.next()

    async def bind(self, resource: str = "web") -> str:
        """Open the authenticated stream and bind `resource`; the full JID."""
        await self.open()
        await self.send(f"<iq type='set' id='bind' xmlns='jabber:client'><bind xmlns='{BIND}'>"
                        f"<resource>{resource}</resource></bind></iq>")
        bound = await self.expect("{jabber:client}iq")
        assert bound.get("type") == "result", bound
        return bound.findtext(f".//{{{BIND}}}jid") or ""

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()


@asynccontextmanager
async def ws_client(url: str, *, protocols: tuple[str, ...] = ("xmpp",),
                    headers: dict[str, str] | None = None) -> AsyncIterator[WsClient]:
    http = aiohttp.ClientSession()
    try:
        ws = await http.ws_connect(url, protocols=protocols, headers=headers or {},
                                   ssl=insecure_context() if url.startswith("wss") else True)
    except BaseException:
        await http.close()
        raise
    client = WsClient(http, ws)
    try:
        yield client
    finally:
        await client.close()


# --- the browser ------------------------------------------------------------------------------------

CONVERSE_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Parley in Converse.js</title>
<link rel="stylesheet" href="/dist/converse.min.css"><script src="/dist/converse.min.js"></script></head>
<body class="converse-fullscreen"><script>
converse.plugins.add("parley-test", {initialize() { window.converseApi = this._converse.api; }});
converse.initialize(%s);
</script></body></html>
"""


def converse_page(connection: dict[str, str], jid: str, password: str, room: str) -> str:
    """A page of Converse.js (served from /dist/) that logs `jid` in at once over `connection` (its
    `websocket_url` or `bosh_service_url`) and joins `room`; `window.converseApi` is its API for the test."""
    settings = {
        **connection, "discover_connection_methods": False,
        "authentication": "login", "auto_login": True, "jid": jid, "password": password,
        "view_mode": "fullscreen", "auto_join_rooms": [room], "nickname": jid.split("@")[0].title(),
        "allow_non_roster_messaging": True, "persistent_store": "localStorage", "loglevel": "info",
        "play_sounds": False, "show_desktop_notifications": False, "whitelisted_plugins": ["parley-test"],
    }
    return CONVERSE_PAGE % json.dumps(settings)


def node_modules() -> Path:
    """tests/browser/node_modules, installed from the pinned package-lock.json with `npm ci` when missing."""
    modules = BROWSER_DIR / "node_modules"
    if not modules.is_dir():
        npm = shutil.which("npm")
        if npm is None:
            unavailable("npm is not installed")
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=BROWSER_DIR, capture_output=True,
                                text=True, timeout=600)
        if result.returncode != 0:
            unavailable(f"npm ci failed: {result.stderr[-2000:]}")
    return modules


@asynccontextmanager
async def static_site(pages: dict[str, str], folder: Path) -> AsyncIterator[str]:
    """An HTTP server for a web client: `pages` by path, and the files under `folder` at /dist/; its origin."""
    app = web.Application()
    for path, html in pages.items():
        app.router.add_get(path, functools.partial(_html, html))
    app.router.add_static("/dist/", folder)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _html(html: str, _: web.Request) -> web.Response:
    return web.Response(text=html, content_type="text/html")


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """Debian's Chromium (never a downloaded one), headless, under Playwright; a fresh browser context."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        unavailable("the playwright package is not installed")
    if not Path(CHROMIUM).exists():
        unavailable(f"{CHROMIUM} is not installed (apt-get install chromium)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                   args=["--no-sandbox", "--disable-gpu"])
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 800})
            yield context
        finally:
            await browser.close()


async def wait_for(condition: Any, timeout: float = 20.0, what: str = "the condition") -> None:
    """Poll `condition()` (sync or async) until true; fail the test on time-out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def screenshot(page: Any, name: str) -> Path:
    """Save what the page shows as tests/artifacts/NAME."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path), full_page=True)
    if os.environ.get("PARLEY_README_SCREENSHOTS"):  # the README's pictures, taken again only when asked
        README_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, README_SCREENSHOTS / name)
    return path
