"""The `parley` command as an admin uses it: accounts, config checks, and a real server process."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Harness, free_port

PARLEY = [sys.executable, "-m", "server.cli"]


def write_config(tmp_path: Path, port: int, direct_port: int, extra: str = "") -> Path:
    path = tmp_path / "parley.toml"
    path.write_text(f"""
data_dir = "data"
scram_iterations = 4096
{extra}
[[listeners]]
type = "c2s"
address = "127.0.0.1"
port = {port}
tls = "starttls"

[[listeners]]
type = "c2s"
address = "127.0.0.1"
port = {direct_port}
tls = "direct"

[hosts."localhost"]
admins = ["admin@localhost"]
""")
    return path


def parley(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PARLEY, *args], capture_output=True, text=True, input=stdin, timeout=60)


def test_user_management(tmp_path: Path) -> None:
    config = str(write_config(tmp_path, free_port(), free_port()))
    assert parley("user", "--config", config, "add", "Alice@LocalHost", "--password", "pw1").returncode == 0
    dup = parley("user", "--config", config, "add", "alice@localhost", "--password", "x")
    assert dup.returncode == 1 and "exists already" in dup.stderr
    assert parley("user", "--config", config, "add", "bob@localhost", stdin="pw2\n").returncode == 0
    assert parley("user", "--config", config, "list").stdout.split() == ["alice@localhost", "bob@localhost"]
    assert parley("user", "--config", config, "passwd", "bob@localhost", "--password", "pw3").returncode == 0
    assert parley("user", "--config", config, "delete", "bob@localhost").returncode == 0
    assert parley("user", "--config", config, "list").stdout.split() == ["alice@localhost"]
    missing = parley("user", "--config", config, "delete", "bob@localhost")
    assert missing.returncode == 1 and "no account" in missing.stderr
    other = parley("user", "--config", config, "add", "eve@elsewhere.example", "--password", "x")
    assert other.returncode == 1 and "not a host" in other.stderr
    bad = parley("user", "--config", config, "add", "a b@localhost", "--password", "x")
    assert bad.returncode == 1 and "invalid" in bad.stderr


def test_check_config(tmp_path: Path) -> None:
    good = write_config(tmp_path, free_port(), free_port())
    result = parley("check-config", str(good))
    assert result.returncode == 0 and "OK" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("port = ", "port = -", 1))
    result = parley("check-config", str(bad))
    assert result.returncode == 2
    assert "listeners[0].port" in result.stderr


def test_example_config_is_valid() -> None:
    result = parley("check-config", str(Path(__file__).parent.parent / "config" / "parley.example.toml"))
    assert result.returncode == 0, result.stderr


async def start_process(tmp_path: Path, port: int, direct_port: int, fd_limit: int | None = None,
                        extra: str = "") -> tuple[asyncio.subprocess.Process, list[str]]:
    config = write_config(tmp_path, port, direct_port, extra)

    def limit() -> None:
        if fd_limit:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    proc = await asyncio.create_subprocess_exec(
        *PARLEY, "serve", "--config", str(config), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=limit, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line, f"server exited: {(await proc.stderr.read()).decode()[-2000:]}"
        lines.append(line)
        if "Ctrl-C stops" in line:
            return proc, lines


async def stop_process(proc: asyncio.subprocess.Process) -> str:
    proc.terminate()
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    return err.decode()


async def test_serve_creates_admin_and_stops_cleanly(tmp_path: Path) -> None:
    port, direct_port = free_port(), free_port()
    proc, lines = await start_process(tmp_path, port, direct_port)
    output = "".join(lines)
    assert "created admin account admin@localhost with password" in output
    password = (tmp_path / "data" / "admin-password-localhost.txt").read_text().split()[1]
    harness = Harness(None, port, direct_port, tmp_path)  # type: ignore[arg-type]
    try:
        client = await harness.client("admin@localhost", password)
        assert client.boundjid.bare == "admin@localhost"
    finally:
        await harness.close()
    assert await stop_process(proc) is not None
    assert proc.returncode == 0


async def test_descriptor_limit_refuses_new_connections_and_keeps_sessions(tmp_path: Path) -> None:
    """With only 128 descriptors, 200 connection attempts must not take the server down."""
    port, direct_port = free_port(), free_port()
    proc, _ = await start_process(tmp_path, port, direct_port, fd_limit=128,
                                  extra='[limits]\nmax_connections_per_ip = 1000')
    parley_args = ("user", "--config", str(tmp_path / "parley.toml"))
    for user in ("alice", "bob"):
        assert parley(*parley_args, "add", f"{user}@localhost", "--password", "pw").returncode == 0
    harness = Harness(None, port, direct_port, tmp_path)  # type: ignore[arg-type]
    sockets = []
    try:
        bob = await harness.client("bob@localhost", "pw", resource="r")
        received = harness.inbox(bob)
        alice = await harness.client("alice@localhost", "pw")
        for _ in range(200):
            try:
                sockets.append(await asyncio.open_connection("127.0.0.1", port))
            except OSError:
                break
        reader, _ = sockets[-1]
        assert await asyncio.wait_for(reader.read(100), 10) == b"", "the last connection was not refused"
        alice.send_message(mto="bob@localhost/r", mbody="still serving", mtype="chat")
        assert (await asyncio.wait_for(received.get(), 10))["body"] == "still serving"
        assert proc.returncode is None
    finally:
        for _, writer in sockets:
            writer.close()
        await harness.close()
        err = await stop_process(proc)
    assert "connection limit" in err


@pytest.mark.parley_config(limits={"unauthenticated_timeout": 1.0})
async def test_unauthenticated_connections_time_out(server: Harness) -> None:
    raw = await server.raw()
    await raw.open()
    data = await raw.closed(timeout=5)
    assert b"connection-timeout" in data
