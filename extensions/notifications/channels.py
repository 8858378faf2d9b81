"""How a notification leaves the server: a Channel sends one rendered notification to one target.

A channel raises `ChannelError` when the target did not take it; the outbox then retries later. More
channels (a chat bridge, SMS) implement the same `send`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Protocol

import aiohttp
import aiosmtplib

SIGNATURE = "X-Parley-Signature"
TIMESTAMP = "X-Parley-Timestamp"
# The notification's key, the same on every try (a retry after a timeout, or after a crash between the
# receiver's 2xx and the 'sent' mark): a receiver that remembers the keys it saw handles each event once.
IDEMPOTENCY = "X-Parley-Idempotency-Key"


class ChannelError(Exception):
    """The target did not take the notification (unreachable, refused, timed out)."""


class Channel(Protocol):
    name: str

    async def send(self, target: str, message: Any) -> None:
        """Deliver `message` (what the module rendered for this channel) to `target`, or raise ChannelError."""


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    tls: str  # 'none', 'starttls' or 'direct'
    username: str | None
    password: str | None
    ca_file: str | None
    timeout: float


class EmailChannel:
    """SMTP submission with aiosmtplib: implicit TLS ('direct'), STARTTLS, or plain on a trusted network."""

    name = "email"

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings

    async def send(self, target: str, message: EmailMessage) -> None:
        s = self.settings
        try:
            # Flattened here with the message's own policy: aiosmtplib's would fold long headers again.
            await aiosmtplib.send(
                message.as_bytes(policy=message.policy.clone(linesep="\r\n")),
                sender=message["From"].addresses[0].addr_spec, recipients=[target], hostname=s.host, port=s.port,
                username=s.username, password=s.password, use_tls=s.tls == "direct", start_tls=s.tls == "starttls",
                cert_bundle=s.ca_file, timeout=s.timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise ChannelError(f"SMTP {s.host}:{s.port}: {exc}") from exc


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """What X-Parley-Signature carries: the receiver recomputes it with the endpoint's secret, and refuses an
    old timestamp, so a captured request cannot be replayed later."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={mac}"


class WebhookChannel:
    """HTTP POST of a JSON event, signed with the endpoint's secret (target: 'url', secret kept aside)."""

    name = "webhook"

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    async def send(self, target: str, message: tuple[str, dict[str, Any]]) -> None:
        """`message` is (secret, event); the event's 'id' is its idempotency key, sent as a header too, and
        signed with the body (a fresh timestamp on each try)."""
        secret, event = message
        body = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
        stamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP: stamp, SIGNATURE: signature(secret, stamp, body),
                   IDEMPOTENCY: str(event["id"])}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session, \
                    session.post(target, data=body, headers=headers) as response:
                if response.status >= 300:
                    raise ChannelError(f"webhook {target}: HTTP {response.status}")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ChannelError(f"webhook {target}: {exc}") from exc
