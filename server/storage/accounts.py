"""User accounts and their SCRAM credentials, isolated per virtual host."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import delete, func, select, update

from server.storage.engine import dialect_insert, read, user_params, user_rows, writer
from server.storage.schema import (
    account_credentials,
    accounts,
    archive,
    kv,
    offline,
    pending_subscriptions,
    pubsub_affiliations,
    pubsub_items,
    pubsub_nodes,
    pubsub_subscriptions,
    roster,
    roster_versions,
    uploads,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

# An account with its credentials (one row per hash, or one with NULL credentials), read at every login.
_ACCOUNT = (
    select(accounts, account_credentials.c.hash_name, account_credentials.c.salt, account_credentials.c.iterations,
           account_credentials.c.stored_key, account_credentials.c.server_key)
    .select_from(accounts.outerjoin(account_credentials, (account_credentials.c.host == accounts.c.host)
                                    & (account_credentials.c.username == accounts.c.username)))
    .where(*user_params(accounts))
)


class Credentials(Protocol):
    """Anything shaped like ``server.sasl.scram.ScramCredentials``; the storage does not import SASL."""

    @property
    def hash_name(self) -> str: ...
    @property
    def salt(self) -> bytes: ...
    @property
    def iterations(self) -> int: ...
    @property
    def stored_key(self) -> bytes: ...
    @property
    def server_key(self) -> bytes: ...


@dataclass(frozen=True)
class StoredCredentials:
    """SCRAM verifiers of one hash function (RFC 5802): enough to authenticate, not the password."""

    hash_name: str
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


@dataclass
class Account:
    host: str
    username: str
    credentials: dict[str, StoredCredentials]  # by hash_name: 'SHA-1', 'SHA-256'...
    created: datetime
    disabled: bool
    last_logout: datetime | None  # XEP-0012 Last Activity of an offline user
    last_status: str | None


class AccountStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)

    async def create(self, host: str, username: str, credentials: Sequence[Credentials]) -> bool:
        """Create the account; False (and nothing changed) if it exists already."""
        async with self._writer.begin() as conn:
            stmt = (
                dialect_insert(conn, accounts)
                .values(
                    host=host,
                    username=username,
                    created=datetime.now(UTC),
                    disabled=False,
                    last_logout=None,
                    last_status=None,
                )
                .on_conflict_do_nothing()
                .returning(accounts.c.username)
            )
            if (await conn.execute(stmt)).first() is None:
                return False
            await _insert_credentials(conn, host, username, credentials)
        return True

    async def get(self, host: str, username: str) -> Account | None:
        """The account with its credentials, in one statement: every login starts here."""
        rows = await read(self._engine, lambda conn: conn.execute(_ACCOUNT, {"host": host, "username": username}).all())
        if not rows:
            return None
        row = rows[0]
        return Account(
            host=row.host,
            username=row.username,
            credentials={
                c.hash_name: StoredCredentials(
                    c.hash_name, bytes(c.salt), c.iterations, bytes(c.stored_key), bytes(c.server_key)
                )
                for c in rows if c.hash_name is not None
            },
            created=row.created,
            disabled=row.disabled,
            last_logout=row.last_logout,
            last_status=row.last_status,
        )

    async def exists(self, host: str, username: str) -> bool:
        async with self._engine.begin() as conn:
            found = await conn.scalar(select(accounts.c.username).where(*user_rows(accounts, host, username)))
        return found is not None

    async def set_credentials(self, host: str, username: str, credentials: Sequence[Credentials]) -> bool:
        """Replace all of the account's credentials (password change); False if there is no account."""
        async with self._writer.begin() as conn:
            found = await conn.scalar(
                select(accounts.c.username).where(*user_rows(accounts, host, username)).with_for_update()
            )
            if found is None:
                return False
            await conn.execute(
                delete(account_credentials).where(*user_rows(account_credentials, host, username))
            )
            await _insert_credentials(conn, host, username, credentials)
        return True

    async def delete(self, host: str, username: str) -> bool:
        """Delete the account with everything stored for the user; False if there is no account.

        The roster version counter survives (bumped) so that a client caching the old roster under
        a re-created account of the same name never sees its stale version accepted.
        """
        async with self._writer.begin() as conn:
            # Credentials go with the account through ON DELETE CASCADE.
            gone = await conn.execute(delete(accounts).where(*user_rows(accounts, host, username)))
            if gone.rowcount == 0:
                return False
            # Upload rows go here too, so their URLs stop working at once; the files follow at the upload
            # module's next sweep (it removes every file without a row), which also covers `parley user delete`.
            for table in (roster, pending_subscriptions, offline, kv, archive, pubsub_items, pubsub_subscriptions,
                          pubsub_affiliations, pubsub_nodes, uploads):
                await conn.execute(delete(table).where(*user_rows(table, host, username)))
            await conn.execute(
                update(roster_versions)
                .where(*user_rows(roster_versions, host, username))
                .values(version=roster_versions.c.version + 1)
            )
        return True

    async def list(self, host: str, *, disabled_only: bool = False) -> list[str]:
        """Usernames of the host, sorted by code point (not by the database's collation)."""
        query = select(accounts.c.username).where(accounts.c.host == host)
        if disabled_only:
            query = query.where(accounts.c.disabled.is_(True))
        async with self._engine.begin() as conn:
            return sorted(await conn.scalars(query))

    async def count(self, host: str) -> int:
        async with self._engine.begin() as conn:
            total = await conn.scalar(
                select(func.count()).select_from(accounts).where(accounts.c.host == host)
            )
        return int(total or 0)

    async def set_disabled(self, host: str, username: str, disabled: bool) -> bool:
        """Disable or re-enable logins; False if there is no account."""
        async with self._writer.begin() as conn:
            result = await conn.execute(
                update(accounts).where(*user_rows(accounts, host, username)).values(disabled=disabled)
            )
        return result.rowcount > 0

    async def record_logout(self, host: str, username: str, when: datetime, status: str | None) -> None:
        """Remember when the user's last session ended and its status, for XEP-0012 queries."""
        async with self._writer.begin() as conn:
            await conn.execute(
                update(accounts)
                .where(*user_rows(accounts, host, username))
                .values(last_logout=when, last_status=status)
            )


async def _insert_credentials(
    conn: AsyncConnection, host: str, username: str, credentials: Sequence[Credentials]
) -> None:
    # One row per hash function; a later entry for the same hash wins.
    rows = {
        c.hash_name: {
            "host": host,
            "username": username,
            "hash_name": c.hash_name,
            "salt": bytes(c.salt),
            "iterations": int(c.iterations),
            "stored_key": bytes(c.stored_key),
            "server_key": bytes(c.server_key),
        }
        for c in credentials
    }
    if rows:
        await conn.execute(account_credentials.insert(), list(rows.values()))
