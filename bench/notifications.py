"""Missed-message notifications: how fast digests go out, and what the hooks cost on the message path.

    python -m bench.notifications [--users 1000] [--messages 900] [--throughput quick|smoke|off] [--rounds 1]
                                  [--json FILE]

Parley runs in this process on SQLite, with an aiosmtpd server on loopback as its mail server.

- `digests`: `--users` accounts opted in (address confirmed), each with messages waiting in three
  conversations; the time from the first look at the outbox until aiosmtpd has accepted every digest
  (prepared from the stored counts, rendered, one SMTP session each, marked sent): digests per second.
- `offline`: one sender on a socket sends `--messages` chat messages to an account that is offline, as fast
  as the server takes them; the time until offline storage holds all of them, three times: without the
  module, with the module and the recipient not opted in, and opted in (each message then also counts for
  a digest). The difference is what the notification hooks cost on the 1:1 path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from bench.client import LoginOptions, Target, login
from bench.servers import Parley, Profile

PASSWORD = "bench-password"
DEADLINE = 120.0  # seconds a phase may take before the run fails


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Counter:
    """aiosmtpd's handler: counts what it accepted (it runs in a thread of its own)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.count += 1
        return "250 OK"


async def start(workdir: Path, smtp_port: int, with_module: bool) -> Any:
    from parley import build_server
    from server.config import DEFAULT_MODULES, parse_config
    from server.registry import available

    port = free_port()
    modules = [*DEFAULT_MODULES, "notifications"] if with_module else list(DEFAULT_MODULES)
    options = {"notifications": {"smtp_host": "127.0.0.1", "smtp_port": smtp_port, "smtp_tls": "none", "tick": 0.05,
                                 "user_per_hour": 1000, "host_per_hour": 1_000_000}} if with_module else {}
    config = parse_config({
        "data_dir": str(workdir), "storage": {"url": f"sqlite+aiosqlite:///{workdir}/parley.db"},
        "listeners": [{"type": "c2s", "address": "127.0.0.1", "port": port, "tls": "starttls"}],
        "hosts": {"localhost": {}}, "modules": modules,
        "module_options": options,
    }, known_modules=available())
    server = build_server(config)
    await server.start()
    return server, port


async def opt_in(server: Any, users: list[str]) -> None:
    from extensions.notifications.preferences import Preferences

    module = server.hosts["localhost"].modules["notifications"]
    for user in users:
        await module.prefs.set("localhost", user, Preferences(f"{user}@example.org", True).document())


async def add_users(server: Any, users: list[str]) -> None:
    from server.accounts import create_account

    for user in users:
        await create_account(server.storage, "localhost", user, PASSWORD, server.config.scram_iterations)


async def digests(workdir: Path, users: int) -> dict[str, Any]:
    counter = Counter()
    smtp_port = free_port()
    controller = Controller(counter, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        server, _ = await start(workdir, smtp_port, True)
        try:
            module = server.hosts["localhost"].modules["notifications"]
            names = [f"u{i}" for i in range(users)]
            await opt_in(server, names)
            store = server.storage.notifications
            now = datetime.now(UTC)
            for name in names:
                for contact in ("bob", "carol", "dave"):
                    await store.note("localhost", name, f"{contact}@localhost", f"{contact}@localhost", now)
            began = time.perf_counter()
            while counter.count < users:
                await module.run_once()
                if time.perf_counter() - began > DEADLINE:
                    raise RuntimeError(f"only {counter.count} of {users} digests arrived in {DEADLINE} s")
            elapsed = time.perf_counter() - began
        finally:
            await server.stop()
    finally:
        controller.stop()
    return {"users": users, "seconds": round(elapsed, 3), "digests_per_second": round(users / elapsed, 1)}


async def offline(workdir: Path, messages: int, mode: str) -> dict[str, Any]:
    server, port = await start(workdir, free_port(), mode != "without module")
    try:
        await add_users(server, ["alice", "bob"])
        if mode == "opted in":
            await opt_in(server, ["alice"])
        conn = await login(Target("127.0.0.1", port, "localhost"), "bob", PASSWORD, "bench",
                           LoginOptions(starttls=True, roster=False, presence=False))
        began = time.perf_counter()
        conn.send_many([f"<message type='chat' to='alice@localhost' id='m{i}'><body>message {i}</body></message>"
                        for i in range(messages)])
        while await server.storage.offline.count("localhost", "alice") < messages:
            await asyncio.sleep(0.01)
            if time.perf_counter() - began > DEADLINE:
                raise RuntimeError(f"offline storage did not get {messages} messages in {DEADLINE} s")
        elapsed = time.perf_counter() - began
        conn.close()
        if mode == "opted in":
            waiting = await server.storage.notifications.waiting("localhost", "alice")
            assert waiting and waiting[0].count == messages, waiting
    finally:
        await server.stop()
    return {"mode": mode, "messages": messages, "seconds": round(elapsed, 3),
            "messages_per_second": round(messages / elapsed, 1)}


THROUGHPUT_MODES = ("without module", "not opted in", "opted in")


class ParleyNotifying(Parley):
    """bench.run's Parley with the notifications module, and its throughput users opted in or not."""

    def __init__(self, workdir: Path, mode: str, port: int) -> None:
        super().__init__(workdir, Profile(), "127.0.0.1", port)
        self.http_port = free_port()
        self.mode = mode

    def _modules(self) -> list[str]:
        return [*super()._modules(), *(["notifications"] if self.mode != "without module" else [])]

    def _write_config(self) -> None:
        super()._write_config()
        if self.mode != "without module":
            with open(self.config_file, "a") as fh:
                fh.write(f'\n[module_options.notifications]\nsmtp_host = "127.0.0.1"\nsmtp_port = {free_port()}\n'
                         'smtp_tls = "none"\n')

    async def setup(self, users: list[str], password: str, rosters: dict[str, list[str]]) -> None:
        await super().setup(users, password, rosters)
        if self.mode != "opted in":
            return
        from extensions.notifications.preferences import Preferences
        from server.config import load_config
        from server.registry import available
        from server.storage import open_storage

        storage = await open_storage(load_config(self.config_file, known_modules=available()).storage.url)
        try:
            for user in users:
                await storage.kv.set(self.domain, user, "notifications", "",
                                     Preferences(f"{user}@example.org", True).document())
        finally:
            await storage.close()


async def throughput(workdir: Path, size_name: str, rounds: int) -> list[dict[str, Any]]:
    """bench.run's throughput scenario against Parley in each mode, the modes taking turns for `rounds` rounds
    (on a shared machine a lull or a burst then falls on every mode). The server's CPU time per message is
    the steadier figure when the machine is busy: messages per second follow whatever else runs."""
    from bench.run import SIZES, bench_server

    rows = []
    for round_ in range(rounds):
        for mode in THROUGHPUT_MODES:
            server = ParleyNotifying(workdir / f"{round_}-{mode.replace(' ', '-')}", mode, free_port())
            report = await bench_server(server, ["throughput"], SIZES[size_name], pin=False)
            result = report.get("scenarios", {}).get("throughput", {})
            if "skipped" in report or "error" in result:
                raise RuntimeError(f"throughput ({mode}): {report.get('skipped') or result.get('error')}")
            rate, cpu = result["metrics"]["messages_per_s"], result.get("cpu", {})
            rows.append({
                "mode": mode, "size": size_name, "round": round_, "messages_per_second": round(rate, 1),
                "latency_p50_ms": round(result["metrics"]["latency_p50_ms"], 2),
                "latency_p99_ms": round(result["metrics"]["latency_p99_ms"], 2),
                "server_cpu_percent": cpu.get("server"), "generator_cpu_percent": cpu.get("generator"),
                "server_cpu_us_per_message": round(cpu["server"] / 100 / rate * 1e6, 2) if cpu.get("server") else None,
            })
    return rows


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as workdir:
        result["digests"] = await digests(Path(workdir) / "digests", args.users)
    result["offline"] = []
    for mode in ("without module", "not opted in", "opted in"):
        with tempfile.TemporaryDirectory() as workdir:
            result["offline"].append(await offline(Path(workdir), args.messages, mode))
    if args.throughput != "off":
        with tempfile.TemporaryDirectory() as workdir:
            result["throughput"] = await throughput(Path(workdir), args.throughput, args.rounds)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=900, help="at most the offline quota (1000 by default)")
    parser.add_argument("--throughput", choices=["quick", "smoke", "off"], default="quick",
                        help="bench.run's size of the 1:1 throughput phase (off: skip it)")
    parser.add_argument("--rounds", type=int, default=1, help="turns of the three throughput modes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    d = result["digests"]
    print(f"digests: {d['users']} in {d['seconds']} s, {d['digests_per_second']}/s")
    for row in result["offline"]:
        print(f"offline 1:1 ({row['mode']}): {row['messages']} in {row['seconds']} s, {row['messages_per_second']}/s")
    for row in result.get("throughput", ()):
        print(f"throughput 1:1 online ({row['mode']}, {row['size']}, round {row['round']}): "
              f"{row['messages_per_second']} messages/s, p50 {row['latency_p50_ms']} ms, "
              f"p99 {row['latency_p99_ms']} ms, "
              f"server CPU {row['server_cpu_percent']}% ({row['server_cpu_us_per_message']} us/message), "
              f"generator CPU {row['generator_cpu_percent']}%")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
