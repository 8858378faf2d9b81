"""HTTP File Upload (XEP-0363): slots over XMPP with slixmpp's plugin, files over real HTTP with aiohttp, on
SQLite and PostgreSQL; every error the XEP names, quotas, rate, expiry, account deletion, safe serving,
ranges, images (metadata stripped, thumbnails, hostile files)."""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import aiohttp
import pytest
from PIL import Image
from slixmpp.exceptions import IqError

from server.commands import Context
from server.control import respond
from server.jid import JID
from tests.conftest import Harness, module_servers

NS = "urn:xmpp:http:upload:0"
Starter = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def upload_server(tmp_path: Path, request: pytest.FixtureRequest
                        ) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    """Starts a server with the upload module and the given options (on the backend of the test's param)."""
    async with module_servers(tmp_path, getattr(request, "param", "sqlite"), "http_upload") as start:
        yield start


BOTH = pytest.mark.parametrize("upload_server", ["sqlite", "postgresql"], indirect=True)


async def uploader(server: Harness, user: str = "alice") -> Any:
    await server.add_user(user)
    return await server.client(f"{user}@localhost", plugins=("xep_0030", "xep_0363"))


async def slot(client: Any, filename: str, size: int, content_type: str | None = "application/octet-stream",
               service: str = "upload.localhost") -> tuple[str, str]:
    iq = await client.plugin["xep_0363"].request_slot(service, filename, size, content_type)
    found = iq["http_upload_slot"]
    return found["put"]["url"], found["get"]["url"]


async def slot_error(client: Any, filename: str, size: int, service: str = "upload.localhost") -> Any:
    with pytest.raises(IqError) as refused:
        await slot(client, filename, size, service=service)
    return refused.value.iq["error"]


async def http(method: str, url: str, data: Any = None, headers: dict[str, str] | None = None
               ) -> tuple[int, bytes, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url, data=data,
                                                                    headers=headers or {}) as response:
        return response.status, await response.read(), response.headers


async def put(url: str, body: bytes, content_type: str = "application/octet-stream",
              **headers: str) -> tuple[int, bytes, Any]:
    return await http("PUT", url, body, {"Content-Type": content_type, **headers})


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def files_of(server: Harness, host: str = "localhost") -> list[str]:
    return sorted(os.listdir(server.data_dir / "uploads" / host))


def admin(server: Harness) -> Context:
    return Context(server.server.hosts["localhost"], JID.parse("admin@localhost"), operator=True)


# --- the service and the happy path ----------------------------------------------------------------------

@BOTH
async def test_slixmpp_uploads_and_anyone_downloads_the_same_bytes(upload_server: Starter) -> None:
    running = await upload_server()
    client = await uploader(running)
    body = os.urandom(300_000)
    url = await client.plugin["xep_0363"].upload_file("notes.bin", input_file=io.BytesIO(body),
                                                      content_type="application/octet-stream")
    status, got, headers = await http("GET", url)
    assert status == 200 and got == body
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Disposition"] == "attachment; filename*=UTF-8''notes.bin"
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["ETag"] and headers["Last-Modified"]
    status, _, _ = await http("GET", url, headers={"If-None-Match": headers["ETag"]})
    assert status == 304
    assert await running.server.commands.run("upload-usage", admin(running), {}) == {"files": 1, "bytes": len(body)}
    assert await running.server.commands.run("stats", admin(running), {"name": "uploadfiles"}) == {"stat": 1}
    assert await running.server.commands.run("stats", admin(running), {"name": "uploadbytes"}) == {"stat": len(body)}


async def test_the_service_is_found_with_its_maximum_file_size(upload_server: Starter) -> None:
    running = await upload_server()
    client = await uploader(running)
    items = await client.plugin["xep_0030"].get_items(jid="localhost")
    assert "upload.localhost" in {item[0] for item in items["disco_items"]["items"]}
    info = await client.plugin["xep_0030"].get_info(jid="upload.localhost")
    assert NS in info["disco_info"]["features"]
    assert ("store", "file") in {identity[:2] for identity in info["disco_info"]["identities"]}
    form = next(f for f in info["disco_info"].iterables if f["values"]["FORM_TYPE"] == [NS])
    assert form["values"]["max-file-size"] == str(100 << 20)


async def test_the_secret_survives_a_restart(upload_server: Starter) -> None:
    running = await upload_server()
    client = await uploader(running)
    put_url, get_url = await slot(client, "a.txt", 5, "text/plain")
    assert (await put(put_url, b"hello", "text/plain"))[0] == 201
    await running.restart()
    status, body, headers = await http("GET", get_url)
    assert (status, body) == (200, b"hello")
    assert headers["Content-Disposition"].startswith("inline")  # text/plain is shown in place


# --- errors ----------------------------------------------------------------------------------------------

async def test_slot_errors_as_the_xep_says(upload_server: Starter) -> None:
    running = await upload_server(max_file_size=1000)
    client = await uploader(running)
    error = await slot_error(client, "big.bin", 1001)
    assert (error["type"], error["condition"]) == ("modify", "not-acceptable")
    too_large = error.xml.find(f"{{{NS}}}file-too-large")
    assert too_large is not None and too_large.findtext(f"{{{NS}}}max-file-size") == "1000"
    error = await slot_error(client, "none.bin", 0)
    assert error["condition"] == "bad-request"
    await running.add_user("eve", host="example.test")
    stranger = await running.client("eve@example.test", plugins=("xep_0030", "xep_0363"))
    error = await slot_error(stranger, "x.bin", 10)
    assert (error["type"], error["condition"]) == ("cancel", "not-allowed")


async def test_put_checks_the_slot_and_serves_once(upload_server: Starter) -> None:
    running = await upload_server()
    client = await uploader(running)
    put_url, get_url = await slot(client, "a.bin", 10)
    assert (await put(put_url, b"0123456789", "text/html"))[0] == 415
    assert (await put(put_url, b"012345678"))[0] == 400  # not the announced length
    assert (await put(put_url.replace("token=", "token=0"), b"0123456789"))[0] == 403
    assert (await put(get_url, b"0123456789"))[0] == 403  # the GET URL does not upload
    assert (await http("GET", get_url))[0] == 404  # nothing stored by the failed attempts
    assert (await put(put_url, b"0123456789"))[0] == 201
    assert (await put(put_url, b"9876543210"))[0] == 409
    assert (await http("GET", get_url))[1] == b"0123456789"
    forged = get_url.replace(get_url.split("/")[-2], "0" * 32)
    assert (await http("GET", forged))[0] == 404


async def test_an_expired_put_url_is_refused(upload_server: Starter) -> None:
    running = await upload_server()
    client = await uploader(running)
    _, get_url = await slot(client, "a.bin", 3)
    module = running.server.hosts["localhost"].modules["http_upload"]
    slot_id = get_url.split("/")[-3]
    past = int(time.time()) - 1
    status, body, _ = await put(f"{get_url}?expires={past}&token={module._sign('put', slot_id, past)}", b"abc")
    assert (status, body) == (403, b"the upload URL has expired\n")


@BOTH
async def test_quota_and_rate(upload_server: Starter) -> None:
    running = await upload_server(user_quota=100, uploads_per_hour=3)
    client = await uploader(running)
    await slot(client, "a.bin", 60)
    error = await slot_error(client, "b.bin", 41)
    assert (error["type"], error["condition"]) == ("wait", "resource-constraint")
    assert "quota" in error["text"]
    await slot(client, "b.bin", 40)  # exactly the quota; the refused request did not count
    other = await uploader(running, "bob")
    for name in ("1", "2", "3"):
        await slot(other, name, 1)
    error = await slot_error(other, "4", 1)
    assert error["condition"] == "resource-constraint"
    retry = error.xml.find(f"{{{NS}}}retry")
    assert retry is not None and retry.get("stamp", "").endswith("Z")


async def test_host_quota(upload_server: Starter) -> None:
    running = await upload_server(host_quota=50, user_quota=0)
    alice = await uploader(running)
    bob = await uploader(running, "bob")
    await slot(alice, "a", 30)
    error = await slot_error(bob, "b", 30)
    assert error["condition"] == "resource-constraint" and "full" in error["text"]


# --- lifecycle -------------------------------------------------------------------------------------------

@BOTH
async def test_files_expire_and_are_swept(upload_server: Starter) -> None:
    running = await upload_server(expire_days=2 / 86400, cleanup_interval=0.1)
    client = await uploader(running)
    put_url, get_url = await slot(client, "a.bin", 4)
    assert (await put(put_url, b"abcd"))[0] == 201
    assert (await http("GET", get_url))[0] == 200

    async def gone() -> bool:
        return (await http("GET", get_url))[0] == 404 and files_of(running) == []
    await eventually(gone, "the expired file to go")


@pytest.mark.parametrize("upload_server", ["sqlite", "postgresql"], indirect=True)
async def test_a_slot_never_used_frees_its_quota(upload_server: Starter) -> None:
    running = await upload_server(slot_timeout=1, cleanup_interval=0.1, user_quota=10)
    client = await uploader(running)
    put_url, _ = await slot(client, "a.bin", 10)
    assert (await slot_error(client, "b.bin", 1))["condition"] == "resource-constraint"
    slot_id = put_url.split("/")[-3]

    async def forgotten() -> bool:
        return await running.server.storage.uploads.get(slot_id) is None
    await eventually(forgotten, "the unused slot to go")
    assert (await put(put_url, bytes(10)))[0] == 403  # its URL has expired too
    await slot(client, "b.bin", 10)


async def test_each_host_serves_its_own_files_with_its_own_secret(upload_server: Starter) -> None:
    running = await upload_server()
    await running.add_user("eve", host="example.test")
    eve = await running.client("eve@example.test", plugins=("xep_0030", "xep_0363"))
    put_url, get_url = await slot(eve, "e.txt", 3, "text/plain", service="upload.example.test")
    assert "/upload/example.test/" in get_url
    assert (await put(put_url, b"eve", "text/plain"))[0] == 201
    assert (await http("GET", get_url))[1] == b"eve"
    assert (await http("GET", get_url.replace("/upload/example.test/", "/upload/localhost/")))[0] == 404
    assert files_of(running, "example.test") == [get_url.split("/")[-3]]


@BOTH
async def test_deleted_accounts_and_purged_users_lose_their_files(upload_server: Starter) -> None:
    running = await upload_server()
    client = await uploader(running)
    bob = await uploader(running, "bob")
    urls = []
    for who, name in ((client, "a"), (bob, "b"), (bob, "c")):
        put_url, get_url = await slot(who, name, 3)
        assert (await put(put_url, b"xyz"))[0] == 201
        urls.append(get_url)
    assert len(files_of(running)) == 3
    assert await running.server.storage.accounts.delete("localhost", "alice")
    assert (await http("GET", urls[0]))[0] == 404
    await running.server.hosts["localhost"].modules["http_upload"].cleanup()
    assert len(files_of(running)) == 2
    result = await running.server.commands.run("upload-purge-user", admin(running),
                                               {"accountjid": JID.parse("bob@localhost")})
    assert result == {"files": 2}
    assert files_of(running) == []
    put_url, _ = await slot(bob, "d", 3)
    assert (await put(put_url, b"xyz"))[0] == 201
    assert await respond(["purge_uploads", "bob", "localhost"], "/", admin(running)) == {"exit": 0, "out": "1\n",
                                                                                        "err": ""}
    assert files_of(running) == []
    assert (await http("GET", urls[1]))[0] == 404


async def test_an_account_deleted_by_an_admin_or_in_band_takes_its_files_at_once(upload_server: Starter) -> None:
    running = await upload_server()
    client = await uploader(running)
    bob = await uploader(running, "bob")
    for who, name in ((client, "a"), (bob, "b")):
        put_url, _ = await slot(who, name, 3)
        assert (await put(put_url, b"xyz"))[0] == 201
    assert len(files_of(running)) == 2
    await running.server.commands.run("delete-user", admin(running), {"accountjids": [JID.parse("alice@localhost")]})
    await wait_until(lambda: len(files_of(running)) == 1, "alice's file deleted with her account")
    remove = bob.Iq(stype="set")  # XEP-0077 3.2: the account cancels itself
    remove.append(ElementTree.fromstring("<query xmlns='jabber:iq:register'><remove/></query>"))
    await remove.send(timeout=5)
    await wait_until(lambda: files_of(running) == [], "bob's file deleted with his in-band removal")


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# --- serving ---------------------------------------------------------------------------------------------

async def test_ranges_cors_and_dangerous_types(upload_server: Starter) -> None:
    running = await upload_server()
    client = await uploader(running)
    body = bytes(range(256)) * 40
    put_url, get_url = await slot(client, "song.ogg", len(body), "audio/ogg")
    status, _, headers = await http("OPTIONS", put_url, headers={
        "Origin": "https://web.example", "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-type"})
    assert status == 204 and "PUT" in headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in headers["Access-Control-Allow-Headers"]
    assert (await put(put_url, body, "audio/ogg"))[0] == 201
    status, part, headers = await http("GET", get_url, headers={"Range": "bytes=1000-1099"})
    assert (status, part) == (206, body[1000:1100])
    assert headers["Content-Range"] == f"bytes 1000-1099/{len(body)}"
    assert headers["Content-Disposition"].startswith("inline") and headers["Content-Type"] == "audio/ogg"
    status, nothing, headers = await http("HEAD", get_url)
    assert (status, nothing, headers["Content-Length"]) == (200, b"", str(len(body)))
    svg = b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"
    put_url, get_url = await slot(client, "x.svg", len(svg), "image/svg+xml")
    assert (await put(put_url, svg, "image/svg+xml"))[0] == 201
    status, _, headers = await http("GET", get_url)
    assert headers["Content-Disposition"].startswith("attachment") and headers["Content-Type"] == "image/svg+xml"
    html = b"<html><script>alert(1)</script></html>"
    put_url, get_url = await slot(client, "../../x.html", len(html), "text/html; charset=utf-8")
    assert "/x.html" in get_url and ".." not in get_url
    assert (await put(put_url, html, "text/html; charset=utf-8"))[0] == 201
    headers = (await http("GET", get_url))[2]
    assert headers["Content-Disposition"] == "attachment; filename*=UTF-8''x.html"


# --- images ----------------------------------------------------------------------------------------------

def jpeg_with_location(size: tuple[int, int] = (800, 600)) -> bytes:
    image = Image.new("RGB", size, (200, 30, 30))
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x0112] = 6  # orientation: rotated, which must survive
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (48.0, 51.0, 24.0)  # latitude
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes(), quality=90)
    return out.getvalue()


@BOTH
async def test_location_is_stripped_and_a_thumbnail_served(upload_server: Starter) -> None:
    running = await upload_server()
    client = await uploader(running)
    photo = jpeg_with_location()
    assert Image.open(io.BytesIO(photo)).getexif().get_ifd(0x8825)
    url = await client.plugin["xep_0363"].upload_file("photo.jpg", input_file=io.BytesIO(photo),
                                                      content_type="image/jpeg")
    status, got, headers = await http("GET", url)
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert headers["Content-Disposition"].startswith("inline")
    stored = Image.open(io.BytesIO(got))
    assert stored.size == (800, 600)
    assert dict(stored.getexif()) == {0x0112: 6}  # no maker, no GPS; the orientation kept
    assert int(headers["Content-Length"]) == len(got)
    status, thumb, headers = await http("GET", url + "/thumb")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    small = Image.open(io.BytesIO(thumb))
    assert small.size == (192, 256)  # upright (orientation applied), longest side 256


async def test_an_animation_is_left_whole(upload_server: Starter) -> None:
    running = await upload_server()
    client = await uploader(running)
    frames = [Image.new("RGB", (64, 64), color) for color in ("red", "green", "blue")]
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0, exif=exif.tobytes())
    animation = out.getvalue()
    url = await client.plugin["xep_0363"].upload_file("a.webp", input_file=io.BytesIO(animation),
                                                      content_type="image/webp")
    assert (await http("GET", url))[1] == animation
    assert (await http("GET", url + "/thumb"))[0] == 200


async def test_metadata_is_kept_when_configured(upload_server: Starter) -> None:
    running = await upload_server(strip_metadata=False, thumbnail_size=0)
    client = await uploader(running)
    photo = jpeg_with_location()
    url = await client.plugin["xep_0363"].upload_file("photo.jpg", input_file=io.BytesIO(photo),
                                                      content_type="image/jpeg")
    assert (await http("GET", url))[1] == photo
    assert (await http("GET", url + "/thumb"))[0] == 404


async def test_hostile_images_are_refused_and_encrypted_files_untouched(upload_server: Starter) -> None:
    running = await upload_server()
    client = await uploader(running)
    truncated = jpeg_with_location()[:3000]
    put_url, get_url = await slot(client, "t.jpg", len(truncated), "image/jpeg")
    status, body, _ = await put(put_url, truncated, "image/jpeg")
    assert status == 422 and b"damaged" in body
    assert (await http("GET", get_url))[0] == 404
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, "PNG")  # 400 megapixels in a few kilobytes
    bomb_bytes = bomb.getvalue()
    assert len(bomb_bytes) < 100_000
    put_url, get_url = await slot(client, "b.png", len(bomb_bytes), "image/png")
    started = time.monotonic()
    status, body, _ = await put(put_url, bomb_bytes, "image/png")
    assert status == 422 and b"pixels" in body and time.monotonic() - started < 5
    sealed = os.urandom(5000)  # what an OMEMO (aesgcm) file looks like, whatever type a client gives it
    put_url, get_url = await slot(client, "s.jpg", len(sealed), "image/jpeg")
    assert (await put(put_url, sealed, "image/jpeg"))[0] == 201
    assert (await http("GET", get_url))[1] == sealed
    assert (await http("GET", get_url + "/thumb"))[0] == 404
    assert sorted(files_of(running)) == [get_url.split("/")[-3]]  # the refused ones left nothing behind
    put_url, get_url = await slot(client, "fine.txt", 1, "text/plain")
    assert (await put(put_url, b"x", "text/plain"))[0] == 201  # and the server still serves


# --- streaming -------------------------------------------------------------------------------------------

def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_large_upload_and_download_stream(upload_server: Starter) -> None:
    running = await upload_server(max_file_size=1 << 31, user_quota=0)
    """200 MB up and down with this process's (client and server) RSS sampled meanwhile; see bench/ for 1 GB
    against a server in its own process."""
    size = int(os.environ.get("UPLOAD_TEST_MB", "200")) << 20
    client = await uploader(running)
    put_url, get_url = await slot(client, "big.bin", size)
    block = os.urandom(1 << 20)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size >> 20):
            yield block

    baseline, peak = rss(), 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        status, _, _ = await http("PUT", put_url, body(), {"Content-Type": "application/octet-stream",
                                                            "Content-Length": str(size)})
        assert status == 201
        received = 0
        async with aiohttp.ClientSession() as session, session.get(get_url) as response:
            async for chunk in response.content.iter_chunked(1 << 20):
                received += len(chunk)
    finally:
        done.set()
        await sampler
    assert received == size
    assert (running.data_dir / "uploads" / "localhost" / get_url.split("/")[-3]).stat().st_size == size
    assert peak - baseline < 64 << 20, f"RSS grew by {(peak - baseline) >> 20} MB for a {size >> 20} MB file"
