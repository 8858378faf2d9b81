"""XEP-0050 Ad-Hoc Commands over the server's command table (`server.commands`; XEP-0133 for admins).

A command with arguments asks for them in one XEP-0004 form, as XEP-0133 shows each command: `execute`
returns the form under a sessionid bound to the requesting full JID, and the client ends with complete
(or execute) and the submitted form, or cancel. A client that knows the form already may submit it with
its first request (execute or complete, no sessionid), as scripts do. Each requester sees in disco only
the commands it may run; running another one is forbidden.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.commands import ADMIN_NS, FIELD_TYPES, REFUSED, XML, Command, CommandError, Context, Forbidden
from server.forms import Field, build_form, find_form, read_form
from server.jid import JID
from server.module import Module
from server.stanza import Stanza
from server.stream.errors import StanzaError

NS = "http://jabber.org/protocol/commands"
COMMAND = ns.qname(NS, "command")
ACTIONS = ("execute", "next", "prev", "complete", "cancel")
SESSION_TTL = 600.0  # seconds an unfinished session is kept
MAX_SESSIONS = 100  # unfinished sessions kept per host, so a client cannot pile them up


@dataclass
class AdhocSession:
    command: Command
    owner: JID
    started: float = field(default_factory=time.monotonic)


def _error(condition: str, specific: str | None, text: str) -> StanzaError:
    """A stanza error with XEP-0050's application condition (bad-action, bad-sessionid...)."""
    return StanzaError(condition, text, extra=Element(ns.qname(NS, specific)) if specific else None)


def _answer(command: Command, sessionid: str, status: str, note: tuple[str, str] | None = None) -> Element:
    answer = Element(COMMAND, {"node": command.node, "sessionid": sessionid, "status": status})
    if note is not None:
        SubElement(answer, ns.qname(NS, "note"), {"type": note[0]}).text = note[1]
    return answer


class Adhoc(Module):
    name = "adhoc"
    depends = ("disco",)

    def setup(self) -> None:
        self.sessions: dict[str, AdhocSession] = {}
        self.add_feature(NS)
        self.iq("set", COMMAND, self.execute)
        self.hook("disco/items-node", self.items_node)
        self.hook("disco/info-node", self.info_node)

    def _visible(self, stanza: Stanza) -> list[Command]:
        return [c for c in self.server.commands if c.adhoc and c.allowed(self.host, stanza.from_)]

    def items_node(self, stanza: Stanza, node: str) -> Element | None:
        if node != NS or stanza.to.local is not None:
            return None
        query = Element(ns.qname(ns.DISCO_ITEMS, "query"), {"node": NS})
        for command in self._visible(stanza):
            SubElement(query, ns.qname(ns.DISCO_ITEMS, "item"),
                       {"jid": self.host.name, "node": command.node, "name": command.title})
        return query

    def info_node(self, stanza: Stanza, node: str) -> Element | None:
        command = self.server.commands.by_node(node)
        if command is None or stanza.to.local is not None:
            return None
        if not command.allowed(self.host, stanza.from_):
            raise StanzaError("forbidden", "you may not run this command")
        query = Element(ns.qname(ns.DISCO_INFO, "query"), {"node": node})
        SubElement(query, ns.qname(ns.DISCO_INFO, "identity"),
                   {"category": "automation", "type": "command-node", "name": command.title})
        for var in (NS, ns.DATA_FORMS):
            SubElement(query, ns.qname(ns.DISCO_INFO, "feature"), {"var": var})
        return query

    async def execute(self, stanza: Stanza) -> Element:
        request = stanza.el[0]
        node, action, sessionid = request.get("node", ""), request.get("action"), request.get("sessionid")
        command = self.server.commands.by_node(node)
        if command is None:
            refused = next((r for n, r in REFUSED.items() if node == f"{ADMIN_NS}#{n}"), None)
            if refused:
                raise StanzaError("feature-not-implemented", refused)
            raise StanzaError("item-not-found", f"no command {node!r}")
        if not command.allowed(self.host, stanza.from_):
            raise StanzaError("forbidden", "you may not run this command")
        if action is not None and action not in ACTIONS:
            raise _error("bad-request", "malformed-action", f"unknown action {action!r}")
        if action in ("next", "prev"):
            raise _error("bad-request", "bad-action", "every command here has a single form: complete it")
        submitted = find_form(stanza.el[0])
        if submitted is not None and submitted.get("type") != "submit":
            raise _error("bad-request", "bad-payload", "submit the form of the command")
        if sessionid is None:
            if action == "cancel":
                raise _error("bad-request", "bad-action", "cancel needs a session")
            if command.args and submitted is None and action != "complete":
                return await self._start(stanza, command)
            return await self._complete(stanza, command, secrets.token_hex(8), submitted)
        session = self.sessions.get(sessionid)
        if session is None or session.owner != stanza.from_ or session.command is not command:
            raise _error("bad-request", "bad-sessionid", "no such session")
        if action == "cancel":
            del self.sessions[sessionid]
            return _answer(command, sessionid, "canceled")
        if submitted is None:
            raise _error("bad-request", "bad-payload", "submit the form of the command")
        answer = await self._complete(stanza, command, sessionid, submitted)
        self.sessions.pop(sessionid, None)  # kept when the form was refused, so that the client can correct it
        return answer

    async def _start(self, stanza: Stanza, command: Command) -> Element:
        self._prune()
        sessionid = secrets.token_hex(8)
        current: dict[str, Any] = {}
        if command.defaults is not None:
            try:
                current = await command.defaults(Context(self.host, stanza.from_))
            except CommandError as exc:
                return _answer(command, sessionid, "completed", note=("error", str(exc)))
        self.sessions[sessionid] = AdhocSession(command, stanza.from_)
        return self._form(sessionid, command, current)

    async def _complete(self, stanza: Stanza, command: Command, sessionid: str, form: Element | None) -> Element:
        """Run `command` with the values of the submitted `form`; a form that does not parse is refused with
        bad-payload, what the command refuses comes back as an error note."""
        try:
            values = command.parse_form(read_form(form) if form is not None else {})
        except CommandError as exc:
            raise _error("bad-request", "bad-payload", str(exc)) from None
        try:
            result = await command.run(Context(self.host, stanza.from_), values)
        except Forbidden as exc:
            raise StanzaError("forbidden", str(exc)) from None
        except CommandError as exc:
            return _answer(command, sessionid, "completed", note=("error", str(exc)))
        self.log.info("%s ran %s", stanza.from_, command.name)
        answer = _answer(command, sessionid, "completed",
                              note=None if command.result else ("info", "Command completed."))
        if command.result:
            form = build_form("result", [
                Field(arg.name, FIELD_TYPES[arg.type], arg.label, tuple(arg.format(result.get(arg.name))))
                for arg in command.result if arg.type != XML
            ], form_type=command.namespace, title=command.title)
            form.extend(result[arg.name] for arg in command.result if arg.type == XML and arg.name in result)
            answer.append(form)
        return answer

    def _form(self, sessionid: str, command: Command, current: dict[str, Any]) -> Element:
        """The command's one form, showing the current values of what it edits."""
        answer = _answer(command, sessionid, "executing")
        actions = SubElement(answer, ns.qname(NS, "actions"), {"execute": "complete"})
        SubElement(actions, ns.qname(NS, "complete"))
        answer.append(build_form("form", [
            Field(arg.name, "list-single" if arg.options else FIELD_TYPES[arg.type], arg.label,
                  () if arg.type == "password" else tuple(arg.format(current.get(arg.name))), arg.required,
                  arg.options)
            for arg in command.args
        ], form_type=command.namespace, title=command.title))
        return answer

    def _prune(self) -> None:
        """Forget sessions left unfinished for too long, then the oldest while there are too many."""
        horizon = time.monotonic() - SESSION_TTL
        for sessionid, session in list(self.sessions.items()):
            if session.started < horizon:
                del self.sessions[sessionid]
        while len(self.sessions) >= MAX_SESSIONS:
            del self.sessions[next(iter(self.sessions))]
