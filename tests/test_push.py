"""Push notifications (XEP-0357): a slixmpp component over XEP-0114 acts as the app server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from xml.etree.ElementTree import Element

import pytest
from slixmpp import ClientXMPP, ComponentXMPP
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from extensions.push import Registrations, pushable
from server.forms import find_form, read_form
from server.stanza import parse_stored
from tests.conftest import Harness, RawClient
from tests.test_basic_modules import features_of, iq_error, query_of, send_iq, wait_for
from tests.test_component import COMPONENT, DOMAIN, SECRET, app_component
from tests.test_muc import ROOM, create, groupchat, join
from tests.test_muc import user as muc_user
from tests.test_muc_admin import admin
from tests.test_offline import send, wait_stored
from tests.test_roster_presence import disconnect, sync
from tests.test_stream_management import closed_sessions, cut, detached, phone, sm_client, until

PUSH = "urn:xmpp:push:0"
PUBSUB = "http://jabber.org/protocol/pubsub"
PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
SUMMARY = "urn:xmpp:push:summary"
OMEMO = "<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='1'/><payload>AAAA</payload></encrypted>"
COMPONENTS = {DOMAIN: {"secret": SECRET}}
WITH_BODY = {"push": {"include_body": True}}

pytestmark = pytest.mark.parley_config(components=COMPONENTS)


class AppServer:
    """What the component gets: each publish as (node, summary fields, publish options); answers as told."""

    def __init__(self, component: ComponentXMPP) -> None:
        self.publishes: asyncio.Queue[tuple[str, dict[str, list[str]], dict[str, list[str]]]] = asyncio.Queue()
        self.component = component
        self.error: tuple[str, str] | None = None  # (type, condition) of an error to answer with; None: a result
        self.senders: list[str] = []
        component.register_handler(Callback("publish", MatchXPath(f"{{{COMPONENT}}}iq/{{{PUBSUB}}}pubsub"),
                                            self._publish))

    def _publish(self, iq: object) -> None:
        el: Element = iq.xml  # type: ignore[attr-defined]
        self.senders.append(el.get("from") or "")
        pubsub = el.find(f"{{{PUBSUB}}}pubsub")
        publish = pubsub.find(f"{{{PUBSUB}}}publish")
        summary = find_form(publish.find(f"{{{PUBSUB}}}item/{{{PUSH}}}notification"), SUMMARY)
        options_el = pubsub.find(f"{{{PUBSUB}}}publish-options")
        options = read_form(find_form(options_el, PUBLISH_OPTIONS)) if options_el is not None else {}
        self.publishes.put_nowait((publish.get("node") or "", read_form(summary), options))
        answer = iq.reply(clear=True)  # type: ignore[attr-defined]
        if self.error:
            answer["type"] = "error"
            answer["error"]["type"], answer["error"]["condition"] = self.error
        answer.send()

    async def next(self) -> tuple[str, dict[str, list[str]], dict[str, list[str]]]:
        return await asyncio.wait_for(self.publishes.get(), 5)

    async def sync(self) -> None:
        """A ping to the server and back: what the component sent before has been handled."""
        iq = self.component.Iq(stype="get", sto="localhost", sfrom=DOMAIN)
        iq.append(Element("{urn:xmpp:ping}ping"))
        await iq.send(timeout=5)


async def enable(client: ClientXMPP, node: str, secret: str | None = None, jid: str = DOMAIN) -> None:
    form = (f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>{PUBLISH_OPTIONS}</value>"
            f"</field><field var='secret'><value>{secret}</value></field></x>") if secret else ""
    await send_iq(client, "set", f"<enable xmlns='{PUSH}' jid='{jid}' node='{node}'>{form}</enable>")


async def registrations(server: Harness, user: str = "alice") -> Registrations:
    return await server.server.hosts["localhost"].modules["push"].registrations.get("localhost", user)


async def all_removed(server: Harness) -> None:
    async def removed() -> bool:
        return (await registrations(server)).apps == ()

    await wait_for(removed)


async def alice_registers(server: Harness, *nodes: str, secret: str | None = "s3cr3t") -> ClientXMPP:
    """alice enables push on `nodes` from a phone that then goes away; returns bob, logged in at his desk."""
    await server.add_user("alice")
    phone = await server.client("alice@localhost", resource="phone")
    for node in nodes:
        await enable(phone, node, secret)
    await disconnect(server, phone)
    await server.add_user("bob")
    return await server.client("bob@localhost", resource="desk")


@contextlib.asynccontextmanager
async def app_server(server: Harness) -> AsyncIterator[AppServer]:
    async with app_component(server) as component:
        yield AppServer(component)


async def test_offline_messages_are_pushed_with_count_sender_and_options(server: Harness) -> None:
    bob = await alice_registers(server, "phone-node")
    async with app_server(server) as app:
        send(bob, "first")
        node, summary, options = await app.next()
        assert node == "phone-node"
        assert summary == {"FORM_TYPE": [SUMMARY], "message-count": ["1"],
                           "last-message-sender": ["bob@localhost/desk"]}
        assert options == {"FORM_TYPE": [PUBLISH_OPTIONS], "secret": ["s3cr3t"]}
        assert app.senders == ["alice@localhost"]
        send(bob, "second")
        assert (await app.next())[1]["message-count"] == ["2"]

        alice = await server.client("alice@localhost")
        alice.send_presence()  # back online: the count starts again, and offline messages come in
        await sync(alice)
        await disconnect(server, alice)
        send(bob, "third")
        assert (await app.next())[1]["message-count"] == ["1"]
    await wait_stored(server, 1)  # and offline storage kept it


@pytest.mark.parley_config(components=COMPONENTS, module_options=WITH_BODY)
async def test_body_only_with_the_option_and_nothing_for_what_a_device_got(server: Harness) -> None:
    bob = await alice_registers(server, "n")
    async with app_server(server) as app:
        laptop = await server.client("alice@localhost", resource="laptop")
        laptop.send_presence()
        await sync(laptop)
        send(bob, "seen on the laptop")
        send(bob, "to the laptop only", to="alice@localhost/laptop")
        await sync(bob, laptop)
        await disconnect(server, laptop)
        send(bob, None, "<active xmlns='http://jabber.org/protocol/chatstates'/>")  # no content: no push
        send(bob, None, OMEMO)  # encrypted, no body: pushed
        send(bob, "while away")
        first, second = await app.next(), await app.next()
        assert first[1]["message-count"] == ["1"] and "last-message-body" not in first[1]
        assert second[1]["message-count"] == ["2"] and second[1]["last-message-body"] == ["while away"]


async def test_disable_one_node_or_all_of_an_app_server(server: Harness) -> None:
    bob = await alice_registers(server, "a", "b", "c")
    alice = await server.client("alice@localhost", resource="phone")  # bound, not available: offline delivery
    async with app_server(server) as app:
        send(bob, "one")
        assert [(await app.next())[0] for _ in range(3)] == ["a", "b", "c"]
        await send_iq(alice, "set", f"<disable xmlns='{PUSH}' jid='{DOMAIN}' node='a'/>")
        send(bob, "two")
        assert [(await app.next())[0] for _ in range(2)] == ["b", "c"]
        await send_iq(alice, "set", f"<disable xmlns='{PUSH}' jid='{DOMAIN}'/>")
        assert (await registrations(server)).apps == ()
        await enable(alice, "d")
        send(bob, "three")
        node, summary, options = await app.next()
        assert (node, summary["message-count"], options) == ("d", ["1"], {})


async def test_an_app_server_error_removes_the_registration_unless_it_says_wait(server: Harness) -> None:
    bob = await alice_registers(server, "a", "b")
    async with app_server(server) as app:
        app.error = ("wait", "resource-constraint")
        send(bob, "one")
        assert [(await app.next())[0] for _ in range(2)] == ["a", "b"]
        await app.sync()
        assert len((await registrations(server)).apps) == 2
        app.error = ("cancel", "item-not-found")
        send(bob, "two")
        assert [(await app.next())[0] for _ in range(2)] == ["a", "b"]
        await app.sync()
        assert (await registrations(server)).apps == ()


async def test_a_disconnected_app_server_loses_its_registration(server: Harness) -> None:
    bob = await alice_registers(server, "n")
    send(bob, "nobody to push to")  # the component is not connected: the publish bounces
    await all_removed(server)
    await wait_stored(server, 1)


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_registrations_survive_a_restart(server: Harness) -> None:
    await alice_registers(server, "n")
    await server.restart()
    bob = await server.client("bob@localhost", resource="desk")
    async with app_server(server) as app:
        send(bob, "after the restart")
        node, summary, options = await app.next()
        assert (node, summary["message-count"], options["secret"]) == ("n", ["1"], ["s3cr3t"])


async def test_advertised_on_the_account_and_bad_requests(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    alice = await server.client("alice@localhost")
    bob = await server.client("bob@localhost")
    info = await send_iq(alice, "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>", "alice@localhost")
    assert PUSH in features_of(query_of(info, "http://jabber.org/protocol/disco#info"))
    bad = [
        f"<enable xmlns='{PUSH}' jid='{DOMAIN}'/>",
        f"<enable xmlns='{PUSH}' node='n'/>",
        f"<enable xmlns='{PUSH}' jid='a@b@c' node='n'/>",
        f"<enable xmlns='{PUSH}' jid='{DOMAIN}' node='n'><x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE'><value>urn:example</value></field></x></enable>",
        f"<disable xmlns='{PUSH}'/>",
    ]
    for payload in bad:
        assert (await iq_error(alice, "set", payload))[0] == "bad-request", payload
    assert (await iq_error(bob, "set", f"<enable xmlns='{PUSH}' jid='{DOMAIN}' node='n'/>", "alice@localhost"))[0] \
        == "forbidden"
    for node in range(10):
        await enable(alice, str(node))
    assert (await iq_error(alice, "set", f"<enable xmlns='{PUSH}' jid='{DOMAIN}' node='11'/>"))[0] \
        == "resource-constraint"
    await enable(alice, "3", secret="changed")  # an existing registration is replaced, not added
    assert len((await registrations(server)).apps) == 10


def test_what_is_worth_a_push() -> None:
    message = parse_stored
    assert pushable(message("<message type='chat'><body>hi</body></message>"))
    assert pushable(message(f"<message>{OMEMO}</message>"))
    assert pushable(message("<message><encrypted xmlns='urn:xmpp:omemo:2'/></message>"))
    assert not pushable(message("<message type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/>"
                                "</message>"))
    assert not pushable(message("<message type='groupchat'><body>hi</body></message>"))
    assert not pushable(message("<message type='chat'><body>hi</body><no-store xmlns='urn:xmpp:hints'/></message>"))
    assert Registrations.parse(Registrations.parse({"apps": [{"jid": DOMAIN, "node": "n", "options": [["s", ["v"]]]}],
                                                    "count": 3}).document()).count == 3


# --- detached stream-management sessions ------------------------------------------------------------



async def push_phone(server: Harness) -> RawClient:
    """alice's phone with resumable stream management and push enabled; bob exists."""
    raw, _ = await phone(server)
    await raw.send(f"<iq type='set' id='e'><enable xmlns='{PUSH}' jid='{DOMAIN}' node='n'/></iq>")
    assert (await raw.expect("{jabber:client}iq")).get("type") == "result"
    return raw


async def lose(server: Harness, raw: RawClient) -> None:
    cut(raw)
    await detached(server, "alice@localhost/phone")


@pytest.mark.parley_config(components=COMPONENTS, module_options=WITH_BODY)
async def test_a_detached_session_is_pushed_unless_an_attached_one_got_the_message(server: Harness) -> None:
    raw = await push_phone(server)
    bob = await server.client("bob@localhost", resource="desk")
    async with app_server(server) as app:
        await lose(server, raw)
        send(bob, "while detached")
        summary = (await app.next())[1]
        assert (summary["message-count"], summary["last-message-body"]) == (["1"], ["while detached"])

        laptop = await server.client("alice@localhost", resource="laptop")
        laptop.send_presence()
        await sync(laptop)
        send(bob, "both got it")
        send(bob, "phone only", to="alice@localhost/phone")
        summary = (await app.next())[1]
        assert (summary["message-count"], summary["last-message-body"]) == (["1"], ["phone only"])


@pytest.mark.parley_config(components=COMPONENTS, module_options={**WITH_BODY,
                                                                   "stream_management": {"resume_timeout": 1}})
async def test_a_message_queued_then_stored_offline_is_pushed_once(server: Harness) -> None:
    ended = closed_sessions(server)
    raw = await push_phone(server)
    bob = await server.client("bob@localhost", resource="desk")
    async with app_server(server) as app:
        await lose(server, raw)
        send(bob, "while detached")
        assert (await app.next())[1]["last-message-body"] == ["while detached"]
        # Not resumed: once the session has ended, its queue goes to offline storage.
        await until(lambda: len(ended) == 1 and ended[0].flushed)
        assert await server.server.storage.offline.count("localhost", "alice") == 1
        send(bob, "later")
        summary = (await app.next())[1]
        assert (summary["message-count"], summary["last-message-body"]) == (["2"], ["later"])


@pytest.mark.parley_config(components=COMPONENTS, module_options=WITH_BODY)
async def test_the_count_starts_again_once_a_resumed_session_gets_a_message(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    alice = await sm_client(server, "alice@localhost", "phone")
    await enable(alice, "n")
    resumed = asyncio.get_running_loop().create_future()
    alice.add_event_handler("session_resumed", lambda _: resumed.set_result(True))
    inbox = server.inbox(alice)
    bob = await server.client("bob@localhost", resource="desk")
    async with app_server(server) as app:
        alice.abort()
        await detached(server, "alice@localhost/phone")
        send(bob, "one")
        send(bob, "two")
        assert [(await app.next())[1]["message-count"] for _ in range(2)] == [["1"], ["2"]]

        alice.connect("127.0.0.1", server.port)
        await asyncio.wait_for(resumed, 10)
        send(bob, "read at once")
        assert [(await asyncio.wait_for(inbox.get(), 5))["body"] for _ in range(3)] == ["one", "two", "read at once"]
        alice.abort()
        await detached(server, "alice@localhost/phone")
        send(bob, "away again")
        summary = (await app.next())[1]
        assert (summary["message-count"], summary["last-message-body"]) == (["1"], ["away again"])


# --- group chat ------------------------------------------------------------------------------------------


async def registered(server: Harness, name: str) -> None:
    """`name` enables push on node `name` from a phone that then goes away."""
    await server.add_user(name)
    phone = await server.client(f"{name}@localhost", resource="phone")
    await enable(phone, name)
    await disconnect(server, phone)


@pytest.mark.parley_config(components=COMPONENTS, module_options=WITH_BODY)
async def test_members_who_are_not_in_the_room_are_pushed(server: Harness) -> None:
    await registered(server, "bob")
    await registered(server, "carol")  # not a member
    alice = await muc_user(server, "alice")
    await create(alice, "Alice", **{"muc#roomconfig_persistentroom": "1", "muc#roomconfig_membersonly": "1"})
    await admin(alice, {"jid": "bob@localhost", "affiliation": "member"})
    async with app_server(server) as app:
        groupchat(alice, "while bob is away")
        node, summary, _ = await app.next()
        assert (node, summary["last-message-sender"], summary["last-message-body"]) == \
            ("bob", [f"{ROOM}/Alice"], ["while bob is away"])

        bob = await muc_user(server, "bob", "laptop")
        await join(bob, "Bob")
        groupchat(alice, "bob is here")
        await disconnect(server, bob)
        groupchat(alice, "bob left")
        node, summary, _ = await app.next()
        assert (node, summary["message-count"], summary["last-message-body"]) == ("bob", ["1"], ["bob left"])
