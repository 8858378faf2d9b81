"""bench/redis_cluster.py at smoke size: two real `parley serve --node` processes on one private redis-server,
then on a private three-master Redis Cluster, so that the comparison cannot rot unnoticed. It judges no speed:
only that messages crossed nodes through each, as publications (SPUBLISH on the Redis Cluster), with none lost.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import postgres_available, unavailable

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
async def test_bench_redis_cluster_smoke(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        unavailable("redis-server and redis-cli are not installed")
    if not await postgres_available():
        unavailable("PostgreSQL at 127.0.0.1:5432 is not reachable")
    out = tmp_path / "results.json"
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bench.redis_cluster", "--smoke", "--json", str(out)], cwd=REPO,
        capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for label in ("one_redis", "redis_cluster"):
        entry = results[label]
        assert "error" not in entry and entry["errors"] == 0, (label, entry)
        crossing = entry["throughput_cross"]
        assert crossing["cross_share"] == 1.0 and crossing["lost"] == 0, (label, crossing)
        assert crossing["delivered"] > 0 and crossing["redis_publications_per_s"] > 0, (label, crossing)
