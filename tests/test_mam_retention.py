"""`mam.retention_days`: the archive module's own expiry task removes what is older, seen through a client's
MAM queries (the store's expire() is tested on its own in test_archive_storage.py)."""

from __future__ import annotations

import pytest

from extensions import mam
from tests.conftest import Harness
from tests.test_basic_modules import wait_for
from tests.test_mam import Archive, chat
from tests.test_roster_presence import sync

RETENTION = 3.0  # seconds, given to the module in days


@pytest.fixture
def quick_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The expiry task runs every 0.2 s instead of hourly; requested before `server`, whose start spawns it."""
    monkeypatch.setattr(mam, "EXPIRY_INTERVAL", 0.2)


@pytest.mark.parley_config(module_options={"mam": {"retention_days": RETENTION / 86400}})
async def test_messages_older_than_the_retention_vanish_from_the_archive(quick_expiry: None,
                                                                          server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    alice = await server.client("alice@localhost", resource="phone")
    bob = await server.client("bob@localhost", resource="desk")
    archive = Archive(alice)

    async def bodies() -> list[str | None]:
        return [r.body for r in await archive.all()]

    chat(bob, "alice@localhost", "soon old news")
    await sync(bob)
    assert await bodies() == ["soon old news"]

    async def expired() -> bool:
        return await bodies() == []

    await wait_for(expired, timeout=RETENTION + 5)
    chat(bob, "alice@localhost", "fresh")
    await sync(bob)
    assert await bodies() == ["fresh"]  # the task goes on, and takes only what is older
