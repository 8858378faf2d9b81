"""FAST tokens (XEP-0484): which devices of which accounts hold a token, and until when.

A row holds the seed a token is derived from (server.sasl2), never the token. An account and device (its
SASL2 user-agent id) have at most two: the token in use and the one just issued to replace it; once the
newer is used, the older goes. `count` is the highest FAST count the device used the token with, so that
a replayed authentication (the same count again) fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, delete, insert, select, update

from server.storage.engine import read, user_rows, writer
from server.storage.schema import fast_tokens

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

_COUNT_SQL = "UPDATE fast_tokens SET count = ? WHERE seed = ? AND count < ?"
_RETIRE_SQL = "DELETE FROM fast_tokens WHERE seed = ?"


@dataclass(frozen=True)
class FastToken:
    seed: bytes
    host: str
    username: str
    agent: str
    mechanism: str
    issued: datetime
    expires: datetime
    count: int


class FastTokenStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)

    async def of_device(self, host: str, username: str, agent: str) -> list[FastToken]:
        """The device's tokens, newest first (a read on a login's path: inline on SQLite)."""
        query = select(fast_tokens).where(*user_rows(fast_tokens, host, username), fast_tokens.c.agent == agent) \
            .order_by(fast_tokens.c.issued.desc())

        def rows(conn: Connection) -> list[FastToken]:
            return [FastToken(**row._mapping) for row in conn.execute(query)]

        return await read(self._engine, rows)

    async def issue(self, token: FastToken, keep: bytes | None) -> None:
        """Store a new token of the device, dropping its others but `keep` (the one it logged in with)."""
        async with self._writer.begin() as conn:
            await conn.execute(delete(fast_tokens).where(
                *user_rows(fast_tokens, token.host, token.username), fast_tokens.c.agent == token.agent,
                fast_tokens.c.seed != (keep or b"")))
            await conn.execute(insert(fast_tokens).values(**token.__dict__))

    async def used(self, token: FastToken, count: int | None, older: list[bytes]) -> bool:
        """Record a use with the client's replay counter and retire the device's `older` tokens (seeds);
        False if the count was used already (a replay) or the token is gone. Without a counter and with
        nothing to retire, a login writes nothing."""
        if count is None and not older:
            return True
        if self._writer.inline is not None:  # SQLite: on the event loop's thread, as the archive writes
            async with self._writer.begin_inline() as dbapi:
                if count is not None and dbapi.execute(_COUNT_SQL, (count, token.seed, count)).rowcount != 1:
                    return False
                dbapi.executemany(_RETIRE_SQL, [(seed,) for seed in older])
            return True
        async with self._writer.begin() as conn:
            if count is not None:
                done = await conn.execute(update(fast_tokens).where(fast_tokens.c.seed == token.seed,
                                                                    fast_tokens.c.count < count).values(count=count))
                if done.rowcount != 1:
                    return False
            if older:
                await conn.execute(delete(fast_tokens).where(fast_tokens.c.seed.in_(older)))
        return True

    async def revoke(self, host: str, username: str, agent: str | None = None) -> int:
        """Forget the account's tokens (of one device if `agent`); how many there were."""
        where = [*user_rows(fast_tokens, host, username)]
        if agent is not None:
            where.append(fast_tokens.c.agent == agent)
        async with self._writer.begin() as conn:
            done = await conn.execute(delete(fast_tokens).where(*where))
        return done.rowcount
