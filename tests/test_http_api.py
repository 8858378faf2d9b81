"""The HTTP API (ejabberd's mod_http_api) on an `http` listener: authentication, allowed networks, tenants,
argument errors, and ejabberd's JSON result shapes, against a running server over real sockets."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Any

import aiohttp
import pytest

from ejabberd_compat.http_api import shape
from parley import COMMANDS
from server.config import ConfigError, ListenerConfig, parse_config
from tests.conftest import Harness, free_port, insecure_context

TOKEN = "t0ken-for-the-operator-0123456789"
def basic(user: str, password: str) -> dict[str, str]:
    """HTTP Basic credentials as a header (aiohttp's BasicAuth is deprecated)."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


ADMIN = basic("admin@localhost", "adminpw")

DECLARED = {c.name: c for c in COMMANDS}  # those not of host modules


@dataclass
class Api:
    """A running server (the harness) with an `http` listener on `port`."""

    h: Harness
    port: int

    async def call(self, command: str, body: Any = None, auth: dict[str, str] | None = ADMIN,
                   token: str | None = None, raw: bytes | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else auth or {}
        async with aiohttp.ClientSession() as http, http.post(
                f"http://127.0.0.1:{self.port}/api/{command}", json=None if raw is not None else body or {},
                data=raw, headers=headers) as response:
            text = await response.text()
            assert "Traceback" not in text
            return response.status, await response.json(content_type=None)

    async def ok(self, command: str, body: Any = None, **kwargs: Any) -> Any:
        status, answer = await self.call(command, body, **kwargs)
        assert status == 200, (command, body, answer)
        return answer


@pytest.fixture
async def api(server: Harness) -> Api:
    return await with_http_api(server)


async def with_http_api(server: Harness) -> Api:
    """The server restarted with an `http` listener and a token, as if they had been in its configuration."""
    port = free_port()
    config = server.server.config
    config.listeners.append(ListenerConfig("http", "127.0.0.1", port, "none"))
    config.http_api.token = TOKEN
    await server.restart()
    await server.add_user("admin", "adminpw")
    return Api(server, port)


async def test_no_or_wrong_credentials_get_401_and_change_nothing(api: Api) -> None:
    alice = {"user": "alice", "host": "localhost", "password": "pw"}
    for kwargs in ({"auth": None}, {"auth": basic("admin@localhost", "wrong")}, {"token": "guess" * 4},
                   {"auth": basic("nobody@nowhere.test", "x")}):
        status, answer = await api.call("register", alice, **kwargs)
        assert status == 401 and answer["status"] == "error", kwargs
    assert not await api.h.server.storage.accounts.exists("localhost", "alice")
    async with aiohttp.ClientSession() as http, \
            http.post(f"http://127.0.0.1:{api.port}/api/register", json=alice) as response:
        assert response.headers["WWW-Authenticate"].startswith("Basic")


async def test_non_admin_gets_403(api: Api) -> None:
    await api.h.add_user("bob", "bobpw")
    status, answer = await api.call("register", {"user": "eve", "host": "localhost", "password": "pw"},
                                    auth=basic("bob@localhost", "bobpw"))
    assert status == 403 and "not an admin" in answer["message"]
    assert not await api.h.server.storage.accounts.exists("localhost", "eve")


@pytest.mark.parley_config(http_api={"token": TOKEN, "allowed_networks": ["10.0.0.0/8", "2001:db8::/32"]})
async def test_outside_the_allowed_networks_gets_403(api: Api) -> None:
    status, answer = await api.call("status", token=TOKEN)
    assert status == 403 and "not open to your address" in answer["message"]


async def test_bad_requests(api: Api) -> None:
    assert (await api.call("frobnicate"))[0] == 404
    status, answer = await api.call("register", {"user": "alice", "host": "localhost"})
    assert (status, answer) == (400, "missing argument: password")
    status, answer = await api.call("register", {"user": "alice", "host": "localhost", "password": "p", "x": 1})
    assert (status, answer) == (400, "unknown arguments: x")
    assert (await api.call("register", raw=b"{not json"))[0] == 400
    assert (await api.call("register", raw=b'["alice", "localhost", "pw"]'))[0] == 400
    status, answer = await api.call("register", {"user": "al ice", "host": "localhost", "password": "pw"})
    assert status == 400 and "invalid username" in answer
    status, answer = await api.call("send_stanza", {"from": "localhost", "to": "admin@localhost",
                                                    "stanza": "<message><!-- x --></message>"})
    assert status == 400 and "restricted-xml" in answer
    assert await api.ok("registered_users", {"host": "localhost"}) == ["admin"]


async def test_accounts_with_ejabberds_shapes(api: Api) -> None:
    alice = {"user": "alice", "host": "localhost"}
    assert await api.ok("register", {**alice, "password": "pw"}) == "User alice@localhost successfully registered"
    status, answer = await api.call("register", {**alice, "password": "pw"})
    assert status == 409 and answer == {"status": "error", "code": 10090,
                                        "message": "User alice@localhost already registered"}
    assert await api.ok("check_account", alice) == 0
    assert await api.ok("check_account", {"user": "nobody", "host": "localhost"}) == 1
    assert await api.ok("check_password", {**alice, "password": "pw"}) == 0
    assert await api.ok("change_password", {**alice, "newpass": "new"}) == 0
    assert await api.ok("check_password", {**alice, "password": "pw"}) == 1
    await api.h.client("alice@localhost", "new", resource="r1")
    assert await api.ok("connected_users") == ["alice@localhost/r1"]
    assert await api.ok("connected_users_number") == {"num_sessions": 1}
    assert await api.ok("stats", {"name": "registeredusers"}) == {"stat": 2}
    assert (await api.ok("status")).startswith("The node parley@")
    assert await api.ok("unregister", alice) == ""
    assert await api.ok("registered_users", {"host": "localhost"}) == ["admin"]


async def test_roster_vcard_and_rooms(api: Api) -> None:
    await api.h.add_user("alice")
    assert await api.ok("add_rosteritem", {"localuser": "alice", "localhost": "localhost", "user": "bob",
                                           "host": "example.test", "nick": "", "group": "", "subs": "to"}) == 0
    assert await api.ok("get_roster", {"user": "alice", "host": "localhost"}) == [
        {"jid": "bob@example.test", "nick": "", "subscription": "to", "ask": "none", "group": ""}]
    assert await api.ok("delete_rosteritem", {"localuser": "alice", "localhost": "localhost", "user": "bob",
                                              "host": "example.test"}) == 0
    assert await api.ok("set_vcard", {"user": "alice", "host": "localhost", "name": "FN", "content": "Alice"}) == 0
    assert await api.ok("get_vcard", {"user": "alice", "host": "localhost", "name": "FN"}) == {"content": "Alice"}
    status, answer = await api.call("get_vcard", {"user": "alice", "host": "localhost", "name": "BDAY"})
    assert status == 400 and "has no BDAY" in answer
    room = {"name": "lobby", "service": "conference.localhost"}
    assert await api.ok("create_room", {**room, "host": "localhost"}) == 0
    assert await api.ok("muc_online_rooms", {"service": "conference.localhost"}) == ["lobby@conference.localhost"]
    client = await api.h.client("alice@localhost", resource="pc", plugins=("xep_0045",))
    await client.plugin["xep_0045"].join_muc_wait("lobby@conference.localhost", "Al", maxchars=0)
    assert await api.ok("get_room_occupants", room) == [{"jid": "alice@localhost/pc", "nick": "Al",
                                                          "role": "participant"}]
    assert await api.ok("set_room_affiliation", {**room, "jid": "alice@localhost", "affiliation": "admin"}) == 0
    assert await api.ok("get_room_occupants", room) == [{"jid": "alice@localhost/pc", "nick": "Al",
                                                          "role": "moderator"}]
    gone = asyncio.Event()
    client.add_event_handler("muc::lobby@conference.localhost::got_offline", lambda _: gone.set())
    assert await api.ok("destroy_room", room) == 0
    await asyncio.wait_for(gone.wait(), 5)
    assert await api.ok("muc_online_rooms", {"service": "global"}) == []


async def test_an_admin_reaches_only_its_own_hosts(api: Api) -> None:
    other = {"user": "carol", "host": "example.test", "password": "pw"}
    status, answer = await api.call("register", other)
    assert status == 400 and "Unknown virtual host" in answer
    assert await api.ok("muc_online_rooms", {"service": "global"}) == []
    status, _ = await api.call("reload_config")  # reaches every host: admins of all hosts only
    assert status == 403
    assert not await api.h.server.storage.accounts.exists("example.test", "carol")
    assert await api.ok("register", other, token=TOKEN) == "User carol@example.test successfully registered"
    status, answer = await api.call("reload_config", token=TOKEN)
    assert status == 400 and "built-in configuration" in answer


@pytest.mark.parametrize("server", ["postgresql"], indirect=True)
async def test_registered_user_logs_in_on_postgresql(api: Api) -> None:
    await api.ok("register", {"user": "dave", "host": "localhost", "password": "s3cret"})
    assert await api.ok("check_password", {"user": "dave", "host": "localhost", "password": "s3cret"}) == 0
    await api.h.client("dave@localhost", "s3cret")


async def test_https_listener(api: Api) -> None:
    """tls = "direct" serves the API over HTTPS with the hosts' certificates."""
    port = free_port()
    api.h.server.config.listeners.append(ListenerConfig("http", "127.0.0.1", port, "direct"))
    await api.h.restart()
    async with aiohttp.ClientSession() as http, http.post(
            f"https://127.0.0.1:{port}/api/connected_users_number", json={}, headers=ADMIN,
            ssl=insecure_context()) as response:
        assert (response.status, await response.json()) == (200, {"num_sessions": 0})


def test_config_refuses_starttls_for_http_and_bad_networks() -> None:
    listener = {"type": "http", "address": "127.0.0.1", "port": 5280, "tls": "starttls"}
    with pytest.raises(ConfigError, match=r"listeners\[0\].tls"):
        parse_config({"listeners": [listener]})
    with pytest.raises(ConfigError, match=r"http_api.allowed_networks\[1\]"):
        parse_config({"http_api": {"allowed_networks": ["10.0.0.0/8", "10.0.0.300/8"]}})
    with pytest.raises(ConfigError, match=r"http_api\.token"):
        parse_config({"http_api": {"token": "short"}})
    assert parse_config({}).http_api.allowed_networks == [ip_network("127.0.0.0/8"), ip_network("::1/128")]


def test_json_of_each_result_kind() -> None:
    commands = DECLARED
    assert shape(commands["check_account"], {}) == 0
    assert shape(commands["register"], {"res": "User a@b registered"}) == "User a@b registered"
    assert shape(commands["get_vcard"], {"content": "Alice"}) == {"content": "Alice"}
    assert shape(commands["stats"], {"stat": 3}) == {"stat": 3}
    assert shape(commands["registered_users"], {"users": ["a"]}) == ["a"]
    assert shape(commands["get_roster"], {"contacts": []}) == []


async def test_text_xml_cannot_carry_is_refused_and_nothing_is_sent(api: Api) -> None:
    """A body with U+0001 would reach the recipient's client as a stanza it cannot parse: 400 in ejabberd's
    error shape, and the recipient, still connected, gets only the next, valid message."""
    await api.h.add_user("bob")
    bob = await api.h.client("bob@localhost")
    inbox = api.h.inbox(bob)
    available = asyncio.Event()
    bob.add_event_handler("presence_available", lambda p: p["from"] == bob.boundjid and available.set())
    bob.send_presence()
    await asyncio.wait_for(available.wait(), 5)  # online: a message to the bare JID comes here
    message = {"type": "chat", "from": "admin@localhost", "to": "bob@localhost", "subject": "", "body": "a\x01b"}
    status, answer = await api.call("send_message", message)
    assert (status, answer) == (400, {"status": "error", "code": 10, "message":
                                      "argument body contains U+0001, a character XML does not allow"})
    status, _ = await api.call("send_message", {**message, "body": "ok", "subject": "\ud800"})
    assert status == 400
    await api.ok("send_message", {**message, "body": "valid"})
    assert (await asyncio.wait_for(inbox.get(), 5))["body"] == "valid"
    assert bob.is_connected()
