"""Overload: more clients than the server has descriptors for. Who keeps serving the sessions it has?

    python -m bench.overload [--servers parley,prosody,ejabberd] [--fd-limit 1024] [--witnesses 100]
                             [--storm 1200] [--json FILE]

Each server runs with its descriptor limit capped at `--fd-limit` (soft and hard, so it cannot raise it),
as a default Debian install has it. First `--witnesses` clients log in and stay; then `--storm` more try
to log in, 100 at a time, and hold on to whatever they get. Afterwards every witness pings the server
(XEP-0199), the storm's connections are closed, and one more client logs in. A server passes when it is
still running, every witness is answered and the last login works: refusing the clients it cannot serve
is fine, failing the ones it already serves is not. Every wait is bounded, so a server that hangs costs
at most a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.client import IQ, Connection, LoginError, LoginOptions, login
from bench.muc_fanout import raise_fd_limit
from bench.servers import SERVERS, BenchServer, Profile, ServerUnavailable, fd_cap

PASSWORD = "bench-secret"
LOGIN = LoginOptions(roster=False, presence=True, timeout=20.0)
PING = "<iq type='get' id='{id}'><ping xmlns='urn:xmpp:ping'/></iq>"


async def try_login(server: BenchServer, user: str) -> Connection | None:
    try:
        return await login(server.target, user, PASSWORD, "overload", LOGIN)
    except (LoginError, OSError, TimeoutError):
        return None


async def answers_ping(conn: Connection, k: int) -> bool:
    conn.send(PING.format(id=f"ping-{k}"))
    try:
        result = await conn.expect(IQ, 10.0, f"ping-{k}")
    except (LoginError, OSError):
        return False
    return result.get("type") == "result"


async def storm(server: BenchServer, users: list[str]) -> list[Connection]:
    gate = asyncio.Semaphore(100)

    async def one(user: str) -> Connection | None:
        async with gate:
            return await try_login(server, user)

    return [c for c in await asyncio.gather(*(one(u) for u in users)) if c is not None]


async def run_server(server: BenchServer, args: argparse.Namespace) -> dict[str, Any]:
    witnesses = [f"w{i}" for i in range(args.witnesses)]
    stormers = [f"s{i}" for i in range(args.storm)]
    await server.setup([*witnesses, *stormers, "late"], PASSWORD, {})
    server.limit_fds = fd_cap(args.fd_limit)
    await server.start()
    try:
        held = [c for c in await asyncio.gather(*(try_login(server, u) for u in witnesses)) if c is not None]
        started = time.perf_counter()
        stormed = await storm(server, stormers)
        storm_seconds = time.perf_counter() - started
        alive_during = server.proc is not None and server.proc.poll() is None
        answered = sum(await asyncio.gather(*(answers_ping(c, k) for k, c in enumerate(held))))
        for conn in stormed:
            conn.close()
        await asyncio.sleep(2.0)
        late = await try_login(server, "late")
        late_ok = late is not None and await answers_ping(late, 0)
        alive = server.proc is not None and server.proc.poll() is None
        for conn in [*held, *([late] if late else [])]:
            conn.close()
        result = {
            "witnesses_logged_in": len(held), "storm_logged_in": len(stormed),
            "storm_refused": args.storm - len(stormed), "storm_seconds": storm_seconds,
            "witnesses_answered": answered, "alive_during_storm": alive_during, "alive_after": alive,
            "login_after_storm": late_ok,
        }
        result["passed"] = alive and answered == len(held) == args.witnesses and late_ok
        return result
    finally:
        await server.stop()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    results: dict[str, Any] = {"fd_limit": args.fd_limit, "witnesses": args.witnesses, "storm": args.storm,
                               "servers": {}}
    with tempfile.TemporaryDirectory(prefix="parley-overload-") as workdir:
        for name in args.servers.split(","):
            address, _, port = (args.address.get(name) or "").partition(":")
            server = SERVERS[name](Path(workdir), Profile(), address or None, int(port or 5222))
            print(f"{name}: {args.witnesses} witnesses, then a storm of {args.storm} logins under a "
                  f"{args.fd_limit}-descriptor limit ...", file=sys.stderr, flush=True)
            try:
                server.check()
                results["servers"][name] = await run_server(server, args)
            except ServerUnavailable as exc:
                results["servers"][name] = {"skipped": str(exc)}
    return results


def table(results: dict[str, Any]) -> str:
    rows = [("witnesses_logged_in", "witnesses logged in"), ("storm_logged_in", "storm logins accepted"),
            ("storm_refused", "storm logins refused"), ("witnesses_answered", "witnesses answered after"),
            ("alive_after", "server still running"), ("login_after_storm", "a login after the storm works"),
            ("passed", "kept serving its sessions")]
    names = list(results["servers"])
    lines = [f"{'':32}" + "".join(f"{n:>12}" for n in names)]
    for key, label in rows:
        cells = []
        for name in names:
            figures = results["servers"][name]
            cells.append("skipped" if "skipped" in figures else str(figures[key]).lower())
        lines.append(f"{label:32}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def address(value: str) -> tuple[str, str]:
    name, _, where = value.partition("=")
    if name not in SERVERS or not where:
        raise argparse.ArgumentTypeError("use SERVER=ADDRESS:PORT")
    return name, where


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default="parley,prosody,ejabberd")
    parser.add_argument("--fd-limit", type=int, default=1024)
    parser.add_argument("--witnesses", type=int, default=100)
    parser.add_argument("--storm", type=int, default=1200)
    parser.add_argument("--address", type=address, action="append", default=[],
                        help="SERVER=ADDRESS:PORT (loopback), repeatable")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.address = dict(args.address)
    results = asyncio.run(main_async(args))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
