"""bench/overload.py against Parley with a tiny descriptor limit, so the overload run cannot rot unnoticed.

Unlike the speed figures this one has a verdict: Parley refuses what it cannot serve and keeps serving
the sessions it has.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bench_smoke import REPO, free_port


@pytest.mark.timeout(150)
def test_parley_keeps_its_sessions_past_the_descriptor_limit(tmp_path: Path) -> None:
    out = tmp_path / "overload.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.overload", "--servers", "parley", "--fd-limit", "128", "--witnesses", "10",
         "--storm", "120", "--address", f"parley=127.0.0.1:{free_port()}", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parley = json.loads(out.read_text())["servers"]["parley"]
    assert parley["witnesses_logged_in"] == parley["witnesses_answered"] == 10
    assert 0 < parley["storm_logged_in"] < 120 and parley["storm_refused"] > 0
    assert parley["alive_after"] and parley["login_after_storm"] and parley["passed"]
