"""Tenants: virtual hosts the operator creates, disables, enables and removes while the server runs.

A tenant is a row of `server.storage.tenants` turned into a `HostConfig` and served with `Server.add_host`:
admins, modules and module options (by default those of the `[tenants] template` host, else the built-in
modules), certificate (its own files, else the shared `[tenants]` pair, else a self-signed one generated as
for configured hosts) and quotas. Tenants are loaded at start after the configured hosts. Every change is
written to storage first and then applied from there, here and, in a cluster, on every other member (a
'tenant' frame naming the domain), so that all members serve the same tenants.

Disabling stops serving: sessions end with 'host-gone', logins meet 'host-unknown', federation treats the
domain as not ours. Removing disables at once and deletes the tenant's data when `[tenants] removal_grace`
has passed (the time is in storage, so a restart does not lose it); cancel-tenant-removal restores it
within the grace.

Quotas: accounts (checked where every account is created, `server.accounts.create_account`), upload space (the upload
module's host quota), and here, on the tenant's outgoing messages, the message rate (a token bucket per
tenant) and storage: the bytes of the tenant's archived and offline stanzas (their XML), counted from time
to time (`USAGE_INTERVAL`); over it, messages with a body bounce with resource-constraint.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import tomllib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from server.config import DEFAULT_MODULES, HostConfig
from server.jid import JID, JIDError
from server.limits import Bucket
from server.options import check_option
from server.registry import available, load
from server.storage.tenants import DISABLED, ENABLED, Quotas, Tenant, TenantStore
from server.stream.errors import StanzaError
from server.tls import TlsError, ensure_certificate

if TYPE_CHECKING:
    from server.server import Server
    from server.stanza import Stanza

log = logging.getLogger("parley.tenants")

FRAME = "tenant"  # cluster frame: the payload is a domain whose row changed
SWEEP_INTERVAL = 60.0  # seconds between two looks for removals due and two counts of storage use
PRIORITY = 2000  # of the quota check on outgoing messages: before blocking (1000) and every module


class TenantError(ValueError):
    """Why a tenant operation was refused; `conflict` when the domain is taken."""

    def __init__(self, reason: str, conflict: bool = False) -> None:
        super().__init__(reason)
        self.conflict = conflict


def tenant_domain(text: str) -> str:
    try:
        jid = JID.make(None, text.strip())
    except JIDError as exc:
        raise TenantError(f"invalid domain {text!r}: {exc}") from None
    return str(jid)


class Tenants:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.settings = server.config.tenants
        self.store: TenantStore = None  # type: ignore[assignment]  # set by start(), with the storage
        self.quotas: dict[str, Quotas] = {}  # of the tenants served here
        self.used: dict[str, int] = {}  # storage bytes of each tenant served here, as last counted
        self._rates: dict[str, Bucket] = {}
        self._applying = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # --- life cycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve the stored tenants (after the configured hosts), follow the other members' changes and start
        the timer that deletes removed tenants' data."""
        self.store = self.server.storage.tenants
        if self.server.cluster is not None:
            self.server.cluster.on(FRAME, self._heard)
        for tenant in await self.store.list():
            if tenant.served:
                try:
                    await self._serve(tenant)
                except Exception as exc:  # one tenant that cannot start does not keep the server from starting
                    log.error("tenant %s not served: %s", tenant.domain, exc)
        self._task = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        """Stop the timer, and wait for it: cancelled in the middle of a query, it must give its connection
        back before the storage closes (left to the garbage collector, an aiosqlite connection ends in a task
        that the closing event loop waits for in vain)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _sweep(self) -> None:
        interval = min(SWEEP_INTERVAL, max(0.05, self.settings.removal_grace / 4))
        while True:
            try:
                await self.reconcile()
                await self.purge_due()
                for domain, quotas in list(self.quotas.items()):
                    if quotas.max_storage:
                        await self.count_usage(domain)
            except Exception:
                log.exception("tenant housekeeping failed; trying again in %g s", interval)
            await asyncio.sleep(interval)

    # --- serving --------------------------------------------------------------------------------------------

    def host_config(self, tenant: Tenant) -> HostConfig:
        data, certs = self.server.config.data_dir, self.server.config.data_dir / "certs"
        if tenant.certificate and tenant.key:
            certificate, key = tenant.certificate, tenant.key
        elif self.settings.certificate is not None and self.settings.key is not None:
            certificate, key = str(self.settings.certificate), str(self.settings.key)
        else:
            certificate, key = str(certs / f"{tenant.domain}.crt"), str(certs / f"{tenant.domain}.key")
        template = self._template()
        return HostConfig(name=tenant.domain, certificate=data / certificate, key=data / key,
                          registration=template.registration if template is not None else False,
                          admins=list(tenant.admins), modules=list(tenant.modules), options=dict(tenant.options))

    def _template(self) -> HostConfig | None:
        name = self.settings.template
        return self.server.config.hosts.get(name) if name else None

    async def _serve(self, tenant: Tenant) -> None:
        hc = self.host_config(tenant)
        if ensure_certificate(hc.name, hc.certificate, hc.key):
            log.info("generated a self-signed certificate for tenant %s at %s", hc.name, hc.certificate)
        before = set(self.server.services)
        await self._limit(tenant)  # before the first stanza
        try:
            host = await self.server.add_host(hc, tenant=True)
        except BaseException:
            self.quotas.pop(tenant.domain, None)
            raise
        host.hooks.add("message/outbound", self._outbound, PRIORITY)
        services = tuple(sorted(set(self.server.services) - before))
        if services != tenant.services:  # remembered, so that a removal deletes their data too
            await self.store.save(replace(tenant, services=services))
        log.info("serving tenant %s", tenant.domain)

    async def _limit(self, tenant: Tenant) -> None:
        if self.quotas.get(tenant.domain, Quotas()).max_rate != tenant.quotas.max_rate:
            self._rates.pop(tenant.domain, None)
        self.quotas[tenant.domain] = tenant.quotas
        if tenant.quotas.max_storage:
            await self.count_usage(tenant.domain)

    async def apply(self, domain: str) -> None:
        """Make this member serve `domain` as its stored row says: start it, stop it, or take its new admins
        and quotas. One change at a time: a command's, another member's and the sweep's may meet."""
        async with self._applying:
            await self._apply(domain)

    async def _apply(self, domain: str) -> None:
        tenant = await self.store.get(domain)
        host = self.server.hosts.get(domain)
        if host is not None and not host.tenant:
            return  # a configured host: not ours to change
        if tenant is None or not tenant.served:
            self.quotas.pop(domain, None)
            self._rates.pop(domain, None)
            if host is not None:
                await self.server.remove_host(domain, "this domain is no longer served here")
                log.info("stopped serving tenant %s (%s)", domain, "removed" if tenant is None or tenant.remove_at
                         else "disabled")
            return
        if host is None:
            await self._serve(tenant)
            return
        added = host.admins - host.configured_admins  # by XEP-0133 edit-admin on the tenant: they stay
        host.configured_admins = frozenset(JID.parse(a) for a in tenant.admins)
        host.admins = {*host.configured_admins, *added}
        host.config.admins = list(tenant.admins)
        await self._limit(tenant)

    async def reconcile(self) -> None:
        """Apply what differs between storage and what this member serves: a change whose frame was lost (Redis
        out of reach when it was made) is taken up here within a sweep interval."""
        stored = {t.domain: t for t in await self.store.list()}
        served = {name: host for name, host in self.server.hosts.items() if host.tenant}
        for domain in {*served, *(d for d, t in stored.items() if t.served)}:
            tenant, host = stored.get(domain), served.get(domain)
            if tenant is None or host is None or not tenant.served or self.quotas.get(domain) != tenant.quotas \
                    or host.config.admins != list(tenant.admins):
                try:
                    await self.apply(domain)
                except (TlsError, ValueError) as exc:
                    log.error("tenant %s not served: %s", domain, exc)

    async def _changed(self, domain: str) -> None:
        """Apply a stored change here and tell the other members of a cluster to apply it too."""
        try:
            await self.apply(domain)
        except (TlsError, ValueError) as exc:
            raise TenantError(f"{domain} cannot be served: {exc}") from None
        cluster = self.server.cluster
        if cluster is not None:
            for member in cluster.members():
                if member != cluster.member:
                    cluster.send(member, FRAME, domain)

    async def _heard(self, _sender: str, domain: str) -> None:
        if self._task is None:
            return  # stopping (or not started): the hosts are being stopped, or not loaded yet
        try:
            await self.apply(domain)
        except (TenantError, TlsError, ValueError) as exc:
            log.error("tenant %s changed on another member but cannot be served here: %s", domain, exc)

    # --- what the commands do -------------------------------------------------------------------------------

    async def get(self, domain: str) -> Tenant:
        tenant = await self.store.get(tenant_domain(domain))
        if tenant is None:
            raise TenantError(f"no tenant {domain}")
        return tenant

    async def create(self, domain: str, admins: list[str], modules: list[str], options: list[str],
                     certificate: str | None, key: str | None) -> Tenant:
        name = tenant_domain(domain)
        if name in self.server.config.hosts:
            raise TenantError(f"{name} is a host of the configuration file", conflict=True)
        if name in self.server.services or name in self.server.config.components:
            raise TenantError(f"{name} is served already (a service or a component)", conflict=True)
        template = self._template()
        chosen = modules or (template.modules if template is not None else list(DEFAULT_MODULES))
        unknown = sorted(set(chosen) - available())
        if unknown:
            raise TenantError(f"unknown modules: {', '.join(unknown)}")
        given = parse_options(options, chosen)
        base = {k: v for k, v in (template.options if template is not None else {}).items()
                if k.partition(".")[0] in chosen}
        if (certificate is None) != (key is None):
            raise TenantError("give both the certificate and the key, or neither")
        for path in (certificate, key):
            if path is not None and not self.server.config.data_dir.joinpath(path).is_file():
                raise TenantError(f"{path} is not a file")
        q = self.settings
        tenant = Tenant(domain=name, admins=tuple(parse_admins(admins, name)), modules=tuple(dict.fromkeys(chosen)),
                        options={**base, **given}, certificate=certificate, key=key,
                        quotas=Quotas(q.max_accounts, q.max_storage, q.max_upload, q.max_rate),
                        created=datetime.now(UTC))
        if not await self.store.create(tenant):
            raise TenantError(f"{name} is a tenant already", conflict=True)
        try:
            await self._changed(name)
        except TenantError:
            await self.store.purge(tenant)
            raise
        return tenant

    async def set_enabled(self, domain: str, enabled: bool) -> Tenant:
        tenant = await self.get(domain)
        if tenant.remove_at is not None:
            raise TenantError(f"{tenant.domain} is being removed: cancel-tenant-removal first")
        tenant = replace(tenant, state=ENABLED if enabled else DISABLED)
        await self.store.save(tenant)
        await self._changed(tenant.domain)
        return tenant

    async def remove(self, domain: str, confirm: str) -> Tenant:
        tenant = await self.get(domain)
        if tenant_domain(confirm) != tenant.domain:
            raise TenantError(f"type the domain again to confirm: {confirm!r} is not {tenant.domain}")
        if tenant.remove_at is not None:
            return tenant
        tenant = replace(tenant, remove_at=datetime.now(UTC) + timedelta(seconds=self.settings.removal_grace))
        await self.store.save(tenant)
        await self._changed(tenant.domain)
        log.warning("tenant %s removed: its data goes at %s", tenant.domain, tenant.remove_at)
        return tenant

    async def cancel_removal(self, domain: str) -> Tenant:
        tenant = await self.get(domain)
        if tenant.remove_at is None:
            raise TenantError(f"{tenant.domain} is not being removed")
        tenant = replace(tenant, remove_at=None)
        await self.store.save(tenant)
        await self._changed(tenant.domain)
        return tenant

    async def set_quotas(self, domain: str, changed: dict[str, int]) -> Tenant:
        tenant = await self.get(domain)
        if any(value < 0 for value in changed.values()):
            raise TenantError("a quota is 0 (no limit) or more")
        tenant = replace(tenant, quotas=replace(tenant.quotas, **changed))
        await self.store.save(tenant)
        await self._changed(tenant.domain)
        return tenant

    async def set_admins(self, domain: str, admins: list[str]) -> Tenant:
        tenant = await self.get(domain)
        tenant = replace(tenant, admins=tuple(parse_admins(admins, tenant.domain)))
        await self.store.save(tenant)
        await self._changed(tenant.domain)
        return tenant

    async def purge_due(self) -> list[str]:
        """Delete the data of the removed tenants whose grace is over; their domains."""
        purged = []
        for tenant in await self.store.due(datetime.now(UTC)):
            if self.server.hosts.get(tenant.domain) is not None:
                await self.apply(tenant.domain)
            await self.store.purge(tenant)
            for domain in (tenant.domain, *tenant.services):
                shutil.rmtree(self.server.config.data_dir / "uploads" / domain, ignore_errors=True)
            log.warning("tenant %s: its data is deleted", tenant.domain)
            purged.append(tenant.domain)
        return purged

    # --- quotas ---------------------------------------------------------------------------------------------

    async def count_usage(self, domain: str) -> int:
        self.used[domain] = used = await self.store.used_storage(domain)
        return used

    def upload_quota(self, domain: str) -> int:
        """Bytes of uploads the tenant may keep (0: no limit)."""
        quotas = self.quotas.get(domain)
        return quotas.max_upload if quotas is not None else 0

    async def _outbound(self, stanza: Stanza) -> bool | None:
        domain = stanza.from_.domain
        quotas = self.quotas.get(domain)
        if quotas is None or stanza.type == "error":
            return None
        if quotas.max_rate:
            now = time.monotonic()
            rate = self._rates.get(domain)
            if rate is None:
                rate = self._rates[domain] = Bucket(quotas.max_rate, quotas.max_rate * 3600, now)
            if not rate.take(now):
                await self.server.router.bounce(stanza, StanzaError(
                    "resource-constraint", f"{domain} sends more than {quotas.max_rate} messages a second; "
                                           "wait a moment"))
                return True
        if quotas.max_storage and self.used.get(domain, 0) >= quotas.max_storage and \
                stanza.el.find("{jabber:client}body") is not None:
            await self.server.router.bounce(stanza, StanzaError(
                "resource-constraint", f"{domain} has used its storage of {quotas.max_storage} bytes"))
            return True
        return None


def parse_admins(given: list[str], domain: str) -> list[str]:
    """Admins of a tenant, accounts of it, from lines that may each hold several (comma or space separated)."""
    admins = []
    for text in (part for line in given for part in line.replace(",", " ").split()):
        try:
            jid = JID.parse(text)
        except JIDError as exc:
            raise TenantError(f"invalid admin {text!r}: {exc}") from None
        if jid.local is None or jid.resource is not None or jid.domain != domain:
            raise TenantError(f"an admin is an account of the tenant, user@{domain}: not {text!r}")
        admins.append(str(jid))
    return list(dict.fromkeys(admins))


def split_names(given: list[str]) -> list[str]:
    """Names from lines that may each hold several, comma or space separated."""
    return [part for line in given for part in line.replace(",", " ").split()]


def parse_options(lines: list[str], modules: list[str]) -> dict[str, Any]:
    """Module options from 'module.option = value' lines, the value in TOML ("text", 10, true, ["a"]), each
    checked against what its module declares."""
    options: dict[str, Any] = {}
    for line in (line for given in lines for line in given.splitlines() if line.strip()):  # one string may hold several
        name, sep, text = line.partition("=")
        module, dot, option = name.strip().partition(".")
        if not sep or not dot:
            raise TenantError(f"{line!r}: write module.option = value")
        if module not in modules:
            raise TenantError(f"{line!r}: the module {module} is not loaded on the tenant")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # a bare word counts as text
        try:
            options[f"{module}.{option}"] = check_option(load(module).options, option, value)
        except ValueError as exc:
            raise TenantError(f"{line!r}: {exc}") from None
    return options
