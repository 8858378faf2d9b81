"""The extension mechanism: a module declares what it adds in `setup()`, the core records it.

The shape follows Prosody: a module adds disco features and identities, iq handlers by (type, payload)
and hooks with priorities. Every registration goes through the module, so unloading a module removes
exactly what it added. Modules are found by name in `extensions/` (see `server.registry`).

Iq handlers are keyed by the address they serve:
- "host": iqs to the domain itself (e.g. version, time, disco of the server);
- "account": iqs to a local user's bare JID from anyone, e.g. a vCard get or a last activity query;
- "own": iqs to a local user's bare JID from that user, including a client's iq with no 'to' (RFC 6120
  10.3.3), e.g. roster, private storage, blocklist. The router answers anyone else with `forbidden`
  (RFC 6121 2.3.3), the same for every payload; an "own" handler is preferred to an "account" one for
  the same payload when the sender is the account itself.
A handler receives the Stanza and returns the result's payload Element, None for an empty result,
or `HANDLED` when it replied itself; raising StanzaError answers with that error. A service
(`add_service`, `server.service`) registers its iq handlers the same way, on its own domain.

Routing events (see `server.router`); a handler that returns a value has taken the stanza, and nothing
after it sees it:
- `<kind>/outbound` (stanza), on the sender's host: a stanza a local client sent, before it is routed;
- `<kind>/inbound` (stanza), on the recipient's host: any stanza to a local account, before the
  `<kind>/<target>` events (`message/bare`, `presence/full`...);
- `<kind>/inbound-many` (stanza, recipients), on the recipients' host: a stanza a service sends to many
  local full JIDs at once (`Router.fan_out`, a room's message to its occupants), 'to' unset; a handler
  removes from the list `recipients` those the host's inbound policy refuses, without answering;
- `message/deliver` (stanza, sessions), on the recipient's host: the default delivery chose `sessions`
  (an empty list: offline storage, 'message/offline', is next). Fired once per message, so a module
  that copies or archives what the user receives sees each message exactly once.
Blocking hooks the inbound and outbound events at a high priority to drop or bounce; carbons and the
archive hook 'message/outbound' and 'message/deliver'.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from xml.etree.ElementTree import Element

from server.options import Option

if TYPE_CHECKING:
    from server.commands import Command
    from server.host import Host
    from server.http import Handler as HttpHandler
    from server.service import Service
    from server.stanza import Stanza

IqHandler = Callable[["Stanza"], Awaitable[Element | object | None]]
TARGETS = ("host", "account", "own")


class IqHandlers(dict[tuple[str, str, str], IqHandler]):
    """The iq get and set handlers of a host or a service, by (type, target, payload tag)."""

    def __init__(self, targets: tuple[str, ...]) -> None:
        super().__init__()
        self.targets = targets

    def add(self, type: str, target: str, payload: str, handler: IqHandler) -> Callable[[], None]:
        """Serve iqs of `type` ('get' or 'set') to `target` whose child has tag `payload` (Clark notation);
        returns what undoes it."""
        if type not in ("get", "set") or target not in self.targets:
            raise ValueError(f"bad iq registration {type!r} {target!r}")
        key = (type, target, payload)
        if key in self:
            raise ValueError(f"iq handler for {key} already registered")
        self[key] = handler
        return lambda: self.pop(key, None)


@dataclass(frozen=True)
class Identity:
    category: str
    type: str
    name: str | None = None


class Module:
    """Base class of extension modules. Subclasses set `name` and register everything in `setup()`."""

    name: ClassVar[str]
    # Names of modules this one needs loaded first (e.g. presence needs roster).
    depends: ClassVar[tuple[str, ...]] = ()
    # The options it reads with option(): the configuration is checked against them when it is loaded.
    options: ClassVar[tuple[Option, ...]] = ()
    # True when worker processes other than the session's read its per-session state (`session.data[name]`, as
    # set or not), e.g. to choose which of a user's resources get a copy: the cluster shares it with them.
    shared_session_state: ClassVar[bool] = False
    _declared: ClassVar[dict[str, Option]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._declared = {option.name: option for option in cls.options}
        if len(cls._declared) != len(cls.options):
            raise TypeError(f"{cls.__name__} declares an option twice")

    def __init__(self, host: Host) -> None:
        self.host = host
        self.server = host.server
        self.log = logging.getLogger(f"parley.{self.name}")
        self._undo: list[Callable[[], None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def setup(self) -> None:
        """Register features, handlers and hooks. Runs once when the module loads on a host."""

    async def start(self) -> None:
        """Asynchronous start-up work (after every module of the host has run setup)."""

    async def stop(self) -> None:
        """Release what start() acquired."""

    # Registration API: each call records how to undo itself.
    def add_feature(self, var: str, target: str = "host") -> None:
        features = self.host.features[target]
        features.append(var)
        self._undo.append(lambda: features.remove(var))

    def add_identity(self, category: str, type: str, name: str | None = None, target: str = "host") -> None:
        identity = Identity(category, type, name)
        identities = self.host.identities[target]
        identities.append(identity)
        self._undo.append(lambda: identities.remove(identity))

    def iq(self, type: str, payload: str, handler: IqHandler, target: str = "host") -> None:
        """Serve iqs of `type` ('get' or 'set') whose child has tag `payload` (Clark notation)."""
        self._undo.append(self.host.iq_handlers.add(type, target, payload, handler))

    def hook(self, event: str, handler: Callable[..., Any], priority: int = 0) -> None:
        self.host.hooks.add(event, handler, priority)
        self._undo.append(lambda: self.host.hooks.remove(event, handler))

    def hook_global(self, event: str, handler: Callable[..., Any], priority: int = 0) -> None:
        """Hook a server-wide event (fired once for all hosts, e.g. 'server/started')."""
        self.server.hooks.add(event, handler, priority)
        self._undo.append(lambda: self.server.hooks.remove(event, handler))

    def add_service(self, service: Service) -> None:
        """Serve every stanza addressed to the service's domain (a subdomain such as conference.<host>)."""
        domain = service.domain
        if domain in self.server.services or domain in self.server.hosts:
            raise ValueError(f"domain {domain} is already served")
        self.server.services[domain] = service.receive
        self._undo.append(lambda: self.server.services.pop(domain, None))

    def add_http(self, method: str, path: str, handler: HttpHandler, *, this_host: bool = False) -> None:
        """Serve an HTTP path on the server's `http` listeners (see `server.http`): for this module's host
        only (the request's Host header names it) with `this_host`; else for every host, shared by the
        module's instances on every host that loads it (the first one's handler serves)."""
        if this_host:
            self._undo.append(self.server.http.add(method, path, handler, self.host.name))
        else:
            self._undo.append(self.server.http.add(method, path, handler, shared_by=self.name))

    def add_command(self, command: Command) -> None:
        """Offer an admin command (see `server.commands`) over the data this module owns, to every front end."""
        self._undo.append(self.server.commands.add(command))

    def option(self, name: str) -> Any:
        """The value this host's configuration gives the option, already checked against its declaration in
        `options`, or the declared default."""
        declared = self._declared.get(name)
        if declared is None:
            raise KeyError(f"module {self.name} reads option {name!r} without declaring it in its `options`")
        return self.host.config_options.get(f"{self.name}.{name}", declared.default)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `work` in the background: nobody waits for it, and the module's end cancels what is left."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_tasks(self) -> None:
        """Cancel the background work spawn() started and wait until it has stopped (after stop())."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def unload(self) -> None:
        while self._undo:
            self._undo.pop()()
