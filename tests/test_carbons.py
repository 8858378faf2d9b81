"""Message Carbons (XEP-0280) between three resources of one account, over real clients."""

from __future__ import annotations

from xml.etree.ElementTree import Element, fromstring

from slixmpp import ClientXMPP

from tests.conftest import Harness
from tests.test_basic_modules import iq_error, send_iq
from tests.test_offline import collect
from tests.test_roster_presence import sync

CARBONS = "urn:xmpp:carbons:2"
FORWARDED = "{urn:xmpp:forward:0}forwarded/{jabber:client}message"
BODY = "{jabber:client}body"


class Devices:
    """alice on a phone (priority 10) and a laptop with carbons enabled, and on the web without; bob."""

    def __init__(self, clients: dict[str, ClientXMPP]) -> None:
        self.clients = clients
        self.inboxes = {name: collect(client) for name, client in clients.items()}

    def __getitem__(self, name: str) -> ClientXMPP:
        return self.clients[name]

    async def arrivals(self) -> dict[str, list[tuple[str, str | None]]]:
        """What each client got since the last call, once everything sent so far has been delivered."""
        await sync(*self.clients.values())
        return {name: [describe(queue.get_nowait()) for _ in range(queue.qsize())]
                for name, queue in self.inboxes.items()}


def describe(el: Element) -> tuple[str, str | None]:
    """('sent'|'received', body) of a carbon, checked to come from alice's bare JID; else ('direct', body)."""
    for kind in ("sent", "received"):
        wrapper = el.find(f"{{{CARBONS}}}{kind}")
        if wrapper is not None:
            inner = wrapper.find(FORWARDED)
            assert el.get("from") == "alice@localhost" and el.get("type") == inner.get("type")
            return kind, inner.findtext(BODY)
    return "direct", el.findtext(BODY)


async def devices(server: Harness) -> Devices:
    await server.add_user("alice")
    await server.add_user("bob")
    clients = {name: await server.client("alice@localhost", resource=name, plugins=("xep_0280",))
               for name in ("phone", "laptop", "web")}
    clients["bob"] = await server.client("bob@localhost", resource="desk")
    clients["phone"].send_presence(ppriority=10)
    clients["laptop"].send_presence()
    clients["web"].send_presence()
    clients["bob"].send_presence()
    await clients["phone"].plugin["xep_0280"].enable()
    await clients["laptop"].plugin["xep_0280"].enable()
    found = Devices(clients)
    await found.arrivals()
    return found


def chat(client: ClientXMPP, to: str, body: str | None, *extra: str, mtype: str = "chat") -> None:
    msg = client.make_message(mto=to, mbody=body, mtype=mtype)
    for xml in extra:
        msg.append(fromstring(xml))
    msg.send()


async def test_received_messages_are_copied_to_the_other_enabled_resources(server: Harness) -> None:
    d = await devices(server)
    chat(d["bob"], "alice@localhost/laptop", "to the laptop")
    chat(d["bob"], "alice@localhost", "to the account")
    assert await d.arrivals() == {
        "phone": [("received", "to the laptop"), ("direct", "to the account")],
        "laptop": [("direct", "to the laptop"), ("received", "to the account")],
        "web": [],
        "bob": [],
    }


async def test_sent_messages_are_copied_to_the_other_enabled_resources(server: Harness) -> None:
    d = await devices(server)
    chat(d["phone"], "bob@localhost", "from the phone")
    await sync(d["phone"])  # routed before the next one, sent on another connection
    chat(d["web"], "bob@localhost/desk", "from the web")
    assert await d.arrivals() == {
        "phone": [("sent", "from the web")],
        "laptop": [("sent", "from the phone"), ("sent", "from the web")],
        "web": [],
        "bob": [("direct", "from the phone"), ("direct", "from the web")],
    }


async def test_a_message_to_the_own_account_is_copied_once(server: Harness) -> None:
    d = await devices(server)
    chat(d["laptop"], "alice@localhost", "note to self")
    assert await d.arrivals() == {"phone": [("direct", "note to self")], "laptop": [], "web": [], "bob": []}


async def test_private_messages_are_not_copied_and_lose_the_marker(server: Harness) -> None:
    d = await devices(server)
    private = f"<private xmlns='{CARBONS}'/>"
    chat(d["phone"], "bob@localhost", "secret out", private)
    chat(d["bob"], "alice@localhost/phone", "secret in", private)
    await sync(*d.clients.values())
    got = {name: [queue.get_nowait() for _ in range(queue.qsize())] for name, queue in d.inboxes.items()}
    assert [describe(el) for el in got["bob"]] == [("direct", "secret out")]
    assert [describe(el) for el in got["phone"]] == [("direct", "secret in")]
    assert got["laptop"] == [] and got["web"] == []
    for el in got["bob"] + got["phone"]:
        assert el.find(f"{{{CARBONS}}}private") is None


async def test_what_is_not_eligible_is_not_copied(server: Harness) -> None:
    d = await devices(server)
    chat(d["bob"], "alice@localhost/phone", "hinted", "<no-copy xmlns='urn:xmpp:hints'/>")
    chat(d["bob"], "alice@localhost/phone", "news", mtype="headline")
    chat(d["bob"], "alice@localhost/phone", None, "<received xmlns='urn:xmpp:receipts' id='x'/>", mtype="normal")
    chat(d["bob"], "alice@localhost/phone", "a normal message with a body", mtype="normal")
    chat(d["bob"], "alice@localhost/phone", None, "<composing xmlns='http://jabber.org/protocol/chatstates'/>")
    arrivals = await d.arrivals()
    assert len(arrivals["phone"]) == 5
    assert arrivals["laptop"] == [("received", "a normal message with a body"), ("received", None)]


async def test_disabled_resources_get_no_more_copies(server: Harness) -> None:
    d = await devices(server)
    await d["laptop"].plugin["xep_0280"].disable()
    await d["laptop"].plugin["xep_0280"].disable()  # XEP-0280 10.1: a second disable is no error
    chat(d["bob"], "alice@localhost/web", "after disabling")
    assert (await d.arrivals())["laptop"] == []
    assert (await d.arrivals())["phone"] == []
    await d["laptop"].plugin["xep_0280"].enable()
    chat(d["bob"], "alice@localhost/web", "enabled again")
    arrivals = await d.arrivals()
    assert arrivals["laptop"] == arrivals["phone"] == [("received", "enabled again")]


async def test_feature_and_who_may_enable(server: Harness) -> None:
    d = await devices(server)
    info = await send_iq(d["web"], "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>", "localhost")
    assert CARBONS in {f.get("var") for f in info.iter("{http://jabber.org/protocol/disco#info}feature")}
    condition, _ = await iq_error(d["bob"], "set", f"<enable xmlns='{CARBONS}'/>", "alice@localhost")
    assert condition == "forbidden"  # the router's one answer for own-account iqs
