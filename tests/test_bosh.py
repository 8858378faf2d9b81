"""BOSH (XEP-0124, XEP-0206) end to end: a raw HTTP client over real sockets against extensions/bosh.py,
chatting with a slixmpp user over TCP, and every terminal condition the spec names."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import time
from typing import Any
from xml.etree.ElementTree import Element, fromstring

import aiohttp
import pytest

from server.config import ListenerConfig
from server.jid import JID
from server.sasl.scram import ScramClient
from server.stream.bosh import HTTPBIND, XBOSH
from tests.conftest import Harness, free_port, insecure_context
from tests.test_roster_presence import sync

B = f"{{{HTTPBIND}}}"
C = "{jabber:client}"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND = "urn:ietf:params:xml:ns:xmpp-bind"


async def bosh_listener(server: Harness, tls: str = "none", **options: Any) -> str:
    """An http listener with the bosh module on every host; the URL of its endpoint."""
    port = free_port()
    server.server.config.listeners.append(ListenerConfig("http", "127.0.0.1", port, tls))
    for hc in server.server.config.hosts.values():
        hc.modules.append("bosh")
        hc.options.update({f"bosh.{k}": v for k, v in options.items()})
    await server.restart()
    return f"{'https' if tls == 'direct' else 'http'}://127.0.0.1:{port}/http-bind"


class Bosh:
    """A BOSH client that says what it sends, rid by rid, as a test needs to."""

    def __init__(self, url: str, http: aiohttp.ClientSession, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.http = http
        self.extra_headers = headers or {}
        self.rid = 1000
        self.sid = ""
        self.status = 0
        self.headers: Any = {}
        self.text = ""

    async def post(self, text: str) -> Element:
        headers = {"Content-Type": "text/xml; charset=utf-8", **self.extra_headers}
        async with self.http.post(self.url, data=text.encode(), headers=headers) as response:
            self.status = response.status
            self.headers = response.headers
            self.text = await response.text()
            return fromstring(self.text)

    def body(self, payload: str = "", rid: int | None = None, **attrs: str) -> str:
        if rid is None:
            self.rid += 1
            rid = self.rid
        extra = "".join(f" {k.replace('_', ':', 1) if k.startswith('xmpp_') else k}='{v}'" for k, v in attrs.items())
        return (f"<body xmlns='{HTTPBIND}' xmlns:xmpp='{XBOSH}' sid='{self.sid}' rid='{rid}'{extra}>"
                f"{payload}</body>")

    async def send(self, payload: str = "", rid: int | None = None, **attrs: str) -> Element:
        return await self.post(self.body(payload, rid, **attrs))

    async def create(self, to: str = "localhost", hold: int = 1, wait: int = 10, **attrs: str) -> Element:
        extra = "".join(f" {k}='{v}'" for k, v in attrs.items())
        answer = await self.post(f"<body xmlns='{HTTPBIND}' xmlns:xmpp='{XBOSH}' xmpp:version='1.0' ver='1.6' "
                                 f"content='text/xml; charset=utf-8' to='{to}' rid='{self.rid}' hold='{hold}' "
                                 f"wait='{wait}' xml:lang='en'{extra}/>")
        self.sid = answer.get("sid", "")
        return answer

    async def features(self, answer: Element) -> Element:
        """The stream features, from `answer` or from the next responses (XEP-0206 5)."""
        while (features := answer.find("{http://etherx.jabber.org/streams}features")) is None:
            assert answer.get("type") != "terminate", self.text
            answer = await self.send()
        return features

    async def login(self, user: str, password: str = "secret", resource: str = "web") -> str:
        """SCRAM-SHA-1, restart, bind: the full JID."""
        await self.features(await self.create())
        scram = ScramClient("SCRAM-SHA-1", user, password)
        first = base64.b64encode(scram.first()).decode()
        answer = await self.send(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-1'>{first}</auth>")
        challenge = base64.b64decode(answer.find(f"{{{SASL}}}challenge").text)
        final = base64.b64encode(scram.final(challenge)).decode()
        answer = await self.send(f"<response xmlns='{SASL}'>{final}</response>")
        assert answer.find(f"{{{SASL}}}success") is not None, answer
        features = await self.features(await self.send(xmpp_restart="true", to="localhost"))
        assert features.find(f"{{{BIND}}}bind") is not None
        assert features.find("{urn:xmpp:sm:3}sm") is None  # stream management is not offered over BOSH
        answer = await self.send(f"<iq xmlns='jabber:client' type='set' id='b1'><bind xmlns='{BIND}'>"
                                 f"<resource>{resource}</resource></bind></iq>")
        while (iq := answer.find(f"{C}iq")) is None:
            answer = await self.send()
        return iq.findtext(f"{{{BIND}}}bind/{{{BIND}}}jid")


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=insecure_context())) as session:
        yield session


async def stanzas(bosh: Bosh, tag: str, deadline: float = 5.0) -> Element:
    """Long-poll until a stanza with `tag` arrives."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        answer = await bosh.send()
        found = answer.find(tag)
        if found is not None:
            return found
    raise AssertionError(f"no {tag} within {deadline} s")


async def test_login_and_chat_with_a_tcp_user(server: Harness, http: aiohttp.ClientSession) -> None:
    url = await bosh_listener(server)
    await server.add_user("web")
    await server.add_user("tcp")
    bosh = Bosh(url, http)
    created = await bosh.create()
    assert bosh.headers["Content-Type"] == "text/xml; charset=utf-8"
    assert bosh.headers["Access-Control-Allow-Origin"] == "*"
    assert created.get("sid") and created.get("requests") == "2" and created.get("hold") == "1"
    assert created.get("wait") == "10" and created.get("ver") == "1.6" and created.get("from") == "localhost"
    assert created.get(f"{{{XBOSH}}}version") == "1.0" and created.get("secure") == "false"
    mechanisms = [m.text for m in (await bosh.features(created)).iter(f"{{{SASL}}}mechanism")]
    assert "SCRAM-SHA-1" in mechanisms and "PLAIN" not in mechanisms  # no PLAIN without TLS
    bosh2 = Bosh(url, http)
    jid = await bosh2.login("web")
    assert jid == "web@localhost/web"
    await bosh2.send("<presence xmlns='jabber:client'/>")

    tcp = await server.client("tcp@localhost")
    inbox = server.inbox(tcp)
    poll = asyncio.ensure_future(stanzas(bosh2, f"{C}message"))
    tcp.send_message(mto=jid, mbody="hello over tcp")
    message = await poll
    assert message.findtext(f"{C}body") == "hello over tcp"
    assert message.get("from").startswith("tcp@localhost")

    await bosh2.send(f"<message xmlns='jabber:client' to='{tcp.boundjid}' type='chat'><body>hi from the web</body>"
                     "</message>")
    got = await asyncio.wait_for(inbox.get(), 5)
    assert got["body"] == "hi from the web" and str(got["from"]) == jid


async def test_plain_only_over_https(server: Harness, http: aiohttp.ClientSession) -> None:
    url = await bosh_listener(server, tls="direct")
    await server.add_user("web")
    bosh = Bosh(url, http)
    created = await bosh.create()
    assert created.get("secure") == "true"
    mechanisms = [m.text for m in (await bosh.features(created)).iter(f"{{{SASL}}}mechanism")]
    assert "PLAIN" in mechanisms and not any(m.endswith("-PLUS") for m in mechanisms)
    plain = base64.b64encode(b"\0web\0secret").decode()
    answer = await bosh.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{plain}</auth>")
    assert answer.find(f"{{{SASL}}}success") is not None


async def test_plain_from_a_trusted_proxy_that_terminated_tls(server: Harness, http: aiohttp.ClientSession) -> None:
    url = await bosh_listener(server)
    await server.add_user("web")
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "192.0.2.7"}
    untrusted = Bosh(url, http, forwarded)
    created = await untrusted.create()
    assert created.get("secure") == "false"  # anyone can write those headers
    assert "PLAIN" not in [m.text for m in (await untrusted.features(created)).iter(f"{{{SASL}}}mechanism")]
    server.server.config.trusted_proxies = [ipaddress.ip_network("127.0.0.1/32")]
    bosh = Bosh(url, http, forwarded)
    created = await bosh.create()
    assert created.get("secure") == "true"
    assert "PLAIN" in [m.text for m in (await bosh.features(created)).iter(f"{{{SASL}}}mechanism")]
    plain = base64.b64encode(b"\0web\0secret").decode()
    assert (await bosh.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{plain}</auth>")).find(
        f"{{{SASL}}}success") is not None
    [conn] = [c for c in server.server.connections if getattr(c, "sid", None) == bosh.sid]
    assert conn.remote_ip == "192.0.2.7"  # limits and logs see the client, not the proxy


async def test_long_poll_holds_until_a_stanza_comes(server: Harness, http: aiohttp.ClientSession) -> None:
    url = await bosh_listener(server)
    await server.add_user("web")
    await server.add_user("tcp")
    bosh = Bosh(url, http)
    jid = await bosh.login("web")
    tcp = await server.client("tcp@localhost")
    held = asyncio.ensure_future(bosh.send())
    done, _ = await asyncio.wait([held], timeout=0.5)
    assert not done  # nothing to say: the request stays open
    tcp.send_message(mto=jid, mbody="wake up")
    answer = await asyncio.wait_for(held, 5)
    assert answer.findtext(f"{C}message/{C}body") == "wake up"
    # The session is the sid's, not a connection's: it goes on over a fresh TCP connection per request.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        bosh.http = fresh
        held = asyncio.ensure_future(bosh.send())
        tcp.send_message(mto=jid, mbody="still here")
        answer = await asyncio.wait_for(held, 5)
    assert answer.findtext(f"{C}message/{C}body") == "still here"


async def test_requests_out_of_order_and_replayed(server: Harness, http: aiohttp.ClientSession) -> None:
    url = await bosh_listener(server)
    await server.add_user("web")
    await server.add_user("tcp")
    bosh = Bosh(url, http)
    await bosh.login("web")
    tcp = await server.client("tcp@localhost")
    inbox = server.inbox(tcp)
    first, second = bosh.rid + 1, bosh.rid + 2
    bosh.rid = second
    message = f"<message xmlns='jabber:client' to='{tcp.boundjid}' type='chat'><body>{{}}</body></message>"
    later = asyncio.ensure_future(bosh.send(message.format("two"), rid=second))
    done, _ = await asyncio.wait([later], timeout=0.3)
    assert not done
    await bosh.send(message.format("one"), rid=first)
    early = bosh.text
    assert [(await asyncio.wait_for(inbox.get(), 5))["body"] for _ in range(2)] == ["one", "two"]
    await bosh.send(message.format("not sent again"), rid=first)
    assert bosh.text == early  # the same answer, and the payload is not handled twice
    await later
    await bosh.send("<iq xmlns='jabber:client' type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert inbox.empty()


async def test_terminal_conditions(server: Harness, http: aiohttp.ClientSession) -> None:
    url = await bosh_listener(server, polling=2)
    bosh = Bosh(url, http)

    bosh.sid = "no-such-session"
    answer = await bosh.send()
    assert (answer.get("type"), answer.get("condition")) == ("terminate", "item-not-found")

    answer = await Bosh(url, http).create(to="")
    assert answer.get("condition") == "improper-addressing"
    answer = await Bosh(url, http).create(to="elsewhere.test")
    assert answer.get("condition") == "host-unknown"

    async def session() -> Bosh:
        fresh = Bosh(url, http)
        await fresh.features(await fresh.create())
        return fresh

    # A rid beyond the window of 'requests'.
    ahead = await session()
    answer = await ahead.send(rid=ahead.rid + 5)
    assert answer.get("condition") == "item-not-found"
    assert (await ahead.send()).get("condition") == "item-not-found"  # the session is gone

    # A rid answered too long ago to be replayed.
    old = await session()
    answer = await old.send(rid=old.rid - 5)
    assert answer.get("condition") == "item-not-found"

    # Overactivity: more requests at once than 'requests' (2): one held, one ahead of a gap, then the gap.
    busy = await session()
    first = busy.rid + 1
    held = [asyncio.ensure_future(busy.send(rid=first)), asyncio.ensure_future(busy.send(rid=first + 2))]
    await asyncio.wait(held, timeout=0.3)
    answer = await busy.send(rid=first + 1)
    assert answer.get("condition") == "policy-violation"
    for request in held:
        assert (await asyncio.wait_for(request, 5)).get("type") == "terminate"

    # A pause longer than 'maxpause'.
    paused = await session()
    answer = await paused.send(pause="100000")
    assert answer.get("condition") == "policy-violation"

    # A polling session (hold 0) that polls faster than 'polling'.
    poller = Bosh(url, http)
    assert (await poller.create(hold=0)).get("hold") == "0"
    answer = await poller.send()
    assert answer.get("condition") == "policy-violation"

    # Bodies that are not XML, not XMPP's restricted XML, or not a <body/>: bad-request, that session only.
    bystander = await session()
    for bad in (lambda b: b.body("<message xmlns='jabber:client'>"),
                lambda b: b.body("<!-- a comment -->"),
                lambda b: "<html/>", lambda b: "not xml at all"):
        victim = await session()
        text = bad(victim)
        answer = await victim.post(text)
        assert victim.status == 400 and answer.get("condition") == "bad-request", text
        if victim.sid in text:
            assert (await victim.send()).get("condition") == "item-not-found"
    assert (await bystander.send(pause="5")).get("type") is None  # still there

    # Stanzas before authentication get a stream error, carried by the terminal body.
    early = await session()
    answer = await early.send("<message xmlns='jabber:client' to='x@localhost'><body>x</body></message>")
    assert answer.get("condition") == "remote-stream-error"
    assert answer.find("{http://etherx.jabber.org/streams}error/"
                       "{urn:ietf:params:xml:ns:xmpp-streams}not-authorized") is not None


async def test_oversized_body_is_a_policy_violation(server: Harness, http: aiohttp.ClientSession) -> None:
    url = await bosh_listener(server)
    bosh = Bosh(url, http)
    await bosh.features(await bosh.create())
    limit = server.server.config.limits.max_stanza_size
    answer = await bosh.send(f"<message xmlns='jabber:client'><body>{'x' * (limit + 10000)}</body></message>")
    assert answer.get("condition") == "policy-violation"


async def test_terminate_ends_the_session(server: Harness, http: aiohttp.ClientSession) -> None:
    url = await bosh_listener(server)
    await server.add_user("web")
    bosh = Bosh(url, http)
    jid = await bosh.login("web")
    answer = await bosh.send("<presence xmlns='jabber:client' type='unavailable'/>", type="terminate")
    assert answer.get("type") == "terminate" and answer.get("condition") is None
    assert (await bosh.send()).get("condition") == "item-not-found"
    deadline = time.monotonic() + 5
    while server.server.sessions.get(JID.parse(jid)) is not None:
        assert time.monotonic() < deadline, "the XMPP session outlived its BOSH session"
        await asyncio.sleep(0.05)


async def test_cors_preflight(server: Harness, http: aiohttp.ClientSession) -> None:
    url = await bosh_listener(server)
    headers = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "content-type"}
    async with http.options(url, headers=headers) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert "content-type" in response.headers["Access-Control-Allow-Headers"].lower()
    async with http.get(url) as response:
        assert response.status == 200


async def test_cors_allow_list(server: Harness, http: aiohttp.ClientSession) -> None:
    url = await bosh_listener(server, cors_origins=["https://chat.example"])
    async with http.options(url, headers={"Origin": "https://chat.example"}) as response:
        assert response.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    async with http.options(url, headers={"Origin": "https://evil.example"}) as response:
        assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parley_config(limits={"max_connections_per_ip": 1})
async def test_per_address_cap(server: Harness, http: aiohttp.ClientSession) -> None:
    url = await bosh_listener(server)
    first = Bosh(url, http)
    await first.features(await first.create())
    assert (await Bosh(url, http).create()).get("condition") == "policy-violation"


@pytest.mark.parley_config(limits={"unauthenticated_timeout": 1.0})
async def test_unauthenticated_timeout(server: Harness, http: aiohttp.ClientSession) -> None:
    url = await bosh_listener(server)
    bosh = Bosh(url, http)
    await bosh.features(await bosh.create())
    answer = await asyncio.wait_for(bosh.send(), 5)
    while answer.get("type") != "terminate":
        answer = await asyncio.wait_for(bosh.send(), 5)
    assert answer.get("condition") == "remote-stream-error"
    assert answer.find("{http://etherx.jabber.org/streams}error/"
                       "{urn:ietf:params:xml:ns:xmpp-streams}connection-timeout") is not None


async def test_gone_client_times_out_and_its_messages_go_offline(server: Harness,
                                                                 http: aiohttp.ClientSession) -> None:
    url = await bosh_listener(server, inactivity=1)
    await server.add_user("web")
    await server.add_user("tcp")
    bosh = Bosh(url, http)
    jid = await bosh.login("web")
    await bosh.send("<presence xmlns='jabber:client'/>")
    tcp = await server.client("tcp@localhost")
    # The client stops asking: no request is pending when the message comes.
    tcp.send_message(mto=jid, mbody="while you were away")
    deadline = time.monotonic() + 10
    while server.server.sessions.count() > 1:
        assert time.monotonic() < deadline, "the BOSH session did not time out"
        await asyncio.sleep(0.05)
    again = await server.client("web@localhost", resource="phone")
    inbox = server.inbox(again)
    again.send_presence()
    got = await asyncio.wait_for(inbox.get(), 5)
    assert got["body"] == "while you were away"


async def test_what_a_gone_client_hands_back_reaches_a_resource_that_came_meanwhile(
        server: Harness, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """The message a timed-out BOSH session never delivered goes back to offline storage; another resource that
    logged in while it was being stored took the (empty) backlog first, and must still get it."""
    url = await bosh_listener(server, inactivity=1)
    await server.add_user("web")
    await server.add_user("tcp")
    offline = server.server.storage.offline
    restore = offline.restore
    storing, stored = asyncio.Event(), asyncio.Event()

    async def slow_restore(*args: Any) -> None:
        storing.set()
        await stored.wait()
        await restore(*args)

    monkeypatch.setattr(offline, "restore", slow_restore)
    bosh = Bosh(url, http)
    jid = await bosh.login("web")
    await bosh.send("<presence xmlns='jabber:client'/>")
    tcp = await server.client("tcp@localhost")
    tcp.send_message(mto=jid, mbody="handed back")
    await asyncio.wait_for(storing.wait(), 10)  # the BOSH session timed out and is storing it
    again = await server.client("web@localhost", resource="phone")
    inbox = server.inbox(again)
    again.send_presence()
    await sync(again)  # its initial presence found no backlog
    stored.set()
    got = await asyncio.wait_for(inbox.get(), 5)
    assert got["body"] == "handed back"


async def test_shutdown_answers_held_requests_at_once(server: Harness, http: aiohttp.ClientSession) -> None:
    url = await bosh_listener(server)
    bosh = Bosh(url, http)
    await bosh.features(await bosh.create(wait=30))
    held = asyncio.ensure_future(bosh.send())
    done, _ = await asyncio.wait([held], timeout=0.3)
    assert not done
    started = time.monotonic()
    await server.server.stop()
    assert time.monotonic() - started < 5, "the HTTP server waited for a held BOSH request"
    answer = await asyncio.wait_for(held, 5)
    assert answer.get("condition") == "remote-stream-error"
    assert answer.find("{http://etherx.jabber.org/streams}error/"
                       "{urn:ietf:params:xml:ns:xmpp-streams}system-shutdown") is not None
    await server.server.start()  # the fixture stops it again
