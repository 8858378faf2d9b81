"""What the account page does to the logged-in user's own account, apart from HTML: change the password,
read and set notification settings, list and prune OMEMO devices, export the account, delete it.

Every operation takes the account from the page's login and nothing else: no form names the account it
acts on, so one user's session cannot reach another's data. Each goes through the path the rest of the
server uses for the same change: `server.accounts` for the password, the core's account commands (run by
name with the account itself as actor and target) to end sessions and delete, the notifications module's
own `configure`, the PEP service to publish a device list (so contacts are notified), and the
`export-own-account` command for the XEP-0227 file, whose writer lives where extensions may not import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from xml.etree.ElementTree import Element

from extensions.notifications import Notifications
from extensions.pep import Pep
from server.accounts import AccountError, password_matches, set_password
from server.commands import CommandError, Context
from server.jid import JID, JIDError
from server.limits import login_keys
from server.stanza import parse_stored

if TYPE_CHECKING:
    from server.host import Host

LEGACY = "eu.siacs.conversations.axolotl"  # OMEMO as Conversations, Gajim, Dino... speak it (XEP-0384 0.3)
LEGACY_LIST = f"{LEGACY}.devicelist"
LEGACY_BUNDLE = f"{LEGACY}.bundles:"  # one node per device, the device id appended
OMEMO2 = "urn:xmpp:omemo:2"  # XEP-0384 0.8 and later
OMEMO2_LIST = f"{OMEMO2}:devices"
OMEMO2_BUNDLES = f"{OMEMO2}:bundles"  # one node, an item per device id
# (namespace, device list node, the list's element) of each OMEMO generation the page shows.
GENERATIONS = ((LEGACY, LEGACY_LIST, "list"), (OMEMO2, OMEMO2_LIST, "devices"))


class PageError(ValueError):
    """What the user is told when the page refused to do what the form asked."""


@dataclass(frozen=True)
class Device:
    """An OMEMO device of the account's published list."""

    namespace: str  # LEGACY or OMEMO2
    id: int
    label: str
    bundle: bool  # whether its keys are published: a device without them cannot be written to

    @property
    def generation(self) -> str:
        return "OMEMO 2" if self.namespace == OMEMO2 else "legacy OMEMO"


@dataclass(frozen=True)
class Notify:
    """The notification settings the page shows (the rest of the user's preferences stays as it is)."""

    email: str
    confirmed: bool
    quiet: str
    zone: str


class OwnAccount:
    """The operations on one account of `host`, for a request of its owner."""

    def __init__(self, host: Host, user: JID) -> None:
        self.host = host
        self.server = host.server
        self.user = user.bare
        self.username = user.local or ""

    def _context(self) -> Context:
        return Context(self.host, self.user)

    # --- password -----------------------------------------------------------------------------------

    async def check_password(self, password: str, address: str) -> None:
        """The account's current password, under the throttle of XMPP logins from that address (a page left
        open must not be a cheaper way to guess it); PageError if it is wrong or guessing is throttled."""
        throttle = self.server.auth_throttle
        keys = login_keys(address, str(self.user))
        wait = max(throttle.blocked_for(key) for key in keys)
        if wait > 0:
            raise PageError(f"Too many failed attempts; try again in {int(wait) + 1} s.")
        if not await password_matches(self.server.storage, self.host.name, self.username, password):
            for key in keys:
                throttle.failed(key)
            raise PageError("The current password is wrong.")
        for key in keys:
            throttle.succeeded(key)

    async def change_password(self, old: str, new: str, again: str, address: str) -> str:
        """A new password, as `parley user passwd` sets it (its SCRAM keys; the FAST tokens of every device
        go with the old one), then every XMPP session of the account ends, on whichever cluster member it
        is: whoever else was logged in must know the new password to come back."""
        if new != again:
            raise PageError("The two new passwords differ.")
        await self.check_password(old, address)
        try:
            await set_password(self.server.storage, self.host.name, self.username, new,
                               self.server.config.scram_iterations)
        except AccountError as exc:
            raise PageError(str(exc)) from None
        ended = await self.end_sessions()
        return (f"Password changed. {ended} session(s) ended; every device must log in with the new password."
                if ended else "Password changed; every device must log in with the new password.")

    async def end_sessions(self) -> int:
        """End every XMPP session of the account through the admins' end-user-session (on every member of a
        cluster); how many there were."""
        sessions = self.server.sessions
        await sessions.ensure(self.user)
        count = len(sessions.of(self.user))
        await self.server.commands.run("end-user-session", self._context(), {"accountjids": [self.user]})
        return count

    # --- notification settings ----------------------------------------------------------------------

    def _notifications(self) -> Notifications | None:
        module = self.host.modules.get(Notifications.name)
        return module if isinstance(module, Notifications) else None

    async def notifications(self) -> Notify | None:
        """The settings, or None where the host does not load the notifications module."""
        module = self._notifications()
        if module is None:
            return None
        prefs = await module.preferences(self.user)
        return Notify(prefs.email, prefs.verified, prefs.quiet, prefs.zone)

    async def set_notifications(self, email: str, quiet: str, zone: str) -> str:
        """Through the module's own checks, as its ad-hoc command sets them: a new address is mailed a
        confirmation link first; the interval, muted conversations and bodies stay as they were."""
        module = self._notifications()
        if module is None:
            raise PageError(f"{self.host.name} sends no notifications.")
        prefs = await module.preferences(self.user)
        try:
            return await module.configure(self.user, {
                "email": email.strip() or None, "quiet": quiet.strip() or None, "zone": zone.strip() or None,
                "interval": f"{prefs.interval:g}" if prefs.interval else None,
                "muted": None, "bodies": "yes" if prefs.bodies else "no"})
        except CommandError as exc:
            raise PageError(str(exc)) from None

    # --- OMEMO devices ------------------------------------------------------------------------------

    def _pep(self) -> Pep | None:
        module = self.host.modules.get(Pep.name)
        return module if isinstance(module, Pep) else None

    async def _list(self, node: str) -> tuple[str, Element] | None:
        """The newest item of a device list node: its id and payload."""
        items = await self.server.storage.pubsub.items(self.host.name, self.username, node, last=1)
        if not items or not items[-1].payload:
            return None
        return items[-1].id, parse_stored(items[-1].payload)

    async def devices(self) -> list[Device]:
        """The devices of both OMEMO generations' published lists, each with whether its bundle is there."""
        pubsub = self.server.storage.pubsub
        found = []
        for namespace, node, _ in GENERATIONS:
            listed = await self._list(node)
            if listed is None:
                continue
            for device in listed[1].iterfind(f"{{{namespace}}}device"):
                ident = device.get("id", "")
                if not ident.isdigit():
                    continue
                if namespace == LEGACY:
                    bundle = bool(await pubsub.items(self.host.name, self.username, f"{LEGACY_BUNDLE}{ident}",
                                                     last=1))
                else:
                    bundle = bool(await pubsub.items(self.host.name, self.username, OMEMO2_BUNDLES, ids=[ident]))
                found.append(Device(namespace, int(ident), device.get("label", ""), bundle))
        return found

    async def remove_device(self, namespace: str, device_id: int) -> str:
        """Publish the device list without the device, through the account's PEP service, so that contacts
        (and the user's other clients) are notified and stop encrypting for it. Its bundle is left: a
        client that is still alive publishes itself into the list again."""
        pep = self._pep()
        node = next((node for ns_, node, _ in GENERATIONS if ns_ == namespace), None)
        listed = await self._list(node) if node is not None else None
        if pep is None or node is None or listed is None:
            raise PageError("There is no such device list.")
        item_id, payload = listed
        kept = [d for d in payload if not (d.tag == f"{{{namespace}}}device" and d.get("id") == str(device_id))]
        if len(kept) == len(payload):
            raise PageError(f"Device {device_id} is not in the list.")
        replacement = Element(payload.tag, payload.attrib)
        replacement.extend(kept)
        await pep.service.publish_item(self.user, self.user, node, item_id, replacement)
        return f"Device {device_id} was removed from your {'OMEMO 2' if namespace == OMEMO2 else 'OMEMO'} list."

    # --- export and deletion ------------------------------------------------------------------------

    async def export(self) -> str:
        """The XEP-0227 document of the account, from the command ejabberd_compat declares for it."""
        try:
            result = await self.server.commands.run("export-own-account", self._context(), {})
        except CommandError as exc:
            raise PageError(str(exc)) from None
        return cast(str, result["document"])

    async def delete(self, typed_jid: str, password: str, address: str) -> None:
        """Delete the account as `parley user delete` and XEP-0133's delete-user do (its data, the modules'
        data elsewhere, its sessions), once the user typed the address and the password again."""
        try:
            typed = JID.parse(typed_jid.strip()).bare
        except JIDError:
            typed = None
        if typed != self.user:
            raise PageError(f"Type your address, {self.user}, to confirm.")
        await self.check_password(password, address)
        await self.server.commands.run("delete-user", self._context(), {"accountjids": [self.user]})
