"""The systemd unit of config/parley.service: valid for systemd, hardened, reloaded by SIGHUP."""

from __future__ import annotations

import configparser
import logging
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from server import logs
from server.config import ConfigError, parse_config

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


def test_syslog_logging_sends_the_lines_to_the_syslog_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon.bind(str(tmp_path / "log"))
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(tmp_path / "log"))
    config = parse_config({"logging": {"syslog": True}}, tmp_path / "parley.toml")
    handler = logs._handler(config)
    try:
        handler.emit(logging.LogRecord("parley.c2s", logging.WARNING, __file__, 1, "hello %s", ("syslog",), None))
        daemon.settimeout(5)
        line = daemon.recv(4096).decode()
    finally:
        handler.close()
        daemon.close()
    assert line.startswith("<28>parley[") and "WARNING parley.c2s: hello syslog" in line  # daemon.warning = 3*8+4


def test_syslog_without_a_daemon_and_syslog_with_a_file_are_configuration_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(tmp_path / "nothing-here"))
    with pytest.raises(ConfigError, match="no syslog daemon listens on"):
        logs._handler(parse_config({"logging": {"syslog": True}}, tmp_path / "parley.toml"))
    with pytest.raises(ConfigError, match="log to syslog or to a file, not both"):
        parse_config({"logging": {"syslog": True, "file": "x.log"}}, tmp_path / "parley.toml")
