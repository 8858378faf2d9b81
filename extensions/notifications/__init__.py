"""Missed-message notifications: email digests and signed webhooks for users who are away (issue 18).

A user opts in with an email address (the 'notification-settings' ad-hoc command; admins do the same for
any account over parleyctl and the HTTP API with 'notification-settings-of'); nothing is emailed until the
address is confirmed through the link the server mails to it. From then on, a message counts for the user
when it goes to offline storage ('message/offline', ahead of the offline module, which still stores it),
waits in the queue of a detached stream-management session ('sm/queued'), or names the user's nick in a
persistent or members-only room the user is a member of but not in ('muc/message'): the moments push
(XEP-0357) uses, so both see the same ones. Counts wait per conversation; a XEP-0333 displayed marker or a
XEP-0490 displayed-synchronization item from any of the user's devices, or the user coming online, takes
them back. When a user's oldest count is one digest interval old (plus the push grace period for users with
a push registration, whose phone heard first) and it is not the user's quiet hours, one email lists who
wrote and how many messages per conversation, with xmpp: links and a one-click unsubscribe link; never a
message body unless the host allows bodies ('include_body') and the user opted in to them, and never the
body of an encrypted message (OMEMO, OpenPGP). An account may also have a webhook (set by an admin), which
gets each event as a signed POST; a room may have one (set by an owner of the room with 'room-webhook', or
by an admin), which gets an event for each message of the room and one for each mention of a member's nick.

Push (XEP-0357) and email: for a user with a push registration a count waits 'push_grace' seconds more, and
when the app server accepts the push for a message within that time ('push/delivered'), the message is
taken back out of the count: the digest tells only what push did not deliver.

Everything to send goes through a stored outbox (server.storage.notifications): claimed by one process at
a time, retried with exponential backoff and jitter, put on the dead-letter list after 'max_attempts', held
back while its endpoint's circuit breaker is open, and never sent again once marked sent.

Delivery is at least once, and what remains of 'twice' is this window: from the moment the receiver accepted
a notification (the SMTP server's 250 after DATA, the webhook's 2xx) until the 'sent' mark is committed.
A process that dies in it, or a reply lost on the way (a timeout after the receiver took the message), leaves
the notification to be sent again after its lease ('lease' seconds) or its retry. No protocol here lets
the sender close that window (SMTP has no two-phase commit, RFC 1047), so every try carries the same key:
the email's Message-ID is <key@host> and the webhook's X-Parley-Idempotency-Key header (and the event's
'id') is the key, both equal across retries, for receivers to recognise the second copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary
from xml.etree.ElementTree import Element

from aiohttp import web

from extensions.notifications.channels import ChannelError, EmailChannel, SmtpSettings, WebhookChannel
from extensions.notifications.outbox import (
    CircuitBreaker,
    Letterhead,
    backoff,
    confirm_email,
    digest_email,
    sign,
    unsign,
)
from extensions.notifications.preferences import (
    BadPreference,
    Preferences,
    RoomHook,
    check_address,
    check_interval,
    check_quiet,
    check_yes_no,
    check_zone,
    quiet_now,
)
from extensions.push import BODY, ENCRYPTED, STANZA_ID, has_content, pushable
from server.commands import Arg, CommandError, Context, Declarations, module_on
from server.jid import JID
from server.module import Module
from server.options import Option
from server.sessions import Session
from server.stanza import Stanza
from server.storage.kv import CachedDocuments
from server.storage.notifications import DEAD, PENDING, SENT, Outgoing

if TYPE_CHECKING:
    from extensions.muc.room import Room
    from server.storage.pubsub import StoredItem

DISPLAYED = "{urn:xmpp:chat-markers:0}displayed"
MDS_NODE = "urn:xmpp:mds:displayed:0"
MEMBERS = ("member", "admin", "owner")
MAX_KEPT_BODY = 1000  # characters of a body kept for a digest (which shows fewer): a stanza may hold far more
PREFIX = "/notifications/"
STORE = "notifications"  # the host's key-value document 'secret' (signs the links of the emails)
ROOM_STORE = "notifications-rooms"  # a room's webhook, by the room's domain and name
# The node namespace of the commands users run on their own data (admins' stay under XEP-0133's). Clients
# (Conversations, Gajim) list a server's commands by the disco item's name and never show the node.
USER_NS = "urn:parley:notifications"
# Whatever else such a message carries (a fallback body such as "I sent you an OMEMO encrypted message")
# is never sent on: encrypted means the user did not want the server to read it.
SEALED = (*ENCRYPTED, "{jabber:x:encrypted}x", "{urn:xmpp:openpgp:0}openpgp", "{urn:xmpp:eme:0}encryption")

# --- commands: the user's own settings, and the same for admins over any account ----------------------

COMMANDS = Declarations()
SETTINGS = (
    Arg("email", "text", "Email address for digests (empty: no emails)", required=False),
    Arg("interval", "text", "Seconds between digests (empty: the server's default)", required=False),
    Arg("quiet", "text", "Quiet hours, HH:MM-HH:MM in your time zone (empty: none)", required=False),
    Arg("zone", "text", "Time zone, e.g. Europe/Berlin", required=False),
    Arg("muted", "jids", "Conversations never to email about", required=False),
)
BODIES = Arg("bodies", "text", "Include message bodies (yes/no; only where the server allows it, never of "
             "encrypted messages)", required=False, options=("no", "yes"))
ACCOUNT = Arg("accountjid", "jid", "The user's JID")
ROOM = Arg("room", "jid", "The room's address (name@service)")
HOOK = (Arg("url", "text", "Endpoint URL (empty: none)", required=False),
        Arg("secret", "password", "Signing secret (16 characters at least)", required=False))
STATUS = (Arg("status", "text", "Status"),)


async def _own_settings(ctx: Context) -> dict[str, Any]:
    prefs = await module_on(ctx.host, Notifications).preferences(ctx.actor.bare)
    interval = f"{prefs.interval:g}" if prefs.interval else None
    return {"email": prefs.email or None, "interval": interval, "quiet": prefs.quiet or None, "zone": prefs.zone,
            "muted": list(prefs.muted), "bodies": "yes" if prefs.bodies else "no"}


@COMMANDS.command("notification-settings", "Missed-message email notifications", (*SETTINGS, BODIES), STATUS,
                  access="user", defaults=_own_settings, namespace=USER_NS)
async def own_settings(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"status": await module_on(ctx.host, Notifications).configure(ctx.actor.bare, args)}


@COMMANDS.command("room-webhook", "Webhook for a room you own", (ROOM, *HOOK, BODIES), STATUS, access="user",
                  namespace=USER_NS)
async def room_webhook(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """An owner of the room (or an admin of its host) points its events at an integrator's endpoint."""
    module = module_on(ctx.host, Notifications)
    room = module.room(args["room"])
    if not ctx.host.is_admin(ctx.actor) and room.affiliation(ctx.actor) != "owner":
        raise CommandError(f"only an owner of {room.jid} may set its webhook")
    return {"status": await module.set_room_webhook(room, args["url"] or "", args["secret"] or "", args["bodies"],
                                                    ctx.actor.bare)}


@COMMANDS.command("notification-settings-of", "Set a user's missed-message notifications", (ACCOUNT, *SETTINGS),
                  STATUS)
async def settings_of(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    module = module_on(ctx.host, Notifications)
    return {"status": await module.configure(module.account(args.pop("accountjid")), args)}


@COMMANDS.command("notification-webhook", "Set a user's notification webhook", (ACCOUNT, *HOOK), STATUS)
async def webhook_of(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    module = module_on(ctx.host, Notifications)
    return {"status": await module.set_webhook(module.account(args["accountjid"]), args["url"] or "",
                                               args["secret"] or "")}


@COMMANDS.command("notification-dead-letters", "List notifications that could not be sent", (),
                  (Arg("letters", "lines", "Dead letters"),))
async def dead_letters(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"letters": await module_on(ctx.host, Notifications).dead_letters()}


# The same for parleyctl and the HTTP API, in ejabberd's shape (user, host).
USER, HOST = Arg("user", "text", "Username"), Arg("host", "text", "Server name")


def _module_for(ctx: Context, args: dict[str, Any]) -> tuple[Notifications, JID]:
    host = ctx.target(args.pop("host"))
    return module_on(host, Notifications), JID.make(args.pop("user"), host.name)


@COMMANDS.command("notification_settings", "Set a user's missed-message email notifications",
                  (USER, HOST, *SETTINGS[:4]), STATUS, returns="string")
async def ctl_settings(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    module, user = _module_for(ctx, args)
    return {"status": await module.configure(user, {**args, "muted": None})}


@COMMANDS.command("notification_webhook", "Set a user's notification webhook (empty URL: none)", (
    USER, HOST, Arg("url", "text", "Endpoint URL", required=False),
    Arg("secret", "password", "Signing secret", required=False)), STATUS, returns="string")
async def ctl_webhook(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    module, user = _module_for(ctx, args)
    return {"status": await module.set_webhook(user, args["url"] or "", args["secret"] or "")}


@COMMANDS.command("notification_room_webhook", "Set a room's notification webhook (empty URL: none)", (
    Arg("room", "text", "The room's address (name@service)"), Arg("url", "text", "Endpoint URL", required=False),
    Arg("secret", "password", "Signing secret", required=False),
    Arg("bodies", "text", "Message bodies in events: yes or no", required=False)), STATUS, returns="string")
async def ctl_room_webhook(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    try:
        jid = JID.parse(args["room"])
    except ValueError:
        raise CommandError(f"not a room address: {args['room']!r}") from None
    module = next((m for m in (h.modules.get(Notifications.name) for h in ctx.hosts())
                   if isinstance(m, Notifications) and m.serves(jid)), None)
    if module is None:
        raise CommandError(f"no host you administer with the notifications module serves {jid.domain}")
    return {"status": await module.set_room_webhook(module.room(jid), args["url"] or "", args["secret"] or "",
                                                    args["bodies"], ctx.actor.bare)}


@COMMANDS.command("notification_dead_letters", "List notifications of HOST that could not be sent", (HOST,),
                  (Arg("letters", "lines", "Dead letters"),), returns="list")
async def ctl_dead_letters(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"letters": await module_on(ctx.target(args["host"]), Notifications).dead_letters()}


def _incarnation(room: Room) -> str:
    """Which room of that name it is: its creation time, the same after a restart on either backend."""
    return room.created.astimezone(UTC).isoformat()


@dataclass
class Seen:
    """A message this module counts, remembered while push may still report it delivered: when, its key
    (which names its body in the counts), the work that counts it, and in which conversation for whom."""

    at: float
    key: str = field(default_factory=lambda: secrets.token_hex(8))
    work: list[asyncio.Task[Any]] = field(default_factory=list)
    noted: dict[JID, str] = field(default_factory=dict)


class Notifications(Module):
    name = "notifications"
    options = (
        Option("smtp_host", str, None, "the SMTP server to send through (unset: no emails are sent)"),
        Option("smtp_port", int, 587, "its port", minimum=1, maximum=65535),
        Option("smtp_tls", str, "starttls", "how TLS is used: direct is implicit TLS (port 465); none only on a "
               "trusted network", choices=("starttls", "direct", "none")),
        Option("smtp_ca_file", str, None, "PEM file of the CAs that may sign the SMTP server's certificate (unset: "
               "the system's)"),
        Option("smtp_username", str, None, "the account to authenticate as (unset: no authentication)"),
        Option("smtp_password", str, None, "its password"),
        Option("sender", str, None, "the From address, notifications@<host> unless set"),
        Option("url", str, None, "public base URL of an http listener for the links in emails (unset: the first "
                                 "http listener's address)"),
        Option("digest_interval", float, 3600.0, "seconds between digests unless the user chooses", minimum=0.01),
        Option("min_interval", float, 300.0, "the shortest interval a user may choose", minimum=0.01),
        Option("push_grace", float, 300.0, "seconds more to wait for users with a push registration", minimum=0),
        Option("tick", float, 5.0, "seconds between looks at the outbox", minimum=0.01),
        Option("lease", float, 120.0, "seconds a process holds a notification it is sending", minimum=1),
        Option("max_attempts", int, 8, "tries before a notification goes to the dead-letter list", minimum=1),
        Option("retry_base", float, 30.0, "seconds before the first retry (doubling each time)", minimum=0.01),
        Option("retry_cap", float, 3600.0, "the longest wait between retries", minimum=0.01),
        Option("breaker_threshold", int, 5, "failures in a row that open an endpoint's circuit breaker", minimum=1),
        Option("breaker_cooldown", float, 60.0, "seconds an open circuit breaker keeps off its endpoint", minimum=0),
        Option("user_per_hour", int, 12, "notifications one user may be sent in an hour", minimum=1),
        Option("host_per_hour", int, 10000, "notifications all users of the host may be sent in an hour", minimum=1),
        Option("timeout", float, 30.0, "seconds an SMTP session or a webhook POST may take", minimum=0.1),
        Option("include_body", bool, False, "allow message bodies in digests and webhook events, for users and "
               "rooms that opt in (never those of encrypted messages)"),
    )

    def setup(self) -> None:
        self.prefs = CachedDocuments(self.server.storage.kv, self.name, Preferences.parse)
        self.room_hooks = CachedDocuments(self.server.storage.kv, ROOM_STORE, RoomHook.parse)
        self._seen: WeakKeyDictionary[Element, Seen] = WeakKeyDictionary()
        self.store = self.server.storage.notifications
        self.secret = b""
        self.breaker = CircuitBreaker(self.option("breaker_threshold"), self.option("breaker_cooldown"))
        smtp = self.option("smtp_host")
        self.email = EmailChannel(SmtpSettings(
            smtp, self.option("smtp_port"), self.option("smtp_tls"), self.option("smtp_username"),
            self.option("smtp_password"), self.option("smtp_ca_file"), self.option("timeout"))) if smtp else None
        self.webhook = WebhookChannel(self.option("timeout"))
        self._wake = asyncio.Event()
        self.hook("message/offline", self.offline, priority=20)  # ahead of push and offline storage
        self.hook("sm/queued", self.queued)
        self.hook("message/outbound", self.outbound)
        self.hook("pep/published", self.pep_published)
        self.hook("presence/initial", self.online)
        self.hook("push/delivered", self.push_delivered)
        self.hook_global("muc/message", self.room_message)
        for method in ("GET", "POST"):
            self.add_http(method, PREFIX, self.http)
        for declared in COMMANDS:
            self.add_command(declared)

    async def start(self) -> None:
        self.secret = await self.server.storage.kv.host_secret(self.host.name, STORE)
        self.spawn(self._loop())

    # --- preferences ------------------------------------------------------------------------------

    def account(self, jid: JID) -> JID:
        if jid.domain != self.host.name or jid.local is None:
            raise CommandError(f"{jid} is not an account of {self.host.name}")
        return jid.bare

    async def preferences(self, user: JID) -> Preferences:
        return await self.prefs.get(user.domain, user.local or "")

    async def _save(self, user: JID, prefs: Preferences) -> None:
        await self.prefs.set(user.domain, user.local or "", prefs.document())

    async def configure(self, user: JID, args: dict[str, Any]) -> str:
        """Apply the settings form; a new address gets a confirmation email and nothing else until confirmed."""
        current = await self.preferences(user)
        try:
            email = check_address(args["email"]) if args["email"] else ""
            quiet = check_quiet(args["quiet"] or "")
            zone = check_zone(args["zone"] or "UTC")
            interval = check_interval(args["interval"] or "0")
        except BadPreference as exc:
            raise CommandError(str(exc)) from None
        if email and self.email is None:
            raise CommandError(f"{self.host.name} has no mail server configured; emails cannot be sent")
        if interval and interval < self.option("min_interval"):
            raise CommandError(f"the interval must be at least {self.option('min_interval'):g} seconds")
        try:
            bodies = check_yes_no(args.get("bodies"), current.bodies)
        except BadPreference as exc:
            raise CommandError(str(exc)) from None
        muted = current.muted if args["muted"] is None else tuple(sorted({str(j.bare) for j in args["muted"]}))
        prefs = replace(current, interval=interval, quiet=quiet, zone=zone, muted=muted,
                        bodies=bodies).with_email(email)
        await self._save(user, prefs)
        if not email:
            await self.store.take(user.domain, user.local or "", None)
            return "email notifications off"
        if prefs.verified:
            return f"settings saved; digests go to {email}{self._bodies_note(bodies)}"
        await self._queue(user, "email", email, {"kind": "confirm"})
        return f"a confirmation link was sent to {email}; no digest is sent before it is opened"

    def _bodies_note(self, bodies: bool) -> str:
        if not bodies:
            return ""
        return ", with message bodies" if self.option("include_body") else \
            f"; {self.host.name} does not allow message bodies, so none are sent"

    @staticmethod
    def _check_hook(url: str, secret: str) -> None:
        if url and not re.match(r"^https?://[^\s]+$", url):
            raise CommandError("the webhook URL must be http:// or https://")
        if url and len(secret) < 16:
            raise CommandError("the webhook secret must have at least 16 characters")

    async def set_webhook(self, user: JID, url: str, secret: str) -> str:
        self._check_hook(url, secret)
        current = await self.preferences(user)
        await self._save(user, replace(current, webhook=url, webhook_secret=secret if url else ""))
        return f"webhook set to {url}" if url else "webhook removed"

    def serves(self, room: JID) -> bool:
        """Whether `room` is an address of this host's MUC service."""
        muc = self.host.modules.get("muc")
        return muc is not None and getattr(muc, "domain", None) == room.domain and room.local is not None

    def room(self, jid: JID) -> Room:
        rooms = getattr(self.host.modules.get("muc"), "rooms", {}) if self.serves(jid) else {}
        room = rooms.get(jid.bare)
        if room is None or room.destroyed:
            raise CommandError(f"no room {jid} on {self.host.name}")
        return room

    async def set_room_webhook(self, room: Room, url: str, secret: str, bodies: str | None, by: JID) -> str:
        """Point the room's events at `url` (empty: none), bound to this room's creation: a room of the same
        name created later does not inherit it."""
        self._check_hook(url, secret)
        try:
            with_bodies = check_yes_no(bodies, False)
        except BadPreference as exc:
            raise CommandError(str(exc)) from None
        hook = RoomHook(url, secret, with_bodies, _incarnation(room), str(by)) if url else RoomHook()
        await self.room_hooks.set(room.jid.domain, room.jid.local or "", hook.document())
        if not url:
            return f"webhook of {room.jid} removed"
        return f"webhook of {room.jid} set to {url}{self._bodies_note(with_bodies)}"

    async def dead_letters(self) -> list[str]:
        """The dead-letter list, one line each: key, account, channel, target, tries and the last error."""
        rows = await self.store.list(self.host.name, DEAD)
        return [f"{r.id} {r.username} {r.channel} {r.target} tries={r.attempts}: {r.error}" for r in rows]

    # --- when to notify ---------------------------------------------------------------------------

    def _track(self, el: Element, work: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Remember the message and the work that counts it, for 'push/delivered' (which comes later)."""
        seen = self._seen.get(el)
        if seen is None:
            seen = self._seen[el] = Seen(time.monotonic())
        seen.work.append(work)
        return work

    def offline(self, stanza: Stanza) -> None:
        """Observe, never take: offline storage, later in the chain, must not wait for this."""
        self._track(stanza.el, self.spawn(self._direct(stanza.to.bare, stanza.el)))

    async def queued(self, session: Session, el: Element) -> None:
        """Waits for a detached session: missed, unless an attached device of the user is online to read it."""
        if not any(not s.detached for s in self.server.sessions.available(session.bare)):
            await self._track(el, self.spawn(self._direct(session.bare, el)))

    async def _direct(self, user: JID, el: Element) -> None:
        if not pushable(el):
            return
        try:
            sender = JID.parse(el.get("from") or "").bare
        except ValueError:
            return
        await self.note(user, str(sender), str(sender), "message", el)

    def _body(self, el: Element | None, consent: bool) -> str | None:
        """The message's body, if the host allows bodies, the user (or room) consented and it is not sealed."""
        if el is None or not consent or not self.option("include_body") or any(el.find(t) is not None
                                                                                for t in SEALED):
            return None
        return el.findtext(BODY)

    async def room_message(self, room: Room, el: Element) -> None:
        """A message in a room: an event for the room's webhook, and for each member whose nick it names, an
        event too; members of this host who are not in a persistent or members-only room count it as missed."""
        if not has_content(el):
            return
        speaker = (el.get("from") or "").partition("/")[2]
        text = el.findtext(BODY)
        mentioned = self._mentioned(room, text) if text else []
        if self.serves(room.jid):
            hook = await self.room_hooks.get(room.jid.domain, room.jid.local or "")
            if hook.url and hook.created == _incarnation(room):
                await self._room_events(room, el, hook, speaker, mentioned)
        if not (room.config.persistent or room.config.members_only):
            return
        away = [jid for jid, _ in mentioned if jid.domain == self.host.name and not room.occupants_of(jid)]
        if away:
            await self._track(el, self.spawn(self._mentions(room, el, speaker, away)))

    async def _mentions(self, room: Room, el: Element, speaker: str, away: list[JID]) -> None:
        for jid in away:
            await self.note(jid, str(room.jid), speaker, "mention", el)

    @staticmethod
    def _mentioned(room: Room, body: str) -> list[tuple[JID, str]]:
        """Members (admins and owners too) whose nick, the one registered in the room or the account's name,
        the body names as a word."""
        found = []
        for jid, record in list(room.affiliations.items()):
            if record.affiliation not in MEMBERS or not jid.local:
                continue
            nick = record.nick or jid.local
            if re.search(rf"(?<!\w){re.escape(nick)}(?!\w)", body, re.IGNORECASE):
                found.append((jid, nick))
        return found

    async def _room_events(self, room: Room, el: Element, hook: RoomHook, speaker: str,
                           mentioned: list[tuple[JID, str]]) -> None:
        sid = next((s.get("id") for s in el.iterfind(STANZA_ID) if s.get("by") == str(room.jid)), None)
        base = {"kind": "event", "room": str(room.jid), "from": speaker, "message_id": sid,
                "stamp": datetime.now(UTC).isoformat()}
        body = self._body(el, hook.bodies)
        events = [{**base, "type": "message", **({"body": body} if body is not None else {})}]
        events += [{**base, "type": "mention", "mentioned": str(jid), "nick": nick} for jid, nick in mentioned]
        for event in events:
            await self._queue_item(self.host.name, str(room.jid), "webhook", hook.url, event)

    async def note(self, user: JID, conversation: str, sender: str, kind: str, el: Element | None = None) -> None:
        """Count a message the user missed (with its body, if allowed), and tell the account's webhook at once."""
        prefs = await self.preferences(user)
        if not prefs.active or conversation in prefs.muted:
            return
        seen = self._seen.get(el) if el is not None else None
        body = self._body(el, prefs.bodies)
        now = datetime.now(UTC)
        if prefs.emailing:
            delay = prefs.interval or self.option("digest_interval")
            if await self._pushes(user):
                delay += self.option("push_grace")
            key = seen.key if seen is not None else secrets.token_hex(8)
            await self.store.note(user.domain, user.local or "", conversation, sender, now + timedelta(seconds=delay),
                                  (key, body[:MAX_KEPT_BODY]) if body is not None else None)
            if seen is not None:
                seen.noted[user.bare] = conversation
        if prefs.webhook:
            await self._queue(user, "webhook", prefs.webhook, {
                "kind": "event", "type": kind, "to": str(user), "conversation": conversation, "from": sender,
                "stamp": now.isoformat(), **({"body": body} if body is not None else {})})

    async def push_delivered(self, user: JID, el: Element) -> None:
        """The push module's app server accepted a notification of `el` for the user: the message is not
        missed, unless it came too late (after push_grace, its digest may have gone already)."""
        seen = self._seen.get(el)
        if seen is None or time.monotonic() - seen.at > self.option("push_grace"):
            return
        await asyncio.gather(*seen.work, return_exceptions=True)  # counted first (both hooks run at once)
        conversation = seen.noted.get(user.bare)
        if conversation is not None:
            await self.store.unnote(user.domain, user.local or "", conversation, seen.key)

    async def _pushes(self, user: JID) -> bool:
        """Whether a push registration (XEP-0357) wakes the user's phone for the same messages."""
        push = self.host.modules.get("push")
        registrations = getattr(push, "registrations", None)
        return registrations is not None and bool((await registrations.get(user.domain, user.local or "")).apps)

    def outbound(self, stanza: Stanza) -> None:
        """A displayed marker from any of the user's devices: that conversation was read. Every message a
        user sends passes here, so it is a plain function (no coroutine) that starts work only for markers."""
        if stanza.el.find(DISPLAYED) is not None and stanza.from_.local:
            self.spawn(self._cancel(stanza.from_.bare, str(stanza.to.bare)))

    async def pep_published(self, service: JID, node: str, item: StoredItem, payload: Element | None) -> None:
        """XEP-0490: a device published how far the user read a conversation (the item id is its JID)."""
        if node == MDS_NODE and service.local and service.domain == self.host.name:
            await self._cancel(service.bare, item.id)

    async def online(self, session: Session) -> None:
        await self._cancel(session.bare)

    async def _cancel(self, user: JID, conversation: str | None = None) -> None:
        """The user read the conversation (or, None, is back): what waits for it is not missed. Only users
        who opted in have anything waiting, and their preferences are cached: the others cost no query."""
        if (await self.preferences(user)).emailing:
            await self.store.cancel(user.domain, user.local or "", conversation)

    # --- the outbox -------------------------------------------------------------------------------

    async def _queue(self, user: JID, channel: str, target: str, payload: dict[str, Any]) -> None:
        await self._queue_item(user.domain, user.local or "", channel, target, payload)

    async def _queue_item(self, host: str, owner: str, channel: str, target: str, payload: dict[str, Any]) -> None:
        """Store a notification for `owner` (a username, or a room's JID for a room's webhook)."""
        now = datetime.now(UTC)
        await self.store.queue(Outgoing(uuid.uuid4().hex, host, owner, channel, target, payload, PENDING, now, 0,
                                        None, now))
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                self.log.exception("notifications: a round of the outbox failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.option("tick"))
            self._wake.clear()

    async def run_once(self) -> int:
        """Make the digests that are due, then send what the outbox holds for now; returns how many were sent."""
        now = datetime.now(UTC)
        for username, _ in await self.store.due_users(self.host.name, now):
            await self._digest(JID.make(username, self.host.name), now)
        claimed = await self.store.claim(self.host.name, now, timedelta(seconds=self.option("lease")))
        return sum(await asyncio.gather(*(self._send(item) for item in claimed)))  # one SMTP session each

    async def _digest(self, user: JID, now: datetime) -> None:
        prefs = await self.preferences(user)
        if not prefs.emailing:
            await self.store.take(user.domain, user.local or "", None)
            return
        if prefs.quiet and quiet_now(prefs.quiet, prefs.zone, now):
            return
        hour = now - timedelta(hours=1)
        if await self.store.sent_since(self.host.name, hour, user.local) >= self.option("user_per_hour") \
                or await self.store.sent_since(self.host.name, hour) >= self.option("host_per_hour"):
            return  # rate-limited: the counts keep growing, and the next round tries again
        await self.store.take(user.domain, user.local or "", Outgoing(
            uuid.uuid4().hex, user.domain, user.local or "", "email", prefs.email, {"kind": "digest"}, PENDING, now,
            0, None, now))

    async def _send(self, item: Outgoing) -> int:
        now = datetime.now(UTC)
        if "@" in item.username:  # a room's webhook
            hook = await self.room_hooks.get(*reversed(item.username.split("@", 1)))
            if hook.url != item.target:
                await self.store.finish(item.id, DEAD, error="the webhook was removed")
                return 0
            channel: EmailChannel | WebhookChannel = self.webhook
            endpoint, message = item.target, (hook.secret, {**item.payload, "id": item.id})
        elif item.channel == "email":
            user = JID.make(item.username, item.host)
            prefs = await self.preferences(user)
            if self.email is None or prefs.email != item.target or (item.payload["kind"] == "digest"
                                                                    and not prefs.verified):
                await self.store.finish(item.id, DEAD, error="no mail server, or the address changed")
                return 0
            channel = self.email
            endpoint = f"smtp:{self.email.settings.host}:{self.email.settings.port}"
            message = self._email(user, item, prefs.bodies)
        else:
            prefs = await self.preferences(JID.make(item.username, item.host))
            if prefs.webhook != item.target:
                await self.store.finish(item.id, DEAD, error="the webhook was removed")
                return 0
            channel, endpoint = self.webhook, item.target
            message = (prefs.webhook_secret, {**item.payload, "id": item.id})
        until = self.breaker.open_until(endpoint)
        if until is not None:
            wait = until - time.monotonic()
            await self.store.finish(item.id, PENDING, now + timedelta(seconds=wait), "circuit open", attempted=False)
            return 0
        try:
            await channel.send(item.target, message)
        except ChannelError as exc:
            self.breaker.failed(endpoint)
            tries = item.attempts + 1
            if tries >= self.option("max_attempts"):
                self.log.warning("notification %s to %s dead after %d tries: %s", item.id, item.target, tries, exc)
                await self.store.finish(item.id, DEAD, error=str(exc))
            else:
                delay = backoff(tries, self.option("retry_base"), self.option("retry_cap"))
                await self.store.finish(item.id, PENDING, now + timedelta(seconds=delay), str(exc))
            return 0
        self.breaker.succeeded(endpoint)
        await self.store.finish(item.id, SENT)
        return 1

    def _email(self, user: JID, item: Outgoing, bodies: bool) -> Any:
        head = Letterhead(self.host.name, self.option("sender") or f"notifications@{self.host.name}",
                          self.base_url())
        fields = {"h": self.host.name, "u": user.local or "", "e": item.target}
        if item.payload["kind"] == "confirm":
            link = f"{head.base_url}{PREFIX}confirm/{self.host.name}/{sign(self.secret, 'confirm', fields)}"
            return confirm_email(head, str(user), item.target, link, item.id)
        unsubscribe = f"{head.base_url}{PREFIX}unsubscribe/{self.host.name}/{sign(self.secret, 'unsubscribe', fields)}"
        # Bodies kept while allowed are dropped if the user or the admin took the permission back since.
        keep = bodies and self.option("include_body")
        conversations = [{**c, "room": self._is_room(c["jid"]), "bodies": c.get("bodies", ()) if keep else ()}
                         for c in item.payload["conversations"]]
        return digest_email(head, str(user), item.target, conversations, unsubscribe, item.id)

    def _is_room(self, jid: str) -> bool:
        return jid.partition("@")[2] in self.server.services

    def base_url(self) -> str:
        return self.server.http.base_url(self.option("url"), self.host.name)

    # --- the links of the emails ------------------------------------------------------------------

    async def http(self, request: web.Request) -> web.StreamResponse:
        """GET (or POST, RFC 8058's one-click) /notifications/<confirm|unsubscribe>/<host>/<token>."""
        parts = request.rel_url.raw_path[len(PREFIX):].split("/")
        host = self.server.hosts.get(parts[1]) if len(parts) == 3 and parts[0] in ("confirm", "unsubscribe") else None
        module = host.modules.get(self.name) if host is not None else None
        if not isinstance(module, Notifications):
            return web.Response(status=404, text="no such link\n")
        return await module.follow(parts[0], parts[2])

    async def follow(self, purpose: str, token: str) -> web.StreamResponse:
        fields = unsign(self.secret, purpose, token)
        if fields is None or fields.get("h") != self.host.name:
            return web.Response(status=404, text="this link is not valid\n")
        user = JID.make(fields["u"], self.host.name)
        prefs = await self.preferences(user)
        if prefs.email != fields["e"]:
            return web.Response(status=410, text="this address is no longer registered\n")
        if purpose == "confirm":
            await self._save(user, replace(prefs, verified=True))
            return web.Response(text=f"Confirmed: {prefs.email} will get digests of missed messages for {user}.\n")
        await self._save(user, prefs.with_email(""))
        await self.store.take(user.domain, user.local or "", None)
        return web.Response(text=f"Unsubscribed: no more emails for {user}.\n")
