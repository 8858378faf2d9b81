"""A few seconds of the benchmark against a Parley subprocess, so bench/ cannot rot unnoticed.

Nothing here judges speed: only that logins completed, messages flowed, sessions idled and the JSON
results were written, on SQLite and (`--storage postgresql`) on PostgreSQL. Prosody and ejabberd stay out
of it (CI time).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import postgres_available, unavailable

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_bench_smoke_against_parley(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--servers", "parley",
         "--scenarios", "login-plain,throughput,idle", "--address", f"parley=127.0.0.1:{free_port()}",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=220,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    parley = results["servers"]["parley"]
    assert "skipped" not in parley, parley
    scenarios = parley["scenarios"]
    for name in ("login-plain", "throughput", "idle"):
        assert "error" not in scenarios[name], (name, scenarios[name])
        assert scenarios[name]["cpu"]["generator"] >= 0
    assert scenarios["login-plain"]["counts"]["logins"] > 0
    assert scenarios["throughput"]["counts"]["delivered"] > 0
    assert scenarios["throughput"]["metrics"]["latency_p50_ms"] > 0
    assert scenarios["idle"]["counts"]["measured_sessions"] > 0
    assert "messages/s" in results["table"] and "messages/s" in proc.stdout


def test_full_profile_loads_every_module_of_a_real_deployment(tmp_path: Path) -> None:
    """`--profile full`: Parley with the archive and the modules a deployment loads, and each peer's counterparts."""
    from bench.servers import EJABBERD_FULL, FULL_MODULES, PROSODY_FULL, Parley, Profile, Prosody
    from server.registry import available

    full = Profile(archive=True, full=True)
    assert full.name == "full"
    modules = Parley(tmp_path, full)._modules()
    assert {"mam", "carbons", "stream_management", "csi", "pep", "blocking", "push", "private", "vcard"} <= \
        set(modules) and set(FULL_MODULES) <= set(available())
    assert "mam" not in Parley(tmp_path, Profile())._modules()
    prosody = Prosody(tmp_path, full)._extra_modules()
    assert all(f'"{m}"' in prosody for m in PROSODY_FULL) and '"smacks"' in prosody
    for module in ("mod_carboncopy", "mod_stream_mgmt", "mod_client_state", "mod_pubsub", "mod_blocking",
                   "mod_push", "mod_private"):
        assert module in EJABBERD_FULL


@pytest.mark.timeout(240)
def test_bench_smoke_full_profile_fanout(tmp_path: Path) -> None:
    """The fan-out scenario under the full profile (stream management, PEP, the archive... on the login path)."""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--servers", "parley", "--profile", "full",
         "--scenarios", "fanout", "--address", f"parley=127.0.0.1:{free_port()}", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=220,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["profile"] == "full"
    fanout = results["servers"]["parley"]["scenarios"]["fanout"]
    assert "error" not in fanout, fanout
    assert fanout["counts"]["presences_at_watchers"] == fanout["counts"]["expected_at_watchers"] > 0
    assert fanout["metrics"]["fanout_logins_per_s"] > 0


@pytest.mark.timeout(180)
async def test_bench_smoke_archive_on_postgresql() -> None:
    """`--storage postgresql` with the archive on: Parley on the machine's PostgreSQL, in a schema of its own
    that is gone afterwards."""
    if not await postgres_available():
        unavailable("no PostgreSQL at 127.0.0.1:5432")
    out = Path(tempfile.mkdtemp()) / "results.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.run", "--smoke", "--servers", "parley", "--scenarios", "throughput",
        "--profile", "archive-on", "--storage", "postgresql", "--address", f"parley=127.0.0.1:{free_port()}",
        "--json", str(out), cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 170)
    assert proc.returncode == 0, err.decode()[-3000:]
    results = json.loads(out.read_text())
    assert results["profile"] == "archive-on, postgresql"
    throughput = results["servers"]["parley"]["scenarios"]["throughput"]
    assert "error" not in throughput, throughput
    assert throughput["counts"]["delivered"] > 0
    conn = await asyncpg.connect(host="127.0.0.1", port=5432, user="postgres", database="test")
    try:
        schema = f"parley_bench_parley_{proc.pid}"
        assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema) == 0
    finally:
        await conn.close()
