"""The server's HTTP listeners (server/http.py): parts add paths, per virtual host or for all, and take them
back; what nobody serves is 404, a method nobody serves 405 with Allow. Real requests over a socket."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from server.config import ListenerConfig
from tests.conftest import Harness, free_port


async def http_listener(server: Harness) -> str:
    port = free_port()
    server.server.config.listeners.append(ListenerConfig("http", "127.0.0.1", port, "none"))
    await server.restart()
    return f"http://127.0.0.1:{port}"


def answer(text: str) -> web.Response:
    return web.Response(text=text)


async def fetch(base: str, path: str, method: str = "GET", host: str | None = None) -> tuple[int, str, str]:
    headers = {"Host": host} if host else {}
    async with aiohttp.ClientSession() as http, http.request(method, base + path, headers=headers) as response:
        return response.status, await response.text(), response.headers.get("Allow", "")


async def test_paths_for_every_host_and_for_one(server: Harness) -> None:
    base = await http_listener(server)
    http = server.server.http

    async def exact(_: web.Request) -> web.Response:
        return answer("exact")

    async def below(request: web.Request) -> web.Response:
        return answer(f"below {request.path}")

    async def deeper(_: web.Request) -> web.Response:
        return answer("deeper")

    async def for_example(_: web.Request) -> web.Response:
        return answer("example.test's")

    http.add("GET", "/files", exact)
    http.add("GET", "/files/", below)
    http.add("GET", "/files/deep/", deeper)
    remove = http.add("GET", "/files", for_example, host="example.test")

    assert await fetch(base, "/files") == (200, "exact", "")
    assert await fetch(base, "/files/a/b") == (200, "below /files/a/b", "")
    assert await fetch(base, "/files/deep/x") == (200, "deeper", "")  # the longest prefix wins
    assert (await fetch(base, "/files", host="example.test:5280"))[:2] == (200, "example.test's")
    assert (await fetch(base, "/files", "HEAD"))[0] == 200  # HEAD is served by GET
    assert await fetch(base, "/files", "DELETE") == (405, "405: Method Not Allowed", "GET")
    assert (await fetch(base, "/nothing"))[0] == 404
    assert (await fetch(base, "/api/registered_users", "GET"))[2] == "POST"  # the HTTP API is here too

    remove()
    assert (await fetch(base, "/files", host="example.test"))[:2] == (200, "exact")


async def test_a_module_takes_its_paths_along_when_it_unloads(server: Harness) -> None:
    base = await http_listener(server)
    module = server.server.hosts["localhost"].modules["ping"]

    async def hello(_: web.Request) -> web.Response:
        return answer("hello")

    module.add_http("GET", "/hello", hello, this_host=True)
    assert (await fetch(base, "/hello", host="localhost"))[:2] == (200, "hello")
    assert (await fetch(base, "/hello", host="example.test"))[0] == 404  # another virtual host
    module.unload()
    assert (await fetch(base, "/hello", host="localhost"))[0] == 404


async def test_hosts_that_load_one_module_share_its_paths(server: Harness) -> None:
    base = await http_listener(server)
    on_localhost = server.server.hosts["localhost"].modules["ping"]
    on_example = server.server.hosts["example.test"].modules["ping"]

    async def endpoint(_: web.Request) -> web.Response:
        return answer("one endpoint for every host")

    on_localhost.add_http("GET", "/endpoint", endpoint)
    on_example.add_http("GET", "/endpoint", endpoint)  # the same module on another host: shared, not refused
    on_localhost.unload()
    assert (await fetch(base, "/endpoint"))[:2] == (200, "one endpoint for every host")
    on_example.unload()
    assert (await fetch(base, "/endpoint"))[0] == 404


def test_a_path_is_served_once_unless_one_module_shares_it(server: Harness) -> None:
    async def endpoint(_: web.Request) -> web.Response:
        return answer("")

    http = server.server.http
    http.add("GET", "/mine", endpoint, shared_by="websocket")
    with pytest.raises(ValueError, match="served already"):
        http.add("GET", "/mine", endpoint, shared_by="bosh")
    with pytest.raises(ValueError, match="served already"):
        http.add("GET", "/mine", endpoint)
