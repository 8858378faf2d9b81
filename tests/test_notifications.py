"""Missed-message notifications (issue 18): email digests through a real SMTP server (aiosmtpd on loopback),
opt-in over ad-hoc commands from slixmpp, links followed over real HTTP, signed webhooks to an aiohttp
receiver."""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import hmac
import re
import ssl
import threading
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import SubElement

import aiohttp
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from slixmpp import JID as SlixJID
from slixmpp import ClientXMPP

from server.jid import JID
from server.storage.notifications import DEAD, SENT
from server.tls import ensure_certificate
from tests.conftest import Harness, free_port, module_servers
from tests.test_adhoc import result_values
from tests.test_basic_modules import wait_for
from tests.test_parleyctl import run
from tests.test_stream_management import cut, detached, phone

NOTIFY = "http://jabber.org/protocol/admin"
USER_NS = "urn:parley:notifications"
PLUGINS = ("xep_0030", "xep_0050", "xep_0004")


class Mailbox:
    """What the SMTP server on loopback accepted, parsed (aiosmtpd runs in a thread of its own)."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], EmailMessage]] = []
        self.raw: dict[int, bytes] = {}  # by id() of the parsed message: the bytes as they came
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self._lock:
            self.messages.append((list(envelope.rcpt_tos), parsed))  # type: ignore[arg-type]
            self.raw[id(parsed)] = envelope.content
        return "250 OK"

    def to(self, address: str) -> list[EmailMessage]:
        with self._lock:
            return [m for rcpt, m in self.messages if address in rcpt]

    async def wait(self, address: str, count: int = 1, timeout: float = 10.0) -> list[EmailMessage]:
        async def enough() -> bool:
            return len(self.to(address)) >= count
        await wait_for(enough, timeout)
        return self.to(address)


class Smtp:
    def __init__(self, port: int, **kwargs: Any) -> None:
        self.port = port
        self.mailbox = Mailbox()
        self.kwargs = kwargs  # aiosmtpd's: TLS, authentication
        self.controller: Controller | None = None

    def start(self) -> None:
        self.controller = Controller(self.mailbox, hostname="127.0.0.1", port=self.port, **self.kwargs)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


@pytest.fixture(name="smtp")
def smtp_fixture() -> Any:
    server = Smtp(free_port())
    server.start()
    yield server
    server.stop()


Starter = Callable[..., Awaitable[Harness]]


@pytest.fixture(name="notify_server")
async def notify_server_fixture(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Starter]:
    """Starts a server with the notifications module (short intervals) sending to `smtp_port`."""
    async with module_servers(tmp_path, getattr(request, "param", "sqlite"), "notifications") as start_module:

        async def start(smtp_port: int, **options: Any) -> Harness:
            return await start_module(**{
                "smtp_host": "127.0.0.1", "smtp_port": smtp_port, "smtp_tls": "none", "tick": 0.05,
                "digest_interval": 0.3, "min_interval": 0.1, "push_grace": 0.0, "retry_base": 0.1,
                "retry_cap": 0.5, "breaker_cooldown": 0.2, **options})

        yield start


BOTH = pytest.mark.parametrize("notify_server", ["sqlite", "postgresql"], indirect=True)


async def settings(client: ClientXMPP, **values: str | list[str]) -> str:
    """Submit the user's own 'notification-settings' form at once; returns the status line, or 'refused: ' and
    the reason the command gave in its error note."""
    form = client.plugin["xep_0004"].make_form(ftype="submit")
    for var, value in values.items():
        form.add_field(var=var, value=value)
    iq = await client.plugin["xep_0050"].send_command("localhost", f"{USER_NS}#notification-settings",
                                                      action="execute", payload=form, timeout=5)
    note = iq.xml.find("{http://jabber.org/protocol/commands}command/{http://jabber.org/protocol/commands}note")
    if note is not None and note.get("type") == "error":
        return f"refused: {note.text}"
    return str(result_values(iq["command"])["status"])


def subject(message: EmailMessage) -> str:
    """The Subject as a reader sees it (a long one is folded onto a line of its own)."""
    return str(message["Subject"]).strip()


def link(message: EmailMessage, kind: str) -> str:
    found = re.search(rf"http://\S+/notifications/{kind}/\S+", message.get_content())
    assert found, message.get_content()
    return found.group(0)


async def get(url: str, method: str = "GET") -> tuple[int, str]:

    async with aiohttp.ClientSession() as session, session.request(method, url) as response:
        return response.status, await response.text()


async def opted_in(server: Harness, smtp: Smtp, name: str, **values: str) -> ClientXMPP:
    """`name` signs up for digests to name@example.org and opens the confirmation link; returns its client,
    which then goes offline."""
    await server.add_user(name)
    client = await server.client(f"{name}@localhost", plugins=PLUGINS)
    address = f"{name}@example.org"
    status = await settings(client, email=address, **values)
    assert "confirmation" in status
    confirm = (await smtp.mailbox.wait(address))[0]
    assert confirm["Subject"] == f"Confirm notifications for {name}@localhost"
    code, text = await get(link(confirm, "confirm"))
    assert code == 200 and "Confirmed" in text, text
    await client.disconnect()
    return client


async def send_chat(client: ClientXMPP, to: str, body: str) -> None:
    client.send_message(mto=to, mbody=body, mtype="chat")


def module(server: Harness) -> Any:
    return server.server.hosts["localhost"].modules["notifications"]


@BOTH
async def test_digest_lists_senders_and_counts_without_bodies(notify_server: Starter, smtp: Smtp) -> None:
    server = await notify_server(smtp.port)
    await opted_in(server, smtp, "alice")
    for name in ("bob", "carol"):
        await server.add_user(name)
    bob = await server.client("bob@localhost")
    carol = await server.client("carol@localhost")
    for i in range(3):
        await send_chat(bob, "alice@localhost", f"secret body {i}")
    await send_chat(carol, "alice@localhost", "another secret")

    messages = await smtp.mailbox.wait("alice@example.org", 2)
    assert len(messages) == 2  # the confirmation, then one digest for all four messages
    digest = messages[1]
    assert digest["To"] == "alice@example.org"
    assert digest["From"] == "notifications@localhost"
    assert subject(digest) == "4 new messages for alice@localhost from bob@localhost, carol@localhost"
    text = digest.get_content()
    assert "bob@localhost: 3 messages" in text and "carol@localhost: 1 message" in text
    assert "xmpp:bob@localhost?message" in text
    assert "secret" not in digest.as_string()
    unsubscribe = link(digest, "unsubscribe")
    assert digest["List-Unsubscribe"] == f"<{unsubscribe}>"
    raw = smtp.mailbox.raw[id(digest)]
    assert f"\r\nList-Unsubscribe: <{unsubscribe}>\r\n".encode() in raw  # as it came: not folded, not encoded
    assert await server.server.storage.offline.count("localhost", "alice") == 4  # offline storage still has them

    code, text = await get(unsubscribe)
    assert code == 200 and "Unsubscribed" in text
    assert (await module(server).preferences(JID.parse("alice@localhost"))).email == ""
    await send_chat(bob, "alice@localhost", "after unsubscribing")
    assert (await get(unsubscribe))[0] == 410  # used up: the address is no longer registered
    forged = unsubscribe[:-4] + "0000"
    assert (await get(forged))[0] == 404
    await asyncio.sleep(0)
    assert not await server.server.storage.notifications.waiting("localhost", "alice")


async def test_nothing_before_the_address_is_confirmed(notify_server: Starter, smtp: Smtp) -> None:
    server = await notify_server(smtp.port)
    await server.add_user("alice")
    await server.add_user("bob")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    await settings(alice, email="alice@example.org")
    await alice.disconnect()
    bob = await server.client("bob@localhost")
    await send_chat(bob, "alice@localhost", "hello")
    await smtp.mailbox.wait("alice@example.org")
    await wait_for(lambda: _offline(server, "alice", 1))
    # Several rounds of the outbox later, the confirmation is still the only email.
    for _ in range(5):
        await module(server).run_once()
    assert len(smtp.mailbox.to("alice@example.org")) == 1
    assert not await server.server.storage.notifications.waiting("localhost", "alice")


async def _offline(server: Harness, user: str, count: int) -> bool:
    return await server.server.storage.offline.count("localhost", user) >= count


async def test_bad_input_refused(notify_server: Starter, smtp: Smtp) -> None:
    server = await notify_server(smtp.port)
    await server.add_user("alice")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    for bad in ("not-an-address", "a@b", "x@example.org\r\nBcc: victim@example.org", "<x@example.org>",
                "a@example.org, b@example.org", "x" * 300 + "@example.org"):
        assert (await settings(alice, email=bad)).startswith("refused: not an email address"), bad
    for values, reason in (({"quiet": "25:00-07:00"}, "quiet hours"), ({"zone": "Mars/Olympus"}, "unknown time zone"),
                           ({"interval": "0.01"}, "at least 0.1"), ({"interval": "soon"}, "number of seconds")):
        assert reason in await settings(alice, email="alice@example.org", **values)
    assert len(smtp.mailbox.to("alice@example.org")) == 0
    assert await server.server.storage.notifications.list("localhost") == []


async def test_header_injection_and_huge_digest(notify_server: Starter, smtp: Smtp) -> None:
    """Names from outside cannot write headers; a digest of very many conversations stays readable."""
    server = await notify_server(smtp.port)
    await opted_in(server, smtp, "alice")
    mod = module(server)
    hostile = "evil\r\nBcc: victim@example.org\r\nSubject: pwned"
    due = _now() + timedelta(seconds=3)  # all 301 conversations noted before the digest is made
    await mod.store.note("localhost", "alice", hostile + "@localhost", hostile, due)
    for i in range(300):
        await mod.store.note("localhost", "alice", f"user{i}@localhost", f"user{i}@localhost", due)
    digest = (await smtp.mailbox.wait("alice@example.org", 2))[1]
    rcpts = next(r for r, m in smtp.mailbox.messages if m is digest)
    assert rcpts == ["alice@example.org"]
    assert digest["Bcc"] is None
    assert len(digest.get_all("Subject")) == 1 and "\n" not in digest["Subject"]
    assert subject(digest).startswith("301 new messages for alice@localhost from evil")
    assert "and 251 more conversations with 251 messages" in digest.get_content()
    assert len(digest.as_bytes()) < 64_000


def _now() -> datetime:
    return datetime.now(UTC)


async def test_smtp_down_then_up_delivers_once(notify_server: Starter) -> None:
    down = Smtp(free_port())  # nothing listens there yet
    server = await notify_server(down.port)
    await server.add_user("alice")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    await settings(alice, email="alice@example.org")
    store = server.server.storage.notifications

    async def retried() -> bool:
        rows = await store.list("localhost")
        return bool(rows) and rows[0].attempts >= 2 and rows[0].error is not None

    await wait_for(retried)
    down.start()
    try:
        await down.mailbox.wait("alice@example.org")

        async def marked_sent() -> bool:
            return [r.status for r in await store.list("localhost")] == [SENT]

        await wait_for(marked_sent)
        for _ in range(3):
            await module(server).run_once()
        assert len(down.mailbox.to("alice@example.org")) == 1
    finally:
        down.stop()


async def test_dead_letter_after_max_attempts(notify_server: Starter) -> None:
    nobody = free_port()
    server = await notify_server(nobody, max_attempts=2, breaker_threshold=10)
    await server.add_user("admin")
    alice_jid = await server.add_user("alice")
    alice = await server.client(alice_jid, plugins=PLUGINS)
    await settings(alice, email="alice@example.org")
    store = server.server.storage.notifications

    async def dead() -> bool:
        return [r.status for r in await store.list("localhost")] == [DEAD]

    await wait_for(dead)
    admin = await server.client("admin@localhost", plugins=PLUGINS)
    iq = await admin.plugin["xep_0050"].send_command("localhost", f"{NOTIFY}#notification-dead-letters",
                                                     action="execute", timeout=5)
    letters = result_values(iq["command"])["letters"]
    assert len(letters) == 1 and " alice email alice@example.org tries=2: SMTP 127.0.0.1" in letters[0]


@BOTH
async def test_restart_with_pending_sends_once(notify_server: Starter, smtp: Smtp) -> None:
    server = await notify_server(smtp.port, digest_interval=1.0)
    await opted_in(server, smtp, "alice")
    await server.add_user("bob")
    bob = await server.client("bob@localhost")
    await send_chat(bob, "alice@localhost", "one")
    await send_chat(bob, "alice@localhost", "two")

    async def noted() -> bool:
        waiting = await server.server.storage.notifications.waiting("localhost", "alice")
        return bool(waiting) and waiting[0].count == 2

    await wait_for(noted)
    await server.restart()
    digest = (await smtp.mailbox.wait("alice@example.org", 2))[1]
    assert "bob@localhost: 2 messages" in digest.get_content()
    await server.restart()
    for _ in range(3):
        await module(server).run_once()
    assert len(smtp.mailbox.to("alice@example.org")) == 2


async def phone_detached(server: Harness) -> None:
    """alice's phone loses its connection with a resumable session: messages wait in its queue."""
    raw, _ = await phone(server)
    cut(raw)
    await detached(server, "alice@localhost/phone")


async def waiting_for(server: Harness, *conversations: str) -> None:
    async def there() -> bool:
        waiting = await server.server.storage.notifications.waiting("localhost", "alice")
        return sorted(w.conversation for w in waiting) == sorted(conversations)
    await wait_for(there)


async def test_displayed_marker_from_another_device_cancels(notify_server: Starter, smtp: Smtp) -> None:
    """Alice's phone keeps a detached session (messages wait in its queue); her desktop, connected, shows bob's
    message and sends a displayed marker: the digest names only carol."""
    server = await notify_server(smtp.port, digest_interval=1.0)
    await opted_in(server, smtp, "alice")
    await phone_detached(server)
    await server.add_user("carol")
    bob = await server.client("bob@localhost")
    carol = await server.client("carol@localhost")
    await send_chat(bob, "alice@localhost", "look")
    await send_chat(carol, "alice@localhost", "and here")
    await waiting_for(server, "bob@localhost", "carol@localhost")

    desktop = await server.client("alice@localhost", resource="desktop")
    marker = desktop.make_message(mto="bob@localhost", mtype="chat")
    SubElement(marker.xml, "{urn:xmpp:chat-markers:0}displayed", {"id": "m1"})
    marker.send()
    await waiting_for(server, "carol@localhost")
    await desktop.disconnect()
    digest = (await smtp.mailbox.wait("alice@example.org", 2))[1]
    assert "carol@localhost: 1 message" in digest.get_content() and "bob@localhost" not in digest.get_content()


async def test_mds_from_another_device_cancels(notify_server: Starter, smtp: Smtp) -> None:
    """XEP-0490: a device publishes to urn:xmpp:mds:displayed:0 an item named by the conversation's JID."""
    server = await notify_server(smtp.port, digest_interval=30.0)
    await opted_in(server, smtp, "alice")
    await phone_detached(server)
    bob = await server.client("bob@localhost")
    await send_chat(bob, "alice@localhost", "look")
    await waiting_for(server, "bob@localhost")
    desktop = await server.client("alice@localhost", resource="desktop", plugins=("xep_0060",))
    payload = ET.Element("{urn:xmpp:mds:displayed:0}displayed")
    SubElement(payload, "{urn:xmpp:sid:0}stanza-id", {"id": "x1", "by": "alice@localhost"})
    await desktop.plugin["xep_0060"].publish(SlixJID("alice@localhost"), "urn:xmpp:mds:displayed:0",
                                             id="bob@localhost", payload=payload, timeout=5)
    await waiting_for(server)


async def _available(server: Harness, jid: str) -> bool:
    session = server.server.sessions.get(JID.parse(jid))
    return session is not None and session.available


async def test_an_attached_device_online_means_nothing_is_missed(notify_server: Starter, smtp: Smtp) -> None:
    server = await notify_server(smtp.port, digest_interval=30.0)
    await opted_in(server, smtp, "alice")
    await phone_detached(server)
    queued: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    hooks = server.server.hosts["localhost"].hooks

    def seen(session: Any, el: Any) -> None:  # runs after the module's handler
        if el.find("{jabber:client}body") is not None and not queued.done():
            queued.set_result(None)

    hooks.add("sm/queued", seen, -100)
    laptop = await server.client("alice@localhost", resource="laptop")
    laptop.send_presence()
    bob = await server.client("bob@localhost")
    await wait_for(lambda: _available(server, "alice@localhost/laptop"))
    await send_chat(bob, "alice@localhost", "seen on the laptop, queued for the phone")
    await asyncio.wait_for(queued, 5)
    assert not await server.server.storage.notifications.waiting("localhost", "alice")


async def test_mention_in_room_while_away(notify_server: Starter, smtp: Smtp) -> None:
    server = await notify_server(smtp.port)
    await opted_in(server, smtp, "alice")
    await server.add_user("bob")
    bob = await server.client("bob@localhost", plugins=("xep_0045", "xep_0004"))
    room = "lounge@conference.localhost"
    await bob.plugin["xep_0045"].join_muc_wait(room, "Bob", timeout=5)
    await bob.plugin["xep_0045"].set_room_config(room, _persistent(bob))
    await bob.plugin["xep_0045"].set_affiliation(room, "member", jid=SlixJID("alice@localhost"))
    bob.send_message(mto=room, mbody="nothing for anyone", mtype="groupchat")
    bob.send_message(mto=room, mbody="hey Alice, look at this", mtype="groupchat")
    digest = (await smtp.mailbox.wait("alice@example.org", 2))[1]
    assert subject(digest) == f"1 new message for alice@localhost from {room}"
    assert f"{room}: 1 message from Bob" in digest.get_content()
    assert f"xmpp:{room}?join" in digest.get_content()


def _persistent(client: ClientXMPP) -> Any:
    form = client.plugin["xep_0004"].make_form(ftype="submit")
    form.add_field(var="FORM_TYPE", value="http://jabber.org/protocol/muc#roomconfig")
    form.add_field(var="muc#roomconfig_persistentroom", value="1")
    return form


async def test_quiet_hours_hold_the_digest(notify_server: Starter, smtp: Smtp) -> None:
    """Quiet all day in the user's zone: counts wait; quiet hours lifted, the digest goes."""
    server = await notify_server(smtp.port)
    alice = await opted_in(server, smtp, "alice")
    from zoneinfo import ZoneInfo
    local = _now().astimezone(ZoneInfo("Pacific/Auckland"))
    start, end = (local - timedelta(hours=1)).strftime("%H:%M"), (local + timedelta(hours=1)).strftime("%H:%M")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    await settings(alice, email="alice@example.org", quiet=f"{start}-{end}", zone="Pacific/Auckland",
                   interval="0.2")
    await alice.disconnect()
    mod = module(server)
    await mod.note(JID.parse("alice@localhost"), "bob@localhost", "bob@localhost", "message")
    await asyncio.sleep(0.5)  # well past the interval: quiet hours, not the clock, hold it back
    for _ in range(3):
        await mod.run_once()
    assert len(smtp.mailbox.to("alice@example.org")) == 1
    assert await mod.store.waiting("localhost", "alice")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    await settings(alice, email="alice@example.org", quiet="", interval="0.2")
    await alice.disconnect()
    await mod.note(JID.parse("alice@localhost"), "bob@localhost", "bob@localhost", "message")
    digest = (await smtp.mailbox.wait("alice@example.org", 2))[1]
    assert "bob@localhost: 2 messages" in digest.get_content()  # the one held back, and the new one


async def test_webhook_signed(notify_server: Starter, smtp: Smtp) -> None:
    got: asyncio.Queue[tuple[dict[str, str], bytes]] = asyncio.Queue()
    failures = [1]

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        if failures:
            failures.pop()
            return web.Response(status=503)
        await got.put((dict(request.headers), body))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        server = await notify_server(smtp.port)
        await server.add_user("admin")
        await server.add_user("alice")
        await server.add_user("bob")
        admin = await server.client("admin@localhost", plugins=PLUGINS)
        secret = "s3cret-s3cret-s3cret"
        form = admin.plugin["xep_0004"].make_form(ftype="submit")
        form.add_field(var="accountjid", value="alice@localhost")
        form.add_field(var="url", value=f"http://127.0.0.1:{port}/hook")
        form.add_field(var="secret", value=secret)
        await admin.plugin["xep_0050"].send_command("localhost", f"{NOTIFY}#notification-webhook",
                                                    action="execute", payload=form, timeout=5)
        bob = await server.client("bob@localhost")
        await send_chat(bob, "alice@localhost", "hi")
        headers, body = await asyncio.wait_for(got.get(), 10)
        stamp = headers["X-Parley-Timestamp"]
        expected = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        assert headers["X-Parley-Signature"] == f"sha256={expected}"
        import json
        event = json.loads(body)
        assert event["to"] == "alice@localhost" and event["conversation"] == "bob@localhost"
        assert event["type"] == "message" and "hi" not in body.decode().replace("chi", "")
        assert got.empty()
    finally:
        await runner.cleanup()


async def test_admin_settings_webhook_and_dead_letters_over_parleyctl(notify_server: Starter) -> None:
    server = await notify_server(free_port(), max_attempts=1)  # no SMTP server: the confirmation dies
    await server.add_user("alice")
    code, out, err = await run(server, "notification_settings", "alice", "localhost", "alice@example.org", "600",
                               "22:00-07:00", "Europe/Berlin")
    assert code == 0 and "confirmation link was sent to alice@example.org" in out, err
    prefs = await module(server).preferences(JID.parse("alice@localhost"))
    assert (prefs.email, prefs.verified, prefs.interval, prefs.quiet, prefs.zone) == (
        "alice@example.org", False, 600.0, "22:00-07:00", "Europe/Berlin")
    code, out, err = await run(server, "notification_settings", "alice", "localhost", "alice@example.org\r\nBcc: x",
                               "", "", "")
    assert code == 1 and "not an email address" in err
    code, out, err = await run(server, "notification_webhook", "alice", "localhost", "ftp://x", "0123456789abcdef")
    assert code == 1 and "http:// or https://" in err

    async def dead() -> bool:
        return len(await module(server).dead_letters()) == 1
    await wait_for(dead)
    code, out, err = await run(server, "notification_dead_letters", "localhost")
    assert code == 0 and " alice email alice@example.org tries=1: SMTP 127.0.0.1" in out


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # implicit TLS: see below
@pytest.mark.parametrize("mode", ["starttls", "direct"])
async def test_tls_and_authentication(notify_server: Starter, tmp_path: Path, mode: str) -> None:
    """The SMTP server's certificate checked against the configured CA file, and the login it requires."""
    cert, key = tmp_path / "smtp.crt", tmp_path / "smtp.key"
    ensure_certificate("127.0.0.1", cert, key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    logins: list[tuple[str, str]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        logins.append((data.login.decode(), data.password.decode()))
        return AuthResult(success=data.password == b"mail-pass")

    # aiosmtpd does not count implicit TLS as TLS for AUTH: it offers AUTH there only when told it need not.
    tls = {"tls_context": context, "require_starttls": True} if mode == "starttls" else \
        {"ssl_context": context, "auth_require_tls": False}
    secure = Smtp(free_port(), auth_required=True, authenticator=authenticator, **tls)
    secure.start()
    try:
        server = await notify_server(secure.port, smtp_tls=mode, smtp_ca_file=str(cert), smtp_username="parley",
                                     smtp_password="mail-pass", sender="Parley <noreply@example.org>")
        await server.add_user("alice")
        alice = await server.client("alice@localhost", plugins=PLUGINS)
        await settings(alice, email="alice@example.org")
        confirm = (await secure.mailbox.wait("alice@example.org"))[0]
        assert confirm["From"] == "Parley <noreply@example.org>"
        assert logins == [("parley", "mail-pass")]
    finally:
        secure.stop()


async def test_per_user_rate_limit_holds_digests(notify_server: Starter, smtp: Smtp) -> None:
    """user_per_hour 2: the confirmation and one digest; what comes next waits for the hour to pass."""
    server = await notify_server(smtp.port, user_per_hour=2)
    await opted_in(server, smtp, "alice")
    mod = module(server)
    alice = JID.parse("alice@localhost")
    await mod.note(alice, "bob@localhost", "bob@localhost", "message")
    await smtp.mailbox.wait("alice@example.org", 2)
    await mod.note(alice, "carol@localhost", "carol@localhost", "message")
    await wait_for(lambda: _due(server))
    for _ in range(3):
        await mod.run_once()
    assert len(smtp.mailbox.to("alice@example.org")) == 2
    assert [w.conversation for w in await mod.store.waiting("localhost", "alice")] == ["carol@localhost"]


async def _due(server: Harness) -> bool:
    return bool(await server.server.storage.notifications.due_users("localhost", _now()))


async def test_push_users_hear_later(notify_server: Starter, smtp: Smtp) -> None:
    """A user whose phone has a push registration gets the digest push_grace seconds later."""
    server = await notify_server(smtp.port, push_grace=100.0)
    await opted_in(server, smtp, "alice")
    await opted_in(server, smtp, "bob")
    push = server.server.hosts["localhost"].modules["push"]
    await push.registrations.set("localhost", "alice", {"apps": [{"jid": "push.example.org", "node": "n",
                                                                  "options": []}], "count": 0})
    mod = module(server)
    before = _now()
    for user in ("alice", "bob"):
        await mod.note(JID.make(user, "localhost"), "carol@localhost", "carol@localhost", "message")
    alice_first = (await mod.store.waiting("localhost", "alice"))[0].first
    bob_first = (await mod.store.waiting("localhost", "bob"))[0].first
    assert alice_first - before >= timedelta(seconds=100.3)
    assert bob_first - before < timedelta(seconds=10)
