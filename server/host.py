"""A virtual host: an isolated tenant with its own users, modules, features and handlers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from server.hooks import Hooks
from server.jid import JID
from server.module import TARGETS, IqHandlers, Module

if TYPE_CHECKING:
    from server.config import HostConfig
    from server.server import Server

log = logging.getLogger("parley.host")
ADMINS = "admins"  # key-value store of the host (user ''): the admins added at runtime


def server_admin(server: Server, jid: JID) -> bool:
    """An admin of the whole server: of every host of the configuration file. Tenants, created at run time, have
    admins of their own, who administer their tenant only."""
    configured = [h for h in server.hosts.values() if not h.tenant]
    return bool(configured) and all(h.is_admin(jid) for h in configured)


class Host:
    def __init__(self, server: Server, config: HostConfig, tenant: bool = False) -> None:
        self.server = server
        self.tenant = tenant  # created at run time (server.tenants) rather than in the configuration file
        self.config = config
        self.name = config.name
        self.jid = JID.make(None, config.name)
        self.hooks = Hooks()
        self.iq_handlers = IqHandlers(TARGETS)
        self.features: dict[str, list[str]] = {"host": [], "account": []}
        self.identities: dict[str, list[Any]] = {"host": [], "account": []}
        self.modules: dict[str, Module] = {}
        self.config_options: dict[str, Any] = dict(config.options)
        self.configured_admins = frozenset(JID.parse(a) for a in config.admins)
        self.admins = set(self.configured_admins)  # and those added at runtime (XEP-0133 edit-admin)

    def load_modules(self, names: list[str]) -> None:
        from server.registry import resolve

        for cls in resolve(names):
            module = cls(self)
            module.setup()
            self.modules[cls.name] = module
            log.debug("loaded module %s on %s", cls.name, self.name)

    async def start(self) -> None:
        added = await self.server.storage.kv.get(self.name, "", ADMINS, "")
        self.admins = {*self.configured_admins, *(JID.parse(a) for a in added or ())}
        for module in self.modules.values():
            await module.start()

    async def stop(self) -> None:
        for module in reversed(list(self.modules.values())):
            await module.stop()
            await module.cancel_tasks()
            module.unload()
        self.modules.clear()

    def is_admin(self, jid: JID) -> bool:
        """The host's own admins; on a tenant the server's admins too, who create and look after tenants."""
        return jid.bare in self.admins or (self.tenant and server_admin(self.server, jid))

    async def set_admins(self, admins: set[JID]) -> None:
        """Make `admins` and the configured admins the admins; those not configured are stored, so that they
        stay admins after a restart."""
        added = sorted(str(a.bare) for a in admins if a.bare not in self.configured_admins)
        await self.server.storage.kv.set(self.name, "", ADMINS, "", added or None)
        self.admins = {*self.configured_admins, *(a.bare for a in admins)}
