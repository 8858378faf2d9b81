"""FAST tokens (XEP-0484): which devices of which accounts hold a token, and until when.

A row holds the seed a token is derived from (server.sasl2), never the token. An account and device (its
SASL2 user-agent id) have at most two: the token in use and the one just issued to replace it; once the
newer is used, the older goes. `count` is the highest FAST count the device used the token with, so that
a replayed authentication (the same count again) fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from server.storage.engine import user_rows, writer
from server.storage.schema import fast_tokens


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
        """The device's tokens, newest first."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(fast_tokens).where(*user_rows(fast_tokens, host, username),
                                                                fast_tokens.c.agent == agent)
                                      .order_by(fast_tokens.c.issued.desc()))
        return [FastToken(**row._mapping) for row in rows]

    async def issue(self, token: FastToken, keep: bytes | None) -> None:
        """Store a new token of the device, dropping its others but `keep` (the one it logged in with)."""
        async with self._writer.begin() as conn:
            await conn.execute(delete(fast_tokens).where(
                *user_rows(fast_tokens, token.host, token.username), fast_tokens.c.agent == token.agent,
                fast_tokens.c.seed != (keep or b"")))
            await conn.execute(insert(fast_tokens).values(**token.__dict__))

    async def used(self, token: FastToken, count: int | None) -> bool:
        """Record a use (with the client's replay counter, if it sent one), retiring the device's older
        token; False if the count was used already (a replay) or the token is gone."""
        where = [fast_tokens.c.seed == token.seed]
        if count is not None:
            where.append(fast_tokens.c.count < count)
        async with self._writer.begin() as conn:
            done = await conn.execute(update(fast_tokens).where(*where)
                                      .values(count=fast_tokens.c.count if count is None else count))
            if done.rowcount != 1:
                return False
            await conn.execute(delete(fast_tokens).where(
                *user_rows(fast_tokens, token.host, token.username), fast_tokens.c.agent == token.agent,
                fast_tokens.c.issued < token.issued))
        return True

    async def revoke(self, host: str, username: str, agent: str | None = None) -> int:
        """Forget the account's tokens (of one device if `agent`); how many there were."""
        where = [*user_rows(fast_tokens, host, username)]
        if agent is not None:
            where.append(fast_tokens.c.agent == agent)
        async with self._writer.begin() as conn:
            done = await conn.execute(delete(fast_tokens).where(*where))
        return done.rowcount
