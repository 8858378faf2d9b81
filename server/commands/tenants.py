"""Tenant commands: create, list, disable, enable, remove (and cancel that), quotas and admins of the virtual hosts
created at run time (`server.tenants`).

Each is declared once and installed twice: in ejabberd's shape for parleyctl and the HTTP API, and as a
XEP-0050 form for the ad-hoc commands of server admins, with the same arguments. Creating, disabling,
enabling, removing and quotas are for the server's admins (access 'server': admins of every configured host)
and the operator; listing and setting admins also for a tenant's own admins, who see and change only their
tenant: anything else is Forbidden (HTTP 403, ad-hoc 'forbidden').
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.commands import Arg, CommandError, Conflict, Context, Declarations, Forbidden, Run
from server.host import server_admin
from server.storage.tenants import Tenant
from server.tenants import TenantError, split_names

COMMANDS = Declarations()
NS = "urn:parley:tenants"  # of the ad-hoc commands' nodes: they are Parley's, not XEP-0133's

DOMAIN = Arg("domain", "text", "Tenant domain")
ADMINS = Arg("admins", "lines", "Admins (accounts of the tenant, one a line or comma separated)", required=False)
QUOTAS = (
    Arg("max_accounts", "int", "Maximum accounts (0: no limit; empty: unchanged)", required=False),
    Arg("max_storage", "int", "Maximum bytes of archived and offline messages (0: no limit; empty: unchanged)",
        required=False),
    Arg("max_upload", "int", "Maximum bytes of uploaded files (0: no limit; empty: unchanged)", required=False),
    Arg("max_rate", "int", "Maximum messages a second from all its users (0: no limit; empty: unchanged)",
        required=False),
)
FIELDS = ("domain", "state", "accounts", "admins", "max_accounts", "max_storage", "max_upload", "max_rate",
          "remove_at")
MESSAGE = Arg("message", "text", "Result")


def _declare(name: str, title: str, args: tuple[Arg, ...], access: str = "server",
             listing: bool = False) -> Callable[[Run], Run]:
    """Install `run` as the command `name` for parleyctl and the HTTP API (a message, or records for a
    listing) and as the ad-hoc command of the same name (the message, or one line a record)."""
    def declare(run: Run) -> Run:
        async def checked(ctx: Context, values: dict[str, Any]) -> dict[str, Any]:
            try:
                return await run(ctx, values)
            except TenantError as exc:
                raise (Conflict if exc.conflict else CommandError)(str(exc)) from None

        if listing:
            records = Arg("tenants", "records", "Tenants", fields=FIELDS)
            COMMANDS.command(name, title, args, (records,), access=access, returns="records")(checked)

            async def as_lines(ctx: Context, values: dict[str, Any]) -> dict[str, Any]:
                found = (await checked(ctx, values))["tenants"]
                return {"tenants": ["\t".join(f"{f}={record[f]}" for f in FIELDS) for record in found]}

            COMMANDS.command(name, title, args, (Arg("tenants", "lines", "Tenants"),), access=access,
                             namespace=NS)(as_lines)
        else:
            COMMANDS.command(name, title, args, (MESSAGE,), access=access, returns="string")(checked)
            COMMANDS.command(name, title, args, (MESSAGE,), access=access, namespace=NS)(checked)
        return run
    return declare


def _may(ctx: Context, tenant: Tenant) -> bool:
    """The operator and the server's admins reach every tenant, a tenant's admins only theirs."""
    return ctx.operator or server_admin(ctx.host.server, ctx.actor) or str(ctx.actor.bare) in tenant.admins


async def _tenant(ctx: Context, domain: str) -> Tenant:
    tenant = await ctx.host.server.tenants.get(domain)
    if not _may(ctx, tenant):
        raise Forbidden(f"{ctx.actor} is not an admin of {tenant.domain}")
    return tenant


def _server_only(ctx: Context) -> None:
    if not (ctx.operator or server_admin(ctx.host.server, ctx.actor)):
        raise Forbidden(f"{ctx.actor} is not an admin of the server")


def _optional(value: str | None) -> str | None:
    return value or None


@_declare("create-tenant", "Create a tenant: a virtual host served at once, kept across restarts", (
    DOMAIN, ADMINS,
    Arg("modules", "lines", "Modules (empty: those of the [tenants] template host, else the defaults)",
        required=False),
    Arg("options", "lines", "Module options, one a line: module.option = value", required=False),
    Arg("certificate", "text", "Certificate file (empty: the shared [tenants] one, else a self-signed one)",
        required=False),
    Arg("key", "text", "Key file of that certificate", required=False)))
async def create_tenant(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    _server_only(ctx)
    tenant = await ctx.host.server.tenants.create(
        args["domain"], args["admins"], split_names(args["modules"]), args["options"],
        _optional(args["certificate"]), _optional(args["key"]))
    return {"message": f"Tenant {tenant.domain} created and served"}


async def _records(ctx: Context, tenants: list[Tenant]) -> list[dict[str, Any]]:
    accounts = ctx.host.server.storage.accounts
    return [{"domain": t.domain, "state": "removing" if t.remove_at else t.state,
             "accounts": await accounts.count(t.domain), "admins": ",".join(t.admins),
             "max_accounts": t.quotas.max_accounts, "max_storage": t.quotas.max_storage,
             "max_upload": t.quotas.max_upload, "max_rate": t.quotas.max_rate,
             "remove_at": t.remove_at.strftime("%Y-%m-%dT%H:%M:%SZ") if t.remove_at else ""} for t in tenants]


@_declare("list-tenants", "List the tenants with their state, accounts and quotas", (), access="admin", listing=True)
async def list_tenants(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """A tenant's admins see their tenant only."""
    tenants = [t for t in await ctx.host.server.tenants.store.list() if _may(ctx, t)]
    return {"tenants": await _records(ctx, tenants)}


@_declare("disable-tenant", "Disable a tenant: its sessions end, logins and federation are refused", (DOMAIN,))
async def disable_tenant(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    _server_only(ctx)
    tenant = await ctx.host.server.tenants.set_enabled(args["domain"], False)
    return {"message": f"Tenant {tenant.domain} disabled"}


@_declare("enable-tenant", "Enable a disabled tenant again", (DOMAIN,))
async def enable_tenant(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    _server_only(ctx)
    tenant = await ctx.host.server.tenants.set_enabled(args["domain"], True)
    return {"message": f"Tenant {tenant.domain} enabled"}


@_declare("remove-tenant", "Remove a tenant: disabled at once, its data deleted after the grace period", (
    DOMAIN, Arg("confirm", "text", "The domain again, to confirm")))
async def remove_tenant(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    _server_only(ctx)
    tenant = await ctx.host.server.tenants.remove(args["domain"], args["confirm"])
    assert tenant.remove_at is not None
    return {"message": f"Tenant {tenant.domain} disabled; its data is deleted at "
                       f"{tenant.remove_at:%Y-%m-%d %H:%M:%S} UTC unless cancel-tenant-removal restores it first"}


@_declare("cancel-tenant-removal", "Keep a removed tenant whose data is not deleted yet", (DOMAIN,))
async def cancel_tenant_removal(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    _server_only(ctx)
    tenant = await ctx.host.server.tenants.cancel_removal(args["domain"])
    return {"message": f"Tenant {tenant.domain} kept ({tenant.state})"}


@_declare("set-tenant-quotas", "Set a tenant's quotas", (DOMAIN, *QUOTAS))
async def set_tenant_quotas(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    _server_only(ctx)
    changed = {a.name: args[a.name] for a in QUOTAS if args[a.name] is not None}
    tenant = await ctx.host.server.tenants.set_quotas(args["domain"], changed)
    q = tenant.quotas
    return {"message": f"Tenant {tenant.domain}: max_accounts={q.max_accounts} max_storage={q.max_storage} "
                       f"max_upload={q.max_upload} max_rate={q.max_rate}"}


@_declare("set-tenant-admins", "Set a tenant's admins", (DOMAIN, ADMINS), access="admin")
async def set_tenant_admins(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """A tenant's admin may change the list of its own tenant."""
    await _tenant(ctx, args["domain"])
    tenant = await ctx.host.server.tenants.set_admins(args["domain"], args["admins"])
    return {"message": f"Tenant {tenant.domain}: admins {', '.join(tenant.admins) or 'none'}"}

