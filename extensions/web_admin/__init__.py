"""The web admin: a browser's view of the server for its admins, at `/admin/` on the `http` listeners.

A host's admins log in with their XMPP account (`server.web_login`) and manage that host: accounts and
their sessions, rooms, invitations, spam reports and deny-lists, the modules' options; the admins of every
host also see the dashboard's charts, federation and tenants. Every change runs a declared command with
the logged-in admin as its actor, so the web admin may do exactly what ad-hoc commands and the HTTP API
let that admin do. See `site.py` for the pages, `sampler.py` and `charts.py` for the dashboard.

Each host that loads the module shares one site (per path) and one sampler: the pages serve every host.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from extensions.web_admin.site import AdminSite
from server.module import Module
from server.options import Option

if TYPE_CHECKING:
    from server.server import Server

# The site of each path on each server, shared by the module's instances on its hosts.
_SITES: weakref.WeakKeyDictionary[Server, dict[str, AdminSite]] = weakref.WeakKeyDictionary()


class WebAdmin(Module):
    name = "web_admin"
    options = (
        Option("path", str, "/admin/", "where the web admin is served on the http listeners (starts and ends "
                                       "with '/'; its login is PATH/login)"),
        Option("sample_interval", int, 10, "seconds between two samples of the dashboard's charts",
               minimum=1, maximum=300),
    )

    def setup(self) -> None:
        path = self.option("path")
        if not path.startswith("/") or not path.endswith("/"):
            raise ValueError(f"web_admin.path starts and ends with '/': {path!r}")
        sites = _SITES.setdefault(self.server, {})
        if path not in sites:
            sites[path] = AdminSite(self.server, path, self.option("sample_interval"))
        self.site = sites[path]
        self.site.holders += 1
        for method, route, handler in self.site.routes():
            self.add_http(method, route, handler)
        self._undo.append(self._release)

    async def start(self) -> None:
        self.site.sampler.start()

    def _release(self) -> None:
        """The last host that unloads the module stops the sampler and forgets the site."""
        self.site.holders -= 1
        if not self.site.holders:
            self.site.sampler.stop()
            _SITES.get(self.server, {}).pop(self.site.prefix, None)
