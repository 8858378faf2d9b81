"""Persistent storage over SQLAlchemy Core: SQLite for small servers, PostgreSQL for the rest.

``open_storage(url)`` creates the engine (URL forms in :mod:`server.storage.engine`), applies the
migrations of :mod:`server.storage.schema` and returns a :class:`Storage` grouping the stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.storage.accounts import Account, AccountStore, Credentials, StoredCredentials
from server.storage.archive import ArchiveStore
from server.storage.engine import dispose_inline, make_engine
from server.storage.fast import FastTokenStore
from server.storage.invites import Invite, InviteStore
from server.storage.kv import KeyValueStore
from server.storage.notifications import NotificationStore
from server.storage.offline import OfflineStore, QuotaExceeded
from server.storage.pubsub import PubSubStore, StoredItem
from server.storage.reports import Report, ReportStore
from server.storage.roster import RosterItem, RosterStore
from server.storage.schema import migrate
from server.storage.tenants import TenantStore
from server.storage.uploads import UploadStore

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "Account",
    "AccountStore",
    "ArchiveStore",
    "Credentials",
    "FastTokenStore",
    "Invite",
    "InviteStore",
    "KeyValueStore",
    "NotificationStore",
    "OfflineStore",
    "PubSubStore",
    "QuotaExceeded",
    "Report",
    "ReportStore",
    "RosterItem",
    "RosterStore",
    "Storage",
    "StoredCredentials",
    "StoredItem",
    "TenantStore",
    "UploadStore",
    "open_storage",
]


class Storage:
    """All of the server's persistent state, sharing one engine (and its connection pool)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.accounts = AccountStore(engine)
        self.roster = RosterStore(engine)
        self.offline = OfflineStore(engine)
        self.kv = KeyValueStore(engine)
        self.archive = ArchiveStore(engine)
        self.pubsub = PubSubStore(engine)
        self.uploads = UploadStore(engine)
        self.invites = InviteStore(engine)
        self.reports = ReportStore(engine)
        self.fast = FastTokenStore(engine)
        self.notifications = NotificationStore(engine)
        self.tenants = TenantStore(engine)

    async def close(self) -> None:
        self.archive.close()
        await dispose_inline(self.engine)
        await self.engine.dispose()


async def open_storage(url: str) -> Storage:
    """Connect to ``url``, migrate the schema to the latest version and return the stores."""
    engine, schema = make_engine(url)
    try:
        await migrate(engine, schema)
    except BaseException:
        await engine.dispose()
        raise
    return Storage(engine)
