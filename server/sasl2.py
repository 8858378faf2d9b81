"""SASL2 (XEP-0388), Bind2 (XEP-0386) and FAST (XEP-0484) for client streams: what an <authenticate/>
asks for, the resource a device gets, and the tokens devices log in with.

The connection (server/c2s.py) runs the exchange; this module reads the request, checks the device's
user-agent id, derives the stable resource Bind2 gives a device that names none, and issues and checks
FAST tokens. A token is HMAC-SHA-256(key, seed): the database keeps the seed (server.storage.fast), the
key lives in the data folder (`fast-token.key`, made on first use), so neither alone logs anyone in.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from xml.etree.ElementTree import Element

from server import ns
from server.sasl import SaslFailure
from server.sasl.ht import initiator_proof
from server.storage.fast import FastToken, FastTokenStore

AUTHENTICATION = ns.qname(ns.SASL2, "authentication")
MECHANISM = ns.qname(ns.SASL2, "mechanism")
INLINE = ns.qname(ns.SASL2, "inline")
INITIAL_RESPONSE = ns.qname(ns.SASL2, "initial-response")
USER_AGENT = ns.qname(ns.SASL2, "user-agent")
SUCCESS = ns.qname(ns.SASL2, "success")
ADDITIONAL_DATA = ns.qname(ns.SASL2, "additional-data")
AUTHORIZATION_IDENTIFIER = ns.qname(ns.SASL2, "authorization-identifier")
BIND2 = ns.qname(ns.BIND2, "bind")
BIND2_INLINE = ns.qname(ns.BIND2, "inline")
BIND2_FEATURE = ns.qname(ns.BIND2, "feature")
BIND2_TAG = ns.qname(ns.BIND2, "tag")
BOUND = ns.qname(ns.BIND2, "bound")
FAST = ns.qname(ns.FAST, "fast")
FAST_MECHANISM = ns.qname(ns.FAST, "mechanism")
REQUEST_TOKEN = ns.qname(ns.FAST, "request-token")
TOKEN = ns.qname(ns.FAST, "token")
UPGRADE = ns.qname(ns.SASL_UPGRADE, "upgrade")
UPGRADE_SHA256 = "UPGR-SCRAM-SHA-256"  # the one upgrade task (XEP-0480): SHA-1 keys only get SHA-256 keys

MAX_AGENT_ID = 64  # a UUID is 36
MAX_AGENT_TEXT = 256  # <software/>, <device/>, Bind2's <tag/>
_AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
TOKEN_LIFETIME = timedelta(days=14)
ROTATE_BEFORE = timedelta(days=2)  # a token this close to its expiry is replaced at the next login
KEY_FILE = "fast-token.key"


@dataclass
class Request:
    """An <authenticate/>: the mechanism and what the client asks to get along with the success."""

    mechanism: str
    initial: str | None
    agent: str | None = None
    bind: Element | None = None
    token_mechanism: str | None = None  # <request-token mechanism/>
    fast: bool = False  # a <fast/> element: a login with a token
    fast_count: int | None = None  # its replay counter, if the client sent one
    invalidate: bool = False  # <fast invalidate='true'/>: the token ends with this login
    upgrades: list[str] = field(default_factory=list)  # upgrade tasks the client can do (XEP-0480)
    inline: list[Element] = field(default_factory=list)  # other modules' elements (stream management)


def _text(el: Element | None, what: str) -> str | None:
    text = el.text if el is not None else None
    if text is not None and len(text) > MAX_AGENT_TEXT:
        raise SaslFailure("malformed-request", f"{what} is longer than {MAX_AGENT_TEXT} characters")
    return text


def parse_request(el: Element) -> Request:
    """Read an <authenticate/>, refusing a malformed user-agent (SaslFailure)."""
    initial = el.find(INITIAL_RESPONSE)
    request = Request(el.get("mechanism", ""), initial.text or "" if initial is not None else None)
    for child in el:
        if child.tag == USER_AGENT:
            request.agent = check_agent_id(child.get("id"))
            for name in ("software", "device"):
                _text(child.find(ns.qname(ns.SASL2, name)), name)
        elif child.tag == BIND2:
            _text(child.find(BIND2_TAG), "the tag")
            request.bind = child
        elif child.tag == REQUEST_TOKEN:
            request.token_mechanism = child.get("mechanism", "")
        elif child.tag == FAST:
            count = child.get("count")
            if count is not None and (not count.isdigit() or len(count) > 18):
                raise SaslFailure("malformed-request", "the FAST count is not a number")
            request.fast = True
            request.fast_count = int(count) if count is not None else None
            request.invalidate = child.get("invalidate") in ("true", "1")
        elif child.tag == UPGRADE:
            request.upgrades.append((child.text or "").strip())
        elif child.tag != INITIAL_RESPONSE:
            request.inline.append(child)
    return request


def check_agent_id(agent: str | None) -> str | None:
    """A user-agent id (XEP-0388 says a UUID): short, printable, no spaces."""
    if agent is None:
        return None
    if len(agent) > MAX_AGENT_ID or not _AGENT_ID.fullmatch(agent):
        raise SaslFailure("malformed-request", f"the user-agent id must be at most {MAX_AGENT_ID} letters, "
                                               "digits and '.-_:'")
    return agent


def stable_resource(tag: str | None, account: str, agent: str) -> str:
    """Bind2's resource for a device (XEP-0386 4.1, '[client tag]/[server generated identifier]'): its tag
    and a short hash of the account, tag and user-agent id, the same at every login, revealing neither."""
    digest = hashlib.sha256(f"{account}\0{tag}\0{agent}".encode()).digest()
    return f"{tag or 'device'}/{base64.b32encode(digest[:5]).decode().lower()}"


def random_resource(tag: str | None) -> str:
    """Bind2's resource for a client that gave no user-agent id: a new one at every login."""
    return f"{tag or 'parley'}/{secrets.token_hex(4)}"


@functools.cache
def fast_key(data_dir: Path) -> bytes:
    """The key tokens are derived with, made once in the data folder and readable by the server only."""
    path = data_dir / KEY_FILE
    if not path.exists():
        # Written whole under a name of its own, then linked into place: another process (of a cluster
        # sharing the folder) that gets there first wins, and nobody reads a half-written key.
        draft = data_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(os.urandom(32))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_bytes()


def token_of(key: bytes, seed: bytes) -> str:
    return base64.urlsafe_b64encode(hmac.new(key, seed, "sha256").digest()).decode().rstrip("=")


class FastTokens:
    """Issue and check one host's FAST tokens."""

    def __init__(self, store: FastTokenStore, key: bytes) -> None:
        self.store = store
        self.key = key

    async def issue(self, host: str, user: str, agent: str, mechanism: str,
                    keep: FastToken | None = None) -> tuple[str, datetime]:
        """A new token for the device (the one it logged in with, `keep`, stays until this one is used)."""
        now = datetime.now(UTC)
        token = FastToken(os.urandom(16), host, user, agent, mechanism, now, now + TOKEN_LIFETIME, -1)
        await self.store.issue(token, keep.seed if keep is not None else None)
        return token_of(self.key, token.seed), token.expires

    async def check(self, host: str, user: str, agent: str, mechanism: str, proof: bytes,
                    cb_data: bytes, count: int | None) -> tuple[FastToken, str]:
        """The device's token the proof was made with, and the token; SaslFailure if none (forged,
        expired, another mechanism or channel binding, a count used before)."""
        now = datetime.now(UTC)
        tokens = await self.store.of_device(host, user, agent)
        for stored in tokens:
            token = token_of(self.key, stored.seed)
            if not hmac.compare_digest(initiator_proof(token, cb_data), proof):
                continue
            if stored.mechanism != mechanism:
                break
            if stored.expires <= now:
                raise SaslFailure("credentials-expired", "the token has expired")
            older = [t.seed for t in tokens if t.issued < stored.issued]
            if not await self.store.used(stored, count, older):
                raise SaslFailure("not-authorized", "the token was used with this count already")
            return stored, token
        raise SaslFailure("not-authorized")


def wants_new_token(request: Request, used: FastToken | None) -> str | None:
    """The mechanism of the token to issue with this success: the one asked for, or a replacement of the
    token logged in with when it is near its expiry (XEP-0484 rotation)."""
    if request.agent is None:
        return None
    if request.token_mechanism:
        return request.token_mechanism
    if used is not None and not request.invalidate and used.expires - datetime.now(UTC) < ROTATE_BEFORE:
        return used.mechanism
    return None
