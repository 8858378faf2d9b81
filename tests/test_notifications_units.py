"""Missed-message notifications: the outbox store on both backends (claims by several processes, digests
taken once, idempotency keys) and the pure pieces (backoff, circuit breaker, signed links, quiet hours,
addresses)."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from extensions.notifications.outbox import CircuitBreaker, backoff, clean, sign, unsign
from extensions.notifications.preferences import BadPreference, check_address, quiet_now
from server.storage import open_storage
from server.storage.notifications import PENDING, SENDING, SENT, Outgoing
from tests.storage_fixtures import storage_url_fixture  # noqa: F401

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def item(key: str, user: str = "alice", due: datetime = NOW) -> Outgoing:
    return Outgoing(key, "localhost", user, "email", f"{user}@example.org", {"kind": "digest"}, PENDING, due, 0,
                    None, NOW)


async def test_two_processes_claim_each_notification_once(storage_url: str) -> None:
    """Two servers on one database (a cluster): every row is sent by exactly one of them."""
    first, second = await open_storage(storage_url), await open_storage(storage_url)
    try:
        for i in range(40):
            assert await first.notifications.queue(item(f"k{i}", f"user{i % 7}"))
        assert not await first.notifications.queue(item("k0"))  # the idempotency key exists already
        lease = timedelta(seconds=60)
        claims = await asyncio.gather(*(s.notifications.claim("localhost", NOW, lease, limit=100)
                                        for s in (first, second, first, second)))
        ids = [o.id for claim in claims for o in claim]
        assert sorted(ids) == sorted(f"k{i}" for i in range(40))
        assert await first.notifications.claim("localhost", NOW, lease) == []  # leased, not yet expired
        await first.notifications.finish("k1", SENT)
        taken_again = await second.notifications.claim("localhost", NOW + 2 * lease, lease, limit=100)
        assert {o.id for o in taken_again} == {f"k{i}" for i in range(40)} - {"k1"}  # a dead process's leases
        assert all(o.status == SENDING for o in taken_again)
    finally:
        await first.close()
        await second.close()


async def test_a_digest_is_taken_by_one_process(storage_url: str) -> None:
    first, second = await open_storage(storage_url), await open_storage(storage_url)
    try:
        store = first.notifications
        for sender in ("bob", "bob", "carol", "bob"):
            await store.note("localhost", "alice", f"{sender}@localhost", sender, NOW)
        await store.note("localhost", "alice", "room@conference.localhost", "Bob", NOW)
        assert await store.due_users("localhost", NOW) == [("alice", NOW)]
        assert await store.due_users("localhost", NOW - timedelta(seconds=1)) == []
        results = await asyncio.gather(first.notifications.take("localhost", "alice", item("d1")),
                                       second.notifications.take("localhost", "alice", item("d2")))
        winners = [r for r in results if r]
        assert len(winners) == 1
        assert [(w.conversation, w.count) for w in winners[0]] == [
            ("bob@localhost", 3), ("carol@localhost", 1), ("room@conference.localhost", 1)]
        rows = await store.list("localhost")
        assert len(rows) == 1 and rows[0].payload["conversations"][0] == {
            "jid": "bob@localhost", "count": 3, "senders": ["bob"]}
        assert await store.waiting("localhost", "alice") == []
    finally:
        await first.close()
        await second.close()


def test_backoff_grows_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    delays = [backoff(n, 1.0, 60.0, rng) for n in range(1, 10)]
    for n, delay in enumerate(delays, start=1):
        full = min(60.0, 2 ** (n - 1))
        assert full / 2 <= delay <= full
    assert len({round(d, 6) for d in delays}) == len(delays)


def test_circuit_breaker_opens_and_closes() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=60)
    for _ in range(2):
        breaker.failed("smtp:a")
    assert breaker.open_until("smtp:a") is None
    breaker.failed("smtp:a")
    assert breaker.open_until("smtp:a") is not None
    assert breaker.open_until("smtp:b") is None  # per endpoint
    breaker.succeeded("smtp:a")
    assert breaker.open_until("smtp:a") is None


def test_signed_links() -> None:
    token = sign(b"k" * 32, "unsubscribe", {"h": "localhost", "u": "alice", "e": "a@example.org"})
    assert unsign(b"k" * 32, "unsubscribe", token) == {"h": "localhost", "u": "alice", "e": "a@example.org"}
    assert unsign(b"k" * 32, "confirm", token) is None  # one purpose per token
    assert unsign(b"x" * 32, "unsubscribe", token) is None
    mac = token.split(".")[1]
    forged = sign(b"other", "unsubscribe", {"h": "localhost", "u": "bob", "e": "a@example.org"}).split(".")[0]
    assert unsign(b"k" * 32, "unsubscribe", f"{forged}.{mac}") is None
    assert unsign(b"k" * 32, "unsubscribe", "garbage") is None


@pytest.mark.parametrize(("quiet", "zone", "hour", "expected"), [
    ("22:00-07:00", "UTC", 23, True), ("22:00-07:00", "UTC", 6, True), ("22:00-07:00", "UTC", 12, False),
    ("09:00-17:00", "UTC", 12, True), ("22:00-07:00", "Asia/Tokyo", 14, True),  # 23:00 in Tokyo
    ("22:00-07:00", "America/New_York", 12, False), ("", "UTC", 3, False),
])
def test_quiet_hours_in_the_users_zone(quiet: str, zone: str, hour: int, expected: bool) -> None:
    assert quiet_now(quiet, zone, NOW.replace(hour=hour)) is expected


def test_addresses_and_names() -> None:
    assert check_address(" alice@example.org ") == "alice@example.org"
    for bad in ("", "alice", "@example.org", "alice@", "alice@localhost", "a b@example.org",
                "a@example.org\nBcc: b@example.org", "Alice <a@example.org>", "a@example.org,b@example.org",
                "a@.example.org"):
        with pytest.raises(BadPreference):
            check_address(bad)
    assert clean("evil\r\nBcc: x@example.org") == "evil  Bcc: x@example.org"
    assert len(clean("x" * 500)) == 80


async def test_bodies_kept_and_push_delivered_taken_back(storage_url: str) -> None:
    """The last bodies per conversation, oldest first; `unnote` takes one message back by its key (its body
    with it) and the conversation away at zero."""
    storage = await open_storage(storage_url)
    try:
        store = storage.notifications
        for i in range(5):
            await store.note("localhost", "alice", "bob@localhost", "bob@localhost", NOW, (f"k{i}", f"body {i}"))
        await store.note("localhost", "alice", "bob@localhost", "bob@localhost", NOW)  # an OMEMO one: no body
        await store.note("localhost", "alice", "carol@localhost", "carol@localhost", NOW, ("c0", "hi"))
        bob, carol = sorted(await store.waiting("localhost", "alice"), key=lambda w: w.conversation)
        assert carol.bodies == (("carol@localhost", "hi"),)
        assert (bob.count, bob.bodies) == (6, tuple(("bob@localhost", f"body {i}") for i in (2, 3, 4)))
        assert await store.unnote("localhost", "alice", "bob@localhost", "k3")
        assert await store.unnote("localhost", "alice", "carol@localhost", "c0")
        assert not await store.unnote("localhost", "alice", "carol@localhost", "c0")
        (bob,) = await store.waiting("localhost", "alice")
        assert (bob.count, bob.bodies) == (5, (("bob@localhost", "body 2"), ("bob@localhost", "body 4")))
        taken = await store.take("localhost", "alice", item("d1"))
        assert [w.conversation for w in taken] == ["bob@localhost"]
        (row,) = await store.list("localhost")
        assert row.payload["conversations"][0]["bodies"] == [["bob@localhost", "body 2"], ["bob@localhost", "body 4"]]
    finally:
        await storage.close()


async def test_step_11_adds_the_bodies_to_a_database_of_step_10(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'parley.db'}"
    storage = await open_storage(url)
    async with storage.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE notify_pending DROP COLUMN recent"))
        await conn.execute(text("DELETE FROM schema_version WHERE version >= 11"))  # the later steps run again
    await storage.close()
    storage = await open_storage(url)
    try:
        await storage.notifications.note("localhost", "alice", "bob@localhost", "bob@localhost", NOW, ("k", "hi"))
        assert (await storage.notifications.waiting("localhost", "alice"))[0].bodies == (("bob@localhost", "hi"),)
    finally:
        await storage.close()
