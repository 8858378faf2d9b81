"""RFC 6121 section 2: the roster, with versioning (XEP-0237, RFC 6121 2.6) and roster pushes.

The roster is where subscription state lives, so the presence module changes it through `update()`
here: every change is stored, gets a new roster version and is pushed to the interested resources.
Read-modify-write changes of one roster hold `locked(user)` so concurrent stanzas cannot lose updates.

Rosters of users with sessions on this server are cached: every presence a user sends or receives
consults the roster, and reading it from the database each time made presence fan-out slow. All writes
go through this module, which keeps the cache in step. A user's entry moves, when the last session ends,
to a small cache of the most recently used rosters of users without sessions (`OFFLINE_ROSTERS`): a user
who logs in probes each contact, and a probe to an offline contact reads that contact's roster, so
without it a hundred logins with a hundred contacts each read the same rosters thousands of times.
With several worker processes, a change is announced ('roster/changed'), and a change another process
made arrives as 'roster/stale' on the user's host, which drops the copy (`invalidate()`).
"""

from __future__ import annotations

import asyncio
import secrets
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.commands import XML, Arg, CommandError, Context, Declarations, module_on
from server.commands.service_admin import ACCOUNTS, existing_account, single_account
from server.jid import JID, JIDError
from server.module import Module
from server.stanza import Stanza, element
from server.storage import RosterItem
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from server.c2s import C2SConnection
    from server.sessions import Session

QUERY = ns.qname(ns.ROSTER, "query")
ITEM = ns.qname(ns.ROSTER, "item")
GROUP = ns.qname(ns.ROSTER, "group")
# RFC 6121 2.3.3 lets the server limit the length of names and group names.
MAX_TEXT = 1023
# Rosters of users without a session kept in memory, least recently used dropped first: enough for the
# contacts that logins in a burst (a restart, the morning) probe in turn, small next to the sessions' own.
OFFLINE_ROSTERS = 256


def item_element(item: RosterItem) -> Element:
    el = Element(ITEM, {"jid": item.jid, "subscription": item.subscription})
    if item.name:
        el.set("name", item.name)
    if item.ask:
        el.set("ask", "subscribe")
    if item.approved:
        el.set("approved", "true")
    for group in item.groups:
        SubElement(el, GROUP).text = group
    return el


def parse_item(query: Element) -> tuple[JID, Element]:
    """The one item of a roster set and its JID, or the stanza error RFC 6121 2.3.3 asks for."""
    if len(query) != 1 or query[0].tag != ITEM:
        raise StanzaError("bad-request", "a roster set carries exactly one item")
    item = query[0]
    jid = item.get("jid")
    if not jid:
        raise StanzaError("bad-request", "the item has no 'jid'")
    try:
        return JID.parse(jid), item
    except JIDError as exc:
        raise StanzaError("jid-malformed", str(exc)) from None


def parse_groups(item: Element) -> tuple[str, ...]:
    groups = tuple(group.text or "" for group in item.findall(GROUP))
    if not all(groups):
        raise StanzaError("not-acceptable", "a group name cannot be empty")
    if len(set(groups)) != len(groups):
        raise StanzaError("bad-request", "duplicate group")
    if any(len(group) > MAX_TEXT for group in groups):
        raise StanzaError("not-acceptable", f"group names are limited to {MAX_TEXT} characters")
    return groups


class Roster(Module):
    name = "roster"

    def setup(self) -> None:
        self._locks: weakref.WeakValueDictionary[JID, asyncio.Lock] = weakref.WeakValueDictionary()
        self._cache: dict[JID, tuple[int, dict[str, RosterItem]]] = {}  # users with sessions here
        self._offline: dict[JID, tuple[int, dict[str, RosterItem]]] = {}  # the others' in LRU order
        self._generation: dict[JID, int] = {}  # bumped by every write, so a racing read is not cached
        self.hook("roster/stale", self.invalidate)  # a copy that another worker process made stale
        self.iq("get", QUERY, self.roster_get, target="own")
        self.iq("set", QUERY, self.roster_set, target="own")
        self.hook("c2s/features", self.stream_features)
        self.hook("session/closed", self.forget, priority=-100)  # after presence has said goodbye
        for declared in COMMANDS:
            self.add_command(declared)

    # --- API for the presence module -------------------------------------------------------------

    @asynccontextmanager
    async def locked(self, user: JID) -> AsyncIterator[None]:
        """The lock serialising changes of one user's roster and pending requests.

        With several worker processes it is held across them, and the roster is read afresh under it: the
        process that held it last may have changed the roster a moment ago.
        Never route a stanza while holding it: the recipient's processing may need its own roster's lock.
        """
        lock = self._locks.get(user)
        if lock is None:
            lock = self._locks[user] = asyncio.Lock()
        async with lock:
            if self.server.cluster is None:
                yield
            else:
                async with self.server.cluster.lock(f"roster:{user}"):
                    self.invalidate(user)
                    yield

    async def load(self, user: JID) -> tuple[int, dict[str, RosterItem]]:
        """(version, items by JID) of a user's roster; callers must not modify the dict."""
        cached = self._cache.get(user)
        if cached is not None:
            return cached
        cached = self._offline.pop(user, None)
        if cached is not None:
            if self.server.sessions.of(user):
                self._cache[user] = cached
            else:
                self._offline[user] = cached  # most recently used goes last
            return cached
        generation = self._generation.get(user, 0)
        loaded = await self.server.storage.roster.get(user.domain, user.local or "")
        if self._generation.get(user, 0) == generation and user not in self._cache:
            if self.server.sessions.of(user):
                self._cache[user] = loaded
            else:
                self._keep_offline(user, loaded)
        return loaded

    def _keep_offline(self, user: JID, roster: tuple[int, dict[str, RosterItem]]) -> None:
        self._offline.pop(user, None)
        self._offline[user] = roster
        if len(self._offline) > OFFLINE_ROSTERS:
            del self._offline[next(iter(self._offline))]

    async def items(self, user: JID) -> dict[str, RosterItem]:
        return (await self.load(user))[1]

    async def item(self, user: JID, contact: JID) -> RosterItem | None:
        return (await self.load(user))[1].get(str(contact))

    async def update(self, user: JID, item: RosterItem) -> None:
        """Store the item and push it to the user's interested resources (RFC 6121 2.1.6)."""
        version = await self.server.storage.roster.put(user.domain, user.local or "", item)
        self._changed(user, version, item.jid, item)
        self._push(user, item_element(item), version)

    def _changed(self, user: JID, version: int, jid: str, item: RosterItem | None) -> None:
        self._generation[user] = self._generation.get(user, 0) + 1
        self.server.hooks.notify("roster/changed", user)  # other worker processes drop their copy
        for cache in (self._cache, self._offline):
            cached = cache.get(user)
            if cached is not None:
                items = {k: v for k, v in cached[1].items() if k != jid}
                if item is not None:
                    items[jid] = item
                cache[user] = (version, items)

    def forget(self, session: Session) -> None:
        """The last session ended: the roster joins those of users without sessions."""
        if not self.server.sessions.of(session.bare):
            cached = self._cache.pop(session.bare, None)
            if cached is not None:
                self._keep_offline(session.bare, cached)
            self._generation.pop(session.bare, None)

    def invalidate(self, user: JID) -> None:
        """Another process changed the user's roster: read it again, and do not cache a read now under way."""
        self._cache.pop(user, None)
        self._offline.pop(user, None)
        self._generation[user] = self._generation.get(user, 0) + 1

    # --- the roster protocol ---------------------------------------------------------------------

    async def roster_get(self, stanza: Stanza) -> Element | None:
        user = stanza.to.bare
        if stanza.origin is not None:
            stanza.origin.interested = True
        version, items = await self.load(user)
        ver = str(version)
        if stanza.el[0].get("ver") == ver:
            # RFC 6121 2.6.3: the client's cached copy is current, so an empty result is the answer.
            return None
        query = Element(QUERY, {"ver": ver})
        query.extend(item_element(items[jid]) for jid in sorted(items))
        return query

    async def roster_set(self, stanza: Stanza) -> None:
        user = stanza.to.bare
        contact, el = parse_item(stanza.el[0])
        # RFC 6121 2.1.2.5: any 'subscription' other than "remove" is ignored, as are 'ask' and 'approved'.
        if el.get("subscription") == "remove":
            await self.remove(user, contact)
            return
        name = el.get("name") or None
        if name is not None and len(name) > MAX_TEXT:
            raise StanzaError("not-acceptable", f"names are limited to {MAX_TEXT} characters")
        groups = parse_groups(el)
        async with self.locked(user):
            old = await self.item(user, contact)
            new = RosterItem(str(contact)) if old is None else old
            await self.update(user, replace(new, name=name, groups=groups))

    async def remove(self, user: JID, contact: JID) -> None:
        """RFC 6121 2.5: the item goes, and the 'roster/removed' event cancels its subscriptions."""
        store = self.server.storage.roster
        async with self.locked(user):
            old = await self.item(user, contact)
            if old is None:
                raise StanzaError("item-not-found", "no such roster item")
            version = await store.remove(user.domain, user.local or "", old.jid)
            self._changed(user, version, old.jid, None)
            pending = await store.remove_pending(user.domain, user.local or "", old.jid)
            self._push(user, Element(ITEM, {"jid": old.jid, "subscription": "remove"}), version)
        await self.host.hooks.fire("roster/removed", user, old, pending)

    def _push(self, user: JID, item: Element, version: int) -> None:
        for session in self.server.sessions.interested(user):
            iq = element("iq", type="set", id=f"push-{secrets.token_hex(6)}", from_=str(user),
                         to=str(session.jid))
            SubElement(iq, QUERY, {"ver": str(version)}).append(item)
            session.send(iq)

    def stream_features(self, conn: C2SConnection, features: Element, stage: str) -> None:
        if stage == "post-auth":
            SubElement(features, ns.qname(ns.ROSTERVER, "ver"))
            SubElement(features, ns.qname(ns.PRE_APPROVAL, "sub"))


# --- commands over rosters: XEP-0133's get-user-roster, and those ejabberd's names map onto ---------------

COMMANDS = Declarations()
command = COMMANDS.command
SUBSCRIPTIONS = ("none", "from", "to", "both")
OWNER = Arg("accountjid", "jid", "The Jabber ID of the roster's owner")
CONTACT = Arg("contact", "jid", "The contact's Jabber ID")


@command("get-user-roster", "Get User Roster", (ACCOUNTS,), (ACCOUNTS, Arg("roster", XML, "The roster")))
async def user_roster(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """One account per request (XEP-0133's form asks for several but answers with one roster): the roster
    comes as a jabber:iq:roster <query/> inside the result form, as in the XEP's example."""
    jid = await existing_account(ctx, single_account(args))
    _, items = await ctx.host.server.storage.roster.get(ctx.host.name, jid.local or "")
    query = Element(ns.qname(ns.ROSTER, "query"))
    query.extend(item_element(items[jid]) for jid in sorted(items))
    return {"accountjids": [jid], "roster": query}


@command("roster-set-item", "Add or change a roster item, pushed to the owner's clients",
         (OWNER, CONTACT, Arg("name", "text", "Nickname", required=False),
          Arg("groups", "lines", "Groups", required=False), Arg("subscription", "text", "Subscription")),
         offered=False)
async def set_item(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    owner = await existing_account(ctx, args["accountjid"])
    if args["subscription"] not in SUBSCRIPTIONS:
        raise CommandError(f"the subscription must be one of {', '.join(SUBSCRIPTIONS)}")
    roster = module_on(ctx.host, Roster)
    item = RosterItem(str(args["contact"]), args["name"], args["subscription"], groups=tuple(args["groups"]))
    async with roster.locked(owner):
        await roster.update(owner, item)
    return {}


@command("roster-remove-item", "Remove a roster item if there is one", (OWNER, CONTACT), offered=False)
async def remove_item(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    owner = await existing_account(ctx, args["accountjid"])
    roster = module_on(ctx.host, Roster)
    if await roster.item(owner, args["contact"]) is not None:
        await roster.remove(owner, args["contact"])
    return {}


@command("roster-items", "The items of a roster, by JID", (OWNER,), (Arg("items", "records", "Roster items"),),
         offered=False)
async def roster_items(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    owner = await existing_account(ctx, args["accountjid"])
    items = await module_on(ctx.host, Roster).items(owner)
    return {"items": sorted(items.values(), key=lambda i: i.jid)}
