"""The publish-subscribe store, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from server.storage import Storage, StoredCredentials, StoredItem
from tests.storage_fixtures import storage_fixture, storage_url_fixture  # noqa: F401

H = "example.org"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def item(id_: str, n: int = 0) -> StoredItem:
    return StoredItem(id_, "alice@example.org/phone", T0 + timedelta(seconds=n), f"<x xmlns='urn:t'>{id_}</x>")


async def ids(storage: Storage, node: str = "n", **kwargs: object) -> list[str]:
    return [i.id for i in await storage.pubsub.items(H, "alice", node, **kwargs)]  # type: ignore[arg-type]


async def test_nodes_items_order_and_max_items(storage: Storage) -> None:
    ps = storage.pubsub
    assert await ps.create(H, "alice", "n", {"max_items": 3}, None, T0)
    assert not await ps.create(H, "alice", "n", {}, None, T0)
    assert await ps.node(H, "alice", "n") == {"max_items": 3}
    for n, id_ in enumerate("abcd"):
        await ps.publish(H, "alice", "n", item(id_, n), 3)
    assert await ids(storage) == ["b", "c", "d"]
    await ps.publish(H, "alice", "n", item("b", 9), 3)  # republished: now the newest
    assert await ids(storage) == ["c", "d", "b"]
    assert await ids(storage, last=2) == ["d", "b"]
    assert await ids(storage, ids=["c", "zz"]) == ["c"]
    assert await ps.retract(H, "alice", "n", ["c", "zz"]) == ["c"]
    await ps.configure(H, "alice", "n", {"max_items": 1}, 1)
    assert await ids(storage) == ["b"]
    await ps.purge(H, "alice", "n")
    assert await ids(storage) == []


async def test_subscriptions_affiliations_and_deletion(storage: Storage) -> None:
    ps = storage.pubsub
    await ps.create("pubsub.example.org", "", "feed", {}, "alice@example.org", T0)
    await ps.subscribe("pubsub.example.org", "", "feed", "bob@example.org", "s1", "subscribed")
    await ps.set_affiliation("pubsub.example.org", "", "feed", "bob@example.org", "publisher")
    assert await ps.subscriptions("pubsub.example.org", "", jid="bob@example.org") == [
        ("feed", "bob@example.org", "s1", "subscribed")]
    assert await ps.affiliations("pubsub.example.org", "", "feed") == [
        ("feed", "alice@example.org", "owner"), ("feed", "bob@example.org", "publisher")]
    await ps.set_affiliation("pubsub.example.org", "", "feed", "bob@example.org", "none")
    assert await ps.unsubscribe("pubsub.example.org", "", "feed", "bob@example.org")
    assert await ps.delete_node("pubsub.example.org", "", "feed")
    assert await ps.affiliations("pubsub.example.org", "", "feed") == []
    assert await ps.nodes("pubsub.example.org", "") == {}


async def test_deleting_an_account_deletes_its_pep_nodes(storage: Storage) -> None:
    await storage.accounts.create(H, "alice", [StoredCredentials("SHA-256", b"s" * 16, 4096, b"k" * 32, b"k" * 32)])
    await storage.pubsub.create(H, "alice", "n", {}, None, T0)
    await storage.pubsub.publish(H, "alice", "n", item("a"), None)
    assert await storage.accounts.delete(H, "alice")
    assert await storage.pubsub.nodes(H, "alice") == {}
    assert await ids(storage) == []
