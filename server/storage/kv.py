"""Generic JSON documents per user (or per host, with user ''), so modules need no tables of their own.

Documents are addressed by ``store`` (the module's name, e.g. 'vcard' or 'private') and a ``key``
inside it ('' when a store keeps one document per user).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import bindparam, delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from server.storage.engine import read, upsert, user_params, user_rows, writer
from server.storage.schema import kv

T = TypeVar("T")


_GET = select(kv.c.value).where(*user_params(kv), kv.c.store == bindparam("store"), kv.c.key == bindparam("key"))


class KeyValueStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)

    async def get(self, host: str, user: str, store: str, key: str = "") -> Any | None:
        params = {"host": host, "username": user, "store": store, "key": key}
        return await read(self._engine, lambda conn: conn.scalar(_GET, params))

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
    so this server never serves a stale copy. With several worker processes, `on_set` tells the others,
    which `forget` their copy.
    """

    instances: ClassVar[weakref.WeakSet[CachedDocuments[Any]]] = weakref.WeakSet()
    on_set: ClassVar[Callable[[str, str, str], None] | None] = None  # (store, host, user)

    def __init__(self, kv: KeyValueStore, store: str, parse: Callable[[Any | None], T], size: int = 10000) -> None:
        self._kv = kv
        self._store = store
        self._parse = parse
        self._size = size
        self._cache: dict[tuple[str, str], T] = {}
        self._forgotten = 0  # bumped by `forget`, so that a read it overtook is not kept
        CachedDocuments.instances.add(self)

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
        if CachedDocuments.on_set is not None:
            CachedDocuments.on_set(self._store, host, user)

    @classmethod
    def forget(cls, store: str, host: str, user: str) -> None:
        for cache in cls.instances:
            if cache._store == store:
                cache._cache.pop((host, user), None)
                cache._forgotten += 1
