"""Table definitions and versioned migrations.

The ``schema_version`` table holds one row per applied step. :func:`migrate` (run by
``open_storage``) applies the missing steps in order inside one transaction, holding a
PostgreSQL advisory lock (SQLite: the database write lock) so that servers starting at the same time
do not migrate twice.

Adding a step (say, step 2):

1. Write ``_step_2(conn: Connection) -> None`` taking the database from version 1 to 2 with plain
   DDL on the synchronous ``conn`` (``conn.execute(text("ALTER TABLE ..."))``,
   ``new_table.create(conn)``, data fixes...). It must work on SQLite and PostgreSQL.
2. Append it to :data:`STEPS`; never edit or reorder released steps.
3. Update the ``Table`` definitions below to the new shape. Step 1 builds its tables from these
   definitions, so when a step alters a table step 1 created, first freeze step 1: give it a
   private ``MetaData`` copy of that table as it was at version 1, so that fresh databases still
   pass through every step.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeDecorator

from server.storage.engine import writer

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

# Key of the PostgreSQL advisory lock held while migrating (any constant unique to Parley).
_MIGRATION_LOCK = 0x5061726C6579


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes, stored in UTC and always returned aware on both backends.

    SQLite has no timezone type, so values are stored there as naive UTC; naive input is refused
    because its zone is unknown.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied", UTCDateTime, nullable=False),
)

accounts = Table(
    "accounts",
    metadata,
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("created", UTCDateTime, nullable=False),
    Column("disabled", Boolean, nullable=False),
    Column("last_logout", UTCDateTime),
    Column("last_status", Text),
    PrimaryKeyConstraint("host", "username"),
)

# SCRAM verifiers, one row per hash function; they live and die with their account.
account_credentials = Table(
    "account_credentials",
    metadata,
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("hash_name", String, nullable=False),
    Column("salt", LargeBinary, nullable=False),
    Column("iterations", Integer, nullable=False),
    Column("stored_key", LargeBinary, nullable=False),
    Column("server_key", LargeBinary, nullable=False),
    PrimaryKeyConstraint("host", "username", "hash_name"),
    ForeignKeyConstraint(["host", "username"], ["accounts.host", "accounts.username"], ondelete="CASCADE"),
)

roster = Table(
    "roster",
    metadata,
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("jid", String, nullable=False),
    Column("name", Text),
    Column("subscription", String, nullable=False),
    Column("ask", Boolean, nullable=False),
    Column("approved", Boolean, nullable=False),
    Column("groups", JSON, nullable=False),
    PrimaryKeyConstraint("host", "username", "jid"),
)

roster_versions = Table(
    "roster_versions",
    metadata,
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("version", BigInteger, nullable=False),
    PrimaryKeyConstraint("host", "username"),
)

pending_subscriptions = Table(
    "pending_subscriptions",
    metadata,
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("jid", String, nullable=False),
    Column("stanza_xml", Text, nullable=False),
    PrimaryKeyConstraint("host", "username", "jid"),
)

offline = Table(
    "offline",
    metadata,
    # SQLite only autoincrements a column declared exactly INTEGER PRIMARY KEY.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("stamp", UTCDateTime, nullable=False),
    Column("stanza_xml", Text, nullable=False),
    Index("ix_offline_user", "host", "username", "id"),
)

kv = Table(
    "kv",
    metadata,
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("store", String, nullable=False),
    Column("key", String, nullable=False),
    Column("value", JSON, nullable=False),
    PrimaryKeyConstraint("host", "username", "store", "key"),
)


# Publish-subscribe (server.storage.pubsub): a PEP service is (host, username), a pubsub domain (domain, '').
pubsub_nodes = Table(
    "pubsub_nodes",
    metadata,
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("node", String, nullable=False),
    Column("config", JSON, nullable=False),
    Column("created", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("host", "username", "node"),
)

pubsub_items = Table(
    "pubsub_items",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("node", String, nullable=False),
    Column("item_id", String, nullable=False),
    Column("publisher", String, nullable=False),
    Column("stamp", UTCDateTime, nullable=False),
    Column("payload", Text, nullable=False),
    Index("ix_pubsub_items_node", "host", "username", "node", "item_id", unique=True),
)

pubsub_subscriptions = Table(
    "pubsub_subscriptions",
    metadata,
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("node", String, nullable=False),
    Column("jid", String, nullable=False),
    Column("subid", String, nullable=False),
    Column("state", String, nullable=False),
    PrimaryKeyConstraint("host", "username", "node", "jid"),
)

pubsub_affiliations = Table(
    "pubsub_affiliations",
    metadata,
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("node", String, nullable=False),
    Column("jid", String, nullable=False),
    Column("affiliation", String, nullable=False),
    PrimaryKeyConstraint("host", "username", "node", "jid"),
)


# Multi-user chat (server.storage.muc): persistent rooms of a service domain, and their affiliations.
muc_rooms = Table(
    "muc_rooms",
    metadata,
    Column("service", String, nullable=False),
    Column("name", String, nullable=False),
    Column("config", JSON, nullable=False),
    Column("created", UTCDateTime, nullable=False),
    Column("subject", Text, nullable=False),
    Column("subject_from", String),
    PrimaryKeyConstraint("service", "name"),
)

muc_affiliations = Table(
    "muc_affiliations",
    metadata,
    Column("service", String, nullable=False),
    Column("room", String, nullable=False),
    Column("jid", String, nullable=False),
    Column("affiliation", String, nullable=False),
    Column("nick", String),
    Column("reason", Text),
    PrimaryKeyConstraint("service", "room", "jid"),
)


# Message archives (server.storage.archive, XEP-0313): rows are never updated. The full-text index of
# bodies depends on the backend and is made by the step that creates the table.
archive = Table(
    "archive",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("stanza_id", String, nullable=False),
    Column("stamp", UTCDateTime, nullable=False),
    Column("with_jid", String, nullable=False),
    Column("with_resource", String),
    Column("body", Text),
    Column("stanza_xml", Text, nullable=False),
    # One per kind of query: the whole archive, one contact, a time range, UIDs.
    Index("ix_archive_user", "host", "username", "id"),
    Index("ix_archive_with", "host", "username", "with_jid", "id"),
    Index("ix_archive_stamp", "host", "username", "stamp"),
    Index("ix_archive_uid", "host", "username", "stanza_id", unique=True),
)

_ARCHIVE_FULLTEXT = {
    # A generated tsvector with the language-neutral 'simple' configuration, and its GIN index.
    "postgresql": [
        "ALTER TABLE archive ADD COLUMN body_tsv tsvector"
        " GENERATED ALWAYS AS (to_tsvector('simple', coalesce(body, ''))) STORED",
        "CREATE INDEX ix_archive_fts ON archive USING gin (body_tsv)",
    ],
    # An FTS5 index over the table's bodies (external content), kept by triggers; rows are never updated.
    "sqlite": [
        "CREATE VIRTUAL TABLE archive_fts USING fts5(body, content='archive', content_rowid='id',"
        " tokenize='unicode61 remove_diacritics 0')",
        "CREATE TRIGGER archive_fts_insert AFTER INSERT ON archive WHEN new.body IS NOT NULL BEGIN"
        " INSERT INTO archive_fts(rowid, body) VALUES (new.id, new.body); END",
        "CREATE TRIGGER archive_fts_delete AFTER DELETE ON archive WHEN old.body IS NOT NULL BEGIN"
        " INSERT INTO archive_fts(archive_fts, rowid, body) VALUES ('delete', old.id, old.body); END",
    ],
}


# HTTP file uploads (server.storage.uploads, XEP-0363): one row per slot, from the slot request on; `uploaded`
# is set once its PUT has stored the file, `size` is then the stored file's (metadata stripped), and
# `thumbnail` the content type of its thumbnail, if one was made.
uploads = Table(
    "uploads",
    metadata,
    Column("id", String, primary_key=True),
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("filename", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("content_type", String, nullable=False),
    Column("created", UTCDateTime, nullable=False),
    Column("uploaded", UTCDateTime),
    Column("thumbnail", String),
    Index("ix_uploads_user", "host", "username"),
    Index("ix_uploads_created", "created"),
)


# Invitations (server.storage.invites, XEP-0401/0379/0445): a token that registers an account on `host`
# ('account') or also approves a subscription to its `inviter` ('contact'), `uses_left` more times, until
# `expires`. `inviter` is the local user whose contact the invitee becomes ('' for none).
invites = Table(
    "invites",
    metadata,
    Column("token", String, primary_key=True),
    Column("host", String, nullable=False),
    Column("kind", String, nullable=False),
    Column("inviter", String, nullable=False),
    Column("uses_left", Integer, nullable=False),
    Column("created", UTCDateTime, nullable=False),
    Column("expires", UTCDateTime, nullable=False),
    Index("ix_invites_host", "host", "inviter"),
)


# Spam and abuse reports (server.storage.reports, XEP-0377): what users reported while blocking an address,
# kept for the host's admins until one of them dismisses it or acts on it (`state`).
spam_reports = Table(
    "spam_reports",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("host", String, nullable=False),
    Column("reporter", String, nullable=False),
    Column("jid", String, nullable=False),
    Column("reason", String, nullable=False),
    Column("text", Text, nullable=False),
    Column("stanza_ids", JSON, nullable=False),
    Column("created", UTCDateTime, nullable=False),
    Column("state", String, nullable=False),
    Index("ix_spam_reports_host", "host", "state", "id"),
)


# FAST tokens (XEP-0484, server.storage.fast): one row per token, at most two per account and device (the
# token in use and the one that replaces it). The token itself is never stored: it is derived from `seed`
# with a key kept outside the database (server.sasl2), so a copy of the database logs no one in.
fast_tokens = Table(
    "fast_tokens",
    metadata,
    Column("seed", LargeBinary, primary_key=True),
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("agent", String, nullable=False),
    Column("mechanism", String, nullable=False),
    Column("issued", UTCDateTime, nullable=False),
    Column("expires", UTCDateTime, nullable=False),
    Column("count", BigInteger, nullable=False),
    Index("ix_fast_tokens_user", "host", "username", "agent"),
    ForeignKeyConstraint(["host", "username"], ["accounts.host", "accounts.username"], ondelete="CASCADE"),
)


# Missed-message notifications (server.storage.notifications): what waits to be told to each user, by
# conversation, until a digest takes it; and the outbox of notifications to send, one row each, whose id is
# the idempotency key. A row is claimed by one process at a time (status 'sending' until `lease`).
notify_pending = Table(
    "notify_pending",
    metadata,
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("conversation", String, nullable=False),
    Column("count", Integer, nullable=False),
    Column("senders", JSON, nullable=False),
    Column("first", UTCDateTime, nullable=False),
    Column("recent", JSON),  # the last few bodies, [key, sender, body], only for users who opted in to them
    PrimaryKeyConstraint("host", "username", "conversation"),
    Index("ix_notify_pending_first", "first"),
)

notify_outbox = Table(
    "notify_outbox",
    metadata,
    Column("id", String, primary_key=True),
    Column("host", String, nullable=False),
    Column("username", String, nullable=False),
    Column("channel", String, nullable=False),
    Column("target", Text, nullable=False),
    Column("payload", JSON, nullable=False),
    Column("status", String, nullable=False),
    Column("due", UTCDateTime, nullable=False),
    Column("lease", UTCDateTime),
    Column("attempts", Integer, nullable=False),
    Column("error", Text),
    Column("created", UTCDateTime, nullable=False),
    Index("ix_notify_outbox_due", "status", "due"),
    Index("ix_notify_outbox_user", "host", "username"),
)


# Virtual hosts created at run time (server.storage.tenants): served while `state` is 'enabled' and no removal
# is due; `remove_at` set, the tenant's data goes at that time (`services`: the subdomains it served, whose
# data goes too). Quotas are 0 for no limit.
tenants = Table(
    "tenants",
    metadata,
    Column("domain", String, primary_key=True),
    Column("state", String, nullable=False),
    Column("admins", JSON, nullable=False),
    Column("modules", JSON, nullable=False),
    Column("options", JSON, nullable=False),
    Column("certificate", Text),
    Column("key", Text),
    Column("max_accounts", BigInteger, nullable=False),
    Column("max_storage", BigInteger, nullable=False),
    Column("max_upload", BigInteger, nullable=False),
    Column("max_rate", BigInteger, nullable=False),
    Column("services", JSON, nullable=False),
    Column("created", UTCDateTime, nullable=False),
    Column("remove_at", UTCDateTime),
)


def _step_1(conn: Connection) -> None:
    """Initial tables."""
    metadata.create_all(
        conn,
        tables=[accounts, account_credentials, roster, roster_versions, pending_subscriptions, offline, kv],
        checkfirst=False,
    )


def _step_2(conn: Connection) -> None:
    """Publish-subscribe nodes, items, subscriptions and affiliations (PEP and pubsub.<host>)."""
    metadata.create_all(
        conn, tables=[pubsub_nodes, pubsub_items, pubsub_subscriptions, pubsub_affiliations], checkfirst=False
    )


def _step_3(conn: Connection) -> None:
    """Multi-user chat rooms and affiliations."""
    metadata.create_all(conn, tables=[muc_rooms, muc_affiliations], checkfirst=False)


def _step_4(conn: Connection) -> None:
    """Message archives, with full-text search of bodies."""
    archive.create(conn)
    for statement in _ARCHIVE_FULLTEXT[conn.dialect.name]:
        conn.execute(text(statement))


# SQLite: bodies wait in a queue and are indexed in batches (ArchiveStore.index_bodies). Indexed one row at
# a time, from the insert's trigger, FTS5 wrote a segment per transaction and cost as much as the row.
# A row still queued is not in the index: deleting it only takes it off the queue.
_ARCHIVE_FULLTEXT_QUEUE = [
    "DROP TRIGGER archive_fts_insert",
    "DROP TRIGGER archive_fts_delete",
    "CREATE TABLE archive_fts_queue (id INTEGER PRIMARY KEY)",
    "CREATE TRIGGER archive_fts_enqueue AFTER INSERT ON archive WHEN new.body IS NOT NULL BEGIN"
    " INSERT INTO archive_fts_queue(id) VALUES (new.id); END",
    "CREATE TRIGGER archive_fts_delete AFTER DELETE ON archive WHEN old.body IS NOT NULL BEGIN"
    " INSERT INTO archive_fts(archive_fts, rowid, body) SELECT 'delete', old.id, old.body"
    " WHERE NOT EXISTS (SELECT 1 FROM archive_fts_queue WHERE id = old.id);"
    " DELETE FROM archive_fts_queue WHERE id = old.id; END",
]


def _step_5(conn: Connection) -> None:
    """Archive bodies indexed for full-text search in batches (SQLite)."""
    if conn.dialect.name == "sqlite":
        for statement in _ARCHIVE_FULLTEXT_QUEUE:
            conn.execute(text(statement))


def _step_6(conn: Connection) -> None:
    """HTTP file upload slots and files."""
    uploads.create(conn)


def _step_7(conn: Connection) -> None:
    """Invitations."""
    invites.create(conn)


def _step_8(conn: Connection) -> None:
    """Spam and abuse reports."""
    spam_reports.create(conn)


def _step_9(conn: Connection) -> None:
    """FAST tokens."""
    fast_tokens.create(conn)


def _step_10(conn: Connection) -> None:
    """Missed-message notifications: pending counts and the outbox."""
    metadata.create_all(conn, tables=[notify_pending, notify_outbox], checkfirst=False)


def _step_11(conn: Connection) -> None:
    """Missed-message notifications: the last bodies of each conversation, for users who opted in to them (step
    10 creates the table from its current definition, which has the column already)."""
    if "recent" not in {c["name"] for c in inspect(conn).get_columns(notify_pending.name)}:
        conn.execute(text("ALTER TABLE notify_pending ADD COLUMN recent JSON"))


def _step_12(conn: Connection) -> None:
    """Tenants: virtual hosts created at run time."""
    tenants.create(conn, checkfirst=True)


def _step_13(conn: Connection) -> None:
    """SQLite: the archive's writer queues its rows' bodies for the full-text index itself, one statement per
    batch (ArchiveStore._insert), instead of a trigger per row: the trigger cost nearly as much as the row's four
    indexes (about 20 µs of CPU per row in batches of 1,000). Rows already queued stay queued."""
    if conn.dialect.name == "sqlite":
        conn.execute(text("DROP TRIGGER IF EXISTS archive_fts_enqueue"))


STEPS: list[Callable[[Connection], None]] = [_step_1, _step_2, _step_3, _step_4, _step_5, _step_6, _step_7,
                                             _step_8, _step_9, _step_10, _step_11, _step_12, _step_13]


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer Parley: this one would misread it, so it refuses to start."""

    def __init__(self, found: int) -> None:
        super().__init__(f"the database has schema version {found}, newer than this Parley's {len(STEPS)}: "
                         f"a newer Parley upgraded it; run that version again (or restore a backup taken "
                         f"before the upgrade)")
        self.found = found


async def current_version(engine: AsyncEngine, schema: str | None = None) -> int:
    """The schema version of the database (0: no Parley tables yet), without changing anything."""
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda c: _read_version(c) if inspect(c).has_table(schema_version.name, schema=schema) else 0)


def _read_version(conn: Connection) -> int:
    return int(conn.scalar(select(func.coalesce(func.max(schema_version.c.version), 0))))


async def migrate(engine: AsyncEngine, schema: str | None = None) -> int:
    """Bring the database up to the latest version, creating PostgreSQL ``schema`` if given; return it."""
    async with writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            if schema is not None:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        return await conn.run_sync(_apply_steps)


def _apply_steps(conn: Connection) -> int:
    schema_version.create(conn, checkfirst=True)
    current = _read_version(conn)
    if current > len(STEPS):
        raise SchemaTooNew(current)
    for number, step in enumerate(STEPS[current:], start=current + 1):
        step(conn)
        conn.execute(insert(schema_version).values(version=number, applied=datetime.now(UTC)))
    return len(STEPS)
