"""XEP-0357 Push Notifications: wake a user's phone through its app server when a message cannot reach it.

A client registers app servers for its account with <enable jid node/> (optionally with publish options
such as a secret, kept verbatim) and removes them with <disable jid [node]/>; registrations are stored
per account, several at once. A message with content (a body, or an OMEMO payload, which has none) is
pushed when it goes to offline storage ('message/offline', ahead of the offline module, which still
stores it) or waits in the queue of a detached stream-management session ('sm/queued'); never when an
attached session of the account got it (directly or as a carbon). A message in a persistent or
members-only room is pushed to its members, admins and owners who are not in the room ('muc/message',
so that being away from a group does not mean missing it). Each push is a pubsub
publish from the account to the app server with the urn:xmpp:push:summary form: the number of messages
since the user was last online and the last sender (and the body, only with the 'include_body' option:
it crosses the app server and the phone vendor's push service).

An app server answering with an error (other than 'wait') loses its registration, as Prosody's
mod_cloud_notify does, so a dead registration stops costing a round trip per message. An app server that
accepts a publish (a result) is told to other modules: 'push/delivered' (user, message element) fires once
per message and user, so missed-message notifications need not email what the phone was woken for.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary, WeakSet
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.forms import Field, build_form, find_form, form_type_of, read_form
from server.jid import JID, JIDError
from server.module import Module
from server.options import Option
from server.sessions import Session
from server.stanza import MESSAGE, Stanza, element
from server.storage.kv import CachedDocuments
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from extensions.muc.room import Room

PUSH = "urn:xmpp:push:0"
SUMMARY = "urn:xmpp:push:summary"
PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
PUBSUB = "http://jabber.org/protocol/pubsub"
ENABLE = ns.qname(PUSH, "enable")
DISABLE = ns.qname(PUSH, "disable")
BODY = ns.qname(ns.CLIENT, "body")
NO_STORE = ns.qname(ns.HINTS, "no-store")
STANZA_ID = "{urn:xmpp:sid:0}stanza-id"
# OMEMO messages may carry no body; their payload is content all the same.
ENCRYPTED = ("{eu.siacs.conversations.axolotl}encrypted", "{urn:xmpp:omemo:2}encrypted")
MEMBERS = ("member", "admin", "owner")  # affiliations whose holders hear of a room's messages when away
MAX_APPS = 10  # registrations per account ('max_registrations')
LOCKS = 64
MAX_PENDING = 10000  # publishes awaiting the app server's answer
MAX_REMEMBERED = 10000  # stanza-ids already pushed (a message re-queued after a lost session is not pushed twice)


@dataclass(frozen=True)
class App:
    """One registration: an app server's JID, its node for this device, and the publish options to send."""

    jid: str
    node: str
    options: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def document(self) -> dict[str, Any]:
        return {"jid": self.jid, "node": self.node, "options": [[var, list(values)] for var, values in self.options]}

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> App:
        return cls(doc["jid"], doc["node"], tuple((var, tuple(values)) for var, values in doc["options"]))


@dataclass(frozen=True)
class Registrations:
    """An account's app servers and the messages pushed since the user was last online."""

    apps: tuple[App, ...] = ()
    count: int = 0

    def document(self) -> dict[str, Any] | None:
        return {"apps": [app.document() for app in self.apps], "count": self.count} if self.apps else None

    @classmethod
    def parse(cls, doc: dict[str, Any] | None) -> Registrations:
        if doc is None:
            return cls()
        return cls(tuple(App.from_document(app) for app in doc["apps"]), doc["count"])


def has_content(el: Element) -> bool:
    """Something a user would want to be woken for: a body or an encrypted payload."""
    return el.find(BODY) is not None or any(el.find(tag) is not None for tag in ENCRYPTED)


def pushable(el: Element) -> bool:
    """A chat or normal message with content, not hinted away from storage."""
    if el.tag != MESSAGE or (el.get("type") or "normal") not in ("chat", "normal") or el.find(NO_STORE) is not None:
        return False
    return has_content(el)


def archive_id(el: Element, user: JID) -> str | None:
    """The XEP-0359 id the user's archive gave the message: it survives copies of the element."""
    for sid in el.iterfind(STANZA_ID):
        if sid.get("by") == str(user):
            return sid.get("id")
    return None


def notification(user: JID, app: App, count: int, sender: str, body: str | None, iq_id: str) -> Element:
    """XEP-0357 7: the publish that tells an app server to wake the device."""
    iq = element("iq", type="set", id=iq_id, from_=str(user), to=app.jid)
    pubsub = SubElement(iq, ns.qname(PUBSUB, "pubsub"))
    item = SubElement(SubElement(pubsub, ns.qname(PUBSUB, "publish"), {"node": app.node}), ns.qname(PUBSUB, "item"))
    fields = [Field("message-count", values=(str(count),)), Field("last-message-sender", values=(sender,))]
    if body is not None:
        fields.append(Field("last-message-body", values=(body,)))
    SubElement(item, ns.qname(PUSH, "notification")).append(build_form("submit", fields, form_type=SUMMARY))
    if app.options:
        options = [Field(var, values=values) for var, values in app.options]
        SubElement(pubsub, ns.qname(PUBSUB, "publish-options")).append(
            build_form("submit", options, form_type=PUBLISH_OPTIONS))
    return iq


class Push(Module):
    name = "push"
    options = (
        Option("include_body", bool, False, "put the message body in notifications (it crosses the app server "
               "and the phone vendor's push service)"),
        Option("max_registrations", int, MAX_APPS, "app server registrations per account", minimum=1),
    )

    def setup(self) -> None:
        self.registrations = CachedDocuments(self.server.storage.kv, self.name, Registrations.parse)
        self._pending: dict[str, tuple[JID, App, Element]] = {}  # publish id -> whose registration, which message
        # Messages an app server accepted, and for whom (a room's message goes to several members).
        self._delivered: WeakKeyDictionary[Element, set[JID]] = WeakKeyDictionary()
        self._reached: WeakSet[Element] = WeakSet()  # messages an attached session got, or already pushed
        self._pushed: dict[str, None] = {}  # archive ids of pushed messages, oldest first
        self._locks = [asyncio.Lock() for _ in range(LOCKS)]
        self.add_feature(PUSH, target="account")
        self.iq("set", ENABLE, self.enable, target="own")
        self.iq("set", DISABLE, self.disable, target="own")
        self.hook("message/deliver", self.delivering, priority=-5)  # after carbons, which names its copies
        self.hook("message/offline", self.offline, priority=10)  # ahead of offline storage, which still runs
        self.hook("sm/queued", self.queued)
        self.hook("presence/initial", self.online)
        self.hook_global("muc/message", self.room_message)
        self.hook("iq-result/bare", self.answered)
        self.hook("iq-error/bare", self.answered)

    # --- registrations ----------------------------------------------------------------------------

    @staticmethod
    def _target(payload: Element) -> str:
        try:
            return str(JID.parse(payload.get("jid") or ""))
        except JIDError:
            raise StanzaError("bad-request", "'jid' must be the app server's address") from None

    async def enable(self, stanza: Stanza) -> None:
        user = stanza.to.bare
        payload = stanza.el[0]
        jid, node = self._target(payload), payload.get("node")
        if not node:
            raise StanzaError("bad-request", "'node' is required")
        form = find_form(payload)
        if form is not None and form_type_of(form) != PUBLISH_OPTIONS:
            raise StanzaError("bad-request", f"the form must be of type {PUBLISH_OPTIONS}")
        options = read_form(form) if form is not None else {}
        options.pop("FORM_TYPE", None)
        app = App(jid, node, tuple((var, tuple(values)) for var, values in options.items()))
        async with self._lock(user):
            current = await self.registrations.get(user.domain, user.local or "")
            apps = (*(a for a in current.apps if (a.jid, a.node) != (jid, node)), app)
            if len(apps) > self.option("max_registrations"):
                raise StanzaError("resource-constraint", "too many push registrations; disable one first")
            await self._save(user, replace(current, apps=apps))

    async def disable(self, stanza: Stanza) -> None:
        user = stanza.to.bare
        payload = stanza.el[0]
        jid, node = self._target(payload), payload.get("node")
        await self._remove(user, lambda app: app.jid == jid and (not node or app.node == node))

    async def _remove(self, user: JID, match: Callable[[App], bool]) -> None:
        async with self._lock(user):
            current = await self.registrations.get(user.domain, user.local or "")
            await self._save(user, replace(current, apps=tuple(app for app in current.apps if not match(app))))

    async def _save(self, user: JID, registrations: Registrations) -> None:
        await self.registrations.set(user.domain, user.local or "", registrations.document())

    def _lock(self, user: JID) -> asyncio.Lock:
        """Registrations and counts are read, changed and written back: one change at a time per account
        (a few accounts share each lock, which keeps their number fixed)."""
        return self._locks[hash(user) % LOCKS]

    # --- when to push -----------------------------------------------------------------------------

    async def delivering(self, stanza: Stanza, sessions: list[Session]) -> None:
        """A message that an attached session gets, directly or as a carbon, needs no push; and the user, who
        is there to read it (a resumed session too), starts a new count."""
        if any(not s.detached for s in (*sessions, *stanza.copies)):
            self._reached.add(stanza.el)
            await self._restart_count(stanza.to.bare)

    def offline(self, stanza: Stanza) -> None:
        """Push behind the router's back: offline storage, next in the chain, must not wait for the lookup
        (a login that empties the store meanwhile would miss the message)."""
        self.spawn(self._push(stanza.to.bare, stanza.el))

    async def queued(self, session: Session, el: Element) -> None:
        await self._push(session.bare, el)

    async def online(self, session: Session) -> None:
        await self._restart_count(session.bare)

    async def _restart_count(self, user: JID) -> None:
        """The user is back: the next push counts from one."""
        if not (await self.registrations.get(user.domain, user.local or "")).count:
            return
        async with self._lock(user):
            current = await self.registrations.get(user.domain, user.local or "")
            await self._save(user, replace(current, count=0))

    async def _push(self, user: JID, el: Element) -> None:
        if el in self._reached or not pushable(el):
            return
        self._reached.add(el)  # a message queued for two detached sessions wakes the phone once
        known = archive_id(el, user)
        if known is not None:
            if known in self._pushed:
                return
            self._pushed[known] = None
            if len(self._pushed) > MAX_REMEMBERED:
                del self._pushed[next(iter(self._pushed))]
        await self._notify(user, el)

    async def room_message(self, room: Room, el: Element) -> None:
        """Members of a persistent or members-only room who are not in it hear of its messages (issue #6)."""
        if not (room.config.persistent or room.config.members_only) or not has_content(el):
            return
        for jid, record in list(room.affiliations.items()):
            if record.affiliation in MEMBERS and jid.local and jid.domain == self.host.name \
                    and not room.occupants_of(jid):
                await self._notify(jid, el)

    async def _notify(self, user: JID, el: Element) -> None:
        """Count the message and publish to each of the user's app servers, if there are any."""
        async with self._lock(user):
            current = await self.registrations.get(user.domain, user.local or "")
            if not current.apps:
                return
            current = replace(current, count=current.count + 1)
            await self._save(user, current)
        body = el.findtext(BODY) if self.option("include_body") else None
        for app in current.apps:
            iq_id = secrets.token_hex(8)
            self._pending[iq_id] = (user, app, el)
            if len(self._pending) > MAX_PENDING:
                del self._pending[next(iter(self._pending))]
            await self.server.router.send(notification(user, app, current.count, el.get("from") or "", body, iq_id))

    # --- the app server's answer ------------------------------------------------------------------

    async def answered(self, stanza: Stanza) -> bool | None:
        pending = self._pending.get(stanza.id or "")
        if pending is None or pending[0] != stanza.to.bare or str(stanza.from_) != pending[1].jid:
            return None
        del self._pending[stanza.id or ""]
        user, app, el = pending
        if stanza.type == "result":
            reached = self._delivered.setdefault(el, set())
            if user not in reached:  # a user with several app servers: one delivery is enough
                reached.add(user)
                await self.host.hooks.fire_all("push/delivered", user, el)
            return True
        if stanza.type == "error":
            error = stanza.el.find(ns.qname(ns.CLIENT, "error"))
            if error is not None and error.get("type") == "wait":
                self.log.info("app server %s asks %s to wait; registration kept", app.jid, user)
            else:
                self.log.info("app server %s answered %s's push with an error; registration removed", app.jid, user)
                await self._remove(user, lambda found: (found.jid, found.node) == (app.jid, app.node))
        return True
