"""HTTP File Upload (XEP-0363): 20 parallel 50 MB uploads, then their 20 downloads, on Parley and on Prosody's
mod_http_file_share in the same run; MB/s of each phase and the server's peak RSS (sampled every 20 ms).

Slots are requested over XMPP with slixmpp's XEP-0363 plugin, files go over HTTP with aiohttp from memory
(one shared 1 MB block, so the generator's own memory stays flat), on loopback.

    .venv/bin/python -m bench.upload [--files 20] [--mb 50] [--servers parley prosody]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from slixmpp import ClientXMPP

from bench.client import insecure_tls
from bench.procstat import rss_kib
from bench.servers import BenchServer, Parley, Profile, Prosody, ServerUnavailable

PASSWORD = "bench"
USER = "uploader"
BLOCK = os.urandom(1 << 20)


class ParleyWithUpload(Parley):
    http_port = 5281

    def _modules(self) -> list[str]:
        return [*super()._modules(), "http_upload"]

    def _write_config(self) -> None:
        super()._write_config()
        text = self.config_file.read_text().replace(f'[hosts."{self.domain}"]', f"""\
[[listeners]]
type = "http"
address = "{self.address}"
port = {self.http_port}

[module_options.http_upload]
max_file_size = {1 << 30}
user_quota = 0
thumbnail_size = 0

[hosts."{self.domain}"]""")
        self.config_file.write_text(text)


class ProsodyWithUpload(Prosody):
    http_port = 5281

    async def setup(self, users: list[str], password: str, rosters: dict[str, list[str]]) -> None:
        await super().setup(users, password, rosters)
        text = self.config_file.read_text().replace("http_ports = {}", f"""http_ports = {{ {self.http_port} }}
http_interfaces = {{ "{self.address}" }}
http_external_url = "http://{self.address}:{self.http_port}/"
""")
        self.config_file.write_text(text + f"""
Component "upload.{self.domain}" "http_file_share"
  http_host = "{self.address}"
  http_file_share_size_limit = {1 << 30}
  http_file_share_daily_quota = {64 << 30}
""")


async def _client(server: BenchServer) -> ClientXMPP:
    client = ClientXMPP(f"{USER}@{server.domain}/bench", PASSWORD)
    client.ssl_context = insecure_tls()
    client.register_plugin("xep_0030")
    client.register_plugin("xep_0363")
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    client.add_event_handler("session_start", lambda _: started.done() or started.set_result(None))
    client.connect(server.address, server.port)
    await asyncio.wait_for(started, 30)
    return client


async def _body(mb: int) -> AsyncIterator[bytes]:
    for _ in range(mb):
        yield BLOCK


class Peak:
    """The largest RSS of a process while it runs (sampled)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.kib, self._task = pid, rss_kib(pid), asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.kib = max(self.kib, rss_kib(self.pid))
            await asyncio.sleep(0.02)

    async def stop(self) -> float:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return round(self.kib / 1024, 1)


async def measure(server: BenchServer, files: int, mb: int) -> dict[str, Any]:
    client = await _client(server)
    try:
        service = f"upload.{server.domain}"
        slots = []
        for i in range(files):
            iq = await client.plugin["xep_0363"].request_slot(service, f"f{i}.bin", mb << 20,
                                                              "application/octet-stream")
            slots.append((iq["http_upload_slot"]["put"], iq["http_upload_slot"]["get"]["url"]))
    finally:
        client.disconnect()
    idle = round(rss_kib(server.pid) / 1024, 1)
    result: dict[str, Any] = {"idle_rss_mb": idle}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        async def put(slot: Any) -> None:
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(mb << 20),
                       **{h["name"]: h["value"] for h in slot["headers"]}}
            async with http.put(slot["url"], data=_body(mb), headers=headers) as response:
                if response.status >= 300:
                    raise RuntimeError(f"PUT {response.status}: {await response.text()}")

        async def get(url: str) -> None:
            received = 0
            async with http.get(url) as response:
                async for chunk in response.content.iter_chunked(1 << 20):
                    received += len(chunk)
            if received != mb << 20:
                raise RuntimeError(f"GET gave {received} bytes")

        for phase, work in (("upload", [put(s) for s, _ in slots]), ("download", [get(u) for _, u in slots])):
            peak = Peak(server.pid)
            started = time.perf_counter()
            await asyncio.gather(*work)
            seconds = time.perf_counter() - started
            result[f"{phase}_mb_s"] = round(files * mb / seconds, 1)
            result[f"{phase}_peak_rss_mb"] = await peak.stop()
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"files": args.files, "mb_each": args.mb}
    with tempfile.TemporaryDirectory(prefix="parley-upload-bench-") as workdir:
        for cls in (ParleyWithUpload, ProsodyWithUpload):
            if cls.name not in args.servers:
                continue
            server = cls(Path(workdir), Profile())
            try:
                server.check()
                await server.setup([USER], PASSWORD, {})
                await server.start()
            except ServerUnavailable as exc:
                results[server.name] = {"unavailable": str(exc)}
                continue
            try:
                print(f"{server.name}: {args.files} x {args.mb} MB ...", file=sys.stderr, flush=True)
                results[server.name] = await measure(server, args.files, args.mb)
            finally:
                await server.stop()
    parley, prosody = results.get("parley", {}), results.get("prosody", {})
    if "upload_mb_s" in parley and "upload_mb_s" in prosody:
        results["ratios_parley_to_prosody"] = {
            key: round(parley[key] / prosody[key], 2) for key in parley if prosody.get(key)}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--servers", nargs="+", default=["parley", "prosody"], choices=["parley", "prosody"])
    print(json.dumps(asyncio.run(run(parser.parse_args(argv))), indent=2))


if __name__ == "__main__":
    main()
