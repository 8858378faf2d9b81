"""Run the benchmark scenarios against Parley and, when installed, Prosody and ejabberd; print one table.

    .venv/bin/python -m bench.run [--servers parley,prosody,ejabberd] [--scenarios ...] [--quick]

Servers run one at a time, each on its own loopback address, restarted before every scenario so one
scenario's leftovers (memory, sessions, rosters) do not weigh on the next. The load generator runs in its
own process (bench.loadgen). Results go to bench/results/latest.json as well.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.loadgen import ring_contacts
from bench.servers import REPO, SERVERS, STORAGES, BenchServer, Profile, ServerUnavailable

PASSWORD = "bench-secret"
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
SATURATED = 90.0  # generator CPU %, of its one core, above which its figures are suspect

# Scenario name -> (load generator kind, fixed parameters).
SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "login-plain": ("login", {"mechanism": "PLAIN", "starttls": False}),
    "login-scram-tls": ("login", {"mechanism": "SCRAM-SHA-1", "starttls": True}),
    "throughput": ("throughput", {}),
    "throughput-ws": ("throughput", {"websocket": True}),  # the same 1:1 load over XMPP over WebSocket
    "idle": ("idle", {}),
    "fanout": ("fanout", {}),
    "bosh-latency": ("bosh", {}),
}
BOSH_PAIRS = 10  # long-polling web clients are fewer and slower than TCP ones: 10 pairs, one message each
DEFAULT_SCENARIOS = list(SCENARIOS)
# Parley as a cluster of 1, 2 and 3 nodes (bench/cluster.py, run as its own process): on request only, as it
# starts nodes of its own rather than one server of --servers.
CLUSTER = "cluster"
SMOKE_SCENARIOS = ["login-plain", "throughput", "idle"]

# Sizes of each run mode; every load is bounded both in time and in count.
SIZES: dict[str, dict[str, Any]] = {
    "full": {"clients": 50, "max_logins": 50_000, "warmup": 2.0, "duration": 10.0, "pairs": 50, "window": 20,
             "sessions": 2000, "settle": 2.0, "hold": 5.0, "users": 200, "contacts": 100, "concurrency": 50,
             "timeout": 60.0},
    "quick": {"clients": 50, "max_logins": 20_000, "warmup": 1.0, "duration": 5.0, "pairs": 50, "window": 20,
              "sessions": 500, "settle": 1.0, "hold": 2.0, "users": 102, "contacts": 100, "concurrency": 50,
              "timeout": 30.0},
    "smoke": {"clients": 4, "max_logins": 500, "warmup": 0.3, "duration": 1.0, "pairs": 4, "window": 5,
              "sessions": 20, "settle": 0.3, "hold": 0.5, "users": 102, "contacts": 100, "concurrency": 20,
              "timeout": 20.0},
}

# Per scenario, the rows of the table: (metric key, label, higher is better).
ROWS: dict[str, list[tuple[str, str, bool]]] = {
    "login-plain": [("logins_per_s", "logins/s", True), ("login_p50_ms", "login p50 ms", False),
                    ("login_p99_ms", "login p99 ms", False)],
    "login-scram-tls": [("logins_per_s", "logins/s", True), ("login_p50_ms", "login p50 ms", False),
                        ("login_p99_ms", "login p99 ms", False)],
    "throughput": [("messages_per_s", "messages/s", True), ("latency_p50_ms", "latency p50 ms", False),
                   ("latency_p99_ms", "latency p99 ms", False)],
    "throughput-ws": [("messages_per_s", "messages/s", True), ("latency_p50_ms", "latency p50 ms", False),
                      ("latency_p99_ms", "latency p99 ms", False)],
    "idle": [("rss_per_session_kib", "RSS KiB/session", False),
             ("session_logins_per_s", "ramp logins/s", True)],
    "fanout": [("fanout_logins_per_s", "logins/s", True), ("presences_per_s", "presences/s", True),
               ("fanout_complete_s", "complete s", False)],
    "bosh-latency": [("bosh_messages_per_s", "messages/s", True), ("bosh_latency_p50_ms", "latency p50 ms", False),
                     ("bosh_latency_p99_ms", "latency p99 ms", False)],
}


def _time_limit(kind: str, size: dict[str, Any]) -> float:
    """Longest a scenario may take before the generator gives up on it."""
    base = size["warmup"] + size["duration"] + 60
    if kind == "idle":
        return size["sessions"] / 20 + size["settle"] + size["hold"] + 60
    if kind == "fanout":
        return size["timeout"] + size["users"] / 10 + 60
    return base


def _rosters(scenarios: list[str], size: dict[str, Any]) -> dict[str, list[str]]:
    """The fan-out users' rosters, stored by each server during setup rather than built over XMPP."""
    if "fanout" not in scenarios:
        return {}
    users, half = size["users"], size["contacts"] // 2
    return {f"f{i}": [f"f{j}" for j in ring_contacts(i, users, half)] for i in range(users)}


def _users_needed(scenarios: list[str], size: dict[str, Any]) -> list[str]:
    general = 0
    for name in scenarios:
        kind = SCENARIOS[name][0]
        general = max(general, {"login": size["clients"], "throughput": 2 * size["pairs"],
                                "idle": size["sessions"], "fanout": 0,
                                "bosh": 2 * min(size["pairs"], BOSH_PAIRS)}[kind])
    users = [f"u{i}" for i in range(general)]
    if "fanout" in scenarios:
        users += [f"f{i}" for i in range(size["users"])]
    return users


def _pin(pid: int, cpu: int) -> None:
    """Pin every thread of a process to one core."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), {cpu})


async def _loadgen(spec: dict[str, Any], pin_cpu: int | None) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loadgen", "--spec", json.dumps(spec), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    if pin_cpu is not None:
        _pin(proc.pid, pin_cpu)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), spec["time_limit"] + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"error": "load generator did not exit in time"}
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"load generator failed ({proc.returncode}): {err.decode().strip()[-500:]}"}
    return json.loads(lines[-1])


async def bench_server(server: BenchServer, scenarios: list[str], size: dict[str, Any],
                       pin: bool) -> dict[str, Any]:
    """Set one server up and run every scenario against a fresh start of it."""
    try:
        server.check()
    except ServerUnavailable as exc:
        return {"skipped": str(exc)}
    report: dict[str, Any] = {"address": f"{server.address}:{server.port}", "scenarios": {}}
    if not server.name.startswith("parley"):
        report["version"] = server.version()
    users = _users_needed(scenarios, size)
    started = time.monotonic()
    try:
        await server.setup(users, PASSWORD, _rosters(scenarios, size))
    except (ServerUnavailable, OSError) as exc:
        await server.stop()
        await server.cleanup()
        return {"skipped": f"setup failed: {exc}"}
    report["setup_seconds"] = round(time.monotonic() - started, 1)
    for name in scenarios:
        kind, fixed = SCENARIOS[name]
        print(f"  {server.name}: {name} ...", file=sys.stderr, flush=True)
        try:
            await server.start()
        except ServerUnavailable as exc:
            report["scenarios"][name] = {"error": str(exc)}
            continue
        try:
            if pin:
                _pin(server.pid, 1)
            spec = {**size, **fixed, "kind": kind, "password": PASSWORD, "server_pid": server.pid,
                    "target": {"address": server.address, "port": server.port, "domain": server.domain,
                               "http_port": server.http_port, "ws_path": server.ws_path},
                    "time_limit": _time_limit(kind, size),
                    "bosh_url": server.bosh_url, "bosh_pairs": min(size["pairs"], BOSH_PAIRS)}
            result = await _loadgen(spec, 0 if pin else None)
        finally:
            await server.stop()
        report["scenarios"][name] = result
        summary = result.get("error") or ", ".join(
            f"{k} {v:.1f}" for k, v in result.get("metrics", {}).items() if v is not None)
        print(f"  {server.name}: {name}: {summary}", file=sys.stderr, flush=True)
    report["notes"] = server.notes
    await server.cleanup()
    return report


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def _cell(result: dict[str, Any] | None, key: str, source: str) -> float | None:
    if not result or "error" in result:
        return None
    if source == "metrics":
        return result.get("metrics", {}).get(key)
    if source == "cpu":
        return result.get("cpu", {}).get(key)
    rss = result.get("server_rss_kib")
    return rss / 1024 if rss is not None else None


def render_table(results: dict[str, Any], scenarios: list[str]) -> str:
    """One text table: each server's figures side by side, then Parley's ratio to each other server (and that of
    Parley in two worker processes to Parley in one)."""
    names = list(results["servers"])
    checkout = results["parley_checkout"]
    versions = [f"parley {checkout['commit']}" + (f" (+{checkout['uncommitted_server_files']} uncommitted "
                                                   "server files)" if checkout["uncommitted_server_files"] else "")]
    versions += [f"{n} {results['servers'][n]['version']}" for n in names if "version" in results["servers"][n]]
    pairs = [("parley", n) for n in names if n not in ("parley", "parley-2w")] if "parley" in names else []
    if "parley" in names and "parley-2w" in names:
        pairs.append(("parley-2w", "parley"))  # what the second worker process adds
    header = ["scenario", "metric", *names, *(f"{a}/{b}" for a, b in pairs)]
    rows: list[list[str]] = []
    notes: list[str] = []
    for scenario in scenarios:
        per_server = {n: results["servers"][n].get("scenarios", {}).get(scenario) for n in names}
        lines = [(key, label + ("" if higher else " (lower better)"), "metrics")
                 for key, label, higher in ROWS[scenario]]
        lines += [("server", "server CPU %", "cpu"), ("generator", "generator CPU %", "cpu"),
                  ("rss", "server RSS MiB", "rss")]
        for i, (key, label, source) in enumerate(lines):
            values = {n: _cell(per_server[n], key, source) for n in names}
            cells = []
            for n in names:
                result = per_server[n]
                if "skipped" in results["servers"][n]:
                    cells.append("skipped")
                elif result is None:
                    cells.append("-")
                elif "error" in result:
                    cells.append("error")
                else:
                    mark = "*" if source == "cpu" and key == "generator" and (values[n] or 0) >= SATURATED else ""
                    cells.append(_fmt(values[n]) + mark)
            ratios = []
            for a, b in pairs:
                p, v = values.get(a), values.get(b)
                ratios.append(f"{p / v:.2f}" if p is not None and v else "-")
            rows.append([scenario if i == 0 else "", label, *cells, *ratios])
        for n in names:
            result = per_server[n] or {}
            for text in ([result["error"]] if "error" in result else []) + result.get("notes", []) + \
                    result.get("first_errors", []):
                notes.append(f"{scenario} / {n}: {text}")
    for n in names:
        server = results["servers"][n]
        if "skipped" in server:
            notes.append(f"{n}: skipped: {server['skipped']}")
        notes += [f"{n}: {text}" for text in server.get("notes", [])]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    def line(cells: list[str]) -> str:
        return "  ".join(v.ljust(w) if c < 2 else v.rjust(w)
                         for c, (v, w) in enumerate(zip(cells, widths, strict=True)))

    out = ["versions: " + ", ".join(versions), line(header)]
    out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in rows]
    out.append("* generator at or above 90% of a core: that figure may be the generator's limit.")
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as fh:
        mem_kib = int(fh.readline().split()[1])
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
            "load_average": os.getloadavg()}


def checkout() -> dict[str, Any]:
    """Which Parley was measured: the commit, and whether server code had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    changed = git("status", "--porcelain", "--", "server", "extensions").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_server_files": len(changed)}


async def run_cluster(mode: str, workdir: Path) -> dict[str, Any]:
    """The cluster scenario, `python -m bench.cluster` in its own process; its results, or the reason it failed."""
    out = workdir / "cluster.json"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.cluster", f"--{mode}", "--json", str(out),
                                                cwd=REPO, stdout=asyncio.subprocess.DEVNULL)
    if await proc.wait() != 0 or not out.exists():
        return {"error": f"bench.cluster failed ({proc.returncode})"}
    return json.loads(out.read_text())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    size = SIZES[mode]
    profile = Profile(archive=args.profile in ("archive-on", "full"), full=args.profile == "full",
                      storage=args.storage)
    cluster = CLUSTER in args.scenarios
    scenarios = [name for name in args.scenarios if name != CLUSTER]
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "mode": mode, "profile": profile.name,
        "sizes": size, "parley_checkout": checkout(), "machine_before": machine(), "servers": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    try:
        for name in args.servers if scenarios else []:
            address, port = args.address.get(name, (None, 5222))
            server = SERVERS[name](workdir, profile, address, port)
            print(f"{name}: setting up ({server.address}:{server.port}) ...", file=sys.stderr, flush=True)
            results["servers"][name] = await bench_server(server, scenarios, size, args.pin)
        if cluster:
            print("cluster: 1, 2 and 3 Parley nodes ...", file=sys.stderr, flush=True)
            results["cluster"] = await run_cluster(mode, workdir)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["machine_after"] = machine()
    tables = [render_table(results, scenarios)] if scenarios else []
    if cluster:
        tables.append("cluster:\n" + results["cluster"].get("table", results["cluster"].get("error", "")))
    results["table"] = "\n\n".join(tables)
    return results


def _address(text: str) -> tuple[str, tuple[str, int]]:
    name, _, addr = text.partition("=")
    host, _, port = addr.rpartition(":")
    if name not in SERVERS or not host.startswith("127.") or not port.isdigit():
        raise argparse.ArgumentTypeError("expected SERVER=127.x.y.z:PORT (loopback only)")
    return name, (host, int(port))


def _names(choices: list[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return names
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=_names(list(SERVERS)), default=list(SERVERS),
                        help="comma-separated, default all: " + ",".join(SERVERS))
    parser.add_argument("--scenarios", type=_names([*SCENARIOS, CLUSTER]),
                        help="comma-separated, default all: " + ",".join(SCENARIOS) + f"; '{CLUSTER}' (Parley "
                             "nodes, bench/cluster.py) only when named")
    parser.add_argument("--quick", action="store_true", help="shorter runs and fewer sessions")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, a few seconds per scenario (tests); default scenarios "
                             + ",".join(SMOKE_SCENARIOS))
    parser.add_argument("--profile", choices=["archive-off", "archive-on", "full"], default="archive-off",
                        help="archive-on: message archiving; full: the archive and every module a real "
                             "deployment loads (carbons, stream management, CSI, PEP, blocking, push, private "
                             "storage, vCard)")
    parser.add_argument("--storage", choices=STORAGES, default="default",
                        help="each server's own default store, or all of them on the machine's PostgreSQL "
                             "(127.0.0.1:5432, database test, a fresh schema each)")
    parser.add_argument("--address", type=_address, action="append", default=[], metavar="SERVER=IP:PORT",
                        help="listen address of a server (loopback only); default 127.0.1.4 Parley, "
                             "127.0.1.2 Prosody, 127.0.1.3 ejabberd, port 5222")
    parser.add_argument("--pin", action="store_true",
                        help="pin the server to CPU 1 and the generator to CPU 0")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write results (default {RESULTS})")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, data)")
    args = parser.parse_args(argv)
    if args.scenarios is None:
        args.scenarios = SMOKE_SCENARIOS if args.smoke else DEFAULT_SCENARIOS
    args.address = dict(args.address)
    results = asyncio.run(run(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    before, after = results["machine_before"]["load_average"][0], results["machine_after"]["load_average"][0]
    print(f"{results['date']}  mode {results['mode']}  profile {results['profile']}  "
          f"parley {results['parley_checkout']['commit']}  load average before {before:.2f}, after {after:.2f}")
    print(results["table"])
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
