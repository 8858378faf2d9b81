"""The stored rooms of a MUC service (server/storage/muc.py), on SQLite and PostgreSQL: one room loads alone,
with its affiliations and vCard and nothing of the others, as a cluster member loads a room it takes over."""

from __future__ import annotations

from datetime import UTC, datetime

from server.storage import Storage
from server.storage.muc import Affiliation, MucStore, StoredRoom
from tests.storage_fixtures import storage_fixture, storage_url_fixture  # noqa: F401

SERVICE = "conference.example.org"


def room(name: str, owner: str) -> StoredRoom:
    return StoredRoom(name, {"name": name.title()}, datetime(2026, 12, 7, tzinfo=UTC), f"{name} subject", "alice",
                      {owner: Affiliation("owner"), "example.net": Affiliation("outcast", reason="spam")},
                      f"<vCard xmlns='vcard-temp'><FN>{name}</FN></vCard>")


async def test_one_room_loads_alone_with_its_affiliations_and_vcard(storage: Storage) -> None:
    store = MucStore(storage.engine)
    for name, owner in (("lobby", "alice@example.org"), ("lobby2", "bob@example.org"), ("other", "carol@x.org")):
        await store.save_room(SERVICE, room(name, owner))
    await store.save_room("conference.example.net", room("lobby", "dave@example.net"))

    assert await store.room(SERVICE, "lobby") == room("lobby", "alice@example.org")
    assert await store.room(SERVICE, "lobby2") == room("lobby2", "bob@example.org")
    assert await store.room(SERVICE, "missing") is None
    assert await store.room("conference.example.com", "lobby") is None
    assert sorted(r.name for r in await store.rooms(SERVICE)) == ["lobby", "lobby2", "other"]
    assert {r.name: r for r in await store.rooms(SERVICE)}["other"] == room("other", "carol@x.org")
