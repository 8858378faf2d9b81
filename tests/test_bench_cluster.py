"""The cluster benchmark (bench/cluster.py) at smoke size, run as `python -m bench.run --scenarios cluster`: 1 and
2 real `parley serve --node` processes on a private redis-server and a fresh PostgreSQL schema, so that the
scenario cannot rot unnoticed. It judges no speed: only that every phase ran, that messages crossed nodes through
Redis, that each step of sessions on the other node was reached, that each message was archived twice, and that
the run left neither its schema nor its Redis behind.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import postgres_available, unavailable

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
async def test_bench_cluster_smoke(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    if not await postgres_available():
        unavailable("PostgreSQL at 127.0.0.1:5432 is not reachable")
    out = tmp_path / "results.json"
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bench.run", "--smoke", "--servers", "parley", "--scenarios", "cluster",
                         "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    cluster = results["cluster"]
    assert "error" not in cluster, cluster
    assert results["servers"] == {}, "no server of --servers runs for the cluster scenario alone"

    for count in ("1", "2"):
        entry = cluster["by_nodes"][count]
        assert "error" not in entry, (count, entry)
        assert entry["login"]["logins"] > 0
        throughput = entry["throughput"]
        assert throughput["delivered"] > 0 and throughput["lost"] == 0 and throughput["bounced"] == 0, throughput
        assert throughput["node_cpu_us_per_message"] > 0
    assert cluster["by_nodes"]["1"]["throughput"]["cross_delivered"] == 0
    crossing = cluster["by_nodes"]["2"]["throughput_cross"]
    assert crossing["cross_share"] == 1.0 and crossing["redis_publications_per_s"] > 0, crossing
    assert crossing["redis_bytes_in_per_cross_message"] > 100  # a 100-byte body went through Redis

    remote = cluster["remote_sessions"]
    assert "error" not in remote, remote
    assert [step["sessions_b"] for step in remote["steps"]] == [0, *cluster["sizes"]["remote"]]
    assert all(step["rss_a_kib"] > 0 for step in remote["steps"])

    archive = cluster["archive"]
    assert "error" not in archive, archive
    assert archive["archive_rows_per_sent_message"] == 2.0, archive  # the sender's archive and the receiver's

    shapes = cluster["redis_alone"]["shapes"]
    assert [s["frames_per_publication"] for s in shapes] == [1, 1, 10, 100]
    assert all(s["redis_cpu_us_per_frame"] > 0 for s in shapes)

    assert "messages/s" in proc.stdout and "remote sessions" in proc.stdout
    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
    try:
        left = await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", cluster["postgres_schema"])
    finally:
        await conn.close()
    assert left == 0, "the run's schema was not dropped"
