"""Publish-subscribe state (XEP-0060): nodes with their configuration, items, subscriptions, affiliations.

A service is addressed like the rest of a user's data: a PEP service by its account (host, username),
the generic service of a domain by (service domain, ''), so deleting an account deletes its nodes.
Items are ordered by an increasing row id; republishing an item id replaces the old row, which makes
the item the newest, as XEP-0060 7.1.2 asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Table, delete, func, select, update

from server.storage.engine import dialect_insert, lock_user, upsert, user_rows, writer
from server.storage.schema import pubsub_affiliations, pubsub_items, pubsub_nodes, pubsub_subscriptions

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

# First key of the advisory lock serialising writes to one service's items.
_PUBLISH_LOCK = 2
NODE_TABLES = (pubsub_items, pubsub_subscriptions, pubsub_affiliations, pubsub_nodes)


@dataclass(frozen=True)
class StoredItem:
    id: str
    publisher: str
    stamp: datetime
    payload: str  # the item's payload element serialized, '' for a notification-only item


class PubSubStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)

    # --- nodes --------------------------------------------------------------------------------------

    async def node(self, host: str, user: str, node: str) -> dict[str, Any] | None:
        """The node's configuration, or None if there is no such node."""
        async with self._engine.begin() as conn:
            return await conn.scalar(select(pubsub_nodes.c.config).where(*_node_rows(pubsub_nodes, host, user, node)))

    async def nodes(self, host: str, user: str) -> dict[str, dict[str, Any]]:
        """Every node of a service with its configuration, by name."""
        async with self._engine.begin() as conn:
            rows = await conn.execute(
                select(pubsub_nodes.c.node, pubsub_nodes.c.config).where(*user_rows(pubsub_nodes, host, user))
            )
            return {row.node: row.config for row in rows}

    async def create(self, host: str, user: str, node: str, config: dict[str, Any], owner: str | None,
                     created: datetime) -> bool:
        """Create a node (with `owner` affiliated as owner, if given); False if it exists already."""
        async with self._writer.begin() as conn:
            stmt = dialect_insert(conn, pubsub_nodes).values(
                host=host, username=user, node=node, config=config, created=created
            ).on_conflict_do_nothing()
            if (await conn.execute(stmt)).rowcount == 0:
                return False
            if owner is not None:
                await conn.execute(pubsub_affiliations.insert().values(
                    host=host, username=user, node=node, jid=owner, affiliation="owner"))
            return True

    async def configure(self, host: str, user: str, node: str, config: dict[str, Any], max_items: int | None) -> None:
        """Replace the node's configuration and drop the items past its new `max_items` (None: no limit)."""
        async with self._writer.begin() as conn:
            await lock_user(conn, _PUBLISH_LOCK, host, user)
            await conn.execute(
                update(pubsub_nodes).where(*_node_rows(pubsub_nodes, host, user, node)).values(config=config)
            )
            if max_items is not None:
                await _trim(conn, host, user, node, max_items)

    async def delete_node(self, host: str, user: str, node: str) -> bool:
        async with self._writer.begin() as conn:
            for table in NODE_TABLES[:-1]:
                await conn.execute(delete(table).where(*_node_rows(table, host, user, node)))
            gone = await conn.execute(delete(pubsub_nodes).where(*_node_rows(pubsub_nodes, host, user, node)))
            return gone.rowcount > 0

    # --- items --------------------------------------------------------------------------------------

    async def publish(self, host: str, user: str, node: str, item: StoredItem, max_items: int | None) -> None:
        """Store `item` as the newest of the node, then keep only the newest `max_items` (None: all)."""
        async with self._writer.begin() as conn:
            await lock_user(conn, _PUBLISH_LOCK, host, user)
            rows = _node_rows(pubsub_items, host, user, node)
            await conn.execute(delete(pubsub_items).where(*rows, pubsub_items.c.item_id == item.id))
            await conn.execute(pubsub_items.insert().values(
                host=host, username=user, node=node, item_id=item.id, publisher=item.publisher,
                stamp=item.stamp, payload=item.payload))
            if max_items is not None:
                await _trim(conn, host, user, node, max_items)

    async def items(self, host: str, user: str, node: str, ids: list[str] | None = None,
                    last: int | None = None) -> list[StoredItem]:
        """Items oldest first: those with `ids` if given, else all, or only the newest `last`."""
        query = select(pubsub_items).where(*_node_rows(pubsub_items, host, user, node))
        if ids is not None:
            query = query.where(pubsub_items.c.item_id.in_(ids))
        query = query.order_by(pubsub_items.c.id.desc())
        if last is not None:
            query = query.limit(last)
        async with self._engine.begin() as conn:
            rows = list(await conn.execute(query))
        return [StoredItem(r.item_id, r.publisher, r.stamp, r.payload) for r in reversed(rows)]

    async def retract(self, host: str, user: str, node: str, item_ids: list[str]) -> list[str]:
        """Delete the items; return the ids that existed."""
        async with self._writer.begin() as conn:
            rows = await conn.execute(
                delete(pubsub_items)
                .where(*_node_rows(pubsub_items, host, user, node), pubsub_items.c.item_id.in_(item_ids))
                .returning(pubsub_items.c.item_id)
            )
            return [row.item_id for row in rows]

    async def purge(self, host: str, user: str, node: str) -> None:
        async with self._writer.begin() as conn:
            await conn.execute(delete(pubsub_items).where(*_node_rows(pubsub_items, host, user, node)))

    # --- subscriptions and affiliations -------------------------------------------------------------

    async def subscribe(self, host: str, user: str, node: str, jid: str, subid: str, state: str) -> None:
        async with self._writer.begin() as conn:
            await conn.execute(upsert(conn, pubsub_subscriptions,
                                      {"host": host, "username": user, "node": node, "jid": jid},
                                      {"subid": subid, "state": state}))

    async def unsubscribe(self, host: str, user: str, node: str, jid: str) -> bool:
        async with self._writer.begin() as conn:
            gone = await conn.execute(delete(pubsub_subscriptions).where(
                *_node_rows(pubsub_subscriptions, host, user, node), pubsub_subscriptions.c.jid == jid))
            return gone.rowcount > 0

    async def subscriptions(self, host: str, user: str, node: str | None = None,
                            jid: str | None = None) -> list[tuple[str, str, str, str]]:
        """(node, jid, subid, state) of the service's subscriptions, of one node and/or one JID."""
        table = pubsub_subscriptions
        return await self._listing(table, (table.c.subid, table.c.state), host, user, node, jid)

    async def set_affiliation(self, host: str, user: str, node: str, jid: str, affiliation: str) -> None:
        """Affiliate `jid` with the node; 'none' removes the affiliation."""
        async with self._writer.begin() as conn:
            if affiliation == "none":
                await conn.execute(delete(pubsub_affiliations).where(
                    *_node_rows(pubsub_affiliations, host, user, node), pubsub_affiliations.c.jid == jid))
            else:
                await conn.execute(upsert(conn, pubsub_affiliations,
                                          {"host": host, "username": user, "node": node, "jid": jid},
                                          {"affiliation": affiliation}))

    async def affiliations(self, host: str, user: str, node: str | None = None,
                           jid: str | None = None) -> list[tuple[str, str, str]]:
        """(node, jid, affiliation) of the service's affiliations, of one node and/or one JID."""
        table = pubsub_affiliations
        return await self._listing(table, (table.c.affiliation,), host, user, node, jid)

    async def _listing(self, table: Table, columns: tuple[ColumnElement[Any], ...], host: str, user: str,
                       node: str | None, jid: str | None) -> list[tuple[Any, ...]]:
        """(node, jid, *columns) of the rows of one service, of one node and/or one JID if given."""
        query = select(table.c.node, table.c.jid, *columns).where(*user_rows(table, host, user))
        if node is not None:
            query = query.where(table.c.node == node)
        if jid is not None:
            query = query.where(table.c.jid == jid)
        async with self._engine.begin() as conn:
            return [tuple(row) for row in await conn.execute(query.order_by(table.c.node, table.c.jid))]


def _node_rows(table: Any, host: str, user: str, node: str) -> tuple[Any, ...]:
    return (*user_rows(table, host, user), table.c.node == node)


async def _trim(conn: Any, host: str, user: str, node: str, keep: int) -> None:
    """Delete all but the newest `keep` items of a node."""
    newest = (
        select(pubsub_items.c.id).where(*_node_rows(pubsub_items, host, user, node))
        .order_by(pubsub_items.c.id.desc()).limit(keep)
    )
    count = await conn.scalar(select(func.count()).select_from(pubsub_items)
                              .where(*_node_rows(pubsub_items, host, user, node)))
    if count and count > keep:
        await conn.execute(delete(pubsub_items).where(
            *_node_rows(pubsub_items, host, user, node), pubsub_items.c.id.not_in(newest)))
