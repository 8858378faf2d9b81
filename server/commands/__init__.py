"""Admin commands, each declared once: name, typed arguments, result fields, who may run it, and the code.

The part that owns the data declares each command: a module registers its own in `setup()` with
`Module.add_command` (roster, vCard, rooms, the message of the day...), the core declares those over
accounts, sessions and the server itself (`service_admin`), and the composition root installs those of
the parts that are not modules (federation policy, ejabberd's names). All of them land in the server's
`CommandTable`. Front ends (XEP-0050 ad-hoc commands, the CLI, the HTTP API) read these declarations to
build their forms, options or JSON, parse arguments with `Arg.parse` and check `Command.allowed`, so no
command is written once per front end. Every front end asks for all the arguments of a command at once:
XEP-0133 shows each of its commands as one form, which a client may also submit without asking for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from server.host import server_admin
from server.jid import JID, JIDError
from server.stream.writer import not_xml

if TYPE_CHECKING:
    from server.host import Host
    from server.module import Module

M = TypeVar("M", bound="Module")

ADMIN_NS = "http://jabber.org/protocol/admin"
# Argument types and the XEP-0004 field type that asks for each.
FIELD_TYPES = {
    "jid": "jid-single", "jids": "jid-multi", "text": "text-single", "password": "text-private",
    "int": "text-single", "lines": "text-multi",
}
# A result of this type is an Element passed on as it is: XEP-0133's get-user-roster answers with a
# jabber:iq:roster <query/> inside the result form.
XML = "xml"


class CommandError(ValueError):
    """A user-facing reason why a command did not do what was asked."""


class Conflict(CommandError):
    """What the command was to create exists already (HTTP front ends answer 409)."""


class Forbidden(CommandError):
    """The caller may run the command but not on what it names (a tenant's admin naming another tenant): HTTP
    front ends answer 403, ad-hoc commands 'forbidden'."""


class NegativeAnswer(CommandError):
    """The command ran and its answer is no (check_account of a missing account): ejabberd's result code 1,
    which its HTTP API sends as a successful call, not as an error."""


@dataclass(frozen=True)
class Arg:
    """An argument or a result field of a command."""

    name: str
    type: str  # a key of FIELD_TYPES; commands that are not ad-hoc also take "path" and return "records"
    label: str
    required: bool = True
    # Values to choose from (XEP-0133's delays); a form offers them as a list, any value of the type is taken.
    options: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()  # of each record, for a result of type 'records'

    def parse(self, values: list[str]) -> Any:
        """The typed value of what a front end received as strings (None when optional and absent).

        Text from outside XML (the control socket, the HTTP API) may hold characters XML cannot carry, which
        would end up in a stanza or in storage: refused here, where every front end passes."""
        for value in values:
            if self.type != "path" and (char := not_xml(value)):
                raise CommandError(f"{self.label}: contains {char}, a character XML does not allow")
        if self.type != "password":
            values = [v.strip() for v in values if v.strip()]
        if not values or not values[0]:
            if self.required:
                raise CommandError(f"{self.label} is required")
            return [] if self.type in ("jids", "lines") else None
        try:
            if self.type == "jid":
                return JID.parse(values[0])
            if self.type == "jids":
                return [JID.parse(v) for v in values]
            if self.type == "int":
                return int(values[0])
        except (JIDError, ValueError) as exc:
            raise CommandError(f"{self.label}: {exc}") from None
        if self.type == "lines":
            return values
        return values[0]

    def format(self, value: Any) -> list[str]:
        """A typed value as the strings a front end shows."""
        if isinstance(value, list | tuple | set):
            return [str(v) for v in value]
        return [] if value is None else [str(value)]


@dataclass
class Context:
    """Who runs a command, and on which host.

    The operator (the local control socket, the HTTP API's token) runs commands for every host; an admin
    only for the hosts it administers, since hosts are separate tenants. Commands that name their host in
    an argument (ejabberd's) reach it through `target`.
    """

    host: Host
    actor: JID
    operator: bool = False

    def hosts(self) -> list[Host]:
        """The hosts this context may act on."""
        return [h for h in self.host.server.hosts.values() if self.operator or h.is_admin(self.actor)]

    def target(self, name: str) -> Host:
        host = self.host.server.hosts.get(name.strip().lower())
        if host is None or host not in self.hosts():
            raise CommandError(f"Unknown virtual host: {name}")
        return host


Run = Callable[[Context, dict[str, Any]], Awaitable[dict[str, Any]]]
# The current values a command's arguments start from, for commands that edit something (edit-motd shows
# the message it edits, edit-admin the list it replaces).
Defaults = Callable[[Context], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Command:
    name: str
    title: str
    run: Run
    args: tuple[Arg, ...] = ()
    result: tuple[Arg, ...] = ()
    # 'admin': the host's admins; 'user': any account of the host; 'server': admins of every host, for
    # commands that reach past one host (restart, federation lists), since hosts are separate tenants.
    access: str = "admin"
    namespace: str = ADMIN_NS
    defaults: Defaults | None = None
    # 'form': XEP-0133 style, named result fields shown in a data form (ad-hoc commands). The others are
    # ejabberd's result kinds, shaped by the CLI and HTTP front ends: 'rescode' (nothing, or a
    # NegativeAnswer), 'restuple' (a message), 'string', 'integer', 'list', 'records'; the one result
    # argument, if any, names the value.
    returns: str = "form"
    # False for a building block that other commands run by name (ejabberd's, through the table) and that
    # no front end offers by itself.
    offered: bool = True

    @property
    def node(self) -> str:
        return f"{self.namespace}#{self.name}"

    def parse_form(self, submitted: dict[str, list[str]]) -> dict[str, Any]:
        """Typed values of every argument from a submitted form, where fields left out count as empty and
        fields of no argument (FORM_TYPE, a client's extras) are ignored."""
        return {a.name: a.parse(submitted.get(a.name, [])) for a in self.args}

    @property
    def adhoc(self) -> bool:
        """Offered as a XEP-0050 command: the ejabberd-shaped ones are for the CLI and HTTP API only."""
        return self.offered and self.returns == "form"

    def parse(self, given: dict[str, Any]) -> dict[str, Any]:
        """Typed values of every argument from a front end that sends them all at once, by name."""
        names = {a.name for a in self.args}
        unknown = sorted(set(given) - names)
        if unknown:
            raise CommandError(f"unknown arguments: {', '.join(unknown)}")
        missing = [a.name for a in self.args if a.name not in given]
        if missing:
            raise CommandError(f"missing argument: {', '.join(missing)}")
        return {a.name: a.parse(_strings(given[a.name])) for a in self.args}

    def allowed(self, host: Host, jid: JID) -> bool:
        if self.access == "user":
            return jid.domain == host.name and jid.local is not None
        if self.access == "server":
            return server_admin(host.server, jid)
        return host.is_admin(jid)


def module_on(host: Host, cls: type[M]) -> M:
    """The module `cls` as loaded on `host`, for a command over that module's data there."""
    module = host.modules.get(cls.name)
    if module is None:
        raise CommandError(f"the {cls.name} module is not loaded on {host.name}")
    return cast(M, module)


def _strings(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [] if value is None else [str(value)]


# Commands of XEP-0133 that cannot exist here, with the reason every front end gives.
REFUSED: dict[str, str] = {
    "get-user-password": "passwords are stored only as SCRAM keys and cannot be retrieved; "
                         "use change-user-password instead",
}


class Declarations(list[Command]):
    """The commands one file declares, in order; `command` is the decorator that adds one."""

    def command(self, name: str, title: str, args: tuple[Arg, ...] = (), result: tuple[Arg, ...] = (),
                access: str = "admin", defaults: Defaults | None = None, returns: str = "form",
                offered: bool = True, namespace: str = ADMIN_NS) -> Callable[[Run], Command]:
        """Declare the decorated coroutine as the command `name`; the name then stands for the Command."""
        def declare(run: Run) -> Command:
            declared = Command(name, title, run, args, result, access, namespace, defaults=defaults,
                               returns=returns, offered=offered)
            self.append(declared)
            return declared
        return declare


class CommandTable:
    """The commands a server runs, by name. Every host that loads a module registers the module's commands
    again: the same declaration counts once and goes when the last host unloads it.

    XEP-0133's names (forms) and ejabberd's (the command line and HTTP API) are two name spaces, as both
    have a `restart`: `get` looks in the first, then the second; `get_ctl` only in ejabberd's."""

    def __init__(self) -> None:
        self._commands: dict[tuple[bool, str], Command] = {}
        self._holders: dict[tuple[bool, str], int] = {}

    @staticmethod
    def _key(command: Command) -> tuple[bool, str]:
        return command.returns != "form", command.name

    def add(self, command: Command) -> Callable[[], None]:
        """Install `command`; returns what removes it again."""
        key = self._key(command)
        found = self._commands.get(key)
        if found is not None and found is not command:
            raise ValueError(f"command {command.name} is declared twice")
        self._commands[key] = command
        self._holders[key] = self._holders.get(key, 0) + 1
        return lambda: self._remove(key)

    def _remove(self, key: tuple[bool, str]) -> None:
        self._holders[key] -= 1
        if not self._holders[key]:
            del self._holders[key], self._commands[key]

    def get(self, name: str) -> Command | None:
        return self._commands.get((False, name)) or self._commands.get((True, name))

    def get_ctl(self, name: str) -> Command | None:
        """An ejabberd-shaped command (parleyctl, the HTTP API) by its name."""
        return self._commands.get((True, name))

    def __getitem__(self, name: str) -> Command:
        command = self.get(name)
        if command is None:
            raise CommandError(f"the command {name} is not available: the module that declares it is not loaded")
        return command

    def __iter__(self) -> Iterator[Command]:
        return iter(list(self._commands.values()))

    def by_node(self, node: str) -> Command | None:
        return next((c for c in self if c.adhoc and c.node == node), None)

    async def run(self, name: str, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        """Run the command `name` with typed arguments, as another command does with the one it builds on."""
        return await self[name].run(ctx, args)
