"""What the outbox sends and how it retries: digest and confirmation emails, webhook events, backoff with
jitter, a circuit breaker per endpoint, and the signed links of the emails.

Everything that reaches a header comes from outside (a roster name, a room's JID, a nick): `clean` takes out
line breaks and control characters, and the message is built with `EmailMessage`, which folds and encodes
headers itself, so no name can write a header of its own.
"""

from __future__ import annotations

import base64
import email.policy
import hashlib
import hmac
import json
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote

MAX_LISTED = 50  # conversations a digest lists by name; the rest are counted
MAX_NAME = 80  # characters of a name in a subject or a line
MAX_BODY = 200  # characters of a message body quoted in a digest


def clean(text: str, limit: int = MAX_NAME) -> str:
    """One line of printable text, cut to `limit` characters."""
    line = "".join(c if c.isprintable() else " " for c in text).strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"


def backoff(attempts: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before the next try after `attempts` failed ones: exponential, capped, with full jitter between
    half and all of it, so that endpoints that come back are not hit by every retry at once."""
    delay = min(cap, base * (2 ** max(attempts - 1, 0)))
    return delay * (0.5 + (rng or random).random() / 2)


class CircuitBreaker:
    """Per endpoint (an SMTP server, a webhook URL): after `threshold` failures in a row the endpoint is left
    alone for `cooldown` seconds; what was due for it waits, without using up its tries. One success closes
    it again."""

    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._failures: dict[str, int] = {}
        self._open_until: dict[str, float] = {}

    def open_until(self, endpoint: str) -> float | None:
        """When the endpoint may be tried again (a monotonic time), or None if it may be tried now."""
        until = self._open_until.get(endpoint)
        if until is None or until <= time.monotonic():
            return None
        return until

    def failed(self, endpoint: str) -> None:
        count = self._failures.get(endpoint, 0) + 1
        self._failures[endpoint] = count
        if count >= self.threshold:
            self._open_until[endpoint] = time.monotonic() + self.cooldown

    def succeeded(self, endpoint: str) -> None:
        self._failures.pop(endpoint, None)
        self._open_until.pop(endpoint, None)


# --- signed links ---------------------------------------------------------------------------------------

def sign(secret: bytes, purpose: str, fields: dict[str, str]) -> str:
    """A token for a link (confirm an address, unsubscribe): what it is for and about, readable, and a MAC."""
    data = base64.urlsafe_b64encode(json.dumps({"p": purpose, **fields}, sort_keys=True).encode()).decode()
    data = data.rstrip("=")
    return f"{data}.{hmac.new(secret, data.encode(), hashlib.sha256).hexdigest()[:32]}"


def unsign(secret: bytes, purpose: str, token: str) -> dict[str, str] | None:
    """The fields of a token made by `sign` for `purpose`, or None for a forged, altered or other token."""
    data, _, mac = token.partition(".")
    if not mac or not hmac.compare_digest(hmac.new(secret, data.encode(), hashlib.sha256).hexdigest()[:32], mac):
        return None
    try:
        fields = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    except ValueError:
        return None
    if not isinstance(fields, dict) or fields.pop("p", None) != purpose:
        return None
    return {str(k): str(v) for k, v in fields.items()}


# --- emails ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Letterhead:
    """What every email of a host carries: its sender and the links' base URL."""

    host: str
    sender: str
    base_url: str


# Headers up to RFC 5322's hard limit: a long List-Unsubscribe URL has nowhere to fold, and folding it anyway
# would encode it (RFC 2047), which mail clients do not read as a link.
POLICY = email.policy.default.clone(max_line_length=998)


def _message(head: Letterhead, to: str, subject: str, key: str) -> EmailMessage:
    msg = EmailMessage(policy=POLICY)
    msg["From"] = head.sender
    msg["To"] = to
    msg["Subject"] = clean(subject, 200)
    msg["Date"] = format_datetime(datetime.now(UTC))
    # The idempotency key names the message, the same on every try: a retry after a lost answer, or after a
    # crash between the server's acceptance and the 'sent' mark, is recognisably the same email.
    msg["Message-ID"] = message_id(key, head.host)
    msg["Auto-Submitted"] = "auto-generated"
    return msg


def message_id(key: str, host: str) -> str:
    """RFC 5322 msg-id of a notification: its idempotency key (hex) at the host, stable across retries."""
    return f"<{clean(key, 64).replace('@', '.').replace('>', '')}@{host}>"


def xmpp_uri(jid: str, room: bool) -> str:
    """RFC 5122 link that opens the conversation in the user's client."""
    return f"xmpp:{quote(jid, safe='@/')}?{'join' if room else 'message'}"


def digest_email(head: Letterhead, user: str, to: str, conversations: list[dict[str, Any]], unsubscribe: str,
                 key: str) -> EmailMessage:
    """One email listing who wrote and how many messages per conversation; the last bodies only where the
    conversation has them (the user and the admin allowed it, and none of an encrypted message), each quoted
    on one line of its own, so that no body can write lines that look like the email's."""
    total = sum(int(c["count"]) for c in conversations)
    names = [clean(c["jid"], 40) for c in conversations[:3]]
    more = f" and {len(conversations) - 3} more" if len(conversations) > 3 else ""
    plural = "s" if total != 1 else ""
    msg = _message(head, to, f"{total} new message{plural} for {user} from {', '.join(names)}{more}", key)
    msg["List-Unsubscribe"] = f"<{unsubscribe}>"
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    lines = [f"You have {total} unread message{plural} on {head.host} ({user}):", ""]
    for c in conversations[:MAX_LISTED]:
        count = int(c["count"])
        who = ", ".join(clean(s, 40) for s in c["senders"])
        lines.append(f"* {clean(c['jid'])}: {count} message{'s' if count != 1 else ''}"
                     + (f" from {who}" if c.get("room") and who else ""))
        lines += [f"  > {clean(sender, 40)}: {clean(body, MAX_BODY)}" for sender, body in c.get("bodies", ())]
        lines.append(f"  {xmpp_uri(c['jid'], bool(c.get('room')))}")
    if len(conversations) > MAX_LISTED:
        rest = conversations[MAX_LISTED:]
        lines.append(f"* and {len(rest)} more conversations with {sum(int(c['count']) for c in rest)} messages")
    lines += ["", "Stop these emails (one click):", unsubscribe, ""]
    msg.set_content("\n".join(lines))
    return msg


def confirm_email(head: Letterhead, user: str, to: str, link: str, key: str) -> EmailMessage:
    msg = _message(head, to, f"Confirm notifications for {user}", key)
    msg.set_content("\n".join([
        f"Someone, probably you, asked {head.host} to email this address when messages wait for {user}.",
        "", "To confirm, open:", link, "", "If it was not you, ignore this email: nothing will be sent.", ""]))
    return msg
