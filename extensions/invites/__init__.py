"""Invitations: onboarding by link instead of open registration (XEP-0401, XEP-0379, XEP-0445).

An invitation is a random token kept in storage (`server.storage.invites`) with an expiry and a number of
uses. A user's contact invitation (ad-hoc command `invite`) is the URI `xmpp:user@host?roster;preauth=TOKEN`:
a subscription request carrying the token is approved and answered in kind (XEP-0379), and, with
`contact_invites_register`, the token also registers an account here that starts subscribed both ways with
the inviter. An account invitation (`create-account`, for admins, or for users up to `user_quota`) is
`xmpp:host?register;preauth=TOKEN`. A client presents the token before registering in-band (XEP-0445);
registration works with it even where open registration is off. Each token also has a web page,
`/invite/TOKEN` on the http listeners (`extensions.invites.web`), with clients to install, the URI as a link
and a QR code, and a form that creates the account.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast
from weakref import WeakKeyDictionary
from xml.etree.ElementTree import Element, SubElement

from extensions.invites.web import PATH, InvitePages
from extensions.roster import Roster
from server.accounts import AccountError, create_account
from server.commands import Arg, Command, CommandError, Context, Declarations, Run, module_on
from server.jid import JID
from server.module import Module
from server.options import Option
from server.stanza import error_reply, reply
from server.storage import Invite, RosterItem
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from extensions.register import Invitation
    from server.c2s import C2SConnection
    from server.host import Host

PARS = "urn:xmpp:pars:0"
PREAUTH = f"{{{PARS}}}preauth"
INVITE_NS = "urn:xmpp:invite"
IBR_TOKEN_FEATURES = ("urn:xmpp:ibr-token:0", INVITE_NS)  # XEP-0445's feature, and the name clients knew first
TOKEN_BYTES = 18


def now() -> datetime:
    return datetime.now(UTC)


class Invites(Module):
    name = "invites"
    depends = ("roster",)
    options = (
        Option("expire_days", float, 7.0, "days an invitation stays valid", minimum=0.001),
        Option("max_uses", int, 100, "uses an admin may give one invitation at most", minimum=1),
        Option("user_quota", int, 0, "account invitations a user may hold at once (0: admins only)", minimum=0),
        Option("contact_invites_register", bool, True,
               "a user's contact invitation also registers an account here for the invitee"),
        Option("url", str, None, "the public base URL of the invitation pages, e.g. 'https://example.org' "
                                 "(unset: the first http listener's address)"),
    )

    def setup(self) -> None:
        # Streams that presented a valid token before registering (XEP-0445), and the token.
        self._presented: WeakKeyDictionary[C2SConnection, str] = WeakKeyDictionary()
        self.hook("c2s/features", self.stream_feature)
        self.hook("c2s/unauthenticated-iq", self.unauthenticated_iq)
        self.hook("register/invitation", self.invitation_of)
        self.hook("presence/preauth", self.preauth)
        self.hook("account/deleted", self.account_deleted)
        pages = InvitePages(self.server)
        for method in ("GET", "POST"):
            self.add_http(method, PATH, pages.handle)
        for declared in COMMANDS:
            self.add_command(declared)

    @property
    def roster(self) -> Roster:
        return cast(Roster, self.host.modules["roster"])

    # --- making invitations -------------------------------------------------------------------------

    async def create(self, kind: str, inviter: str = "", uses: int = 1, days: float | None = None) -> Invite:
        await self.server.storage.invites.expire(self.host.name, now())  # spent and expired ones go as new come
        invite = Invite(secrets.token_urlsafe(TOKEN_BYTES), self.host.name, kind, inviter, uses, now(),
                        now() + timedelta(days=days if days is not None else self.option("expire_days")))
        await self.server.storage.invites.add(invite)
        self.log.info("invitation (%s, %d uses) created by %s", kind, uses, inviter or "an admin")
        return invite

    async def account_deleted(self, user: str) -> None:
        await self.server.storage.invites.remove_inviter(self.host.name, user)

    def registers(self, invite: Invite) -> bool:
        """Whether the invitation may create an account."""
        return invite.kind == "account" or self.option("contact_invites_register")

    def uri(self, invite: Invite) -> str:
        if invite.kind == "contact":
            ibr = ";ibr=y" if self.registers(invite) else ""
            return f"xmpp:{invite.inviter}@{self.host.name}?roster;preauth={invite.token}{ibr}"
        return f"xmpp:{self.host.name}?register;preauth={invite.token}"

    def landing_url(self, invite: Invite) -> str:
        return f"{self.server.http.base_url(self.option('url'), self.host.name)}{PATH}{invite.token}"

    # --- using them ---------------------------------------------------------------------------------

    async def valid(self, token: str | None) -> Invite | None:
        """The host's invitation of `token`, while it may still be used."""
        invite = await self.server.storage.invites.get(token) if token else None
        if invite is None or invite.host != self.host.name or not invite.valid(now()):
            return None
        return invite

    async def register(self, token: str, username: str, password: str) -> JID:
        """Create an account with an invitation (the web form): AccountError or CommandError say why not."""
        invite = await self.valid(token)
        if invite is None or not self.registers(invite):
            raise CommandError("this invitation is not valid any more")
        if not await create_account(self.server.storage, self.host.name, username, password,
                                    self.server.config.scram_iterations):
            raise AccountError("that username is taken")
        user = JID.make(username, self.host.name)
        if not await self.accept(token, user):
            await self.server.storage.accounts.delete(self.host.name, user.local or "")
            raise CommandError("this invitation is not valid any more")
        self.log.info("account %s registered with an invitation on the web", user)
        await self.host.hooks.fire("account/registered", user)
        return user

    async def accept(self, token: str, user: JID) -> bool:
        """Spend a use of the invitation for the new account `user`, which becomes the inviter's contact."""
        invite = await self.server.storage.invites.use(token, now())
        if invite is None or invite.host != self.host.name:
            return False
        if invite.inviter and await self.server.storage.accounts.exists(self.host.name, invite.inviter):
            await self.befriend(JID.make(invite.inviter, self.host.name), user)
        return True

    async def befriend(self, inviter: JID, user: JID) -> None:
        """Both local accounts subscribed to each other's presence, as if each had approved the other."""
        for owner, contact in ((inviter, user), (user, inviter)):
            async with self.roster.locked(owner):
                item = await self.roster.item(owner, contact) or RosterItem(str(contact))
                await self.roster.update(owner, replace(item, subscription="both", ask=False, approved=False))

    # --- XEP-0445: the token before in-band registration ---------------------------------------------

    def stream_feature(self, conn: C2SConnection, features: Element, stage: str) -> None:
        """Registration with a token, where registration may take place (the register module's rule)."""
        if stage == "pre-auth" and (conn.secure or not self.server.config.require_encryption):
            for namespace in IBR_TOKEN_FEATURES:
                SubElement(features, f"{{{namespace}}}register")

    async def unauthenticated_iq(self, conn: C2SConnection, el: Element) -> bool | None:
        if el.get("type") != "set" or len(el) != 1 or el[0].tag != PREAUTH or \
                el.get("to") not in (None, self.host.name):
            return None
        invite = await self.valid(el[0].get("token"))
        if invite is None or not self.registers(invite):
            conn.send(error_reply(el, StanzaError("item-not-found", "the invitation is unknown, used up or expired")))
        else:
            self._presented[conn] = invite.token
            conn.send(reply(el))
        return True

    async def invitation_of(self, conn: C2SConnection) -> Invitation | None:
        """For the register module: what spends the invitation this stream presented, if it is still valid."""
        token = self._presented.get(conn)
        if token is None or await self.valid(token) is None:
            return None

        async def accept(user: JID) -> bool:
            return await self.accept(token, user)
        return accept

    # --- XEP-0379: the token in a subscription request ------------------------------------------------

    async def preauth(self, user: JID, contact: JID, preauth: Element) -> bool | None:
        """A contact invitation of `user` approves `contact`'s request (and spends a use)."""
        invite = await self.valid(preauth.get("token"))
        if invite is None or invite.kind != "contact" or invite.inviter != user.local:
            return None
        if await self.server.storage.invites.use(invite.token, now()) is None:
            return None
        self.log.info("%s subscribed to %s with an invitation", contact, user)
        return True


# --- commands: XEP-0401's ad-hoc commands, and the operator's ----------------------------------------------

COMMANDS = Declarations()
command = COMMANDS.command


def _invites(host: Host) -> Invites:
    return module_on(host, Invites)


URI = Arg("uri", "text", "Invitation URI")
LANDING = Arg("landing-url", "text", "Invitation web page")
EXPIRE = Arg("expire", "text", "Valid until")


def _result(module: Invites, invite: Invite) -> dict[str, Any]:
    return {"uri": module.uri(invite), "landing-url": module.landing_url(invite),
            "expire": invite.expires.strftime("%Y-%m-%dT%H:%M:%SZ")}


def _xep0401(name: str, title: str) -> Callable[[Run], Command]:
    """XEP-0401's commands have their nodes under urn:xmpp:invite, and any user of the host may run them."""
    def declare(run: Run) -> Command:
        declared = Command(name, title, run, result=(URI, LANDING, EXPIRE), access="user", namespace=INVITE_NS)
        COMMANDS.append(declared)
        return declared
    return declare


@_xep0401("invite", "Invite someone to be your contact")
async def invite_contact(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    module = _invites(ctx.host)
    return _result(module, await module.create("contact", ctx.actor.local or ""))


@_xep0401("create-account", "Invite someone to create an account here")
async def invite_account(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    module = _invites(ctx.host)
    if ctx.operator or ctx.host.is_admin(ctx.actor):
        return _result(module, await module.create("account"))
    quota = module.option("user_quota")
    inviter = ctx.actor.local or ""
    if not quota:
        raise CommandError("only admins may invite new accounts here")
    if await ctx.host.server.storage.invites.active(ctx.host.name, inviter, now()) >= quota:
        raise CommandError(f"you hold {quota} unused invitations already")
    return _result(module, await module.create("account", inviter))


HOST = Arg("host", "text", "Host")


@command("generate_invite", "Create an account invitation of USES uses, valid for DAYS days: its web page",
         (HOST, Arg("uses", "int", "Uses"), Arg("days", "int", "Days")), returns="string",
         result=(Arg("url", "text", "Invitation web page"),))
async def generate_invite(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    module = _invites(ctx.target(args["host"]))
    if not 1 <= args["uses"] <= module.option("max_uses"):
        raise CommandError(f"uses must be between 1 and {module.option('max_uses')}")
    if args["days"] < 1:
        raise CommandError("days must be at least 1")
    return {"url": module.landing_url(await module.create("account", uses=args["uses"], days=args["days"]))}


@command("list_invites", "List the invitations of a host that may still be used", (HOST,), returns="records",
         result=(Arg("invites", "records", "Invitations",
                     fields=("token", "kind", "inviter", "uses_left", "expires", "url")),))
async def list_invites(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    host = ctx.target(args["host"])
    module = _invites(host)
    moment = now()
    return {"invites": [
        {"token": i.token, "kind": i.kind, "inviter": i.inviter or "-", "uses_left": i.uses_left,
         "expires": i.expires.strftime("%Y-%m-%dT%H:%M:%SZ"), "url": module.landing_url(i)}
        for i in await host.server.storage.invites.list(host.name) if i.valid(moment)]}


@command("delete_invite", "Revoke an invitation", (HOST, Arg("token", "text", "Token")), returns="rescode")
async def delete_invite(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    host = ctx.target(args["host"])
    invite = await host.server.storage.invites.get(args["token"])
    if invite is None or invite.host != host.name or not await host.server.storage.invites.remove(invite.token):
        raise CommandError("no such invitation")
    return {}
