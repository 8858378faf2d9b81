"""Group chat fan-out: the time from one message's send to its receipt by the last of N room occupants.

    python -m bench.muc_fanout [--servers parley,prosody,ejabberd] [--occupants 1000] [--messages 20]
                               [--burst 50] [--no-archive] [--json FILE]

Each server runs in turn as a subprocess (bench.servers' configuration plus group chat: Parley's muc module,
Prosody's muc component with muc_mam, ejabberd's mod_muc with mod_mam and up to 2,000 occupants a room)
pinned to one core, and the N clients, one connection each, run in this process, on uvloop, pinned to the
other. One client creates the room - a
persistent one, so archived, as a team channel would be, unless --no-archive - and all join it; each then
reads raw bytes and only looks for the body of the next expected message, so client work stays small next
to the server's. The figures:

- `last_receipt_ms`: one message at a time, from its send to the moment the last occupant (the sender
  included) has read it, over `--messages` messages: median, p95, max;
- `median_receipt_ms`: the same messages, the median occupant's receipt;
- `burst_deliveries_per_s`: `--burst` messages sent back to back, N x burst deliveries over the time until
  the last occupant has read the last message.

Receipt times include the clients' own reading, so they are an upper bound on the server's part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

from bench.client import IQ, PRESENCE, Connection, LoginOptions, login
from bench.loadgen import percentile
from bench.procstat import CpuWindow, rss_kib
from bench.servers import BenchServer, Ejabberd, Parley, Profile, Prosody, ServerUnavailable

PASSWORD = "bench"
ROOM = "fanout"
SELF = "{http://jabber.org/protocol/muc#user}x/{http://jabber.org/protocol/muc#user}status[@code='110']"


class ParleyWithMuc(Parley):
    def _modules(self) -> list[str]:
        return [*super()._modules(), "muc"]


class ProsodyWithMuc(Prosody):
    """Prosody with its group chat component on conference.DOMAIN, archiving rooms with muc_mam."""

    archived = True

    async def setup(self, users: list[str], password: str, rosters: dict[str, list[str]]) -> None:
        await super().setup(users, password, rosters)
        mam = '\n  modules_enabled = { "muc_mam" }' if self.archived else ""
        with open(self.config_file, "a") as fh:
            fh.write(f'\nComponent "conference.{self.domain}" "muc"{mam}\n')


class EjabberdWithMuc(Ejabberd):
    """ejabberd with mod_muc (rooms of up to 2,000 occupants, the service's and each room's; its default is 200)
    and, archived, mod_mam."""

    archived = True

    async def setup(self, users: list[str], password: str, rosters: dict[str, list[str]]) -> None:
        await super().setup(users, password, rosters)
        mam = "  mod_mam: {}\n" if self.archived else ""
        with open(self.dir / "ejabberd.yml", "a") as fh:  # modules: is the template's last section
            fh.write(f"  mod_muc:\n    host: conference.{self.domain}\n    max_users: 2000\n"
                     f"    max_users_presence: 2000\n    default_room_options:\n      max_users: 2000\n"
                     f"      mam: {'true' if self.archived else 'false'}\n{mam}")


MUC_SERVERS: dict[str, type[BenchServer]] = {"parley": ParleyWithMuc, "prosody": ProsodyWithMuc,
                                             "ejabberd": EjabberdWithMuc}


class Occupant:
    """Reads raw bytes and notes when each expected message ('fanout-<k><') arrives."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.next = 0
        self.received: dict[int, float] = {}
        self.tail = b""

    def data(self, chunk: bytes) -> None:
        now = time.perf_counter()
        buf = self.tail + chunk
        start = 0
        while (at := buf.find(b"fanout-%d<" % self.next, start)) >= 0:
            self.received[self.next] = now
            self.next += 1
            start = at
        self.tail = buf[-24:]


class Room:
    def __init__(self, domain: str) -> None:
        self.jid = f"{ROOM}@conference.{domain}"
        self.occupants: list[Occupant] = []

    async def create(self, conn: Connection, nick: str, archived: bool) -> None:
        """The first occupant makes the room (an instant room), then configures it."""
        await self.join(conn, nick, raw=False)
        conn.on_element = None
        persistent = "1" if archived else "0"
        conn.send(f"<iq type='set' id='config' to='{self.jid}'><query xmlns='http://jabber.org/protocol/muc#owner'>"
                  "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
                  "<value>http://jabber.org/protocol/muc#roomconfig</value></field>"
                  "<field var='muc#roomconfig_persistentroom'>"
                  f"<value>{persistent}</value></field></x></query></iq>")
        result = await conn.expect(IQ, 30.0, "config")
        if result.get("type") != "result":
            raise RuntimeError("the room could not be configured")
        conn.on_raw = self.occupants[0].data

    async def join(self, conn: Connection, nick: str, timeout: float = 30.0, raw: bool = True) -> None:
        """Join and wait for the self-presence; from then on the connection is read raw (unless not `raw`)."""
        joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_element(el: Element) -> None:
            if el.tag != PRESENCE or joined.done():
                return
            if el.get("type") == "error":
                error = el.find("{jabber:client}error")
                reason = [child.tag.split("}")[-1] for child in error] if error is not None else []
                joined.set_exception(RuntimeError(f"{nick} could not join: {reason}"))
            elif el.find(SELF) is not None:
                joined.set_result(None)

        conn.on_element = on_element
        # The first creates the room (XEP-0045 10.1: locked until its owner submits the configuration, which
        # `create` does; Prosody makes no room for a presence without <x/>); the others ask for no history.
        x = "<x xmlns='http://jabber.org/protocol/muc'/>" if not self.occupants else \
            "<x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x>"
        conn.send(f"<presence to='{self.jid}/{nick}'>{x}</presence>")
        await asyncio.wait_for(joined, timeout)
        occupant = Occupant(conn)
        if raw:
            conn.on_raw = occupant.data
        self.occupants.append(occupant)

    async def all_received(self, k: int, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while any(o.next <= k for o in self.occupants):
            if time.perf_counter() > deadline:
                missing = sum(1 for o in self.occupants if o.next <= k)
                raise TimeoutError(f"message {k} did not reach {missing} occupants")
            await asyncio.sleep(0.001)


def send(conn: Connection, room: str, k: int) -> float:
    sent = time.perf_counter()
    conn.send(f"<message to='{room}' type='groupchat'><body>fanout-{k}</body></message>")
    return sent


async def measure(room: Room, messages: int, burst: int) -> dict[str, Any]:
    sender = room.occupants[0].conn
    last: list[float] = []
    median: list[float] = []
    for k in range(messages):
        sent = send(sender, room.jid, k)
        await room.all_received(k, 30.0)
        times = [o.received[k] - sent for o in room.occupants]
        last.append(max(times) * 1000)
        median.append(statistics.median(times) * 1000)
        await asyncio.sleep(0.05)
    first = messages
    started = time.perf_counter()
    for k in range(first, first + burst):
        send(sender, room.jid, k)
    await room.all_received(first + burst - 1, 120.0)
    elapsed = max(o.received[first + burst - 1] for o in room.occupants) - started
    return {
        "last_receipt_ms": {"p50": statistics.median(last), "p95": percentile(last, 0.95), "max": max(last)},
        "median_receipt_ms": statistics.median(median),
        "burst_deliveries_per_s": len(room.occupants) * burst / elapsed,
        "burst_seconds": elapsed,
    }


def pin(pid: int, cpu: int) -> None:
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), {cpu})


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every server in turn; a server that is not installed or fails is reported as such."""
    results: dict[str, Any] = {"load_average_before": os.getloadavg()[0], "servers": {}}
    for name in args.servers:
        try:
            results["servers"][name] = await asyncio.wait_for(run_one(name, args), args.time_limit)
        except ServerUnavailable as exc:
            results["servers"][name] = {"skipped": str(exc)}
        except (TimeoutError, RuntimeError, OSError) as exc:
            results["servers"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    results["load_average_after"] = os.getloadavg()[0]
    return results


async def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    users = [f"m{i}" for i in range(args.occupants)]
    # ejabberd's files belong to its own user, and its node may write its spool a moment after it stopped.
    with tempfile.TemporaryDirectory(prefix="parley-muc-bench-", ignore_cleanup_errors=True) as workdir:
        cls = MUC_SERVERS[name]
        address = args.address if name == "parley" else None
        server = cls(Path(workdir), Profile(), address, args.port)
        server.archived = not args.no_archive  # type: ignore[attr-defined]
        server.check()
        print(f"{name}: setting up {len(users)} accounts ...", file=sys.stderr, flush=True)
        await server.setup(users, PASSWORD, {})
        await server.start()
        try:
            if len(os.sched_getaffinity(0)) > 1:
                pin(server.pid, 0)
                pin(os.getpid(), 1)
            gate = asyncio.Semaphore(50)

            async def one(user: str) -> Connection:
                async with gate:
                    return await login(server.target, user, PASSWORD, "bench", LoginOptions(roster=False,
                                                                                               presence=False))
            conns = await asyncio.gather(*(one(u) for u in users))
            room = Room(server.domain)
            print(f"{name}: {len(conns)} logged in; joining ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            await room.create(conns[0], users[0], not args.no_archive)
            for conn, user in zip(conns[1:], users[1:], strict=True):
                await room.join(conn, user)
            join_seconds = time.perf_counter() - started
            print(f"{name}: {len(room.occupants)} joined in {join_seconds:.1f} s; measuring ...", file=sys.stderr,
                  flush=True)
            window = CpuWindow({"server": server.pid, "generator": os.getpid()})
            result = await measure(room, args.messages, args.burst)
            result["cpu_percent"] = window.percent()
            result |= {"occupants": len(room.occupants), "messages": args.messages, "burst": args.burst,
                       "archived": not args.no_archive, "join_seconds": join_seconds,
                       "server_rss_kib": rss_kib(server.pid)}
            if name != "parley":
                result["version"] = server.version()
            for conn in conns:
                conn.close()
            return result
        finally:
            await server.stop()


def table(results: dict[str, Any]) -> str:
    """The servers side by side, with Parley's ratio to each other: deliveries/s is messages/s x occupants."""
    rows = [("burst deliveries/s (msg/s x occupants)", lambda r: r["burst_deliveries_per_s"], True),
            ("last receipt p50 ms (lower better)", lambda r: r["last_receipt_ms"]["p50"], False),
            ("last receipt p95 ms (lower better)", lambda r: r["last_receipt_ms"]["p95"], False),
            ("median receipt ms (lower better)", lambda r: r["median_receipt_ms"], False),
            ("join of all occupants s (lower better)", lambda r: r["join_seconds"], False),
            ("server CPU %", lambda r: r["cpu_percent"]["server"], True),
            ("server RSS MiB", lambda r: r["server_rss_kib"] / 1024, False)]
    servers = results["servers"]
    ok = {n: r for n, r in servers.items() if "skipped" not in r and "error" not in r}
    others = [n for n in ok if n != "parley"] if "parley" in ok else []
    lines = [" | ".join(["metric", *servers, *(f"parley/{n}" for n in others)])]
    for label, get, _ in rows:
        cells = [f"{get(ok[n]):,.1f}" if n in ok else next(iter(servers[n].values())) for n in servers]
        ratios = [f"{get(ok['parley']) / get(ok[n]):.2f}" if get(ok[n]) else "-" for n in others]
        lines.append(" | ".join([label, *cells, *ratios]))
    lines.append(f"load average before {results['load_average_before']:.2f}, after {results['load_average_after']:.2f}")
    return "\n".join(lines)


def raise_fd_limit() -> None:
    """A thousand clients need more descriptors than the usual soft limit of 1,024."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.muc_fanout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=lambda text: [n for n in text.split(",") if n], default=["parley"],
                        help="comma-separated: parley,prosody,ejabberd (default parley)")
    parser.add_argument("--occupants", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=20, help="messages sent one at a time")
    parser.add_argument("--burst", type=int, default=50, help="messages sent back to back")
    parser.add_argument("--no-archive", action="store_true", help="a temporary room, which is not archived")
    parser.add_argument("--address", default="127.0.1.4", help="Parley's listen address (loopback); Prosody "
                        "and ejabberd listen on their bench.servers addresses")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds each server may take in all")
    parser.add_argument("--port", type=int, default=5222)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not args.address.startswith("127."):
        parser.error("loopback addresses only")
    unknown = [n for n in args.servers if n not in MUC_SERVERS]
    if unknown or not args.servers:
        parser.error(f"--servers: choose from {', '.join(MUC_SERVERS)}")
    raise_fd_limit()
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    print(table(result), file=sys.stderr)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
