"""Where Parley's resident memory goes: by import, and by phase of a SCRAM+TLS login storm.

    .venv/bin/python -m bench.memory [--clients 50] [--seconds 5]

Two measurements, each in fresh processes:

* imports: VmRSS of a new interpreter after importing, one after another, each large dependency and then
  `parley` (what is left for Parley's own modules), in the order `parley serve` meets them;
* phases: `parley serve` with the benchmark's configuration (bench.servers.Parley, minimal profile, its
  http listener included) at rest after start, after one login, at the peak of a storm of `--clients`
  clients logging in over and over (SCRAM-SHA-1 over STARTTLS, or `--plain`; sampled every 20 ms), at its
  end and 2 s after, with its thread count.

It judges nothing: it prints the figures that docs/benchmarks.md's memory section quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.client import LoginOptions, login
from bench.procstat import rss_kib
from bench.run import PASSWORD, SIZES, _loadgen, _time_limit
from bench.servers import REPO, Parley, Profile

# In the order `parley serve` imports them (aiohttp for the benchmark's http listener); each line's growth is
# what that import adds to the ones before. Then, for reference, what it no longer imports: the `cryptography`
# package (needed only to generate a certificate) and SQLAlchemy's asyncio package with the ORM.
IMPORTS = ("asyncio", "uvloop", "sqlalchemy", "sqlalchemy.dialects.sqlite", "aiosqlite", "server.storage",
           "server.server", "parley", "aiohttp.web")
AVOIDED = ("cryptography.x509", "sqlalchemy.ext.asyncio")

_IMPORT_PROBE = """\
import importlib, json, sys
def rss():
    with open('/proc/self/status') as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith('VmRSS'))
rows = [('interpreter', rss())]
for name in sys.argv[1:]:
    importlib.import_module(name)
    rows.append((name, rss()))
print(json.dumps(rows))
"""


def imports() -> list[tuple[str, int, int]]:
    """(module, KiB it added, KiB in all) for each of IMPORTS and AVOIDED, in a new interpreter."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *IMPORTS, *AVOIDED], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    rows = json.loads(out)
    return [(name, total - (rows[i - 1][1] if i else 0), total) for i, (name, total) in enumerate(rows)]


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("Threads"))


async def phases(clients: int, seconds: float, address: str, plain: bool) -> dict[str, Any]:
    """RSS (KiB) and threads of `parley serve` at each phase of a login storm."""
    size = {**SIZES["quick"], "clients": clients, "duration": seconds}
    with tempfile.TemporaryDirectory(prefix="parley-memory-") as workdir:
        server = Parley(Path(workdir), Profile(archive=False, full=False, storage="default"),
                        address)
        await server.setup([f"u{i}" for i in range(clients)], PASSWORD, {})
        await server.start()
        try:
            pid = server.pid
            found: dict[str, Any] = {"at rest after start": (rss_kib(pid), _threads(pid))}
            options = LoginOptions(mechanism="PLAIN" if plain else "SCRAM-SHA-1", starttls=not plain)
            conn = await login(server.target, "u0", PASSWORD, "first", options)
            conn.close()
            await asyncio.sleep(0.5)
            found["after one login"] = (rss_kib(pid), _threads(pid))
            peak = [0, 0]
            spec = {**size, "kind": "login", "mechanism": options.mechanism, "starttls": options.starttls,
                    "password": PASSWORD, "server_pid": pid, "time_limit": _time_limit("login", size),
                    "bosh_url": None, "bosh_pairs": 0,
                    "target": {"address": server.address, "port": server.port, "domain": server.domain,
                               "http_port": server.http_port, "ws_path": server.ws_path}}
            storm = asyncio.ensure_future(_loadgen(spec, None))
            while not storm.done():
                peak = [max(peak[0], rss_kib(pid)), max(peak[1], _threads(pid))]
                await asyncio.sleep(0.02)
            result = storm.result()
            found["storm peak"] = tuple(peak)
            found["storm end (bench.run's figure)"] = (result.get("server_rss_kib", 0), _threads(pid))
            await asyncio.sleep(2)
            found["2 s after the storm"] = (rss_kib(pid), _threads(pid))
            found["logins/s"] = result.get("metrics", {}).get("logins_per_s")
            return found
        finally:
            await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the measured storm")
    parser.add_argument("--address", default="127.0.7.4", help="loopback address for the server (port 5222)")
    parser.add_argument("--plain", action="store_true", help="PLAIN without TLS (PBKDF2 in the server's threads)")
    args = parser.parse_args(argv)
    print("import                                    adds MiB  total MiB")
    for name, added, total in imports():
        label = f"({name}: not imported)" if name in AVOIDED else name
        print(f"{label:40s} {added / 1024:9.1f} {total / 1024:10.1f}")
    started = time.monotonic()
    found = asyncio.run(phases(args.clients, args.seconds, args.address, args.plain))
    rate = found.pop("logins/s")
    login_kind = "PLAIN" if args.plain else "SCRAM-SHA-1 + STARTTLS"
    print(f"\nphase (parley serve, {args.clients} clients, {login_kind})".ljust(53) + "RSS MiB  threads")
    for phase, (kib, threads) in found.items():
        print(f"{phase:52s} {kib / 1024:8.1f} {threads:8d}")
    print(f"storm: {rate or 0:.0f} logins/s; {time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
