"""Tenants: virtual hosts created at run time, their settings and quotas, and the deletion of a removed one's data.

A row holds what a configured host has in the configuration file (admins, modules, module options,
certificate files) plus its quotas and state; `server.tenants` serves the rows. Deleting a tenant's data
goes table by table over every table keyed by host (or by MUC service domain), for the tenant's domain and
the subdomains its modules served.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from server.storage.engine import writer
from server.storage.schema import (
    account_credentials,
    accounts,
    archive,
    fast_tokens,
    invites,
    kv,
    muc_affiliations,
    muc_rooms,
    notify_outbox,
    notify_pending,
    offline,
    pending_subscriptions,
    pubsub_affiliations,
    pubsub_items,
    pubsub_nodes,
    pubsub_subscriptions,
    roster,
    roster_versions,
    spam_reports,
    tenants,
    uploads,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

ENABLED, DISABLED = "enabled", "disabled"
# Tables whose rows belong to a domain through their `host` column, children before parents.
_BY_HOST: tuple[Table, ...] = (
    fast_tokens, account_credentials, accounts, roster, roster_versions, pending_subscriptions, offline, kv,
    pubsub_items, pubsub_subscriptions, pubsub_affiliations, pubsub_nodes, archive, uploads, invites, spam_reports,
    notify_pending, notify_outbox,
)


@dataclass(frozen=True)
class Quotas:
    """What a tenant may use; 0 is no limit."""

    max_accounts: int = 0
    max_storage: int = 0  # bytes of archived and offline stanzas (their XML)
    max_upload: int = 0  # bytes of uploaded files, reserved slots included
    max_rate: int = 0  # messages per second from all the tenant's users together


@dataclass(frozen=True)
class Tenant:
    domain: str
    state: str = ENABLED
    admins: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    certificate: str | None = None
    key: str | None = None
    quotas: Quotas = Quotas()
    services: tuple[str, ...] = ()  # subdomains it served, as of its removal
    created: datetime | None = None
    remove_at: datetime | None = None

    @property
    def served(self) -> bool:
        return self.state == ENABLED and self.remove_at is None


_QUOTAS = tuple(f.name for f in fields(Quotas))


def _tenant(row: Any) -> Tenant:
    m = row._mapping
    return Tenant(domain=m["domain"], state=m["state"], admins=tuple(m["admins"]), modules=tuple(m["modules"]),
                  options=dict(m["options"]), certificate=m["certificate"], key=m["key"],
                  quotas=Quotas(**{name: int(m[name]) for name in _QUOTAS}), services=tuple(m["services"]),
                  created=m["created"], remove_at=m["remove_at"])


def _values(tenant: Tenant) -> dict[str, Any]:
    return {"domain": tenant.domain, "state": tenant.state, "admins": list(tenant.admins),
            "modules": list(tenant.modules), "options": tenant.options, "certificate": tenant.certificate,
            "key": tenant.key, "services": list(tenant.services), "created": tenant.created,
            "remove_at": tenant.remove_at, **{name: getattr(tenant.quotas, name) for name in _QUOTAS}}


class TenantStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)

    async def create(self, tenant: Tenant) -> bool:
        """False when the domain is a tenant already."""
        try:
            async with self._writer.begin() as conn:
                await conn.execute(insert(tenants).values(**_values(tenant)))
        except IntegrityError:
            return False
        return True

    async def get(self, domain: str) -> Tenant | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(tenants).where(tenants.c.domain == domain))).first()
        return _tenant(row) if row is not None else None

    async def list(self) -> list[Tenant]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(tenants).order_by(tenants.c.domain))).all()
        return [_tenant(row) for row in rows]

    async def save(self, tenant: Tenant) -> None:
        """Write every setting of an existing tenant."""
        async with self._writer.begin() as conn:
            await conn.execute(update(tenants).where(tenants.c.domain == tenant.domain).values(**_values(tenant)))

    async def due(self, now: datetime) -> list[Tenant]:
        """Removed tenants whose grace period is over."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(tenants).where(tenants.c.remove_at <= now))).all()
        return [_tenant(row) for row in rows]

    async def purge(self, tenant: Tenant) -> None:
        """Delete everything stored for the tenant's domain and the subdomains it served, then the tenant itself,
        in one transaction: a purge cut short leaves the tenant to purge again."""
        domains = [tenant.domain, *tenant.services]
        async with self._writer.begin() as conn:
            for table in _BY_HOST:
                await conn.execute(delete(table).where(table.c.host.in_(domains)))
            for table in (muc_affiliations, muc_rooms):
                await conn.execute(delete(table).where(table.c.service.in_(domains)))
            await conn.execute(delete(tenants).where(tenants.c.domain == tenant.domain))

    async def used_storage(self, domain: str) -> int:
        """Bytes of the domain's archived and offline stanzas, as their XML text counts them."""
        async with self._engine.connect() as conn:
            total = 0
            for table in (archive, offline):
                total += int(await conn.scalar(select(func.coalesce(func.sum(func.length(table.c.stanza_xml)), 0))
                                               .where(table.c.host == domain)) or 0)
        return total


def with_quotas(tenant: Tenant, **changed: int) -> Tenant:
    return replace(tenant, quotas=replace(tenant.quotas, **changed))
