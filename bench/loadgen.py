"""The load generator: one scenario against one running server, in its own process.

Run by bench.run as `python -m bench.loadgen --spec JSON`; prints one JSON object with the figures.
It runs on uvloop with the hand-written client of bench.client, and measures its own CPU use beside the
server's over the timed window, so a saturated generator is visible in the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from xml.etree.ElementTree import Element

from bench.bosh_latency import bosh_latency
from bench.client import (
    PRESENCE,
    ROSTER_NS,
    Connection,
    LoginError,
    LoginOptions,
    Target,
    bare,
    login,
)
from bench.procstat import CpuWindow, rss_kib

BODY_SIZE = 100
STAMP = re.compile(rb"T(\d{20})Z")  # the send time, in ns, at the start of every body
STAMP_TAIL = 21  # bytes kept between reads: a stamp cut in two is found whole next time
ERRORS_SHOWN = 3


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Run:
    """What every scenario gets: the target, the knobs, and the bookkeeping of failures."""

    target: Target
    spec: dict[str, Any]
    server_pid: int
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def password(self) -> str:
        return self.spec["password"]

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        if len(self.first_errors) < ERRORS_SHOWN:
            self.first_errors.append(f"{type(exc).__name__}: {exc}")

    def cpu_window(self) -> CpuWindow:
        return CpuWindow({"server": self.server_pid, "generator": os.getpid()})

    async def login_many(self, users: list[str], options: LoginOptions, concurrency: int,
                         resource: str = "bench") -> list[Connection]:
        """Log in every user, `concurrency` at a time; failures are counted, not raised."""
        gate = asyncio.Semaphore(concurrency)

        async def one(user: str) -> Connection | None:
            async with gate:
                try:
                    return await login(self.target, user, self.password, resource, options)
                except (LoginError, OSError) as exc:
                    self.failed(exc)
                    return None

        conns = await asyncio.gather(*(one(u) for u in users))
        return [c for c in conns if c is not None]


async def _bounded(coro: Awaitable[Any], timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(coro, timeout)


# --- login storm ---------------------------------------------------------------------------------


async def login_storm(run: Run) -> dict[str, Any]:
    """K clients each logging in over and over (stream, SASL, bind, roster, presence, close)."""
    spec = run.spec
    options = LoginOptions(mechanism=spec["mechanism"], starttls=spec["starttls"])
    clients, max_logins = spec["clients"], spec["max_logins"]
    state = {"measuring": False, "stop": False, "count": 0, "no_roster": 0}
    times: list[float] = []

    async def worker(i: int) -> None:
        n = 0
        while not state["stop"]:
            started = time.perf_counter()
            try:
                conn = await login(run.target, f"u{i}", run.password, f"w{n}", options)
            except (LoginError, OSError) as exc:
                run.failed(exc)
                await asyncio.sleep(0.1)
                continue
            conn.close()
            n += 1
            if state["measuring"]:
                state["count"] += 1
                state["no_roster"] += conn.roster is None
                times.append(time.perf_counter() - started)
                if state["count"] >= max_logins:
                    state["stop"] = True

    workers = [asyncio.create_task(worker(i)) for i in range(clients)]
    await asyncio.sleep(spec["warmup"])
    window = run.cpu_window()
    state["measuring"] = True
    started = time.monotonic()
    while not state["stop"] and time.monotonic() - started < spec["duration"]:
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    state["measuring"], state["stop"] = False, True
    cpu = window.percent()
    await _bounded(asyncio.gather(*workers, return_exceptions=True), 10)
    for task in workers:
        task.cancel()
    if state["no_roster"]:
        run.notes.append(f"roster get answered with an error in {state['no_roster']} logins")
    p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
    return {
        "metrics": {
            "logins_per_s": state["count"] / elapsed,
            "login_p50_ms": p50 * 1000 if p50 is not None else None,
            "login_p99_ms": p99 * 1000 if p99 is not None else None,
        },
        "counts": {"logins": state["count"], "clients": clients, "seconds": round(elapsed, 2)},
        "cpu": cpu,
    }


# --- 1:1 throughput and latency -----------------------------------------------------------------


class Pair:
    """One sender keeping `window` messages in flight to one receiver; each delivery releases one more."""

    def __init__(self, sender: Connection, receiver: Connection, window: int, stats: dict[str, Any]) -> None:
        self.sender = sender
        self.stats = stats
        self.window = window
        self.tail = b""
        self.in_flight = 0
        pad = "x" * (BODY_SIZE - 22)
        self.head = f"<message to='{receiver.jid}' type='chat'><body>T"
        self.rest = f"Z{pad}</body></message>"
        receiver.on_raw = self.received
        sender.on_raw = self.bounced

    def fill(self) -> None:
        self.send(self.window - self.in_flight)

    def send(self, n: int) -> None:
        if n <= 0 or self.stats["stop"]:
            return
        stamp = time.perf_counter_ns()
        self.sender.send_many([f"{self.head}{stamp:020d}{self.rest}"] * n)
        self.in_flight += n
        self.stats["sent"] += n

    def received(self, data: bytes) -> None:
        buf = self.tail + data
        stamps = STAMP.findall(buf)
        self.tail = buf[-STAMP_TAIL:]
        if not stamps:
            return
        n = len(stamps)
        self.in_flight -= n
        stats = self.stats
        stats["received"] += n
        if stats["measuring"]:
            now = time.perf_counter_ns()
            stats["delivered"] += n
            stats["latencies"].extend(now - int(s) for s in stamps)
        self.send(n)

    def bounced(self, data: bytes) -> None:
        self.stats["bounced"] += data.count(b"<message")


async def throughput(run: Run) -> dict[str, Any]:
    spec = run.spec
    pairs_wanted, window = spec["pairs"], spec["window"]
    users = [f"u{i}" for i in range(2 * pairs_wanted)]
    options = LoginOptions(roster=False, websocket=spec.get("websocket", False))
    conns = await run.login_many(users, options, concurrency=20)
    by_user = {bare(c.jid).split("@")[0]: c for c in conns}
    stats: dict[str, Any] = {"measuring": False, "stop": False, "sent": 0, "received": 0, "delivered": 0,
                             "bounced": 0, "latencies": []}
    pairs = [Pair(by_user[users[2 * i]], by_user[users[2 * i + 1]], window, stats)
             for i in range(pairs_wanted) if users[2 * i] in by_user and users[2 * i + 1] in by_user]
    if not pairs:
        raise LoginError("no pair of users could log in")
    if len(pairs) < pairs_wanted:
        run.notes.append(f"only {len(pairs)} of {pairs_wanted} pairs logged in")
    await asyncio.sleep(0.5)  # let the initial presences settle before the first message
    for pair in pairs:
        pair.fill()
    await asyncio.sleep(spec["warmup"])
    window_cpu = run.cpu_window()
    stats["measuring"] = True
    started = time.monotonic()
    await asyncio.sleep(spec["duration"])
    stats["measuring"] = False
    elapsed = time.monotonic() - started
    cpu = window_cpu.percent()
    stats["stop"] = True
    deadline = time.monotonic() + 5
    while stats["received"] < stats["sent"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    lost = stats["sent"] - stats["received"]
    if lost:
        run.notes.append(f"{lost} messages not delivered 5 s after sending stopped")
    if stats["bounced"]:
        run.notes.append(f"{stats['bounced']} messages bounced to senders")
    rss = rss_kib(run.server_pid)
    for conn in conns:
        conn.close()
    lat = stats["latencies"]
    p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
    return {
        "metrics": {
            "messages_per_s": stats["delivered"] / elapsed,
            "latency_p50_ms": p50 / 1e6 if p50 is not None else None,
            "latency_p99_ms": p99 / 1e6 if p99 is not None else None,
        },
        "counts": {"delivered": stats["delivered"], "sent_total": stats["sent"], "pairs": len(pairs),
                   "window": window, "seconds": round(elapsed, 2), "lost": lost, "bounced": stats["bounced"]},
        "cpu": cpu,
        "server_rss_kib": rss,
    }


# --- idle sessions --------------------------------------------------------------------------------


async def idle(run: Run) -> dict[str, Any]:
    """Memory per idle session: a first tenth of the sessions absorbs start-up allocations (modules
    loaded lazily, first-use caches), then the growth over the other nine tenths is divided among them."""
    spec = run.spec
    names = [f"u{i}" for i in range(spec["sessions"])]
    first = max(1, len(names) // 10)
    options = LoginOptions()
    conns = await run.login_many(names[:first], options, concurrency=50)
    await asyncio.sleep(spec["settle"])
    before = rss_kib(run.server_pid)
    started = time.monotonic()
    rest = await run.login_many(names[first:], options, concurrency=50)
    ramp = time.monotonic() - started
    conns += rest
    for conn in conns:
        conn.on_raw = _ignore
    await asyncio.sleep(spec["settle"])
    window = run.cpu_window()
    await asyncio.sleep(spec["hold"])
    cpu = window.percent()
    after = rss_kib(run.server_pid)
    for conn in conns:
        conn.close()
    if not rest:
        raise LoginError("no session could log in")
    return {
        "metrics": {
            "rss_per_session_kib": (after - before) / len(rest),
            "session_logins_per_s": len(rest) / ramp,
        },
        "counts": {"sessions": len(conns), "measured_sessions": len(rest), "rss_before_kib": before,
                   "rss_after_kib": after, "hold_seconds": spec["hold"]},
        "cpu": cpu,
        "server_rss_kib": after,
    }


def _ignore(data: bytes) -> None:
    """Idle sessions only have to keep reading (whitespace keepalives, presence)."""


# --- presence fan-out -----------------------------------------------------------------------------


def ring_contacts(i: int, users: int, half: int) -> list[int]:
    """User i's contacts: the `half` users before it and after it on a ring, all mutually subscribed.
    bench.run has the servers store these rosters before the fan-out scenario starts."""
    return [(i + d) % users for d in range(-half, half + 1) if d != 0]


def _roster_both(conn: Connection) -> int:
    if conn.roster is None:
        return 0
    return sum(1 for item in conn.roster.iter(f"{{{ROSTER_NS}}}item") if item.get("subscription") == "both")


async def fanout(run: Run) -> dict[str, Any]:
    """Half the users online; the other half log in, each with a roster of 2*half contacts."""
    spec = run.spec
    users, half = spec["users"], spec["contacts"] // 2
    if users % 2 or users <= 2 * half:
        raise ValueError("fan-out needs an even number of users larger than the roster size")
    names = [f"f{i}" for i in range(users)]
    totals = {"all": 0, "watchers": 0}

    def counter(me: str, watcher: bool) -> Callable[[Element], None]:
        def on_element(el: Element) -> None:
            if el.tag == PRESENCE and el.get("type") is None and bare(el.get("from", "")) != me:
                totals["all"] += 1
                totals["watchers"] += watcher
        return on_element

    watchers = await run.login_many(names[0::2], LoginOptions(), concurrency=50)
    for conn in watchers:
        conn.on_element = counter(bare(conn.jid), True)
    await asyncio.sleep(1.0)
    totals["all"] = totals["watchers"] = 0
    expected_at_watchers = (users // 2) * half  # each logger has `half` watchers among its contacts
    gate = asyncio.Semaphore(spec["concurrency"])
    loggers: list[Connection] = []
    roster_sizes: list[int] = []

    async def log_in(name: str) -> None:
        async with gate:
            try:
                conn = await login(run.target, name, run.password, "bench", LoginOptions())
            except (LoginError, OSError) as exc:
                run.failed(exc)
                return
            conn.on_element = counter(bare(conn.jid), False)
            loggers.append(conn)
            roster_sizes.append(_roster_both(conn))

    window = run.cpu_window()
    started = time.monotonic()
    await asyncio.gather(*(log_in(name) for name in names[1::2]))
    login_seconds = time.monotonic() - started
    deadline = started + spec["timeout"]
    while totals["watchers"] < expected_at_watchers and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - started
    cpu = window.percent()
    rss = rss_kib(run.server_pid)
    for conn in watchers + loggers:
        conn.close()
    if totals["watchers"] < expected_at_watchers:
        run.notes.append(f"watchers got {totals['watchers']} of {expected_at_watchers} presences")
    if roster_sizes and min(roster_sizes) < 2 * half:
        run.notes.append(f"smallest roster had {min(roster_sizes)} mutual contacts, not {2 * half}")
    return {
        "metrics": {
            "fanout_logins_per_s": len(loggers) / login_seconds,
            "presences_per_s": totals["all"] / elapsed,
            "fanout_complete_s": elapsed,
        },
        "counts": {"users": users, "contacts": 2 * half, "loggers": len(loggers), "watchers": len(watchers),
                   "presences": totals["all"], "presences_at_watchers": totals["watchers"],
                   "expected_at_watchers": expected_at_watchers},
        "cpu": cpu,
        "server_rss_kib": rss,
    }


SCENARIOS: dict[str, Callable[[Run], Awaitable[dict[str, Any]]]] = {
    "login": login_storm,
    "throughput": throughput,
    "idle": idle,
    "fanout": fanout,
    "bosh": bosh_latency,
}


async def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one scenario; failures come back as an 'error' entry rather than an exception."""
    run = Run(Target(**spec["target"]), spec, spec["server_pid"])
    try:
        result = await asyncio.wait_for(SCENARIOS[spec["kind"]](run), spec["time_limit"])
    except TimeoutError:
        result = {"error": f"scenario did not finish within {spec['time_limit']} s"}
    except (LoginError, OSError, ValueError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["errors"] = run.errors
    result["first_errors"] = run.first_errors
    result["notes"] = run.notes
    if "server_rss_kib" not in result:
        try:
            result["server_rss_kib"] = rss_kib(run.server_pid)
        except OSError:
            result.setdefault("notes", []).append("server process is gone")
    return result


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.loadgen", description=__doc__)
    parser.add_argument("--spec", required=True, help="the scenario as a JSON object (written by bench.run)")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    _raise_fd_limit()
    try:
        import uvloop

        result = uvloop.run(run_spec(spec))
    except ImportError:
        result = asyncio.run(run_spec(spec))
        result["notes"].append("uvloop missing: ran on the default asyncio loop")
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
