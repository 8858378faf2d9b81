"""Parley as a cluster of 1, 2 and 3 nodes on this machine: what a second and a third node cost and bring.

    .venv/bin/python -m bench.cluster [--quick | --smoke] [--nodes 1,2,3] [--redis URL] [--starttls] [--json FILE]
    .venv/bin/python -m bench.run --servers parley --scenarios cluster [--quick]     (the same, run from there)

Each node is `parley serve --node nK` with one worker, listening on its own loopback address 127.0.2.K. The
nodes share one Redis (a private `redis-server` started for the run, so that its counters and CPU time are the
cluster's alone, unless --redis names another; either way under a key prefix of the run's own) and one
PostgreSQL schema made for the run and dropped after it (SQLite is refused for nodes). The clients run in
this process on uvloop, with bench.client's raw client. Each phase starts its nodes afresh:

- for 1, 2 and 3 nodes, login: C clients log in over and over (stream, PLAIN over plain TCP, bind, roster,
  presence, close), each time to a node picked at random: logins/s, the nodes' CPU time and Redis commands
  per login;
- then, on the same nodes, throughput: P pairs of users, each user on a node picked at random (so about
  (k-1)/k of the pairs cross nodes), each sender keeping W messages in flight: messages/s, latency, and the
  CPU time of all nodes per delivered message (from /proc: on 2 shared cores messages/s hits the ceiling
  early, CPU per message still shows what crossing nodes costs); and what Redis did for it: publications,
  bytes in and out and its own CPU time per cross-node message. With 2 nodes again with every pair crossing,
  and with 1 and 2 nodes at one message in flight per pair (small batches, as on a node that is not busy);
- remote sessions (2 nodes): node A holds L sessions while node B goes through 0 -> R1 -> R2 ... sessions; A's
  RSS at each step is what sessions elsewhere in the cluster cost every node (bytes per remote session);
  --starttls logs these sessions in over STARTTLS;
- archive (1 node, the mam module on): the throughput load with all users on the node; archive rows committed
  per second in PostgreSQL, rows per message, bytes per row (table and indexes), CPU and WAL per row;
- Redis alone: what a publication and a frame cost Redis, in batches of several shapes.

Results go to bench/results/cluster.json as well. Every phase is bounded in time and in count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.client import Connection, LoginError, LoginOptions, bare, login
from bench.loadgen import Pair, percentile
from bench.procstat import CpuWindow, children, cpu_seconds, rss_kib
from bench.servers import SCRAM_ITERATIONS, Parley, Profile, ServerUnavailable

PASSWORD = "bench-secret"
DOMAIN = "cluster.bench"
POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
RESULTS = Path(__file__).resolve().parent / "results" / "cluster.json"
QUIET_CPU = 20.0  # percent of a core under which a node counts as done with what it was told
PHASE_LIMIT = 120.0  # seconds a phase may take before it is abandoned

SIZES: dict[str, dict[str, Any]] = {
    "full": {"nodes": [1, 2, 3], "clients": 50, "login_warmup": 1.0, "login_duration": 10.0, "pairs": 50,
             "window": 20, "warmup": 2.0, "duration": 10.0, "local": 200, "remote": [0, 1000, 2000, 4000],
             "settle": 2.0, "archive_duration": 10.0, "redis_frames": 300_000},
    "quick": {"nodes": [1, 2, 3], "clients": 50, "login_warmup": 0.5, "login_duration": 3.0, "pairs": 50,
              "window": 20, "warmup": 1.0, "duration": 4.0, "local": 200, "remote": [0, 500, 1000],
              "settle": 1.0, "archive_duration": 4.0, "redis_frames": 100_000},
    "smoke": {"nodes": [1, 2], "clients": 4, "login_warmup": 0.2, "login_duration": 0.5, "pairs": 4,
              "window": 5, "warmup": 0.3, "duration": 1.0, "local": 10, "remote": [0, 20, 40], "settle": 0.3,
              "archive_duration": 1.0, "redis_frames": 2_000},
}


class ClusterNode(Parley):
    """One node: `parley serve --node NAME` (a supervisor and one worker) on its own loopback address, on the
    cluster's PostgreSQL schema and Redis prefix."""

    web = False  # one c2s listener is all the phases use

    def __init__(self, workdir: Path, profile: Profile, index: int, storage_url: str, redis_url: str,
                 prefix: str) -> None:
        address = f"127.0.2.{index}"
        super().__init__(workdir, profile, address, free_port(address))
        self.node = f"n{index}"
        self.name = f"parley-{self.node}"
        self.domain = DOMAIN
        self.dir = workdir / self.node
        self._log = self.dir / "stdout.log"
        self.storage_url = storage_url
        self.redis_url = redis_url
        self.prefix = prefix

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_config()

    def _write_config(self) -> None:
        super()._write_config()
        with open(self.config_file, "a") as fh:
            fh.write(f'\n[storage]\nurl = "{self.storage_url}"\n\n'
                     f'[cluster]\nredis_url = "{self.redis_url}"\nprefix = "{self.prefix}"\n')

    def command(self) -> list[str]:
        return [*super().command(), "--node", self.node]

    @property
    def worker_pid(self) -> int:
        """The node's worker process (the supervisor's only child): the one whose memory holds the sessions."""
        found = children(self.pid)
        if not found:
            raise ServerUnavailable(f"{self.name} has no worker process; see {self._log}")
        return found[0]


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class RedisUnderTest:
    """The cluster's Redis: a private redis-server of this run (its counters and CPU are the cluster's alone),
    or a given one (shared: its counters include whatever else uses it)."""

    def __init__(self, workdir: Path, url: str | None) -> None:
        self.private = url is None
        self.port = free_port("127.0.0.1") if url is None else 0
        self.url = url or f"redis://127.0.0.1:{self.port}/0"
        self.dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: Any = None
        self.pid = 0

    async def start(self) -> None:
        import redis.asyncio as aioredis

        if self.private:
            if shutil.which("redis-server") is None:
                raise ServerUnavailable("redis-server is not installed (or pass --redis URL)")
            self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        self.client = aioredis.from_url(self.url, protocol=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                await self.client.ping()
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise ServerUnavailable(f"no Redis at {self.url}: {exc}") from None
                await asyncio.sleep(0.1)
        self.pid = int((await self.client.info("server"))["process_id"])

    async def counters(self) -> dict[str, float]:
        """Publications, bytes in and out, and CPU seconds of the Redis process, so far."""
        stats = await self.client.info("stats")
        commands = await self.client.info("commandstats")
        try:
            cpu = cpu_seconds(self.pid)
        except OSError:
            cpu = float("nan")  # a Redis elsewhere
        return {"publications": commands.get("cmdstat_publish", {}).get("calls", 0),
                "commands": stats["total_commands_processed"],
                "bytes_in": stats["total_net_input_bytes"], "bytes_out": stats["total_net_output_bytes"],
                "cpu_s": cpu}

    async def members(self, prefix: str) -> int:
        return len(await self.client.smembers(f"{prefix}:members"))

    async def sessions(self, prefix: str, member: str) -> int:
        return int(await self.client.hlen(f"{prefix}:sessions:{member}"))

    async def stop(self, prefixes: list[str]) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                for prefix in prefixes:
                    keys = [key async for key in self.client.scan_iter(f"{prefix}:*")]
                    if keys:
                        await self.client.delete(*keys)
            await self.client.aclose()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class Run:
    """What every phase gets: where things are, the sizes, and the failures so far."""

    workdir: Path
    size: dict[str, Any]
    redis: RedisUnderTest
    storage_url: str
    schema: str
    rng: random.Random
    starttls: bool = False  # the remote-sessions phase's sessions over STARTTLS (their memory with TLS)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)  # of every phase's nodes, whose keys are deleted at the end

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        if len(self.first_errors) < 3:
            self.first_errors.append(f"{type(exc).__name__}: {exc}")

    def nodes(self, count: int, phase: str, profile: Profile | None = None) -> list[ClusterNode]:
        """`count` new nodes under a Redis prefix of their own (no member of an earlier phase lingers)."""
        prefix = f"parley-bench-cluster-{uuid.uuid4().hex[:8]}-{phase}"
        self.prefixes.append(prefix)
        return [ClusterNode(self.workdir / phase, profile or Profile(), k, self.storage_url, self.redis.url, prefix)
                for k in range(1, count + 1)]


async def start_nodes(run: Run, nodes: list[ClusterNode]) -> None:
    """All at once (each member announces itself before it reads the others, so of two starting together the
    later reader finds the earlier and tells it), then until Redis lists them all."""
    for node in nodes:
        node.prepare()
    started = await asyncio.gather(*(node.start() for node in nodes), return_exceptions=True)
    for outcome in started:
        if isinstance(outcome, BaseException):
            raise outcome
    deadline = time.monotonic() + 20
    while await run.redis.members(nodes[0].prefix) < len(nodes):
        if time.monotonic() > deadline:
            raise ServerUnavailable(f"only {await run.redis.members(nodes[0].prefix)} of {len(nodes)} members live")
        await asyncio.sleep(0.1)


async def stop_nodes(nodes: list[ClusterNode]) -> None:
    await asyncio.gather(*(node.stop() for node in nodes), return_exceptions=True)


async def quiet(nodes: list[ClusterNode], timeout: float = 20.0) -> None:
    """Until every node is idle: what the clients did has been told to the others and handled there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        window = CpuWindow({node.node: node.pid for node in nodes})
        await asyncio.sleep(0.5)
        if max(window.percent().values()) < QUIET_CPU:
            return


class Cpu:
    """CPU seconds of the nodes (supervisor and worker) and of this process (the clients) over a window."""

    def __init__(self, nodes: list[ClusterNode]) -> None:
        self.nodes = nodes
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        values = {node.node: cpu_seconds(node.pid) for node in self.nodes}
        values["generator"] = time.process_time()
        values["wall"] = time.monotonic()
        return values

    def spent(self) -> dict[str, float]:
        now = self._read()
        return {name: now[name] - self._start[name] for name in now}


async def login_many(run: Run, users: list[tuple[str, ClusterNode]], options: LoginOptions,
                     concurrency: int = 50, resource: str = "bench") -> list[Connection]:
    gate = asyncio.Semaphore(concurrency)

    async def one(user: str, node: ClusterNode) -> Connection | None:
        async with gate:
            try:
                conn = await login(node.target, user, PASSWORD, resource, options)
            except (LoginError, OSError) as exc:
                run.failed(exc)
                return None
            conn.on_raw = _ignore
            return conn

    conns = await asyncio.gather(*(one(user, node) for user, node in users))
    return [conn for conn in conns if conn is not None]


def _ignore(data: bytes) -> None:
    """Idle sessions only have to keep reading."""


# --- phases -----------------------------------------------------------------------------------------------


async def login_phase(run: Run, nodes: list[ClusterNode]) -> dict[str, Any]:
    """C clients logging in over and over, each time to a node picked at random."""
    size = run.size
    state = {"measuring": False, "stop": False, "count": 0}
    times: list[float] = []

    async def client(i: int) -> None:
        n = 0
        while not state["stop"]:
            node = run.rng.choice(nodes)
            started = time.perf_counter()
            try:
                conn = await login(node.target, f"u{i}", PASSWORD, f"w{n}", LoginOptions())
            except (LoginError, OSError) as exc:
                run.failed(exc)
                await asyncio.sleep(0.1)
                continue
            conn.close()
            n += 1
            if state["measuring"]:
                state["count"] += 1
                times.append(time.perf_counter() - started)

    tasks = [asyncio.create_task(client(i)) for i in range(size["clients"])]
    await asyncio.sleep(size["login_warmup"])
    before = await run.redis.counters()
    cpu = Cpu(nodes)
    state["measuring"] = True
    await asyncio.sleep(size["login_duration"])
    state["measuring"] = False
    spent = cpu.spent()
    after = await run.redis.counters()
    state["stop"] = True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    for task in tasks:
        task.cancel()
    node_cpu = sum(spent[node.node] for node in nodes)
    p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
    logins = state["count"]
    return {
        "logins_per_s": state["count"] / spent["wall"],
        "login_p50_ms": p50 * 1000 if p50 is not None else None,
        "login_p99_ms": p99 * 1000 if p99 is not None else None,
        "node_cpu_ms_per_login": 1000 * node_cpu / state["count"] if state["count"] else None,
        "node_cpu_percent": 100 * node_cpu / spent["wall"],
        "generator_cpu_percent": 100 * spent["generator"] / spent["wall"],
        "logins": state["count"],
        "redis_commands_per_login": (after["commands"] - before["commands"]) / logins if logins else None,
        "redis_bytes_in_per_login": (after["bytes_in"] - before["bytes_in"]) / logins if logins else None,
    }


async def published(run: Run, nodes: list[ClusterNode], sessions: int) -> None:
    """Until the nodes' session hashes in Redis hold `sessions` sessions (each node publishes its sessions there as
    it tells the others of them), then a moment for the others to read it: a stanza sent to a session another
    node has not heard of yet goes to offline storage."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counts = [await run.redis.sessions(node.prefix, f"{node.node}/0") for node in nodes]
        if sum(counts) >= sessions:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)


async def offline_rows(run: Run) -> int:
    """Messages in offline storage: where a message to a session its sender's node did not know went."""
    import asyncpg

    conn = await asyncpg.connect(run.storage_url.replace("+asyncpg", "").split("?")[0])
    try:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{run.schema}".offline'))
    finally:
        await conn.close()


def place(users: list[str], nodes: list[ClusterNode], how: str, rng: random.Random) -> dict[str, ClusterNode]:
    """Where each user of the pairs (users[2i] sends to users[2i+1]) logs in: on a node picked at random, all on
    the first node ('local'), or each pair across two nodes ('cross')."""
    if how == "local":
        return {user: nodes[0] for user in users}
    if how == "cross":
        return {user: nodes[(i // 2 + i % 2) % len(nodes)] for i, user in enumerate(users)}
    return {user: rng.choice(nodes) for user in users}


async def throughput_phase(run: Run, nodes: list[ClusterNode], how: str = "random", duration: float | None = None,
                           probe: Callable[[], Awaitable[dict[str, float]]] | None = None,
                           window: int | None = None) -> dict[str, Any]:
    """P pairs placed as `place` says, each sender keeping `window` messages in flight; counts kept apart for the
    pairs whose two users are on different nodes. `probe` is read at the start and the end of the measured
    window."""
    size = run.size
    users = [f"u{i}" for i in range(2 * size["pairs"])]
    placement = place(users, nodes, how, run.rng)
    # A resource of this run's own: the full JIDs of an earlier phase's sessions, which may still be closing, are
    # not reused.
    conns = await login_many(run, list(placement.items()), LoginOptions(roster=False), concurrency=20,
                             resource=f"t{uuid.uuid4().hex[:6]}")
    await published(run, nodes, len(conns))
    offline_before = await offline_rows(run)
    by_user = {bare(conn.jid).split("@")[0]: conn for conn in conns}
    local: dict[str, Any] = {"measuring": False, "stop": False, "sent": 0, "received": 0, "delivered": 0,
                             "bounced": 0, "latencies": []}
    cross: dict[str, Any] = {**local, "latencies": []}
    pairs = []
    for i in range(size["pairs"]):
        sender, receiver = users[2 * i], users[2 * i + 1]
        if sender in by_user and receiver in by_user:
            stats = cross if placement[sender] is not placement[receiver] else local
            pairs.append(Pair(by_user[sender], by_user[receiver], window or size["window"], stats))
    if not pairs:
        raise LoginError("no pair of users could log in")
    early = local["received"] + cross["received"]  # messages of an earlier phase, out of offline storage
    for pair in pairs:
        pair.fill()
    await asyncio.sleep(size["warmup"])
    probed = [await probe()] if probe is not None else []
    before = await run.redis.counters()
    cpu = Cpu(nodes)
    local["measuring"] = cross["measuring"] = True
    await asyncio.sleep(duration or size["duration"])
    local["measuring"] = cross["measuring"] = False
    spent = cpu.spent()
    after = await run.redis.counters()
    probed += [await probe()] if probe is not None else []
    local["stop"] = cross["stop"] = True
    deadline = time.monotonic() + 5
    while (local["received"] + cross["received"] < local["sent"] + cross["sent"]) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    lost = local["sent"] + cross["sent"] - local["received"] - cross["received"] + early
    offline = await offline_rows(run) - offline_before
    for conn in conns:
        conn.close()
    delivered = local["delivered"] + cross["delivered"]
    node_cpu = sum(spent[node.node] for node in nodes)
    latencies = local["latencies"] + cross["latencies"]
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    redis = {key: after[key] - before[key] for key in after}
    crossed = cross["delivered"]
    result: dict[str, Any] = {
        "messages_per_s": delivered / spent["wall"],
        "latency_p50_ms": p50 / 1e6 if p50 is not None else None,
        "latency_p99_ms": p99 / 1e6 if p99 is not None else None,
        "node_cpu_us_per_message": 1e6 * node_cpu / delivered if delivered else None,
        "node_cpu_percent": 100 * node_cpu / spent["wall"],
        "generator_cpu_percent": 100 * spent["generator"] / spent["wall"],
        "cross_share": crossed / delivered if delivered else None,
        "cross_pairs": sum(1 for pair in pairs if pair.stats is cross), "pairs": len(pairs),
        "delivered": delivered, "cross_delivered": crossed, "sent_total": local["sent"] + cross["sent"],
        "lost": lost, "lost_crossing": cross["sent"] - cross["received"], "received_before_sending": early,
        "stored_offline": offline,
        "bounced": local["bounced"] + cross["bounced"], "seconds": round(spent["wall"], 2),
        "redis_publications_per_s": redis["publications"] / spent["wall"],
        "redis_messages_per_publication": crossed / redis["publications"] if redis["publications"] else None,
        "redis_bytes_in_per_cross_message": redis["bytes_in"] / crossed if crossed else None,
        "redis_bytes_out_per_cross_message": redis["bytes_out"] / crossed if crossed else None,
        "redis_cpu_us_per_cross_message": 1e6 * redis["cpu_s"] / crossed if crossed else None,
        "redis_cpu_percent": 100 * redis["cpu_s"] / spent["wall"],
    }
    if probed:
        result["probe"] = {key: probed[1][key] - probed[0][key] for key in probed[0]}
    return result


async def remote_sessions_phase(run: Run, nodes: list[ClusterNode]) -> dict[str, Any]:
    """Node A with L sessions, node B going through the remote steps: each node's worker RSS at each step."""
    size = run.size
    a, b = nodes
    member_b = f"{b.node}/0"
    await quiet(nodes)
    empty = {"sessions_a": 0, "sessions_b": 0, "rss_a_kib": rss_kib(a.worker_pid), "rss_b_kib": rss_kib(b.worker_pid)}
    options = LoginOptions(starttls=run.starttls)
    conns = await login_many(run, [(f"u{i}", a) for i in range(size["local"])], options)
    held, on_b, steps = len(conns), 0, []
    try:
        for target in size["remote"]:
            wanted = target - on_b
            conns += await login_many(run, [(f"u{size['local'] + on_b + i}", b) for i in range(wanted)], options)
            on_b = target
            deadline = time.monotonic() + 30
            while await run.redis.sessions(b.prefix, member_b) < len(conns) - held and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(size["settle"])
            await quiet(nodes)
            steps.append({"sessions_a": held, "sessions_b": await run.redis.sessions(b.prefix, member_b),
                          "rss_a_kib": rss_kib(a.worker_pid), "rss_b_kib": rss_kib(b.worker_pid)})
    finally:
        for conn in conns:
            conn.close()
    first, last = steps[0], steps[-1]
    remote = last["sessions_b"] - first["sessions_b"]
    grown = last["sessions_b"] - steps[1]["sessions_b"] if len(steps) > 2 else 0
    return {
        "starttls": run.starttls,
        "steps": [empty, *steps],
        "local_per_session_kib_a": (first["rss_a_kib"] - empty["rss_a_kib"]) / held if held else None,
        "per_remote_session_bytes": 1024 * (last["rss_a_kib"] - first["rss_a_kib"]) / remote if remote else None,
        # B past its first step, so that its start-up allocations are not counted (as bench.run's idle scenario)
        "per_local_session_kib_b": (last["rss_b_kib"] - steps[1]["rss_b_kib"]) / grown if grown else None,
    }


async def archive_phase(run: Run, nodes: list[ClusterNode]) -> dict[str, Any]:
    """The throughput load on one node with the archive on, all users on it, and what PostgreSQL stored: rows
    committed during the measured window, and the table's growth (indexes included) per row."""
    import asyncpg

    conn = await asyncpg.connect(run.storage_url.replace("+asyncpg", "").split("?")[0])
    table = f'"{run.schema}".archive'

    cpu: list[dict[int, float]] = []  # PostgreSQL's processes at each reading: before, window start and end, after

    async def stored() -> dict[str, float]:
        rows = await conn.fetchval(f"SELECT count(*) FROM {table}")
        size = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
        wal = await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
        cpu.append(postgres_cpu())
        return {"rows": int(rows), "bytes": int(size), "wal_bytes": float(wal)}

    try:
        before = await stored()
        result = await throughput_phase(run, nodes, "local", duration=run.size["archive_duration"],
                                        probe=stored)
        await quiet(nodes)
        after = await stored()
    finally:
        await conn.close()
    window = result.pop("probe")
    rows = after["rows"] - before["rows"]
    result["archive_rows_per_s"] = window["rows"] / result["seconds"]
    result["archive_rows_per_sent_message"] = rows / result["sent_total"] if result["sent_total"] else None
    result["archive_bytes_per_row"] = (after["bytes"] - before["bytes"]) / rows if rows else None
    result["archive_rows"] = rows
    if window["rows"]:
        # The whole PostgreSQL server's WAL, and the CPU of its processes that lived through the window (Parley's
        # pooled connections, the WAL writer, the checkpointer... and other clients' long-lived connections, as the
        # server is shared): upper bounds of this load's share.
        start, end = cpu[1], cpu[2]
        spent = sum(end[pid] - start[pid] for pid in start if pid in end)
        result["postgres_wal_bytes_per_row_max"] = window["wal_bytes"] / window["rows"]
        result["postgres_cpu_us_per_row_max"] = 1e6 * spent / window["rows"]
    return result


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of every process named postgres on this machine (its server and every backend), by pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{entry}/comm") as fh:
                if fh.read().strip() == "postgres":
                    found[int(entry)] = schedstat_seconds(int(entry))
    return found



# A cross-node message as a member publishes it: the sender's id, then a stanza frame for a session (server/cluster/).
PROBE_STANZA = ("<message to='u1@cluster.bench/bench' type='chat' xmlns='jabber:client' from='u0@cluster.bench/bench'>"
                "<body>T00000000000000000000Z" + "x" * 78 + "</body></message>")
PROBE_FRAME = "s\x00u1@cluster.bench/bench\x00" + PROBE_STANZA
# (frames per publication, publications per pipeline): one message a turn to one member (a quiet node), and
# busier turns; a pipeline of 100 is a turn with frames for 100 members.
PROBE_SHAPES = [(1, 1), (1, 100), (10, 100), (100, 100)]


def schedstat_seconds(pid: int) -> float:
    """CPU time of every thread of a process from /proc/PID/task/*/schedstat, in nanoseconds' precision (the
    clock ticks of /proc/PID/stat are 10 ms: too coarse for Redis's share of a short run)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as fh:
            total += int(fh.read().split()[0])
    return total / 1e9


def _resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


async def redis_phase(run: Run) -> dict[str, Any]:
    """Redis alone: what a publication and a frame of the size of a cross-node message cost it, with one raw
    subscriber reading the channel, as a member's pub/sub connection does. Every shape sends the same number of
    frames (a tenth of them for one publication per round trip, which is slow to send)."""
    if not run.redis.private:
        return {"error": "needs the private redis-server (its CPU time is the probe's alone)"}
    channel = f"parley-bench-cluster-{uuid.uuid4().hex[:8]}:m:probe".encode()
    sub_reader, sub_writer = await asyncio.open_connection("127.0.0.1", run.redis.port)
    pub_reader, pub_writer = await asyncio.open_connection("127.0.0.1", run.redis.port)
    received = {"bytes": 0}

    async def subscriber() -> None:
        while data := await sub_reader.read(1 << 20):
            received["bytes"] += len(data)

    sub_writer.write(_resp(b"SUBSCRIBE", channel))
    await sub_reader.readuntil(b":1\r\n")
    reading = asyncio.create_task(subscriber())
    shapes = []
    try:
        for frames, pipeline in PROBE_SHAPES:
            total = run.size["redis_frames"] // (10 if pipeline == 1 else 1)
            payload = ("n1/0\x01" + "\x01".join([PROBE_FRAME] * frames)).encode()
            command = _resp(b"PUBLISH", channel, payload) * pipeline
            publications = max(1, total // frames // pipeline) * pipeline
            expected = received["bytes"] + publications * (len(payload) + len(channel) + 40)
            cpu = schedstat_seconds(run.redis.pid)
            started = time.monotonic()
            for _ in range(publications // pipeline):
                pub_writer.write(command)
                await pub_reader.readexactly(4 * pipeline)  # one ':1\r\n' per publication: one subscriber
            while received["bytes"] < expected - 40 * publications and time.monotonic() - started < 60:
                await asyncio.sleep(0.005)
            elapsed = time.monotonic() - started
            spent = schedstat_seconds(run.redis.pid) - cpu
            shapes.append({"frames_per_publication": frames, "publications_per_pipeline": pipeline,
                           "publications": publications, "payload_bytes": len(payload),
                           "redis_cpu_us_per_publication": 1e6 * spent / publications,
                           "redis_cpu_us_per_frame": 1e6 * spent / (publications * frames),
                           "frames_per_redis_cpu_second": publications * frames / spent if spent else None,
                           "seconds": round(elapsed, 2)})
    finally:
        reading.cancel()
        for writer in (sub_writer, pub_writer):
            writer.close()
    return {"frame_bytes": len(PROBE_FRAME), "shapes": shapes}

# --- the whole scenario ----------------------------------------------------------------------------------


def users_needed(size: dict[str, Any]) -> int:
    return max(size["clients"], 2 * size["pairs"], size["local"] + max(size["remote"]))


async def create_users(storage_url: str, count: int) -> None:
    """The accounts, in the run's fresh schema (which opening the storage creates). One set of SCRAM credentials
    serves them all: deriving 4,096-iteration keys for thousands of users would take longer than the phases."""
    from server.accounts import credentials_for
    from server.storage import open_storage

    storage = await open_storage(storage_url)
    credentials = credentials_for(PASSWORD, SCRAM_ITERATIONS)
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with gate:
            await storage.accounts.create(DOMAIN, f"u{i}", credentials)

    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await storage.close()


async def drop_schema(postgres_url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(postgres_url.replace("+asyncpg", ""))
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def _phase(run: Run, name: str, count: int, body: Callable[[Run, list[ClusterNode]], Awaitable[dict[str, Any]]],
                 profile: Profile | None = None) -> dict[str, Any]:
    """Start `count` fresh nodes, run one phase (or several, in `body`) against them, stop them; a failure
    becomes an 'error' entry."""
    print(f"  cluster: {name} ({count} node{'s' if count > 1 else ''}) ...", file=sys.stderr, flush=True)
    nodes = run.nodes(count, name, profile)
    started = time.monotonic()
    try:
        await start_nodes(run, nodes)
        result = await asyncio.wait_for(body(run, nodes), PHASE_LIMIT)
        result["phase_seconds"] = round(time.monotonic() - started, 1)
        return result
    except TimeoutError:
        return {"error": f"{name} did not finish within {PHASE_LIMIT:.0f} s"}
    except (ServerUnavailable, LoginError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        await stop_nodes(nodes)


async def _login_and_throughput(run: Run, nodes: list[ClusterNode]) -> dict[str, Any]:
    """Logins, then the pairs at random; with two nodes, the pairs again with every pair crossing nodes, whose CPU
    per message beside one node's is what crossing costs (once is enough: a message crosses one hop at most);
    with one and two nodes, the same at one message in flight per pair."""
    result = {"login": await login_phase(run, nodes), "throughput": await throughput_phase(run, nodes)}
    if len(nodes) == 2:
        result["throughput_cross"] = await throughput_phase(run, nodes, "cross")
    if len(nodes) <= 2:
        # One message in flight per pair: small batches per turn, as on a node that is not busy (1 node: all
        # local, 2 nodes: all crossing).
        result["trickle"] = await throughput_phase(run, nodes, "local" if len(nodes) == 1 else "cross",
                                                   duration=run.size["duration"] / 2, window=1)
    return result


async def bench_cluster(mode: str, node_counts: list[int], redis_url: str | None, postgres_url: str,
                        workdir: Path, starttls: bool = False, seed: int = 1) -> dict[str, Any]:
    """Every phase in turn; the results as one JSON-able dict with its table."""
    from bench.run import checkout, machine

    size = {**SIZES[mode], "nodes": node_counts}
    redis = RedisUnderTest(workdir, redis_url)
    schema = f"parley_bench_{uuid.uuid4().hex[:12]}"
    run = Run(workdir, size, redis, f"{postgres_url}?schema={schema}", schema, random.Random(seed), starttls)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "mode": mode, "sizes": size,
                               "parley_checkout": checkout(), "machine_before": machine(), "postgres_schema": schema,
                               "by_nodes": {}}
    started = time.monotonic()
    try:
        await redis.start()
        results["redis"] = {"private": redis.private, "url": redis.url,
                            "version": (await redis.client.info("server"))["redis_version"]}
        await create_users(run.storage_url, users_needed(size))
        results["setup_seconds"] = round(time.monotonic() - started, 1)
        for count in node_counts:
            results["by_nodes"][str(count)] = await _phase(run, f"k{count}", count, _login_and_throughput)
        if max(node_counts) >= 2:
            results["remote_sessions"] = await _phase(run, "remote", 2, remote_sessions_phase)
        results["archive"] = await _phase(run, "archive", 1, archive_phase, Profile(archive=True))
        print("  cluster: Redis alone ...", file=sys.stderr, flush=True)
        results["redis_alone"] = await asyncio.wait_for(redis_phase(run), PHASE_LIMIT)
    finally:
        await redis.stop(run.prefixes)
        with contextlib.suppress(Exception):
            await drop_schema(postgres_url, schema)
    results["seconds"] = round(time.monotonic() - started, 1)
    results["errors"] = run.errors
    results["first_errors"] = run.first_errors
    results["machine_after"] = machine()
    results["table"] = render_table(results)
    return results


# --- the table -------------------------------------------------------------------------------------------

ROWS: list[tuple[str, str, str]] = [
    ("login", "logins_per_s", "logins/s (random node)"),
    ("login", "login_p50_ms", "login p50 ms"),
    ("login", "node_cpu_ms_per_login", "nodes' CPU ms per login"),
    ("login", "redis_commands_per_login", "Redis commands per login (and close)"),
    ("login", "redis_bytes_in_per_login", "Redis bytes in per login (and close)"),
    ("throughput", "messages_per_s", "messages/s"),
    ("throughput", "latency_p50_ms", "latency p50 ms"),
    ("throughput", "latency_p99_ms", "latency p99 ms"),
    ("throughput", "cross_share", "share of messages crossing nodes"),
    ("throughput", "node_cpu_us_per_message", "nodes' CPU us per message"),
    ("throughput_cross", "node_cpu_us_per_message", "  the same, every pair crossing nodes"),
    ("throughput", "node_cpu_percent", "nodes' CPU % (sum)"),
    ("throughput", "generator_cpu_percent", "generator CPU %"),
    ("throughput", "redis_publications_per_s", "Redis publications/s"),
    ("throughput", "redis_messages_per_publication", "cross-node messages per publication"),
    ("throughput", "redis_bytes_in_per_cross_message", "Redis bytes in per cross-node message"),
    ("throughput", "redis_bytes_out_per_cross_message", "Redis bytes out per cross-node message"),
    ("throughput", "redis_cpu_us_per_cross_message", "Redis CPU us per cross-node message"),
    ("throughput_cross", "messages_per_s", "messages/s, every pair crossing nodes"),
    ("throughput_cross", "redis_messages_per_publication", "  cross-node messages per publication"),
    ("throughput_cross", "redis_bytes_in_per_cross_message", "  Redis bytes in per cross-node message"),
    ("throughput_cross", "redis_cpu_us_per_cross_message", "  Redis CPU us per cross-node message"),
    ("trickle", "messages_per_s", "messages/s, 1 in flight per pair (2 nodes: crossing)"),
    ("trickle", "latency_p50_ms", "  latency p50 ms"),
    ("trickle", "node_cpu_us_per_message", "  nodes' CPU us per message"),
    ("trickle", "redis_messages_per_publication", "  cross-node messages per publication"),
    ("trickle", "redis_cpu_us_per_cross_message", "  Redis CPU us per cross-node message"),
]


def _fmt(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def render_table(results: dict[str, Any]) -> str:
    counts = list(results["by_nodes"])
    header = ["metric", *(f"{c} node{'s' if c != '1' else ''}" for c in counts)]
    rows = []
    for phase, key, label in ROWS:
        cells = []
        for count in counts:
            entry = results["by_nodes"][count]
            cells.append("error" if "error" in entry else _fmt(entry.get(phase, {}).get(key)))
        rows.append([label, *cells])
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    out = ["  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths, strict=True)))
           for r in [header, *rows]]
    out.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{c} nodes: {results['by_nodes'][c]['error']}" for c in counts if "error" in results["by_nodes"][c]]
    remote = results.get("remote_sessions")
    if remote and "error" not in remote:
        tls = ", over STARTTLS" if remote.get("starttls") else ""
        out += ["", f"remote sessions (2 nodes{tls}): B sessions  A RSS MiB  B RSS MiB"]
        out += [f"  {s['sessions_b']:>6}  {s['rss_a_kib'] / 1024:9.1f}  {s['rss_b_kib'] / 1024:9.1f}"
                + ("   (before A's sessions)" if i == 0 else "") for i, s in enumerate(remote["steps"])]
        out.append(f"  A, holding {remote['steps'][1]['sessions_a']} sessions, grows "
                   f"{_fmt(remote['per_remote_session_bytes'])} bytes per session on B; a local session costs "
                   f"{_fmt(remote['per_local_session_kib_b'])} KiB on B ({_fmt(remote['local_per_session_kib_a'])} "
                   "KiB on A, first sessions)")
    elif remote:
        notes.append(f"remote sessions: {remote['error']}")
    archive = results.get("archive")
    if archive and "error" not in archive:
        out += ["", f"archive on (1 node, PostgreSQL): {_fmt(archive['messages_per_s'])} messages/s, "
                f"{_fmt(archive['archive_rows_per_s'])} archive rows/s committed, "
                f"{_fmt(archive['archive_rows_per_sent_message'])} rows per message sent, "
                f"{_fmt(archive['archive_bytes_per_row'])} bytes per row (table and indexes), "
                f"nodes' CPU {_fmt(archive['node_cpu_us_per_message'])} us per message; the whole PostgreSQL server "
                f"(shared): at most {_fmt(archive.get('postgres_cpu_us_per_row_max'))} us CPU and "
                f"{_fmt(archive.get('postgres_wal_bytes_per_row_max'))} WAL bytes per row"]
    elif archive:
        notes.append(f"archive: {archive['error']}")
    probe = results.get("redis_alone")
    if probe and "error" not in probe:
        out += ["", f"Redis alone ({probe['frame_bytes']}-byte frames, one subscriber): frames/publication, "
                "publications/pipeline: Redis CPU us per publication, per frame"]
        out += [f"  {s['frames_per_publication']:>3}, {s['publications_per_pipeline']:>3}: "
                f"{_fmt(s['redis_cpu_us_per_publication'])}, {_fmt(s['redis_cpu_us_per_frame'])}"
                for s in probe["shapes"]]
    elif probe:
        notes.append(f"Redis alone: {probe['error']}")
    for count in counts:
        for phase in ("throughput", "throughput_cross", "trickle"):
            entry = results["by_nodes"][count].get(phase, {})
            if entry.get("lost") or entry.get("bounced") or entry.get("received_before_sending") or \
                    entry.get("stored_offline"):
                notes.append(f"{count} nodes, {phase}: {entry['lost']} messages not delivered 5 s after sending "
                             f"stopped (negative: more received than sent), {entry['bounced']} bounced, "
                             f"{entry['received_before_sending']} received before the first was sent, "
                             f"{entry['stored_offline']} put in offline storage")
    redis = results.get("redis", {})
    if redis and not redis.get("private"):
        notes.append(f"Redis at {redis['url']} is shared: its counters and CPU include other clients' work")
    if results.get("errors"):
        notes.append(f"{results['errors']} client errors, first: {'; '.join(results['first_errors'])}")
    return "\n".join(out + [f"note: {n}" for n in notes])


# --- command line ----------------------------------------------------------------------------------------


def _counts(text: str) -> list[int]:
    counts = [int(n) for n in text.split(",") if n.strip().isdigit()]
    if not counts or any(not 1 <= n <= 3 for n in counts):
        raise argparse.ArgumentTypeError("node counts from 1 to 3, comma-separated")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter windows, fewer sessions (about 2 minutes)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, 1 and 2 nodes (tests)")
    parser.add_argument("--nodes", type=_counts, help="cluster sizes to run, default 1,2,3 (smoke: 1,2)")
    parser.add_argument("--redis", help="a Redis URL to use instead of a private redis-server (counters then "
                                        "include other clients' work)")
    parser.add_argument("--postgres", default=POSTGRES_URL, help=f"PostgreSQL database (default {POSTGRES_URL}); "
                                                                 "the run makes its own schema and drops it")
    parser.add_argument("--starttls", action="store_true", help="the remote-sessions phase's sessions log in over "
                                                                    "STARTTLS (what a session costs with TLS)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write results (default {RESULTS})")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = parser.parse_args(argv)
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    workdir = Path(tempfile.mkdtemp(prefix="parley-bench-cluster-"))
    job = bench_cluster(mode_name, args.nodes or SIZES[mode_name]["nodes"], args.redis, args.postgres, workdir,
                        args.starttls)
    try:
        try:
            import uvloop

            results = uvloop.run(job)
        except ImportError:
            results = asyncio.run(job)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    before, after = results["machine_before"]["load_average"][0], results["machine_after"]["load_average"][0]
    print(f"{results['date']}  cluster, mode {mode_name}  parley {results['parley_checkout']['commit']}  "
          f"{results['seconds']} s  load average before {before:.2f}, after {after:.2f}")
    print(results["table"])
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
