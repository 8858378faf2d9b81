"""The systemd unit of config/parley.service: valid for systemd, hardened, reloaded by SIGHUP."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "config" / "parley.service"


def read_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    return unit


def test_the_unit_runs_parley_hardened_and_reloads_with_sighup() -> None:
    service = read_unit()["Service"]
    assert service["User"] == "parley"
    assert service["ExecStart"].split()[1:3] == ["serve", "--config"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/parley" in service["ReadWritePaths"].split()
    for setting in ("NoNewPrivileges", "PrivateTmp"):
        assert service[setting] == "true"
    assert int(service["LimitNOFILE"]) >= 65536


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # Skipped where systemd-analyze is missing, even under CI=true: it is a verification tool of systemd, not
    # a service the tests need, and containers often lack it.
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # The unit runs /usr/local/bin/parley, which this machine may lack: verify a copy naming this Python's.
    parley = shutil.which("parley") or "/bin/true"
    unit = tmp_path / "parley.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/parley", parley))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=60)
    problems = [line for line in result.stderr.splitlines() if str(unit) in line or "parley.service" in line]
    assert result.returncode == 0 and not problems, result.stderr
