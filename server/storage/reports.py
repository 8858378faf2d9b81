"""Spam and abuse reports (XEP-0377): what users report while blocking an address, for the host's admins.

A report stays 'open' until an admin dismisses it or acts on it (disables the account, denies the domain);
the rows are kept afterwards, so that an admin sees who was reported before and what came of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import select, update

from server.storage.engine import writer
from server.storage.schema import spam_reports

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

OPEN = "open"


@dataclass(frozen=True)
class Report:
    id: int
    host: str
    reporter: str
    jid: str
    reason: str
    text: str
    stanza_ids: list[str]
    created: datetime
    state: str = OPEN


class ReportStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)

    async def add(self, host: str, reporter: str, jid: str, reason: str, text: str, stanza_ids: list[str]) -> int:
        """Store a new open report; its id."""
        async with self._writer.begin() as conn:
            result = await conn.execute(spam_reports.insert().values(
                host=host, reporter=reporter, jid=jid, reason=reason, text=text, stanza_ids=stanza_ids,
                created=datetime.now(UTC), state=OPEN))
        return int(result.inserted_primary_key[0])

    async def list(self, host: str, state: str | None = OPEN) -> list[Report]:
        """The host's reports in the given state (None: all), oldest first."""
        query = select(spam_reports).where(spam_reports.c.host == host)
        if state is not None:
            query = query.where(spam_reports.c.state == state)
        async with self._engine.connect() as conn:
            rows = await conn.execute(query.order_by(spam_reports.c.id))
        return [Report(**row._mapping) for row in rows]

    async def get(self, host: str, report_id: int) -> Report | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(spam_reports).where(
                spam_reports.c.host == host, spam_reports.c.id == report_id))).first()
        return Report(**row._mapping) if row is not None else None

    async def close(self, host: str, jid: str, state: str) -> int:
        """Give every open report of the host about `jid` the state `state`; how many there were."""
        async with self._writer.begin() as conn:
            done = await conn.execute(update(spam_reports).where(
                spam_reports.c.host == host, spam_reports.c.jid == jid, spam_reports.c.state == OPEN)
                .values(state=state))
        return int(done.rowcount)

    async def set_state(self, host: str, report_id: int, state: str) -> bool:
        """False when the host has no open report `report_id`."""
        async with self._writer.begin() as conn:
            done = await conn.execute(update(spam_reports).where(
                spam_reports.c.host == host, spam_reports.c.id == report_id, spam_reports.c.state == OPEN)
                .values(state=state))
        return done.rowcount == 1
