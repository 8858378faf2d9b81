"""bench/notifications.py with small numbers, so the measurement cannot rot unnoticed (nothing judges speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bench_smoke import REPO


@pytest.mark.timeout(120)
def test_notifications_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "notifications.json"
    proc = subprocess.run([sys.executable, "-m", "bench.notifications", "--users", "20", "--messages", "50",
                           "--throughput", "smoke", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["digests"]["users"] == 20 and result["digests"]["digests_per_second"] > 0
    assert [row["mode"] for row in result["offline"]] == ["without module", "not opted in", "opted in"]
    assert [row["mode"] for row in result["throughput"]] == ["without module", "not opted in", "opted in"]
    assert all(row["messages_per_second"] > 0 for row in result["throughput"])
