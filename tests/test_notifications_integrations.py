"""Missed-message notifications for integrators and around push (issue 18): room webhooks (events for messages
and mentions, set by a room's owner over ad-hoc commands or by an admin over the HTTP API), message bodies only
with the admin's and the user's consent and never of OMEMO messages, dedup with a real XEP-0357 app server (a
slixmpp component), the per-host rate limit, and the same key on every try after a crash or a failure."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from slixmpp import JID as SlixJID
from slixmpp import ClientXMPP

from extensions.notifications.preferences import Preferences
from server.config import DEFAULT_MODULES
from server.jid import JID
from server.storage.notifications import SENT
from tests.conftest import Harness, free_port
from tests.test_adhoc import result_values
from tests.test_basic_modules import wait_for
from tests.test_muc import ROOM, create, groupchat
from tests.test_muc import user as muc_user
from tests.test_muc_admin import admin
from tests.test_notifications import (
    BOTH,
    PLUGINS,
    USER_NS,
    Mailbox,
    Smtp,
    Starter,
    module,
    notify_server_fixture,  # noqa: F401
    opted_in,
    send_chat,
    settings,
    smtp_fixture,  # noqa: F401
)
from tests.test_parleyctl import run
from tests.test_push import COMPONENTS, alice_registers, app_server
from tests.test_roster_presence import disconnect, sync

SECRET = "room-secret-0123456789"
OMEMO = ("<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='1'><key rid='2'>AAAA</key><iv>BBBB</iv>"
         "</header><payload>CCCC</payload></encrypted>")
OMEMO_FALLBACK = "I sent you an OMEMO encrypted message but your client doesn't seem to support that."
ADMIN_NS = "http://jabber.org/protocol/admin"


class Receiver:
    """An integrator's endpoint on loopback: checks each POST's signature and timestamp as a receiver should
    (refusing what fails), and keeps the events with their idempotency keys, per path."""

    def __init__(self, secrets: dict[str, str]) -> None:
        self.secrets = secrets  # path -> the endpoint's secret
        self.events: dict[str, asyncio.Queue[dict[str, Any]]] = {path: asyncio.Queue() for path in secrets}
        self.keys: list[str] = []  # the idempotency key of every request, refused ones too
        self.fail_next = 0  # requests to answer 503 (after checking them)
        self.refused: list[str] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        stamp = request.headers.get("X-Parley-Timestamp", "")
        expected = hmac.new(self.secrets[request.path].encode(), stamp.encode() + b"." + body,
                            hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Parley-Signature", ""), f"sha256={expected}"):
            self.refused.append("signature")
            return web.Response(status=401)
        if not stamp.isdigit() or abs(time.time() - int(stamp)) > 300:
            self.refused.append("timestamp")
            return web.Response(status=401)
        self.keys.append(request.headers["X-Parley-Idempotency-Key"])
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(status=503)
        await self.events[request.path].put(json.loads(body))
        return web.Response(status=204)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def next(self, path: str) -> dict[str, Any]:
        return await asyncio.wait_for(self.events[path].get(), 10)

    async def start(self) -> None:
        app = web.Application()
        for path in self.secrets:
            app.router.add_post(path, self.receive)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    endpoint = Receiver({"/room": SECRET, "/carol": SECRET[::-1]})
    await endpoint.start()
    yield endpoint
    assert endpoint.runner is not None
    await endpoint.runner.cleanup()


async def run_command(client: ClientXMPP, node: str, **values: str) -> tuple[str, str]:
    """Submit a command's form at once; returns ('ok', status) or ('error', the note)."""
    form = client.plugin["xep_0004"].make_form(ftype="submit")
    for var, value in values.items():
        form.add_field(var=var, value=value)
    iq = await client.plugin["xep_0050"].send_command("localhost", node, action="execute", payload=form, timeout=5)
    note = iq.xml.find("{http://jabber.org/protocol/commands}command/{http://jabber.org/protocol/commands}note")
    if note is not None and note.get("type") == "error":
        return "error", note.text or ""
    return "ok", str(result_values(iq["command"])["status"])


async def persistent_room(server: Harness, *members: str) -> ClientXMPP:
    """alice creates ROOM, persistent, with `members` as members; returns her client (in the room)."""
    alice = await muc_user(server, "alice")
    for plugin in PLUGINS:
        alice.register_plugin(plugin)
    await create(alice, "Alice", ROOM, **{"muc#roomconfig_persistentroom": "1"})
    for name in members:
        await server.add_user(name)
        await admin(alice, {"jid": f"{name}@localhost", "affiliation": "member"})
    return alice


@BOTH
async def test_room_webhook_gets_signed_message_and_mention_events(notify_server: Starter, smtp: Smtp,
                                                                   receiver: Receiver) -> None:
    """The room's owner registers a webhook; each message of the room is an event, each mention of a member's
    nick one more; carol's account webhook hears of her mention while she is away. A member who is no owner
    may not set the room's webhook, and a room made again under the same name does not inherit it."""
    server = await notify_server(smtp.port)
    await server.add_user("admin")
    alice = await persistent_room(server, "bob", "carol")
    bob = await server.client("bob@localhost", plugins=PLUGINS)
    refused = await run_command(bob, f"{USER_NS}#room-webhook", room=ROOM, url=receiver.url("/room"), secret=SECRET)
    assert refused == ("error", f"only an owner of {ROOM} may set its webhook")
    assert await run_command(alice, f"{USER_NS}#room-webhook", room=ROOM, url=receiver.url("/room"),
                             secret="short") == ("error", "the webhook secret must have at least 16 characters")
    status = await run_command(alice, f"{USER_NS}#room-webhook", room=ROOM, url=receiver.url("/room"),
                               secret=SECRET, bodies="yes")
    assert status == ("ok", f"webhook of {ROOM} set to {receiver.url('/room')}; localhost does not allow message "
                            "bodies, so none are sent")
    admin_client = await server.client("admin@localhost", plugins=PLUGINS)
    form = {"accountjid": "carol@localhost", "url": receiver.url("/carol"), "secret": SECRET[::-1]}
    assert (await run_command(admin_client, f"{ADMIN_NS}#notification-webhook", **form))[0] == "ok"

    groupchat(alice, "hello everyone, carol and BOB: secret plans")
    message = await receiver.next("/room")
    assert {k: message[k] for k in ("kind", "type", "room", "from")} == {
        "kind": "event", "type": "message", "room": ROOM, "from": "Alice"}
    assert message["message_id"] and message["id"] and "body" not in message
    mentions = [await receiver.next("/room"), await receiver.next("/room")]
    assert sorted((m["type"], m["mentioned"], m["nick"]) for m in mentions) == [
        ("mention", "bob@localhost", "bob"), ("mention", "carol@localhost", "carol")]
    assert {m["message_id"] for m in mentions} == {message["message_id"]}
    carol_event = await receiver.next("/carol")
    assert {k: carol_event[k] for k in ("type", "to", "conversation", "from")} == {
        "type": "mention", "to": "carol@localhost", "conversation": ROOM, "from": "Alice"}
    assert "secret plans" not in json.dumps([message, *mentions, carol_event])
    assert receiver.refused == []
    assert len(set(receiver.keys)) == len(receiver.keys) == 4  # one key per event

    await server.restart()  # the room, loaded from storage, is the same room: its webhook stays
    alice = await muc_user(server, "alice")
    await alice.plugin["xep_0045"].join_muc_wait(SlixJID(ROOM), "Alice", timeout=5)
    groupchat(alice, "after the restart")
    assert (await receiver.next("/room"))["type"] == "message"

    # Destroyed and made again by someone else: another room, whose messages the first webhook must not get.
    await alice.plugin["xep_0045"].destroy(SlixJID(ROOM), timeout=5)
    dave = await muc_user(server, "dave")
    await create(dave, "Dave", ROOM, **{"muc#roomconfig_persistentroom": "1"})
    groupchat(dave, "private to the new room")
    await sync(dave)
    await asyncio.sleep(0.3)
    assert receiver.events["/room"].empty()


@pytest.mark.parametrize("include_body", [False, True])
async def test_bodies_need_the_admin_and_the_user_and_never_omemo(notify_server: Starter, smtp: Smtp,
                                                                  include_body: bool) -> None:
    """alice consents to bodies, dave does not; the host allows them or not. Only alice on a host that allows
    them gets bodies, never that of an OMEMO message (nor its fallback text), each on one quoted line whatever
    line breaks and headers it holds."""
    server = await notify_server(smtp.port, include_body=include_body, digest_interval=0.6)
    await opted_in(server, smtp, "alice", bodies="yes")
    await opted_in(server, smtp, "dave")
    await server.add_user("bob")
    bob = await server.client("bob@localhost")
    hostile = ("line one\r\nBcc: victim@example.org\r\n\r\n* eve@localhost: 99 messages\n.\n"
               "Stop these emails (one click):\nhttp://evil.example/unsubscribe")
    for to in ("alice@localhost", "dave@localhost"):
        await send_chat(bob, to, "plain words")
        await send_chat(bob, to, hostile)
        omemo = bob.make_message(mto=to, mbody=OMEMO_FALLBACK, mtype="chat")
        omemo.append(ET.fromstring(OMEMO))
        omemo.send()
    digests = {name: (await smtp.mailbox.wait(f"{name}@example.org", 2))[1] for name in ("alice", "dave")}
    for name, digest in digests.items():
        text = digest.get_content()
        assert "bob@localhost: 3 messages" in text, text
        assert "OMEMO" not in digest.as_string() and "CCCC" not in digest.as_string()
        assert digest["Bcc"] is None and len(digest.get_all("Subject")) == 1
        rcpts = next(r for r, m in smtp.mailbox.messages if m is digest)
        assert rcpts == [f"{name}@example.org"]
        quoted = [line for line in text.splitlines() if line.startswith("  > ")]
        if name == "alice" and include_body:
            assert quoted[0] == "  > bob@localhost: plain words" and len(quoted) == 2, quoted
            assert quoted[1].startswith("  > bob@localhost: line one Bcc: victim@example.org")
            assert quoted[1].endswith("http://evil.example/unsubscribe")
            assert text.splitlines().count("Stop these emails (one click):") == 1
            assert not any(line.startswith(("Bcc:", "* eve", ".")) for line in text.splitlines())
        else:
            assert quoted == [] and "plain words" not in digest.as_string(), text


async def test_webhook_bodies_with_consent_never_of_omemo(notify_server: Starter, smtp: Smtp,
                                                          receiver: Receiver) -> None:
    server = await notify_server(smtp.port, include_body=True)
    await server.add_user("carol")
    await server.add_user("bob")
    mod = module(server)
    carol = JID.parse("carol@localhost")
    await mod.set_webhook(carol, receiver.url("/carol"), SECRET[::-1])
    bob = await server.client("bob@localhost")
    await send_chat(bob, "carol@localhost", "without consent")
    assert "body" not in await receiver.next("/carol")
    await mod._save(carol, Preferences(webhook=receiver.url("/carol"), webhook_secret=SECRET[::-1], bodies=True))
    await send_chat(bob, "carol@localhost", "with consent")
    assert (await receiver.next("/carol"))["body"] == "with consent"
    omemo = bob.make_message(mto="carol@localhost", mbody=OMEMO_FALLBACK, mtype="chat")
    omemo.append(ET.fromstring(OMEMO))
    omemo.send()
    event = await receiver.next("/carol")
    assert event["type"] == "message" and "body" not in event


@pytest.mark.parley_config(components=COMPONENTS, modules=[*DEFAULT_MODULES, "notifications"],
                           module_options={"notifications": {
                               "smtp_host": "127.0.0.1", "smtp_tls": "none", "tick": 0.05, "digest_interval": 0.3,
                               "min_interval": 0.1, "push_grace": 2.0}})
async def test_push_delivered_is_not_emailed_push_failed_is(server: Harness, smtp: Smtp) -> None:
    """alice's phone has a push registration. The app server accepts the push of bob's message and answers
    carol's with an error: the digest, push_grace later, names carol only."""
    server.server.config.hosts["localhost"].options["notifications.smtp_port"] = smtp.port
    await server.restart()
    bob = await alice_registers(server, "phone-node")
    await module(server)._save(JID.parse("alice@localhost"), Preferences("alice@example.org", True))
    await server.add_user("carol")
    carol = await server.client("carol@localhost")
    async with app_server(server) as app:
        began = time.monotonic()
        await send_chat(bob, "alice@localhost", "pushed")
        assert (await app.next())[1]["last-message-sender"] == ["bob@localhost/desk"]
        app.error = ("wait", "resource-constraint")
        await send_chat(carol, "alice@localhost", "not pushed")
        await app.next()
        await app.sync()

        async def only_carol_waits() -> bool:
            waiting = await server.server.storage.notifications.waiting("localhost", "alice")
            return [(w.conversation, w.count) for w in waiting] == [("carol@localhost", 1)]

        await wait_for(only_carol_waits)
        digest = (await smtp.mailbox.wait("alice@example.org"))[0]
        assert time.monotonic() - began >= 2.0  # push_grace, for users whose phone is woken
        assert "carol@localhost: 1 message" in digest.get_content()
        assert "bob@localhost" not in digest.get_content()
    await disconnect(server, carol)


async def test_host_rate_limit_holds_digests_of_every_user(notify_server: Starter, smtp: Smtp) -> None:
    """host_per_hour 3: two confirmations and alice's digest; carol's waits, counted, for the hour to pass."""
    server = await notify_server(smtp.port, host_per_hour=3, user_per_hour=100)
    await opted_in(server, smtp, "alice")
    await opted_in(server, smtp, "carol")
    mod = module(server)
    await mod.note(JID.parse("alice@localhost"), "bob@localhost", "bob@localhost", "message")
    await smtp.mailbox.wait("alice@example.org", 2)
    await mod.note(JID.parse("carol@localhost"), "bob@localhost", "bob@localhost", "message")
    await asyncio.sleep(0.5)  # past carol's interval
    for _ in range(3):
        await mod.run_once()
    assert len(smtp.mailbox.to("carol@example.org")) == 1  # the confirmation only
    assert [w.count for w in await mod.store.waiting("localhost", "carol")] == [1]


async def call_api(port: int, command: str, body: dict[str, Any], password: str = "adminpw") -> tuple[int, Any]:
    import base64
    auth = base64.b64encode(f"admin@localhost:{password}".encode()).decode()
    async with aiohttp.ClientSession() as http, http.post(
            f"http://127.0.0.1:{port}/api/{command}", json=body, headers={"Authorization": f"Basic {auth}"}) as r:
        return r.status, await r.json(content_type=None)


def http_port(server: Harness) -> int:
    return next(listener.port for listener in server.server.config.listeners if listener.type == "http")


async def test_admin_commands_over_the_http_api(notify_server: Starter, smtp: Smtp, receiver: Receiver) -> None:
    """An admin over the real HTTP API: a room's webhook (with bodies, which this host allows), an account's
    webhook, and the dead-letter list once an endpoint that refuses everything used up the tries."""
    server = await notify_server(smtp.port, include_body=True, max_attempts=1)
    await server.add_user("admin", "adminpw")
    await server.add_user("carol")
    alice = await persistent_room(server, "bob")
    port = http_port(server)
    status, answer = await call_api(port, "notification_room_webhook", {
        "room": ROOM, "url": receiver.url("/room"), "secret": SECRET, "bodies": "yes"})
    assert (status, answer) == (200, {"status": f"webhook of {ROOM} set to {receiver.url('/room')}, with message "
                                                "bodies"})
    status, answer = await call_api(port, "notification_room_webhook", {
        "room": "nowhere@conference.example.test", "url": receiver.url("/room"), "secret": SECRET, "bodies": ""})
    assert status >= 400 and "conference.example.test" in json.dumps(answer)
    status, answer = await call_api(port, "notification_webhook", {
        "user": "carol", "host": "localhost", "url": f"http://127.0.0.1:{free_port()}/gone", "secret": SECRET})
    assert status == 200 and answer["status"].startswith("webhook set to")

    groupchat(alice, "hi bob")
    message = await receiver.next("/room")
    assert (message["type"], message["body"]) == ("message", "hi bob")
    assert (await receiver.next("/room"))["type"] == "mention"

    bob = await server.client("bob@localhost")
    await send_chat(bob, "carol@localhost", "nobody listens")

    async def dead() -> bool:
        return len(await module(server).dead_letters()) == 1

    await wait_for(dead)
    status, letters = await call_api(port, "notification_dead_letters", {"host": "localhost"})
    assert status == 200 and len(letters) == 1 and " carol webhook http://127.0.0.1:" in letters[0]
    assert (await call_api(port, "notification_dead_letters", {"host": "localhost"}, password="wrong"))[0] == 401

    code, out, err = await run(server, "notification_room_webhook", ROOM, "", "", "")  # parleyctl: removed
    assert code == 0 and f"webhook of {ROOM} removed" in out, err
    groupchat(alice, "nobody hears this")
    await sync(alice)
    await asyncio.sleep(0.3)
    assert receiver.events["/room"].empty()


class BlockingMailbox(Mailbox):
    """Takes the first message, then keeps its answer back until released: the sender's process dies meanwhile,
    after the mail server has the message and before the 'sent' mark."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        answer = await super().handle_DATA(server, session, envelope)
        if len(self.messages) == 1:
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 10)
        return answer


async def test_a_resend_after_a_crash_has_the_same_message_id(notify_server: Starter) -> None:
    blocking = Smtp(free_port())
    blocking.mailbox = BlockingMailbox()
    blocking.start()
    try:
        server = await notify_server(blocking.port, lease=1.0)
        await server.add_user("alice")
        alice = await server.client("alice@localhost", plugins=PLUGINS)
        await settings(alice, email="alice@example.org")
        await blocking.mailbox.wait("alice@example.org")
        await server.restart()  # the process 'dies' while the SMTP server holds its answer
        assert isinstance(blocking.mailbox, BlockingMailbox)
        blocking.mailbox.release.set()
        first, second = await blocking.mailbox.wait("alice@example.org", 2)
        rows = await server.server.storage.notifications.list("localhost")
        assert len(rows) == 1
        assert first["Message-ID"] == second["Message-ID"] == f"<{rows[0].id}@localhost>"

        async def sent() -> bool:
            return [r.status for r in await server.server.storage.notifications.list("localhost")] == [SENT]

        await wait_for(sent)
    finally:
        blocking.stop()


async def test_a_webhook_retry_has_the_same_idempotency_key(notify_server: Starter, smtp: Smtp,
                                                            receiver: Receiver) -> None:
    server = await notify_server(smtp.port)
    await server.add_user("carol")
    await server.add_user("bob")
    await module(server).set_webhook(JID.parse("carol@localhost"), receiver.url("/carol"), SECRET[::-1])
    receiver.fail_next = 2
    bob = await server.client("bob@localhost")
    await send_chat(bob, "carol@localhost", "hi")
    event = await receiver.next("/carol")
    assert receiver.keys == [event["id"]] * 3  # two refused tries and the one taken


async def test_user_commands_outside_the_admin_namespace(notify_server: Starter, smtp: Smtp) -> None:
    """What a user sees in the server's command list (clients show the names): the user's commands under
    urn:parley:notifications; an admin sees the admin commands where XEP-0133 puts them."""
    server = await notify_server(smtp.port)
    await server.add_user("admin")
    await server.add_user("alice")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    admin_client = await server.client("admin@localhost", plugins=PLUGINS)

    async def nodes(client: ClientXMPP) -> dict[str, str]:
        items = await client.plugin["xep_0030"].get_items(jid="localhost", node="http://jabber.org/protocol/commands",
                                                          timeout=5)
        return {node: name for _, node, name in items["disco_items"]["items"]}

    mine = await nodes(alice)
    assert mine[f"{USER_NS}#notification-settings"] == "Missed-message email notifications"
    assert mine[f"{USER_NS}#room-webhook"] == "Webhook for a room you own"
    assert not any(node.startswith(ADMIN_NS) and "notification" in node for node in mine)
    admins = await nodes(admin_client)
    assert f"{ADMIN_NS}#notification-webhook" in admins and f"{ADMIN_NS}#notification-dead-letters" in admins
