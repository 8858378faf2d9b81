"""A real web client: Converse.js (pinned in tests/browser/package-lock.json) in Debian's headless Chromium,
logged in to Parley over WebSocket and over BOSH. It chats with a slixmpp user both ways and joins a room
whose history it shows; screenshots are saved in tests/artifacts/ (and /tmp/converse-ws.png,
/tmp/converse-bosh.png)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.config import DEFAULT_MODULES
from server.jid import JID
from tests.browser_support import (
    ARTIFACTS,
    chromium,
    converse_page,
    node_modules,
    screenshot,
    static_site,
    wait_for,
    web_listener,
)
from tests.conftest import Harness
from tests.test_muc import ROOM
from tests.test_muc_history import talk

TRANSPORTS = {  # Converse.js's setting for each, from the http listener's base URL
    "ws": lambda base: {"websocket_url": base.replace("http", "ws") + "/xmpp-websocket"},
    "bosh": lambda base: {"bosh_service_url": base + "/http-bind"},
}


@asynccontextmanager
async def juliet_in_converse(server: Harness, base: str, transport: str, name: str) -> AsyncIterator[Any]:
    """A Chromium page of Converse.js, served from another origin, with juliet logged in over `transport`
    (she is in ROOM too); the last screen is kept as converse-NAME.png, with the browser's console."""
    page_html = converse_page(TRANSPORTS[transport](base), "juliet@localhost", "secret", ROOM)
    async with static_site({"/": page_html}, node_modules() / "converse.js" / "dist") as origin, \
            chromium() as browser:
        for host in server.server.hosts.values():  # the page is of another origin: allow it, as an admin would
            host.config_options["websocket.allowed_origins"] = (origin,)
        page = await browser.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        try:
            await page.goto(origin + "/")
            juliet = JID.parse("juliet@localhost")
            await wait_for(lambda: server.server.sessions.of(juliet), 30, f"Converse.js to log in over {transport}")
            yield page
        finally:
            shutil.copy(await screenshot(page, f"converse-{name}.png"), f"/tmp/converse-{name}.png")
            (ARTIFACTS / f"converse-{name}-console.txt").write_text("\n".join(console))


@pytest.mark.parley_config(modules=[*DEFAULT_MODULES, "websocket", "bosh", "host_meta"])
@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
async def test_converse_logs_in_chats_and_sees_room_history(server: Harness, transport: str) -> None:
    base = await web_listener(server)
    await server.add_user("juliet")
    alice = await talk(server, "Welcome to the balcony")  # a room with history, alice in it
    inbox = server.inbox(alice)
    async with juliet_in_converse(server, base, transport, transport) as page:
        [session] = server.server.sessions.of(JID.parse("juliet@localhost"))
        assert session.remote_ip == "127.0.0.1"
        # The room's history, shown in the room Converse joined.
        await page.get_by_text("Welcome to the balcony").first.wait_for(timeout=20_000)
        await screenshot(page, f"converse-{transport}-room.png")
        # Juliet opens a chat with alice and types; alice answers, and the browser shows it.
        await page.evaluate("converseApi.chats.open('alice@localhost', {}, true)")  # as a click on a contact
        textarea = page.locator("converse-chat textarea.chat-textarea").first
        await textarea.fill("Here, on the balcony")
        await textarea.press("Enter")
        got = await asyncio.wait_for(_chat_from(inbox, "juliet@localhost"), 20)
        assert got["body"] == "Here, on the balcony"
        alice.send_message(mto=str(got["from"]), mbody="Are you there, Juliet?", mtype="chat")
        await page.get_by_text("Are you there, Juliet?").first.wait_for(timeout=20_000)


async def _chat_from(inbox: asyncio.Queue[Any], bare: str) -> Any:
    while True:
        message = await inbox.get()
        if message["type"] == "chat" and message["from"].bare == bare:
            return message


@pytest.mark.parley_config(modules=[*DEFAULT_MODULES, "websocket", "http_upload"])
async def test_converse_sends_a_file_through_the_upload_service(server: Harness, tmp_path: Path) -> None:
    """XEP-0363 from a browser: Converse.js finds upload.localhost, PUTs the file (CORS) and sends its URL,
    which the slixmpp recipient downloads, byte for byte."""
    base = await web_listener(server)
    await server.add_user("juliet")
    await server.add_user("alice")
    alice = await server.client("alice@localhost", resource="desk")
    alice.send_presence()
    inbox = server.inbox(alice)
    note = tmp_path / "balcony-notes.txt"
    note.write_bytes(b"Parting is such sweet sorrow\n" * 100)
    async with juliet_in_converse(server, base, "ws", "upload") as page:
        await page.evaluate("converseApi.chats.open('alice@localhost', {}, true)")
        chooser = page.locator("converse-chat input.fileupload").first  # there once the service is found
        await chooser.wait_for(state="attached", timeout=20_000)
        await chooser.set_input_files(str(note))
        got = await asyncio.wait_for(_chat_from(inbox, "juliet@localhost"), 20)
        url = got["body"]
        assert url.startswith(base + "/upload/localhost/") and url.endswith("/balcony-notes.txt")
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            assert response.status == 200 and await response.read() == note.read_bytes()
