"""bench/mam_query.py on a small archive in both stores, so the measurement cannot rot unnoticed.

Nothing here judges speed: only that each kind of query found what the archive was filled with.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bench_smoke import REPO, free_port


@pytest.mark.timeout(120)
def test_mam_query_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "mam.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.mam_query", "--messages", "3000", "--contacts", "10", "--queries", "2",
         "--address", "127.0.0.1", "--port", str(free_port()), "--pg-schema", "bench_mam_smoke",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for store in ("sqlite", "postgresql"):
        queries = result["stores"][store]["queries"]
        assert queries["contact-last-page"] | {"p50_ms": 0, "p95_ms": 0} == \
            {"p50_ms": 0, "p95_ms": 0, "page": 50, "count": 300}
        assert queries["all-last-page"]["count"] == 3000
        assert queries["fulltext"]["count"] == queries["fulltext"]["page"] == 3  # messages 0, 1000 and 2000
        assert 0 < queries["time-range"]["page"] == queries["time-range"]["count"] <= 50
        assert all(0 < q["p50_ms"] <= q["p95_ms"] for q in queries.values())
