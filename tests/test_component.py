"""XEP-0114 components: a slixmpp ComponentXMPP and raw streams against the component listener."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from xml.etree.ElementTree import Element

import pytest
from slixmpp import ComponentXMPP
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from server.component import handshake_digest
from server.config import ConfigError, parse_config
from server.stream.parser import StreamOpen
from tests.conftest import Harness, RawClient
from tests.test_c2s import stream_error_condition
from tests.test_offline import collect
from tests.test_roster_presence import sync

DOMAIN = "push.localhost"
SECRET = "component-secret"
COMPONENT = "jabber:component:accept"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"

pytestmark = pytest.mark.parley_config(components={DOMAIN: {"secret": SECRET}})


@contextlib.asynccontextmanager
async def app_component(server: Harness, domain: str = DOMAIN, secret: str = SECRET) -> AsyncIterator[ComponentXMPP]:
    """A slixmpp component connected and past the handshake; disconnected on the way out."""
    component = ComponentXMPP(domain, secret)
    started = asyncio.get_running_loop().create_future()
    component.add_event_handler("session_start", lambda _: started.done() or started.set_result(True))
    component.connect("127.0.0.1", server.component_port)
    try:
        await asyncio.wait_for(started, 10)
        yield component
    finally:
        if component.transport is not None:
            await asyncio.wait_for(component.disconnect(wait=0.5), 3)


def received(component: ComponentXMPP, kind: str) -> asyncio.Queue[Element]:
    """The XML of every `kind` stanza ('message', 'iq'...) the component gets."""
    queue: asyncio.Queue[Element] = asyncio.Queue()
    component.register_handler(Callback(f"test {kind}", MatchXPath(f"{{{COMPONENT}}}{kind}"),
                                        lambda st: queue.put_nowait(st.xml)))
    return queue


@contextlib.asynccontextmanager
async def raw_component(server: Harness, domain: str = DOMAIN) -> AsyncIterator[tuple[RawClient, str]]:
    """A raw socket that has opened a component stream to `domain`; yields it with the stream id."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.component_port)
    raw = RawClient(reader, writer)
    try:
        await raw.send(f"<stream:stream xmlns='{COMPONENT}' xmlns:stream='http://etherx.jabber.org/streams' "
                       f"to='{domain}'>")
        header = await raw.next()
        assert isinstance(header, StreamOpen)
        yield raw, header.get("id") or ""
    finally:
        writer.close()


async def handshake(raw: RawClient, stream_id: str) -> None:
    await raw.send(f"<handshake>{handshake_digest(stream_id, SECRET)}</handshake>")
    await raw.expect(f"{{{COMPONENT}}}handshake")


def condition_of(el: Element) -> str | None:
    error = el.find("{jabber:client}error")
    return None if error is None else next(c.tag.split("}")[1] for c in error if c.tag.startswith(f"{{{STANZAS}}}"))


async def test_messages_and_iqs_flow_both_ways(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    inbox = collect(alice)
    async with app_component(server) as component:
        messages = received(component, "message")
        alice.send_message(mto=f"gateway-user@{DOMAIN}", mbody="to the component", mtype="chat")
        got = await asyncio.wait_for(messages.get(), 5)
        assert got.get("from") == str(alice.boundjid) and got.findtext(f"{{{COMPONENT}}}body") == "to the component"

        component.send_message(mto=str(alice.boundjid), mfrom=f"bot@{DOMAIN}", mbody="hello alice")
        component.send_message(mto=str(alice.boundjid), mfrom=f"room.{DOMAIN}", mbody="from a subdomain")
        first, second = await asyncio.wait_for(inbox.get(), 5), await asyncio.wait_for(inbox.get(), 5)
        assert (first.get("from"), first.findtext("{jabber:client}body")) == (f"bot@{DOMAIN}", "hello alice")
        assert second.get("from") == f"room.{DOMAIN}"

        component.register_handler(Callback("version", MatchXPath(f"{{{COMPONENT}}}iq/{{jabber:iq:version}}query"),
                                            lambda iq: iq.reply().send()))
        iq = alice.Iq(stype="get", sto=DOMAIN)
        iq.append(Element("{jabber:iq:version}query"))
        result = await iq.send(timeout=5)
        assert result["type"] == "result" and result["from"] == DOMAIN


async def test_wrong_secret_is_not_authorized(server: Harness) -> None:
    async with raw_component(server) as (raw, stream_id):
        await raw.send(f"<handshake>{handshake_digest(stream_id, 'guess')}</handshake>")
        assert stream_error_condition(await raw.closed()) == "not-authorized"
    assert server.server.components.by_domain[DOMAIN].connection is None


async def test_unknown_domain_and_stanzas_before_the_handshake(server: Harness) -> None:
    async with raw_component(server, "nobody.localhost") as (raw, _):
        assert stream_error_condition(await raw.closed()) == "host-unknown"
    async with raw_component(server) as (raw, _):
        await raw.send(f"<message from='{DOMAIN}' to='alice@localhost'><body>early</body></message>")
        assert stream_error_condition(await raw.closed()) == "not-authorized"


@pytest.mark.parley_config(components={DOMAIN: {"secret": SECRET}}, limits={"unauthenticated_timeout": 0.5})
async def test_a_component_that_never_shakes_hands_is_timed_out(server: Harness) -> None:
    async with raw_component(server) as (raw, _):
        assert stream_error_condition(await raw.closed(3)) == "connection-timeout"


@pytest.mark.parametrize("forged", ["admin@localhost", f"evil{DOMAIN}", "", "@"])
async def test_forged_from_closes_the_stream(server: Harness, forged: str) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    inbox = collect(alice)
    async with raw_component(server) as (raw, stream_id):
        await handshake(raw, stream_id)
        to = alice.boundjid
        await raw.send(f"<message from='bot@{DOMAIN}' to='{to}'><body>genuine</body></message>"
                       f"<message from='{forged}' to='{to}'><body>forged</body></message>")
        assert stream_error_condition(await raw.closed()) == "invalid-from"
    assert (await asyncio.wait_for(inbox.get(), 5)).findtext("{jabber:client}body") == "genuine"
    await sync(alice)  # the component's stream is closed: whatever it sent reached alice before this answer
    assert inbox.empty()


async def test_second_connection_for_a_domain_is_a_conflict(server: Harness) -> None:
    async with app_component(server) as component:
        async with raw_component(server) as (raw, stream_id):
            await raw.send(f"<handshake>{handshake_digest(stream_id, SECRET)}</handshake>")
            assert stream_error_condition(await raw.closed()) == "conflict"
        assert server.server.components.by_domain[DOMAIN].connection is not None
        assert component.transport is not None


async def test_stanzas_bounce_while_the_component_is_away(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    errors = collect(alice, "error")
    async with app_component(server):
        pass
    await wait_disconnected(server)
    alice.send_message(mto=f"someone@{DOMAIN}", mbody="anyone there?")
    alice.send_message(mto="someone@elsewhere.localhost", mbody="or there?")
    away, unknown = await asyncio.wait_for(errors.get(), 5), await asyncio.wait_for(errors.get(), 5)
    assert (away.get("from"), condition_of(away)) == (f"someone@{DOMAIN}", "service-unavailable")
    assert condition_of(unknown) == "remote-server-not-found"

    async with app_component(server) as component:  # back again: delivered
        messages = received(component, "message")
        alice.send_message(mto=f"someone@{DOMAIN}", mbody="welcome back")
        assert (await asyncio.wait_for(messages.get(), 5)).findtext(f"{{{COMPONENT}}}body") == "welcome back"


async def wait_disconnected(server: Harness) -> None:
    for _ in range(100):
        if server.server.components.by_domain[DOMAIN].connection is None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the component is still connected")


async def test_bad_to_gets_an_error_and_the_stream_goes_on(server: Harness) -> None:
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    inbox = collect(alice)
    async with raw_component(server) as (raw, stream_id):
        await handshake(raw, stream_id)
        await raw.send(f"<message id='m1' from='bot@{DOMAIN}' to='a@b@c'><body>x</body></message>")
        error = await raw.expect(f"{{{COMPONENT}}}message")
        assert error.get("type") == "error" and error.get("id") == "m1"
        await raw.send(f"<message from='bot@{DOMAIN}' to='{alice.boundjid}'><body>still here</body></message>")
        assert (await asyncio.wait_for(inbox.get(), 5)).findtext("{jabber:client}body") == "still here"


def test_components_config(tmp_path: Path) -> None:
    base = {"data_dir": str(tmp_path), "hosts": {"localhost": {}}}
    config = parse_config({**base, "components": {"Push.Localhost": {"secret": "s"}}})
    assert config.components["push.localhost"].secret == "s"
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "components": {"localhost": {"secret": "s"}}})
    assert info.value.key == "components.localhost"
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "components": {"push.localhost": {}}})
    assert info.value.key == 'components."push.localhost".secret'
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "listeners": [{"type": "component", "address": "127.0.0.1", "port": 5347,
                                             "tls": "starttls"}]})
    assert info.value.key == "listeners[0].tls"
