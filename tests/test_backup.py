"""`parley backup`, `parley restore` and `parley db` on SQLite and PostgreSQL, with a real `parley serve`."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy

from server.config import load_config
from server.storage import open_storage
from server.storage.schema import STEPS
from tests.conftest import PG_URL, drop_pg_schema, free_port, make_pg_schema, unavailable
from tests.test_cli import parley, start_process, stop_process, write_config

pytestmark = pytest.mark.timeout(120)
PORTS = (free_port(), free_port())  # of the listeners: only `parley serve` binds them


@pytest.fixture(name="storage_extra", params=["sqlite", "postgresql"])
async def storage_extra_fixture(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The configuration's storage: SQLite in the data folder, or a PostgreSQL schema of the test's own."""
    if request.param == "sqlite":
        yield ""
        return
    if shutil.which("pg_dump") is None:
        unavailable("pg_dump is not installed (apt-get install -y postgresql-client)")
    schema = await make_pg_schema()
    try:
        yield f'[storage]\nurl = "{PG_URL}?schema={schema}"'
    finally:
        await drop_pg_schema(schema)


@pytest.fixture
def config(tmp_path: Path, storage_extra: str) -> Path:
    return write_config(tmp_path, PORTS[0], PORTS[1], extra=storage_extra)


async def run(*args: str) -> tuple[int, str, str]:
    result = await asyncio.to_thread(parley, *args)
    return result.returncode, result.stdout, result.stderr


async def start(tmp_path: Path, storage_extra: str) -> asyncio.subprocess.Process:
    """`parley serve` on the configuration of the `config` fixture (written again, the same)."""
    proc, _ = await start_process(tmp_path, *PORTS, extra=storage_extra)
    return proc


async def test_backup_while_serving_then_restore_after_a_loss(config: Path, tmp_path: Path,
                                                              storage_extra: str) -> None:
    uploads = tmp_path / "data" / "uploads"
    proc = await start(tmp_path, storage_extra)
    try:
        assert (await run("user", "add", "alice@localhost", "--password", "pw", "--config", str(config)))[0] == 0
        uploads.mkdir()
        (uploads / "cat.jpg").write_bytes(b"meow")
        code, out, err = await run("backup", str(tmp_path / "b1"), "--config", str(config))
        assert code == 0, err
        assert "backup in" in out and "uploads" in out
        assert json.loads((tmp_path / "b1" / "parley-backup.json").read_text())["schema_version"] == len(STEPS)
        code, _, err = await run("backup", str(tmp_path / "b1"), "--config", str(config))
        assert code == 1 and "is not empty" in err  # a backup is never overwritten
        assert (await run("user", "delete", "alice@localhost", "--config", str(config)))[0] == 0
        code, _, err = await run("restore", str(tmp_path / "b1"), "--force", "--config", str(config))
        assert code == 1 and "the server is running" in err
    finally:
        await stop_process(proc)
    shutil.rmtree(uploads)
    code, _, err = await run("restore", str(tmp_path / "b1"), "--config", str(config))
    assert code == 1 and "add --force" in err
    code, out, err = await run("restore", str(tmp_path / "b1"), "--force", "--config", str(config))
    assert code == 0, err
    assert (uploads / "cat.jpg").read_bytes() == b"meow"
    code, out, _ = await run("user", "list", "--config", str(config))
    assert out.split() == ["admin@localhost", "alice@localhost"]
    proc = await start(tmp_path, storage_extra)  # the restored database serves
    await stop_process(proc)
    assert proc.returncode == 0


async def test_db_status_and_upgrade(config: Path) -> None:
    code, out, _ = await run("db", "status", "--config", str(config))
    assert code == 1 and f"schema version 0, this Parley's is {len(STEPS)}: run `parley db upgrade`" in out
    code, out, err = await run("db", "upgrade", "--config", str(config))
    assert code == 0 and f"upgraded from schema version 0 to {len(STEPS)}" in out, err
    code, out, _ = await run("db", "status", "--config", str(config))
    assert code == 0 and "up to date" in out


async def test_an_older_parley_refuses_a_newer_schema(config: Path) -> None:
    url = load_config(config).storage.url
    storage = await open_storage(url)
    try:
        async with storage.engine.begin() as conn:
            await conn.execute(sqlalchemy.text("INSERT INTO schema_version (version, applied) "
                                               "VALUES (99, CURRENT_TIMESTAMP)"))
    finally:
        await storage.close()
    code, _, err = await run("serve", "--config", str(config))
    assert code == 2, err
    assert f"the database has schema version 99, newer than this Parley's {len(STEPS)}" in err
    assert "Traceback" not in err
    code, out, _ = await run("db", "status", "--config", str(config))
    assert code == 1 and "newer than this Parley's" in out


async def test_without_pg_dump_the_command_to_run_is_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    schema = await make_pg_schema()
    config = write_config(tmp_path, free_port(), free_port(), extra=f'[storage]\nurl = "{PG_URL}?schema={schema}"')
    try:
        await (await open_storage(f"{PG_URL}?schema={schema}")).close()
        result = await asyncio.to_thread(parley, "backup", str(tmp_path / "b"), "--config", str(config),
                                         env={"PATH": "/nonexistent"})
        assert result.returncode == 1
        assert "pg_dump is not installed here" in result.stderr
        assert f"pg_dump --format=custom --schema={schema} --file=" in result.stderr
        assert "postgresql://postgres@127.0.0.1:5432/test" in result.stderr
    finally:
        await drop_pg_schema(schema)


async def test_restore_refuses_a_folder_that_is_no_backup(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port(), free_port())
    code, _, err = await run("restore", str(tmp_path), "--config", str(config))
    assert code == 1 and "is not a Parley backup" in err
    assert not (tmp_path / "data" / "parley.db").exists()

