"""The `parley` command as an admin uses it: accounts, config checks, and a real server process."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from server.config import load_config
from server.storage import open_storage
from tests.conftest import PG_URL, Harness, drop_pg_schema, free_port, make_pg_schema

PARLEY = [sys.executable, "-m", "parley"]


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


def parley(*args: str, stdin: str | None = None, cwd: Path | None = None, env: dict[str, str] | None = None,
           system_config: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`parley ARGS` in a subprocess; `system_config` stands for /etc/parley/parley.toml (which a test cannot
    write), so that what the machine has there never counts."""
    system = system_config or Path("/nonexistent/parley.toml")
    command = [sys.executable, "-c", "import sys; import server.config as c; c.SYSTEM_CONFIG = "
               "c.Path(sys.argv.pop(1)); from parley import main; sys.exit(main())", str(system)]
    environment = {k: v for k, v in os.environ.items() if k not in ("PARLEY_CONFIG", "PARLEY_DATA")}
    return subprocess.run([*command, *args], capture_output=True, text=True, input=stdin, timeout=timeout,
                          cwd=cwd, env={**environment, **(env or {})})


def create_database(config: Path) -> None:
    """What the server's first start does: user commands work on an existing database only."""
    async def create() -> None:
        await (await open_storage(load_config(config).storage.url)).close()

    asyncio.run(create())


def test_user_management(tmp_path: Path) -> None:
    config = str(write_config(tmp_path, free_port(), free_port()))
    create_database(Path(config))
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


def test_config_option_anywhere_and_where_the_server_keeps_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port(), free_port())
    create_database(config)
    added = parley("user", "add", "alice@localhost", "--password", "pw", "--config", str(config))
    assert added.returncode == 0, added.stderr
    assert parley("--config", str(config), "user", "list").stdout.split() == ["alice@localhost"]
    assert parley("user", "list", f"--config={config}").stdout.split() == ["alice@localhost"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    from_env = parley("user", "add", "bob@localhost", "--password", "pw", cwd=elsewhere,
                      env={"PARLEY_CONFIG": str(config)})
    assert from_env.returncode == 0, from_env.stderr
    listed = parley("user", "list", cwd=elsewhere, system_config=config)  # as /etc/parley/parley.toml
    assert listed.stdout.split() == ["alice@localhost", "bob@localhost"], listed.stderr
    assert parley("check-config", "--config", str(config)).returncode == 0
    assert f"{config}: OK" in parley("check-config", cwd=elsewhere, env={"PARLEY_CONFIG": str(config)}).stdout
    assert not (elsewhere / "parley-data").exists()


def test_user_command_never_creates_a_database(tmp_path: Path) -> None:
    result = parley("user", "add", "alice@localhost", "--password", "pw", cwd=tmp_path)
    assert result.returncode == 2
    assert f"no database at {tmp_path}/parley-data/parley.db" in result.stderr
    assert "--config" in result.stderr and "PARLEY_CONFIG" in result.stderr
    assert not (tmp_path / "parley-data").exists()
    config = write_config(tmp_path, free_port(), free_port())
    result = parley("user", "list", cwd=tmp_path / "..", env={"PARLEY_CONFIG": str(config)})
    assert result.returncode == 2 and f"no database at {tmp_path}/data/parley.db" in result.stderr
    assert not (tmp_path / "data").exists()


def test_a_configured_certificate_that_is_missing_is_an_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port(), free_port())
    config.write_text(config.read_text() + 'certificate = "tls/tpyo.crt"\nkey = "tls/tpyo.key"\n')
    missing = tmp_path / "tls" / "tpyo.crt"
    for command in ("check-config", "serve"):
        result = parley(command, "--config", str(config), timeout=20)
        assert result.returncode == 2, (command, result.stderr)
        assert f"config key 'hosts.localhost.certificate': {missing} does not exist" in result.stderr
    assert not missing.exists() and not (tmp_path / "tls").exists()
    assert not (tmp_path / "data" / "certs").exists()


async def test_user_command_never_creates_a_postgresql_schema(tmp_path: Path) -> None:
    schema = await make_pg_schema()
    config = write_config(tmp_path, free_port(), free_port(), extra=f'[storage]\nurl = "{PG_URL}?schema={schema}"')
    try:
        result = await asyncio.to_thread(parley, "user", "list", "--config", str(config))
        assert result.returncode == 2 and "no Parley database at postgresql+asyncpg://" in result.stderr
        conn = await asyncpg.connect(PG_URL.replace("+asyncpg", ""))
        try:
            assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema) == 0
        finally:
            await conn.close()
        await (await open_storage(f"{PG_URL}?schema={schema}")).close()  # what the server's first start does
        result = await asyncio.to_thread(parley, "user", "add", "alice@localhost", "--password", "pw",
                                         "--config", str(config))
        assert result.returncode == 0, result.stderr
    finally:
        await drop_pg_schema(schema)
