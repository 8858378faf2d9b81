"""bench.fast_login for a few logins against a Parley subprocess, so the FAST benchmark cannot rot unnoticed.
Nothing here judges speed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_bench_smoke import REPO, free_port


@pytest.mark.timeout(240)
def test_fast_benchmark_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fast_login", "--workers", "1", "--logins", "2", "--rounds", "1",
         "--rtt", "0", "5", "--address", "127.0.0.1", "--port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=220,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    for way in ("scram", "fast", "fast_counted"):
        assert results["logins"][way]["per_s"] > 0
    for rtt in ("rtt_0ms", "rtt_5ms"):
        assert results["reconnect"][rtt]["fast"]["p50_ms"] > 0 and results["reconnect"][rtt]["scram"]["p50_ms"] > 0
