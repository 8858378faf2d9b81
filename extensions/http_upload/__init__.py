"""HTTP File Upload (XEP-0363 v1.1) on upload.<host>: clients ask for a slot over XMPP, PUT the file over HTTP
and send the GET URL in their message; images, voice messages and (encrypted) files of every modern client.

A slot is a row in storage (`server.storage.uploads`) made at the request, so quotas count reserved bytes;
the file goes to a blob store (`blobs`, files under the data folder by default). URLs carry an HMAC of the
slot with a secret the host keeps in storage (it survives restarts): the GET URL
`{url}/upload/{host}/{slot}/{signature}/{filename}` is as good as the file is kept; the PUT URL adds an
expiry and its own signature, and serves once. `{GET URL}/thumb` is the thumbnail of an image. The HTTP
paths are shared by every host that loads the module; the host named in the path serves its own files.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, unquote
from xml.etree.ElementTree import Element, SubElement

from aiohttp import web

from extensions.disco import Disco
from extensions.http_upload import media
from extensions.http_upload.blobs import BlobStore, DiskStore, TooLong
from server.commands import Arg, CommandError, Context, Declarations, module_on
from server.forms import Field, build_form
from server.jid import JID
from server.module import Identity, Module
from server.options import Domain, Option
from server.service import Service
from server.stanza import Stanza
from server.storage.uploads import Limits, Upload, UploadRefused
from server.stream.errors import StanzaError

NS = "urn:xmpp:http:upload:0"
REQUEST = f"{{{NS}}}request"
NAME = "HTTP File Upload"
PREFIX = "/upload/"
STORE = "http_upload"  # the host's key-value document 'secret'
CHUNK = 1 << 16
SWEEP_BATCH = 500  # slot ids looked up at once (SQLite bounds the parameters of a statement)
# Types a browser may show in place; anything else (HTML, SVG, scripts, PDFs...) is a download, so an
# uploaded page never runs with the server's origin.
INLINE = {"image/jpeg", "image/png", "image/gif", "image/webp", "image/avif", "text/plain"}
INLINE_PREFIXES = ("audio/", "video/")
MIME = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*\Z")
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, PUT, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Content-Length, Authorization",
    "Access-Control-Expose-Headers": "Content-Length, Content-Range, Accept-Ranges, ETag, Last-Modified",
    "Access-Control-Max-Age": "86400",
}
# One thread for images: a burst of uploads queues rather than taking every core.
_IMAGES = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload-images")


def _now() -> datetime:
    return datetime.now(UTC)


def _served_type(content_type: str) -> str:
    """The slot's type as a header may carry it: its type/subtype when well-formed, else a byte stream."""
    main = content_type.split(";", 1)[0].strip().lower()
    return main if MIME.match(main) else "application/octet-stream"


def _clean_filename(name: str) -> str:
    """A file name that fits in one URL segment and a Content-Disposition: no folders, no control characters."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable()).strip().strip(".")
    return name[:200] or "file"


def _error(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers=CORS)


class UploadService(Service):
    """upload.<host>: slot requests, and its disco info with the maximum file size (XEP-0128)."""

    def __init__(self, module: HttpUpload, domain: str) -> None:
        super().__init__(module.server, domain, Identity("store", "file", NAME), [NS])
        self.module = module
        self.iq("get", REQUEST, module.request_slot)

    async def disco_info(self, st: Stanza) -> Element:
        query = await super().disco_info(st)
        query.append(build_form("result", [Field("max-file-size", values=(str(self.module.max_size),))],
                                form_type=NS))
        return query


class HttpUpload(Module):
    name = "http_upload"
    depends = ("disco",)
    options = (
        Option("domain", Domain, None, "the service's address, upload.<host> unless set (in a host's own table)"),
        Option("url", str, None, "the public base URL of an http listener, e.g. 'https://upload.example.org:5443' "
                                 "(unset: the first http listener's address)"),
        Option("max_file_size", int, 100 << 20, "bytes one file may have", minimum=1),
        Option("user_quota", int, 1 << 30, "bytes one user may keep (0: no limit)", minimum=0),
        Option("host_quota", int, 0, "bytes all users of the host may keep (0: no limit)", minimum=0),
        Option("uploads_per_hour", int, 100, "slots one user may request in an hour (0: no limit)", minimum=0),
        Option("expire_days", float, 30.0, "days a file is kept (0: until its account goes)", minimum=0),
        Option("slot_timeout", float, 300.0, "seconds a PUT URL is valid", minimum=1),
        Option("cleanup_interval", float, 3600.0, "seconds between sweeps of expired files", minimum=0.05),
        Option("path", str, None, "the folder of the files, DATA_DIR/uploads/<host> unless set"),
        Option("strip_metadata", bool, True, "remove EXIF (location...), XMP and comments from JPEG, PNG and WebP"),
        Option("thumbnail_size", int, 256, "largest side of the thumbnail made of each image (0: none)", minimum=0),
        Option("max_image_pixels", int, 40_000_000, "pixels an image may have (larger: refused)", minimum=1),
    )

    def setup(self) -> None:
        self.domain = self.option("domain") or f"upload.{self.host.name}"
        folder = self.option("path")
        self.blobs: BlobStore = DiskStore(Path(folder) if folder else
                                          self.server.config.data_dir / "uploads" / self.host.name)
        self.secret = b""
        self.uploading: set[str] = set()  # slots whose PUT is under way
        self.add_service(UploadService(self, self.domain))
        self.disco.add_item(self.domain, NAME)
        self._undo.append(lambda: self.disco.remove_item(self.domain))
        for method, handler in (("PUT", self.put), ("GET", self.get), ("OPTIONS", self.preflight)):
            self.add_http(method, PREFIX, handler)
        for declared in COMMANDS:
            self.add_command(declared)
        self.hook("account/deleted", self.account_deleted)

    async def account_deleted(self, user: str) -> None:
        """The account's rows went with it (AccountStore.delete); its files go now, not at the next sweep."""
        self.spawn(self.cleanup())

    async def start(self) -> None:
        self.secret = await self.server.storage.kv.host_secret(self.host.name, STORE)
        self.spawn(self._cleanup_loop())

    @property
    def disco(self) -> Disco:
        return cast(Disco, self.host.modules["disco"])

    @property
    def max_size(self) -> int:
        return int(self.option("max_file_size"))

    # --- slots ------------------------------------------------------------------------------------------

    async def request_slot(self, st: Stanza) -> Element:
        requester = st.from_
        if requester.domain != self.host.name or requester.local is None:
            raise StanzaError("not-allowed", f"only accounts of {self.host.name} may upload here")
        request = st.el[0]
        filename, size_text = request.get("filename"), request.get("size", "")
        if not filename or not size_text.isdigit() or int(size_text) <= 0:
            raise StanzaError("bad-request", "a slot request needs a filename and a positive size")
        size = int(size_text)
        if size > self.max_size:
            too_large = Element(f"{{{NS}}}file-too-large")
            SubElement(too_large, f"{{{NS}}}max-file-size").text = str(self.max_size)
            raise StanzaError("not-acceptable", f"the file is larger than {self.max_size} bytes", extra=too_large)
        slot = Upload(secrets.token_urlsafe(18), self.host.name, requester.local, _clean_filename(filename), size,
                      request.get("content-type", "").strip(), _now())
        limits = Limits(self.option("user_quota"), self._host_quota(), self.option("uploads_per_hour"))
        try:
            await self.server.storage.uploads.reserve(slot, limits)
        except UploadRefused as refused:
            retry = None
            if refused.retry is not None:
                retry = Element(f"{{{NS}}}retry", {"stamp": refused.retry.strftime("%Y-%m-%dT%H:%M:%SZ")})
            raise StanzaError("resource-constraint", str(refused), "wait", extra=retry) from None
        get_url = self.get_url(slot)
        expires = int(time.time() + self.option("slot_timeout"))
        answer = Element(f"{{{NS}}}slot")
        put_url = f"{get_url}?expires={expires}&token={self._sign('put', slot.id, expires)}"
        SubElement(answer, f"{{{NS}}}put", {"url": put_url})
        SubElement(answer, f"{{{NS}}}get", {"url": get_url})
        return answer

    def _sign(self, purpose: str, slot_id: str, expires: int = 0) -> str:
        return hmac.new(self.secret, f"{purpose}\0{self.host.name}\0{slot_id}\0{expires}".encode(),
                        hashlib.sha256).hexdigest()[:32]

    def get_url(self, slot: Upload) -> str:
        return f"{self.base_url()}{PREFIX}{quote(self.host.name)}/{slot.id}/{self._sign('get', slot.id)}/" \
               f"{quote(slot.filename, safe='')}"

    def base_url(self) -> str:
        return self.server.http.base_url(self.option("url"), self.domain)

    # --- HTTP -------------------------------------------------------------------------------------------

    def _slot_of(self, request: web.Request) -> tuple[HttpUpload, str, bool] | None:
        """The module of the host the path names, the slot, and whether the thumbnail is asked for; None when
        the path's signature is not that host's for that slot."""
        parts = request.rel_url.raw_path[len(PREFIX):].split("/")
        thumb = len(parts) == 5 and parts[4] == "thumb"
        if len(parts) != 4 and not thumb:
            return None
        host = self.server.hosts.get(unquote(parts[0]))
        module = host.modules.get(self.name) if host is not None else None
        if not isinstance(module, HttpUpload) or not hmac.compare_digest(module._sign("get", parts[1]), parts[2]):
            return None
        return module, parts[1], thumb

    async def preflight(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204, headers=CORS)

    async def get(self, request: web.Request) -> web.StreamResponse:
        found = self._slot_of(request)
        if found is None:
            return _error(404, "no such file")
        module, slot_id, thumb = found
        return await module.serve(request, slot_id, thumb)

    async def serve(self, request: web.Request, slot_id: str, thumb: bool) -> web.StreamResponse:
        slot = await self.server.storage.uploads.get(slot_id)
        if slot is None or slot.uploaded is None or self._expired(slot) or (thumb and slot.thumbnail is None):
            return _error(404, "no such file")
        path = self.blobs.open(f"{slot_id}.thumb" if thumb else slot_id)
        if path is None:
            return _error(404, "no such file")
        content_type = cast(str, slot.thumbnail) if thumb else _served_type(slot.content_type)
        inline = content_type in INLINE or content_type.startswith(INLINE_PREFIXES)
        headers = {
            **CORS,
            "Content-Type": content_type,
            "Content-Disposition": f"{'inline' if inline else 'attachment'}; filename*=UTF-8''"
                                   f"{quote(slot.filename, safe='')}",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, max-age=86400",
        }
        return web.FileResponse(path, chunk_size=CHUNK, headers=headers)

    def _expired(self, slot: Upload) -> bool:
        days = self.option("expire_days")
        return bool(days) and slot.uploaded is not None and slot.uploaded < _now() - timedelta(days=days)

    async def put(self, request: web.Request) -> web.StreamResponse:
        found = self._slot_of(request)
        if found is None or found[2]:
            return _error(403, "not an upload URL")
        module, slot_id, _ = found
        return await module.receive(request, slot_id)

    async def receive(self, request: web.Request, slot_id: str) -> web.StreamResponse:
        """The PUT of a slot's file: the URL's expiry and signature, the announced length and type, once."""
        expires = request.query.get("expires", "")
        token = request.query.get("token", "")
        if not expires.isdigit() or not hmac.compare_digest(self._sign("put", slot_id, int(expires)), token):
            return _error(403, "bad upload token")
        if int(expires) < time.time():
            return _error(403, "the upload URL has expired")
        uploads = self.server.storage.uploads
        slot = await uploads.get(slot_id)
        if slot is None:
            return _error(404, "no such slot")
        if slot.uploaded is not None or slot_id in self.uploading:
            return _error(409, "this slot has been used")
        if request.content_length is None:
            return _error(411, "Content-Length is required")
        if request.content_length != slot.size:
            return _error(400, f"Content-Length must be {slot.size}, the size the slot was requested for")
        sent_type = request.headers.get("Content-Type", "")
        if slot.content_type and sent_type.strip().lower() != slot.content_type.lower():
            return _error(415, f"Content-Type must be {slot.content_type}, the type the slot was requested for")
        self.uploading.add(slot_id)
        try:
            try:
                size = await self.blobs.put(slot_id, request.content.iter_chunked(CHUNK), slot.size)
            except TooLong:
                return _error(400, f"the body is longer than {slot.size} bytes")
            if size != slot.size:
                await self.blobs.delete(slot_id)
                return _error(400, f"the body has {size} bytes, not {slot.size}")
            try:
                size, thumbnail = await self._images(slot_id, slot)
            except media.BadImage as exc:
                await self._forget(slot_id)
                return _error(422, str(exc))
            if not await uploads.stored(slot_id, size, thumbnail, _now()):
                await self._delete_files(slot_id)
                return _error(409, "this slot has been used or has expired")
        finally:
            self.uploading.discard(slot_id)
        return web.Response(status=201, headers=CORS)

    async def _images(self, slot_id: str, slot: Upload) -> tuple[int, str | None]:
        """Strip an image's metadata and make its thumbnail; the stored size and the thumbnail's type."""
        path = self.blobs.open(slot_id)
        if path is None or _served_type(slot.content_type) not in media.FORMATS.values():
            return slot.size, None
        loop = asyncio.get_running_loop()
        done = await loop.run_in_executor(_IMAGES, media.process, path, self.option("strip_metadata"),
                                          self.option("thumbnail_size"), self.option("max_image_pixels"))
        if done is None:
            return slot.size, None
        size = slot.size
        if done.stripped is not None:
            size = await self.blobs.put(slot_id, _once(done.stripped), len(done.stripped))
        if done.thumbnail is not None:
            await self.blobs.put(f"{slot_id}.thumb", _once(done.thumbnail), len(done.thumbnail))
        return size, done.thumbnail_type

    # --- lifecycle --------------------------------------------------------------------------------------

    def _host_quota(self) -> int:
        """The host's option, or a tenant's upload quota (`server.tenants`) when that is smaller."""
        quotas = [q for q in (self.option("host_quota"), self.server.tenants.upload_quota(self.host.name)) if q]
        return min(quotas, default=0)

    async def _delete_files(self, slot_id: str) -> None:
        await self.blobs.delete(slot_id)
        await self.blobs.delete(f"{slot_id}.thumb")

    async def _forget(self, slot_id: str) -> None:
        await self.server.storage.uploads.remove(slot_id)
        await self._delete_files(slot_id)

    async def purge_user(self, user: str) -> int:
        """Delete every file of the user; how many slots there were."""
        ids = await self.server.storage.uploads.remove_user(self.host.name, user)
        for slot_id in ids:
            await self._delete_files(slot_id)
        return len(ids)

    async def cleanup(self) -> int:
        """Delete expired files, slots whose PUT never came, and files without a slot (their account was
        deleted, or the server stopped during an upload); how many files went."""
        days = self.option("expire_days")
        now = _now()
        ids = await self.server.storage.uploads.expire(
            self.host.name, now - timedelta(days=days) if days else None,
            now - timedelta(seconds=self.option("slot_timeout")), sorted(self.uploading))
        for slot_id in ids:
            await self._delete_files(slot_id)
        keys = self.blobs.keys()
        slots = sorted({key.split(".", 1)[0] for key in keys})
        known: set[str] = set()
        for start in range(0, len(slots), SWEEP_BATCH):
            known |= await self.server.storage.uploads.known(slots[start:start + SWEEP_BATCH])
        orphans = [key for key in keys if key.split(".", 1)[0] not in known]
        for key in orphans:
            await self.blobs.delete(key)
        return len(ids) + len(orphans)

    async def _cleanup_loop(self) -> None:
        while True:
            try:
                await self.cleanup()
            except Exception:
                self.log.exception("upload cleanup failed")
            await asyncio.sleep(self.option("cleanup_interval"))


async def _once(data: bytes) -> Any:
    yield data


# --- admin commands --------------------------------------------------------------------------------------

COMMANDS = Declarations()


@COMMANDS.command("upload-purge-user", "Delete a User's Uploaded Files", (Arg("accountjid", "jid", "The user's JID"),),
                  (Arg("files", "int", "Files deleted"),))
async def purge_user(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    jid: JID = args["accountjid"]
    if jid.domain != ctx.host.name or jid.local is None:
        raise CommandError(f"{jid} is not an account of {ctx.host.name}")
    return {"files": await module_on(ctx.host, HttpUpload).purge_user(jid.local)}


@COMMANDS.command("purge_uploads", "Delete a user's uploaded files", (Arg("user", "text", "Username"),
                  Arg("host", "text", "Server name")), (Arg("files", "int", "Files deleted"),), returns="integer")
async def purge_uploads(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """purge-user for parleyctl and the HTTP API, in ejabberd's shape (user, host)."""
    host = ctx.target(args["host"])
    return {"files": await module_on(host, HttpUpload).purge_user(args["user"])}


@COMMANDS.command("upload-usage", "Get Uploaded Files Usage", (),
                  (Arg("files", "int", "Files stored"), Arg("bytes", "int", "Bytes stored")))
async def usage(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    files = size = 0
    for host in ctx.hosts():
        if HttpUpload.name in host.modules:
            counted = await host.server.storage.uploads.usage(host.name)
            files, size = files + counted[0], size + counted[1]
    return {"files": files, "bytes": size}

