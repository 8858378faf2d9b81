"""Admin commands, each declared once: name, typed arguments, result fields, who may run it, and the code.

Front ends (XEP-0050 ad-hoc commands, the CLI, the HTTP API) read these declarations to build
their forms, options or JSON, parse arguments with `Arg.parse` and check `Command.allowed`, so no
command is written once per front end. Every front end asks for all the arguments of a command at once:
XEP-0133 shows each of its commands as one form, which a client may also submit without asking for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

from server.jid import JID, JIDError
from server.stream.writer import not_xml

if TYPE_CHECKING:
    from server.host import Host

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
        return self.returns == "form"

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
            return all(h.is_admin(jid) for h in host.server.hosts.values())
        return host.is_admin(jid)


def _strings(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [] if value is None else [str(value)]


COMMANDS: dict[str, Command] = {}
# Commands of XEP-0133 that cannot exist here, with the reason every front end gives.
REFUSED: dict[str, str] = {
    "get-user-password": "passwords are stored only as SCRAM keys and cannot be retrieved; "
                         "use change-user-password instead",
}


def register(command: Command) -> Command:
    if command.name in COMMANDS:
        raise ValueError(f"command {command.name} is declared twice")
    COMMANDS[command.name] = command
    return command


def by_node(node: str) -> Command | None:
    return next((c for c in COMMANDS.values() if c.adhoc and c.node == node), None)


def command(name: str, title: str, args: tuple[Arg, ...] = (), result: tuple[Arg, ...] = (),
            access: str = "admin", defaults: Defaults | None = None, returns: str = "form") -> Callable[[Run], Run]:
    """Declare the decorated coroutine as the command `name`."""
    def declare(run: Run) -> Run:
        register(Command(name, title, run, args, result, access, defaults=defaults, returns=returns))
        return run
    return declare


# Modules that declare commands; `load` imports them so that every front end sees the same set.
DECLARING_MODULES = ("server.commands.service_admin", "ejabberd_compat.commands")


def load() -> dict[str, Command]:
    """Every declared command, by name."""
    for module in DECLARING_MODULES:
        import_module(module)
    return COMMANDS
