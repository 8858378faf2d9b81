"""XEP-0077 In-Band Registration: create an account before logging in, change its password or remove
it after.

Creating accounts is open only when the host enables registration, only over an encrypted stream
(the password travels in the clear inside it) and at most `per_ip_limit` times per `per_ip_window`
seconds from one address, which slows down bulk creation of spam accounts.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.accounts import AccountError, AccountsFull, create_account, set_password
from server.forms import FIELD, Field, X, build_form, find_form, first_value, read_form
from server.jid import JID, JIDError
from server.module import Module
from server.options import Option
from server.stanza import HANDLED, Stanza, error_reply, reply
from server.stream.errors import StanzaError

if TYPE_CHECKING:
    from server.c2s import C2SConnection

# What 'register/invitation' answers for a stream that presented a valid invitation: called with the new
# account, it spends one use and does what the invitation promised; False when it was spent meanwhile.
Invitation = Callable[[JID], Awaitable[bool]]

QUERY = ns.qname(ns.REGISTER, "query")
USERNAME = ns.qname(ns.REGISTER, "username")
PASSWORD = ns.qname(ns.REGISTER, "password")
REMOVE = ns.qname(ns.REGISTER, "remove")
FEATURE = ns.qname(ns.REGISTER_FEATURE, "register")
PER_IP_LIMIT = 5
PER_IP_WINDOW = 600.0
INSTRUCTIONS = "Choose a username and a password for your new account."


def _credentials(query: Element) -> tuple[str | None, str | None]:
    """Username and password from a submitted form, or else from the legacy fields (XEP-0077 6)."""
    form = find_form(query, ns.REGISTER)
    if form is not None:
        values = read_form(form)
        username, password = first_value(values, "username"), first_value(values, "password")
    else:
        username, password = query.findtext(USERNAME), query.findtext(PASSWORD)
    return (username.strip() if username else None), password or None


def _redact(query: Element) -> None:
    """Drop passwords from a query before it is echoed in an error (XEP-0077 3.3 asks not to)."""
    for parent in (query, *query.iterfind(X)):
        for child in list(parent):
            if child.tag == PASSWORD or (child.tag == FIELD and child.get("var") == "password"):
                parent.remove(child)


class Register(Module):
    name = "register"
    options = (
        Option("per_ip_limit", int, PER_IP_LIMIT, "accounts one address may create per window", minimum=1),
        Option("per_ip_window", float, PER_IP_WINDOW, "the window of per_ip_limit, in seconds", minimum=0),
    )

    def setup(self) -> None:
        self._created: dict[str, deque[float]] = {}  # remote IP -> monotonic times of recent creations
        self.add_feature(ns.REGISTER)
        self.hook("c2s/features", self.stream_feature)
        self.hook("c2s/unauthenticated-iq", self.unauthenticated_iq)
        for target in ("host", "own"):
            self.iq("get", QUERY, self.registration_info, target)
            self.iq("set", QUERY, self.update, target)

    # --- before authentication: account creation ---------------------------------------------------

    def _open_to(self, conn: C2SConnection, invited: bool = False) -> bool:
        return (self.host.config.registration or invited) and \
            (conn.secure or not self.server.config.require_encryption)

    def stream_feature(self, conn: C2SConnection, features: Element, stage: str) -> None:
        if stage == "pre-auth" and self._open_to(conn):
            SubElement(features, FEATURE)

    async def unauthenticated_iq(self, conn: C2SConnection, el: Element) -> bool | None:
        if el.get("type") not in ("get", "set") or len(el) != 1 or el[0].tag != QUERY or \
                el.get("to") not in (None, self.host.name):
            return None
        # XEP-0445: an invitation the stream presented opens registration (the invites module answers).
        invitation: Invitation | None = await self.host.hooks.fire("register/invitation", conn)
        try:
            if not self.host.config.registration and invitation is None:
                raise StanzaError("not-allowed", "registration is disabled on this server")
            if not self._open_to(conn, invitation is not None):
                raise StanzaError("not-authorized", "register over an encrypted connection (STARTTLS)")
            answer = reply(el)
            if el.get("type") == "get":
                answer.append(self._registration_form())
            else:
                await self._create(conn.remote_ip, el[0], invitation)
        except StanzaError as exc:
            _redact(el[0])
            answer = error_reply(el, exc)
        conn.send(answer)
        return True

    def _registration_form(self) -> Element:
        query = Element(QUERY)
        SubElement(query, ns.qname(ns.REGISTER, "instructions")).text = INSTRUCTIONS
        SubElement(query, USERNAME)
        SubElement(query, PASSWORD)
        query.append(build_form("form", [
            Field("username", label="Username", required=True),
            Field("password", "text-private", label="Password", required=True),
        ], form_type=ns.REGISTER, title=f"Create an account on {self.host.name}", instructions=INSTRUCTIONS))
        return query

    async def _create(self, ip: str, query: Element, invitation: Invitation | None = None) -> None:
        if query.find(REMOVE) is not None:
            raise StanzaError("registration-required", "log in to remove your account")
        username, password = _credentials(query)
        if not username or not password:
            raise StanzaError("not-acceptable", "a username and a password are required")
        stamp = self._reserve(ip)
        try:
            created = await create_account(self.server.storage, self.host.name, username, password,
                                           self.server.config.scram_iterations)
        except AccountsFull as exc:
            self._release(ip, stamp)
            raise StanzaError("resource-constraint", str(exc)) from None
        except AccountError as exc:
            self._release(ip, stamp)
            raise StanzaError("not-acceptable", str(exc)) from None
        if not created:
            self._release(ip, stamp)
            raise StanzaError("conflict", "that username is taken")
        user = JID.make(username, self.host.name)
        if invitation is not None and not await invitation(user) and not self.host.config.registration:
            await self.server.storage.accounts.delete(self.host.name, username)  # its last use went meanwhile
            raise StanzaError("not-allowed", "the invitation is no longer valid")
        self.log.info("account %s registered in-band from %s", user, ip)
        await self.host.hooks.fire("account/registered", user)

    def _reserve(self, ip: str) -> float:
        """Count a creation from `ip` before it happens, so concurrent attempts cannot exceed the limit."""
        limit = self.option("per_ip_limit")
        now = time.monotonic()
        horizon = now - self.option("per_ip_window")
        for key, stamps in list(self._created.items()):
            while stamps and stamps[0] < horizon:
                stamps.popleft()
            if not stamps:
                del self._created[key]
        stamps = self._created.setdefault(ip, deque())
        if len(stamps) >= limit:
            raise StanzaError("policy-violation", "too many new accounts from your address; try again later")
        stamps.append(now)
        return now

    def _release(self, ip: str, stamp: float) -> None:
        stamps = self._created.get(ip)
        if stamps is not None and stamp in stamps:
            stamps.remove(stamp)

    # --- after authentication: password change and removal ------------------------------------------

    def _own_account(self, stanza: Stanza) -> JID:
        """The sender's bare JID, when it is a user of this host. The router passes an iq to an account only
        from that account; one to the host itself comes from anyone."""
        sender = stanza.from_.bare
        if sender.local is None or sender.domain != self.host.name:
            raise StanzaError("forbidden", "you can only manage your own account")
        return sender

    async def registration_info(self, stanza: Stanza) -> Element:
        user = self._own_account(stanza)
        query = Element(QUERY)
        SubElement(query, ns.qname(ns.REGISTER, "registered"))
        SubElement(query, ns.qname(ns.REGISTER, "instructions")).text = \
            "You are registered. Send a new password to change it, or <remove/> to delete your account."
        SubElement(query, USERNAME).text = user.local
        return query

    async def update(self, stanza: Stanza) -> object:
        user = self._own_account(stanza)
        query = stanza.el[0]
        try:
            if query.find(REMOVE) is not None:
                if len(query) != 1:
                    raise StanzaError("bad-request", "<remove/> must be alone in the query")
                return await self._remove(stanza, user)
            await self._change_password(user, query)
        except StanzaError:
            _redact(query)
            raise
        return None

    async def _change_password(self, user: JID, query: Element) -> None:
        username, password = _credentials(query)
        if not username or not password:
            raise StanzaError("bad-request", "a username and a new password are required")
        try:
            named = JID.parse(username) if "@" in username else JID.make(username, self.host.name)
        except JIDError:
            named = None
        if named is None or named.bare != user:
            raise StanzaError("not-allowed", "you can only change your own password")
        try:
            changed = await set_password(self.server.storage, user.domain, user.local, password,
                                         self.server.config.scram_iterations)
        except AccountError as exc:
            raise StanzaError("not-acceptable", str(exc)) from None
        if not changed:
            raise StanzaError("registration-required")
        self.log.info("%s changed their password in-band", user)

    async def _remove(self, stanza: Stanza, user: JID) -> object:
        """Delete the account, answer, then end every session of the user (XEP-0077 3.2)."""
        if not await self.server.storage.accounts.delete(user.domain, user.local):
            raise StanzaError("registration-required")
        self.log.info("%s removed their account in-band", user)
        await self.host.hooks.fire_all("account/deleted", user.local)
        answer = reply(stanza.el)
        answer.set("from", str(stanza.to))
        await self.server.router.deliver_reply(stanza, answer, stanza.to)
        for session in self.server.sessions.of(user):
            session.close("not-authorized")
        return HANDLED
