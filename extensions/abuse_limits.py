"""Anti-abuse limits of a host: deny-lists of domains and addresses, and a rate on messages to strangers.

Deny-lists: files (one domain or address a line, '#' comments) and URLs (fetched with aiohttp, same format)
named in the options, loaded at start and again on every configuration reload (SIGHUP, `parleyctl
reload_config`). Their domains go to federation's policy as a loaded list (the key-value document
'loaded:HOST' of the federation lists, then the server-wide event 'federation/policy-changed'), so streams
with a denied domain end and no new ones open. Here, messages and subscription requests from a denied
domain (its subdomains included) or address, or one an admin denied acting on a spam report, are dropped.
A list that cannot be read keeps what was loaded before.

Rate: a local account may send messages to addresses that are not its contacts (see block_strangers'
`known`) at `strangers_per_hour`, with bursts of `strangers_burst` (a token bucket per account), so that a
compromised account cannot spray thousands of strangers. Past it the message bounces with policy-violation
and the host's admins get a message, once per account and `notify_interval`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from extensions.block_strangers import known
from extensions.blocking import matches
from server.commands.service_admin import message
from server.jid import JID, JIDError
from server.limits import Bucket
from server.module import Module
from server.options import Option
from server.storage.kv import CachedDocuments
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from server.server import Server
    from server.stanza import Stanza

log = logging.getLogger("parley.abuse")

FEDERATION_LISTS = "s2s-lists"  # federation policy's documents (s2s.policy.ADDED, LOADED)
POLICY_CHANGED = "federation/policy-changed"
PRIORITY = 900  # after blocking (1000)
DENIED = "abuse-denied"  # the host's document (user ''): the addresses admins denied (spam_reporting's deny-jid)
FETCH_TIMEOUT = 30.0


def parse_deny_list(text: str) -> set[JID]:
    """Domains and addresses, one a line; blank lines, '#' comments and what is no JID are left out."""
    found = set()
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            try:
                found.add(JID.parse(entry).bare)
            except JIDError:
                log.warning("deny-list: %r is no domain or address, left out", entry)
    return found


class AbuseLimits(Module):
    name = "abuse_limits"
    options = (
        Option("deny_files", tuple, (), "files of denied domains and addresses, one a line"),
        Option("deny_urls", tuple, (), "URLs of deny-lists in the same format, fetched at start and on reload"),
        Option("strangers_burst", int, 30, "messages an account may send to non-contacts at once; 0: no limit",
               minimum=0),
        Option("strangers_per_hour", int, 120, "messages to non-contacts an account may send per hour",
               minimum=1),
        Option("notify_interval", float, 3600.0, "seconds between two notes to the admins about one account",
               minimum=0),
    )

    def setup(self) -> None:
        self.denied: frozenset[JID] = frozenset()
        self._buckets: dict[JID, Bucket] = {}
        self._notified: dict[JID, float] = {}
        self._added = CachedDocuments(self.server.storage.kv, DENIED, lambda jids: frozenset(jids or ()))
        self.hook("message/inbound", self.inbound, priority=PRIORITY)
        self.hook("presence/inbound", self.inbound, priority=PRIORITY)
        self.hook("message/outbound", self.outbound, priority=PRIORITY)
        self.hook_global("server/reloaded", self.reloaded)

    async def start(self) -> None:
        await self.load()

    async def stop(self) -> None:
        await self._publish([])

    async def reloaded(self, server: Server) -> None:
        await self.load()

    # --- deny-lists -------------------------------------------------------------------------------

    async def load(self) -> None:
        found: set[JID] = set()
        for source, text in [*[(f, self._read(f)) for f in self.option("deny_files")],
                             *[(u, await self._fetch(u)) for u in self.option("deny_urls")]]:
            if text is None:
                log.warning("deny-list %s unreadable: what was loaded before stays", source)
                found |= self.denied
            else:
                found |= parse_deny_list(text)
        self.denied = frozenset(found)
        await self._publish(sorted(j.domain for j in found if j.local is None))

    @staticmethod
    def _read(path: str) -> str | None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("deny-list %s: %s", path, exc)
            return None

    @staticmethod
    async def _fetch(url: str) -> str | None:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT)) as http, \
                    http.get(url) as response:
                response.raise_for_status()
                return await response.text()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as exc:
            log.warning("deny-list %s: %s", url, exc)
            return None

    async def _publish(self, domains: list[str]) -> None:
        kv = self.server.storage.kv
        key = f"loaded:{self.host.name}"
        if await kv.get("", "", FEDERATION_LISTS, key) != (domains or None):
            await kv.set("", "", FEDERATION_LISTS, key, domains or None)
            await self.server.hooks.fire_all(POLICY_CHANGED)

    async def deny(self, jid: JID) -> None:
        """Add an address to the host's deny-list for good (an admin's decision, not a loaded list)."""
        added = await self._added.get(self.host.name, "")
        await self._added.set(self.host.name, "", sorted({*added, str(jid.bare)}))

    async def refused(self, sender: JID) -> bool:
        return matches(self.denied, sender) or str(sender.bare) in await self._added.get(self.host.name, "")

    async def inbound(self, stanza: Stanza) -> bool | None:
        if (stanza.kind == "presence" and stanza.type != "subscribe") or stanza.type == "error":
            return None
        return True if await self.refused(stanza.from_) else None

    # --- messages to strangers --------------------------------------------------------------------

    async def outbound(self, stanza: Stanza) -> bool | None:
        burst = self.option("strangers_burst")
        sender = stanza.from_.bare
        if not burst or stanza.type in ("error", "groupchat") or sender.local is None \
                or stanza.el.find("{jabber:client}body") is None or await known(self.server, sender, stanza.to):
            return None
        now = time.monotonic()
        bucket = self._buckets.get(sender)
        if bucket is None:
            bucket = self._buckets[sender] = Bucket(burst, self.option("strangers_per_hour"), now)
        if bucket.take(now):
            return None
        await self.server.router.bounce(stanza, StanzaError(
            "policy-violation", "too many messages to addresses that are not in your roster; try later"))
        await self._notify(sender, now)
        return True

    async def _notify(self, sender: JID, now: float) -> None:
        last = self._notified.get(sender)
        if last is not None and now - last < self.option("notify_interval"):
            return
        self._notified[sender] = now
        text = (f"{sender} passed the limit of messages to non-contacts ({self.option('strangers_burst')} at once, "
                f"{self.option('strangers_per_hour')} an hour): its messages bounce. A compromised account? "
                "The ad-hoc command disable-user stops it.")
        for admin in sorted(self.host.admins, key=str):
            el = message(self.host.name, text, "Messages to strangers limited", type="normal")
            el.set("to", str(admin))
            await self.server.router.send(el)
