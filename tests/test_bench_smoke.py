"""A few seconds of the benchmark against a Parley subprocess, so bench/ cannot rot unnoticed.

Nothing here judges speed: only that logins completed, messages flowed, sessions idled and the JSON
results were written. Prosody and ejabberd stay out of it (CI time).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
