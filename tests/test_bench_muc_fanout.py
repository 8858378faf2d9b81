"""bench/muc_fanout.py against a Parley subprocess with a small room, so the measurement cannot rot unnoticed.

Nothing here judges speed: only that every occupant joined and got every message. Prosody and ejabberd
(`--servers`) stay out of it (CI time); their group chat configuration is checked without starting them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bench_smoke import REPO, free_port


@pytest.mark.timeout(120)
def test_muc_fanout_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "muc.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.muc_fanout", "--occupants", "12", "--messages", "3", "--burst", "4",
         "--address", "127.0.0.1", "--port", str(free_port()), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["servers"]["parley"]
    assert result["occupants"] == 12
    assert 0 < result["last_receipt_ms"]["p50"] <= result["last_receipt_ms"]["max"]
    assert result["burst_deliveries_per_s"] > 0


def test_muc_fanout_configures_each_peers_group_chat(tmp_path: Path) -> None:
    """Prosody's muc component (with muc_mam when archived) and ejabberd's mod_muc with room for 1,000."""
    from bench.muc_fanout import MUC_SERVERS, EjabberdWithMuc, ProsodyWithMuc

    assert set(MUC_SERVERS) == {"parley", "prosody", "ejabberd"}
    assert issubclass(ProsodyWithMuc, MUC_SERVERS["prosody"]) and issubclass(EjabberdWithMuc, MUC_SERVERS["ejabberd"])
