"""XEP-0050 Ad-Hoc Commands over the declarations of `server.commands` (XEP-0133 for admins).

A command whose arguments come in several stages is a session: each stage is one XEP-0004 form, the
client moves with next/prev and ends with complete or cancel, and the values of every stage are kept
under a sessionid bound to the requesting full JID. Each requester sees in disco only the commands it
may run; running another one is forbidden.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from xml.etree.ElementTree import Element, SubElement

from server import commands, ns
from server.commands import (
    ADMIN_NS,
    COMMANDS,
    FIELD_TYPES,
    REFUSED,
    XML,
    Arg,
    Command,
    CommandError,
    Context,
    by_node,
)
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
    stage: int = 0
    raw: dict[str, list[str]] = field(default_factory=dict)  # submitted values, shown again on prev
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
        commands.load()
        self.sessions: dict[str, AdhocSession] = {}
        self.add_feature(NS)
        self.iq("set", COMMAND, self.execute)
        self.hook("disco/items-node", self.items_node)
        self.hook("disco/info-node", self.info_node)

    def _visible(self, stanza: Stanza) -> list[Command]:
        return [c for c in COMMANDS.values() if c.adhoc and c.allowed(self.host, stanza.from_)]

    def items_node(self, stanza: Stanza, node: str) -> Element | None:
        if node != NS or stanza.to.local is not None:
            return None
        query = Element(ns.qname(ns.DISCO_ITEMS, "query"), {"node": NS})
        for command in self._visible(stanza):
            SubElement(query, ns.qname(ns.DISCO_ITEMS, "item"),
                       {"jid": self.host.name, "node": command.node, "name": command.title})
        return query

    def info_node(self, stanza: Stanza, node: str) -> Element | None:
        command = by_node(node)
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
        command = by_node(node)
        if command is None:
            refused = next((r for n, r in REFUSED.items() if node == f"{ADMIN_NS}#{n}"), None)
            if refused:
                raise StanzaError("feature-not-implemented", refused)
            raise StanzaError("item-not-found", f"no command {node!r}")
        if not command.allowed(self.host, stanza.from_):
            raise StanzaError("forbidden", "you may not run this command")
        if action is not None and action not in ACTIONS:
            raise _error("bad-request", "malformed-action", f"unknown action {action!r}")
        if sessionid is None:
            if action not in (None, "execute"):
                raise _error("bad-request", "bad-action", f"{action} needs a session")
            return await self._start(stanza, command)
        session = self.sessions.get(sessionid)
        if session is None or session.owner != stanza.from_ or session.command is not command:
            raise _error("bad-request", "bad-sessionid", "no such session")
        if action == "cancel":
            del self.sessions[sessionid]
            return _answer(command, sessionid, "canceled")
        return await self._step(stanza, sessionid, session, action)

    async def _start(self, stanza: Stanza, command: Command) -> Element:
        if command.stages == 0:
            return await self._complete(stanza, command, secrets.token_hex(8), {})
        self._prune()
        sessionid = secrets.token_hex(8)
        session = AdhocSession(command, stanza.from_)
        if command.defaults is not None:
            try:
                current = await command.defaults(Context(self.host, stanza.from_))
            except CommandError as exc:
                return _answer(command, sessionid, "completed", note=("error", str(exc)))
            session.raw = {arg.name: arg.format(current.get(arg.name)) for arg in command.args}
        self.sessions[sessionid] = session
        return self._form(sessionid, session)

    async def _step(self, stanza: Stanza, sessionid: str, session: AdhocSession, action: str | None) -> Element:
        last = session.stage == session.command.stages - 1
        if action == "prev":
            if session.stage == 0:
                raise _error("bad-request", "bad-action", "this is the first stage")
            session.stage -= 1
            return self._form(sessionid, session)
        if action in (None, "execute"):
            action = "complete" if last else "next"
        if (action == "complete") != last:
            raise _error("bad-request", "bad-action", f"{action} is not possible at this stage")
        form = find_form(stanza.el[0])
        if form is None or form.get("type") != "submit":
            raise _error("bad-request", "bad-payload", "submit the form of this stage")
        submitted = read_form(form)
        for arg in self._stage_args(session):
            session.raw[arg.name] = submitted.get(arg.name, [])
            try:
                arg.parse(session.raw[arg.name])
            except CommandError as exc:
                raise _error("bad-request", "bad-payload", str(exc)) from None
        if not last:
            session.stage += 1
            return self._form(sessionid, session)
        del self.sessions[sessionid]
        values = {arg.name: arg.parse(session.raw.get(arg.name, [])) for arg in session.command.args}
        return await self._complete(stanza, session.command, sessionid, values)

    async def _complete(self, stanza: Stanza, command: Command, sessionid: str, values: dict[str, Any]) -> Element:
        try:
            result = await command.run(Context(self.host, stanza.from_), values)
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

    def _stage_args(self, session: AdhocSession) -> list[Arg]:
        return [a for a in session.command.args if a.stage == session.stage]

    def _form(self, sessionid: str, session: AdhocSession) -> Element:
        command = session.command
        answer = _answer(command, sessionid, "executing")
        last = session.stage == command.stages - 1
        actions = SubElement(answer, ns.qname(NS, "actions"), {"execute": "complete" if last else "next"})
        if session.stage > 0:
            SubElement(actions, ns.qname(NS, "prev"))
        SubElement(actions, ns.qname(NS, "complete" if last else "next"))
        answer.append(build_form("form", [
            Field(arg.name, "list-single" if arg.options else FIELD_TYPES[arg.type], arg.label,
                  () if arg.type == "password" else tuple(session.raw.get(arg.name, ())), arg.required, arg.options)
            for arg in self._stage_args(session)
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
