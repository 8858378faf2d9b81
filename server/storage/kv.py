"""Generic JSON documents per user (or per host, with user ''), so modules need no tables of their own.

Documents are addressed by ``store`` (the module's name, e.g. 'vcard' or 'private') and a ``key``
inside it ('' when a store keeps one document per user).
"""

from __future__ import annotations

import secrets
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import bindparam, delete, select

from server.storage.engine import dialect_insert, read, upsert, user_params, user_rows, writer
from server.storage.schema import kv

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")


_GET = select(kv.c.value).where(*user_params(kv), kv.c.store == bindparam("store"), kv.c.key == bindparam("key"))


class KeyValueStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)
        self._caches: weakref.WeakSet[CachedDocuments[Any]] = weakref.WeakSet()  # read through this store
        self._cache_watchers: list[Callable[[str, str, str], None]] = []

    def watch_cached(self, watcher: Callable[[str, str, str], None]) -> None:
        """Tell `watcher` (store, host, user) whenever a cached document is set through this store: with several
        worker processes the others hear of it and `forget_cached` their copy."""
        self._cache_watchers.append(watcher)

    def forget_cached(self, store: str, host: str, user: str) -> None:
        """Another process set a document: every cache of `store` drops its copy."""
        for cache in self._caches:
            cache.forget(store, host, user)

    async def get(self, host: str, user: str, store: str, key: str = "") -> Any | None:
        params = {"host": host, "username": user, "store": store, "key": key}
        return await read(self._engine, lambda conn: conn.scalar(_GET, params))

    async def host_secret(self, host: str, store: str) -> bytes:
        """A random 32-byte key of `store` on `host`, made at first use and kept: what signs the URLs a module
        hands out (uploads, unsubscribe links) and the dialback keys of federation, so that they survive a restart,
        no two hosts share one and every process of a cluster (sharing the database) has the same."""
        secret = await self.get(host, "", store, "secret")
        if secret is None:
            # Several processes starting at once on a new database: the first one's secret is everyone's.
            async with self._writer.begin() as conn:
                await conn.execute(dialect_insert(conn, kv).values(
                    host=host, username="", store=store, key="secret", value=secrets.token_hex(32),
                ).on_conflict_do_nothing())
            secret = await self.get(host, "", store, "secret")
        return bytes.fromhex(secret)

    async def set(self, host: str, user: str, store: str, key: str, value: Any) -> None:
        """Store a JSON-serialisable ``value``; None deletes the document."""
        async with self._writer.begin() as conn:
            if value is None:
                await conn.execute(
                    delete(kv).where(*user_rows(kv, host, user), kv.c.store == store, kv.c.key == key)
                )
            else:
                await conn.execute(
                    upsert(
                        conn,
                        kv,
                        {"host": host, "username": user, "store": store, "key": key},
                        {"value": value},
                    )
                )

    async def owners(self, host: str, store: str, key: str) -> list[str]:
        """The users of ``host`` with a document under ``key`` in ``store``."""
        async with self._engine.begin() as conn:
            found = await conn.scalars(
                select(kv.c.username).where(kv.c.host == host, kv.c.store == store, kv.c.key == key)
            )
            return sorted(found)

    async def keys(self, host: str, user: str, store: str) -> list[str]:
        """Keys present in the store, sorted by code point."""
        async with self._engine.begin() as conn:
            found = await conn.scalars(
                select(kv.c.key).where(*user_rows(kv, host, user), kv.c.store == store)
            )
            return sorted(found)


class CachedDocuments(Generic[T]):
    """One document per user in a module's store, parsed once and kept in a bounded cache.

    For documents read on every stanza (a blocklist, archiving preferences). Writes go through `set`,
    so this server never serves a stale copy. With several worker processes, the store's cache watchers
    tell the others, which forget their copy (`KeyValueStore.watch_cached` and `forget_cached`).
    """

    def __init__(self, kv: KeyValueStore, store: str, parse: Callable[[Any | None], T], size: int = 10000) -> None:
        self._kv = kv
        self._store = store
        self._parse = parse
        self._size = size
        self._cache: dict[tuple[str, str], T] = {}
        self._forgotten = 0  # bumped by `forget`, so that a read it overtook is not kept
        kv._caches.add(self)

    async def get(self, host: str, user: str) -> T:
        key = (host, user)
        if key not in self._cache:
            forgotten = self._forgotten
            parsed = self._parse(await self._kv.get(host, user, self._store))
            if forgotten != self._forgotten:
                return parsed
            # setdefault: a `set` that finished while the database answered wins over what was read.
            self._cache.setdefault(key, parsed)
            if len(self._cache) > self._size:
                del self._cache[next(iter(self._cache))]
        return self._cache[key]

    def cached(self, host: str, user: str) -> T | None:
        """The document if it is in the cache, else None: for a check of many users at once that awaits
        `get` only for those not cached."""
        return self._cache.get((host, user))

    async def set(self, host: str, user: str, document: Any | None) -> None:
        """Store the document (None deletes it)."""
        await self._kv.set(host, user, self._store, "", document)
        self._cache[(host, user)] = self._parse(document)
        for watcher in self._kv._cache_watchers:
            watcher(self._store, host, user)

    def forget(self, store: str, host: str, user: str) -> None:
        """Drop the copy of a document another process set, if it is of this cache's store."""
        if store == self._store:
            self._cache.pop((host, user), None)
            self._forgotten += 1
