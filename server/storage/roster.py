"""Rosters (RFC 6121 section 2) with versioning (XEP-0237), and pending inbound subscriptions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection, Row

from server.storage.engine import dialect_insert, read, upsert, user_params, user_rows, writer
from server.storage.schema import pending_subscriptions, roster, roster_versions

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

SUBSCRIPTIONS = frozenset({"none", "to", "from", "both"})


@dataclass
class RosterItem:
    jid: str  # bare JID
    name: str | None = None
    subscription: str = "none"  # none | to | from | both
    ask: bool = False  # our outbound subscribe request is pending
    approved: bool = False  # inbound subscription pre-approved (RFC 6121 3.4)
    groups: tuple[str, ...] = ()


def _item(row: Row) -> RosterItem:
    return RosterItem(
        jid=row.jid,
        name=row.name,
        subscription=row.subscription,
        ask=row.ask,
        approved=row.approved,
        groups=tuple(row.groups),
    )


# The statements of a login, built once.
_VERSION = select(roster_versions.c.version).where(*user_params(roster_versions))
_ITEMS = select(roster).where(*user_params(roster))
_PENDING = select(pending_subscriptions.c.jid, pending_subscriptions.c.stanza_xml).where(
    *user_params(pending_subscriptions))


async def _version(conn: AsyncConnection, host: str, user: str) -> int:
    found = await conn.scalar(
        select(roster_versions.c.version).where(*user_rows(roster_versions, host, user))
    )
    return int(found or 0)


async def _bump(conn: AsyncConnection, host: str, user: str) -> int:
    # A single upsert, so concurrent changes of one roster each get their own version number.
    stmt = dialect_insert(conn, roster_versions).values(host=host, username=user, version=1)
    stmt = stmt.on_conflict_do_update(
        index_elements=["host", "username"], set_={"version": roster_versions.c.version + 1}
    ).returning(roster_versions.c.version)
    return int((await conn.execute(stmt)).scalar_one())


class RosterStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)

    async def get(self, host: str, user: str) -> tuple[int, dict[str, RosterItem]]:
        """The roster version (0 before the first change) and the items by JID, read consistently."""

        def query(conn: Connection) -> tuple[int, dict[str, RosterItem]]:
            key = {"host": host, "username": user}
            version = conn.scalar(_VERSION, key)
            return int(version or 0), {row.jid: _item(row) for row in conn.execute(_ITEMS, key)}

        return await read(self._engine, query)

    async def get_item(self, host: str, user: str, jid: str) -> RosterItem | None:
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(select(roster).where(*user_rows(roster, host, user), roster.c.jid == jid))
            ).first()
        return None if row is None else _item(row)

    async def put(self, host: str, user: str, item: RosterItem) -> int:
        """Insert or replace the item; return the roster's new version."""
        if item.subscription not in SUBSCRIPTIONS:
            raise ValueError(f"invalid subscription state {item.subscription!r}")
        async with self._writer.begin() as conn:
            await conn.execute(
                upsert(
                    conn,
                    roster,
                    {"host": host, "username": user, "jid": item.jid},
                    {
                        "name": item.name,
                        "subscription": item.subscription,
                        "ask": item.ask,
                        "approved": item.approved,
                        "groups": list(item.groups),
                    },
                )
            )
            return await _bump(conn, host, user)

    async def remove(self, host: str, user: str, jid: str) -> int:
        """Remove the item; return the new version, unchanged if there was no such item."""
        async with self._writer.begin() as conn:
            result = await conn.execute(
                delete(roster).where(*user_rows(roster, host, user), roster.c.jid == jid)
            )
            if result.rowcount == 0:
                return await _version(conn, host, user)
            return await _bump(conn, host, user)

    async def version(self, host: str, user: str) -> int:
        async with self._engine.begin() as conn:
            return await _version(conn, host, user)

    async def add_pending(self, host: str, user: str, jid: str, stanza_xml: str) -> None:
        """Keep an unanswered inbound subscribe request (RFC 6121 3.1.3); a newer one replaces it."""
        async with self._writer.begin() as conn:
            await conn.execute(
                upsert(
                    conn,
                    pending_subscriptions,
                    {"host": host, "username": user, "jid": jid},
                    {"stanza_xml": stanza_xml},
                )
            )

    async def remove_pending(self, host: str, user: str, jid: str) -> bool:
        async with self._writer.begin() as conn:
            result = await conn.execute(
                delete(pending_subscriptions).where(
                    *user_rows(pending_subscriptions, host, user), pending_subscriptions.c.jid == jid
                )
            )
        return result.rowcount > 0

    async def list_pending(self, host: str, user: str) -> list[tuple[str, str]]:
        """(jid, stanza_xml) of every pending request, to redeliver at login; sorted by JID."""
        rows = await read(self._engine, lambda conn: conn.execute(_PENDING, {"host": host, "username": user}).all())
        return sorted((row.jid, row.stanza_xml) for row in rows)
