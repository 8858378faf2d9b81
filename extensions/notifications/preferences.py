"""A user's notification preferences, kept as one key-value document per account, and their checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime, time
from email.errors import HeaderParseError
from email.headerregistry import Address
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

QUIET = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)-([01]?\d|2[0-3]):([0-5]\d)$")
MAX_ADDRESS = 254  # RFC 5321's limit on a forward path


class BadPreference(ValueError):
    """A value the user gave that cannot be used (the message says which and why)."""


def check_address(text: str) -> str:
    """A plain mailbox address 'local@domain', or BadPreference: no display name, no second address, no
    line breaks that would let it write headers of its own."""
    text = text.strip()
    if not text or len(text) > MAX_ADDRESS or any(c in text for c in "\r\n\0<>,;\" ()"):
        raise BadPreference(f"not an email address: {text[:64]!r}")
    local, at, domain = text.rpartition("@")
    if not at or not local or "." not in domain or domain.startswith(".") or domain.endswith("."):
        raise BadPreference(f"not an email address: {text[:64]!r}")
    try:
        Address(addr_spec=text)
    except (HeaderParseError, ValueError, IndexError):
        raise BadPreference(f"not an email address: {text[:64]!r}") from None
    return text


def check_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadPreference(f"unknown time zone: {name[:64]!r}") from None
    return name


def check_interval(text: str) -> float:
    """Seconds, a positive decimal number, or 0 for the host's default."""
    try:
        seconds = float(text)
    except ValueError:
        raise BadPreference(f"the interval is a number of seconds, not {text[:32]!r}") from None
    if not 0 <= seconds < 1e7:
        raise BadPreference("the interval must be between 0 and 10,000,000 seconds")
    return seconds


def check_quiet(text: str) -> str:
    """'HH:MM-HH:MM' (it may run past midnight), or '' for none."""
    text = text.strip()
    if text and not QUIET.match(text):
        raise BadPreference("quiet hours are written HH:MM-HH:MM, e.g. 22:00-07:00")
    return text


def quiet_now(quiet: str, zone: str, now: datetime) -> bool:
    """Whether `now` falls in the quiet hours, read in the user's time zone."""
    match = QUIET.match(quiet)
    if not match:
        return False
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    start, end = time(h1, m1), time(h2, m2)
    local = now.astimezone(ZoneInfo(zone)).time()
    if start <= end:
        return start <= local < end
    return local >= start or local < end


@dataclass(frozen=True)
class Preferences:
    email: str = ""
    verified: bool = False
    interval: float = 0.0  # seconds between digests; 0: the host's default
    quiet: str = ""
    zone: str = "UTC"
    muted: tuple[str, ...] = ()
    webhook: str = ""  # an integrator's endpoint for this account's events (set by an admin)
    webhook_secret: str = ""
    bodies: bool = False  # the user's consent to message bodies in digests and events (the host must allow it)

    @property
    def emailing(self) -> bool:
        return bool(self.email and self.verified)

    @property
    def active(self) -> bool:
        """Whether anything is to be noted for this user at all (the cheap test on every message)."""
        return self.emailing or bool(self.webhook)

    def document(self) -> dict[str, Any] | None:
        if self == Preferences():
            return None
        return {"email": self.email, "verified": self.verified, "interval": self.interval, "quiet": self.quiet,
                "zone": self.zone, "muted": list(self.muted), "webhook": self.webhook,
                "webhook_secret": self.webhook_secret, "bodies": self.bodies}

    @classmethod
    def parse(cls, doc: dict[str, Any] | None) -> Preferences:
        if not doc:
            return cls()
        return cls(doc.get("email", ""), doc.get("verified", False), doc.get("interval", 0.0), doc.get("quiet", ""),
                   doc.get("zone", "UTC"), tuple(doc.get("muted", ())), doc.get("webhook", ""),
                   doc.get("webhook_secret", ""), doc.get("bodies", False))

    def with_email(self, email: str) -> Preferences:
        """A new address must be confirmed again; the same one keeps its state."""
        if email == self.email:
            return self
        return replace(self, email=email, verified=False)


def check_yes_no(text: str | None, current: bool) -> bool:
    """'yes' or 'no' (a form's choice), or the current value when left empty."""
    if not text:
        return current
    answer = text.strip().lower()
    if answer not in ("yes", "no"):
        raise BadPreference(f"answer yes or no, not {text[:16]!r}")
    return answer == "yes"


@dataclass(frozen=True)
class RoomHook:
    """A room's webhook, kept per room: set by an owner of the room or an admin of its host. `created` is the
    room's creation time when it was set: a room destroyed and created again under the same name is another
    room, whose messages must not reach the first one's integrator."""

    url: str = ""
    secret: str = ""
    bodies: bool = False
    created: str = ""
    by: str = ""

    def document(self) -> dict[str, Any] | None:
        if not self.url:
            return None
        return {"url": self.url, "secret": self.secret, "bodies": self.bodies, "created": self.created,
                "by": self.by}

    @classmethod
    def parse(cls, doc: dict[str, Any] | None) -> RoomHook:
        if not doc:
            return cls()
        return cls(doc["url"], doc["secret"], doc.get("bodies", False), doc.get("created", ""), doc.get("by", ""))
