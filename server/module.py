"""The extension mechanism: a module declares what it adds in `setup()`, the core records it.

The shape follows Prosody: a module adds disco features and identities, iq handlers by (type, payload)
and hooks with priorities. Every registration goes through the module, so unloading a module removes
exactly what it added. Modules are found by name in `extensions/` (see `server.registry`).

Iq handlers are keyed by the address they serve:
- "host": iqs to the domain itself (e.g. version, time, disco of the server);
- "account": iqs to a local user's bare JID, including a client's iq with no 'to' (RFC 6120 10.3.3),
  e.g. roster or vCard.
A handler receives the Stanza and returns the result's payload Element, None for an empty result,
or `HANDLED` when it replied itself; raising StanzaError answers with that error.

Routing events (see `server.router`); a handler that returns a value has taken the stanza, and nothing
after it sees it:
- `<kind>/outbound` (stanza), on the sender's host: a stanza a local client sent, before it is routed;
- `<kind>/inbound` (stanza), on the recipient's host: any stanza to a local account, before the
  `<kind>/<target>` events (`message/bare`, `presence/full`...);
- `message/deliver` (stanza, sessions), on the recipient's host: the default delivery chose `sessions`
  (an empty list: offline storage, 'message/offline', is next). Fired once per message, so a module
  that copies or archives what the user receives sees each message exactly once.
Blocking hooks the first two at a high priority to drop or bounce; carbons and the archive hook
'message/outbound' and 'message/deliver'.
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
    from server.host import Host
    from server.stanza import Stanza

IqHandler = Callable[["Stanza"], Awaitable[Element | object | None]]
TARGETS = ("host", "account")


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
        if type not in ("get", "set") or target not in TARGETS:
            raise ValueError(f"bad iq registration {type!r} {target!r}")
        key = (type, target, payload)
        if key in self.host.iq_handlers:
            raise ValueError(f"iq handler for {key} already registered")
        self.host.iq_handlers[key] = handler
        self._undo.append(lambda: self.host.iq_handlers.pop(key, None))

    def hook(self, event: str, handler: Callable[..., Any], priority: int = 0) -> None:
        self.host.hooks.add(event, handler, priority)
        self._undo.append(lambda: self.host.hooks.remove(event, handler))

    def hook_global(self, event: str, handler: Callable[..., Any], priority: int = 0) -> None:
        """Hook a server-wide event (fired once for all hosts, e.g. 'server/started')."""
        self.server.hooks.add(event, handler, priority)
        self._undo.append(lambda: self.server.hooks.remove(event, handler))

    def add_service(self, domain: str, handler: Callable[[Stanza], Awaitable[None]]) -> None:
        """Serve every stanza addressed to `domain` (a subdomain such as conference.<host>)."""
        if domain in self.server.services or domain in self.server.hosts:
            raise ValueError(f"domain {domain} is already served")
        self.server.services[domain] = handler
        self._undo.append(lambda: self.server.services.pop(domain, None))

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
