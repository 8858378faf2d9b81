"""Storage fixtures: a fresh database on SQLite and on PostgreSQL for every test.

Import the fixtures into a test module (``from tests.storage_fixtures import storage_fixture``).
PostgreSQL is reached through ``PARLEY_TEST_POSTGRES_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``); each test gets its own schema, dropped afterwards,
so parallel runs on one database never collide. If PostgreSQL is unreachable its variants are
skipped, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import make_url

from server.storage import Storage, open_storage
from tests.conftest import unavailable

POSTGRES_DSN = os.environ.get("PARLEY_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


async def connect_postgres() -> asyncpg.Connection:
    """A plain asyncpg connection for test set-up; skips (fails under CI=true) when unreachable."""
    try:
        return await asyncpg.connect(POSTGRES_DSN, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        unavailable(f"PostgreSQL unreachable at {POSTGRES_DSN}: {exc}")


def postgres_url(schema: str) -> str:
    """open_storage URL of the test PostgreSQL database, with Parley's tables in ``schema``."""
    url = make_url(POSTGRES_DSN).set(drivername="postgresql+asyncpg").update_query_dict({"schema": schema})
    return url.render_as_string(hide_password=False)


@pytest.fixture(name="storage_url", params=["sqlite", "postgresql"])
async def storage_url_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """URL of an empty database; the SQLite file sits in a folder open_storage must create."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'data' / 'parley.db'}"
        return
    schema = f"parley_t_{secrets.token_hex(8)}"
    conn = await connect_postgres()
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    try:
        url = (
            make_url(POSTGRES_DSN).set(drivername="postgresql+asyncpg").update_query_dict({"schema": schema})
        )
        yield url.render_as_string(hide_password=False)
    finally:
        conn = await connect_postgres()
        try:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture(name="storage")
async def storage_fixture(storage_url: str) -> AsyncIterator[Storage]:
    """An opened (migrated) Storage on each backend."""
    storage = await open_storage(storage_url)
    try:
        yield storage
    finally:
        await storage.close()
