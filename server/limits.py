"""Abuse limits as pure logic: read-rate buckets, auth throttling, per-IP caps, the server-wide output budget.

Clocks are injectable so the policies can be tested without sleeping.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["AuthThrottle", "ConnectionCounter", "OutputBudget", "TokenBucket"]

Clock = Callable[[], float]
K = TypeVar("K", bound=Hashable)


class TokenBucket:
    """Rate limit with burst; consume() says how long to pause reading afterwards.

    The bucket may go into debt: data already read is always accounted for,
    and the returned delay is the time needed to pay the debt back.
    """

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def consume(self, amount: float) -> float:
        """Take `amount` tokens; return seconds to wait before reading more (0.0 if none)."""
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate) - amount
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate


class Bucket:
    """A token bucket of whole actions (messages): `burst` tokens, one more every 3600/per_hour seconds; an
    action refused takes none, so whoever is over the rate is served again as soon as it slows down."""

    def __init__(self, burst: int, per_hour: int, now: float) -> None:
        self.tokens, self.burst, self.rate, self.stamp = float(burst), burst, per_hour / 3600.0, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def login_keys(address: str, account: str | None) -> list[str]:
    """The keys `AuthThrottle` counts a login's failures under: its address, and the address with the bare
    account tried. XMPP logins, the web login and the account page's password check share them, so that
    guessing through one costs the budget of all."""
    keys = [f"ip:{address}"]
    if account:
        keys.append(f"ip:{address}|{account}")
    return keys


@dataclass
class _AuthEntry:
    failures: deque[float] = field(default_factory=deque)
    penalty: float = 0.0  # current lockout length; 0 until the first lockout
    blocked_until: float = 0.0
    last_failure: float = 0.0


class AuthThrottle:
    """Locks out keys (IPs, accounts) after repeated authentication failures.

    After `max_failures` failures within `window` seconds a key is blocked for
    `lockout` seconds; each further failure doubles the block, up to an hour.
    A key idle for a window after its block ends is forgotten, and the table
    is capped at `max_keys` entries (least recently failed dropped first).
    """

    MAX_LOCKOUT = 3600.0

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 300.0,
        lockout: float = 60.0,
        max_keys: int = 100_000,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_failures < 1 or window <= 0 or lockout <= 0 or max_keys < 1:
            raise ValueError("limits must be positive")
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.max_keys = max_keys
        self._clock = clock
        self._entries: OrderedDict[str, _AuthEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _idle(self, entry: _AuthEntry, now: float) -> bool:
        return now - max(entry.last_failure, entry.blocked_until) >= self.window

    def _expire(self, now: float) -> None:
        """Drop idle keys from the least recently failed end of the table."""
        while self._entries:
            entry = next(iter(self._entries.values()))
            if not self._idle(entry, now):
                break
            self._entries.popitem(last=False)

    def failed(self, key: str) -> None:
        """Record one failed authentication for `key`."""
        now = self._clock()
        self._expire(now)
        entry = self._entries.pop(key, None)
        if entry is None or self._idle(entry, now):
            entry = _AuthEntry()
        self._entries[key] = entry  # now the most recently failed
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)
        entry.last_failure = now
        failures = entry.failures
        failures.append(now)
        while failures and now - failures[0] >= self.window:
            failures.popleft()
        while len(failures) > self.max_failures:
            failures.popleft()
        if entry.penalty:
            entry.penalty = min(entry.penalty * 2, self.MAX_LOCKOUT)
        elif len(failures) >= self.max_failures:
            entry.penalty = min(self.lockout, self.MAX_LOCKOUT)
        else:
            return
        entry.blocked_until = now + entry.penalty

    def succeeded(self, key: str) -> None:
        """A successful authentication clears the key's history."""
        self._entries.pop(key, None)

    def blocked_for(self, key: str) -> float:
        """Seconds until `key` may try again (0.0 when allowed now)."""
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        return max(0.0, entry.blocked_until - self._clock())


class ConnectionCounter:
    """Caps simultaneous connections per client IP address."""

    def __init__(self, max_per_ip: int) -> None:
        if max_per_ip < 1:
            raise ValueError("max_per_ip must be positive")
        self.max_per_ip = max_per_ip
        self._counts: dict[str, int] = {}

    def acquire(self, ip: str) -> bool:
        """Count a new connection from `ip`; False (and not counted) if at the cap."""
        count = self._counts.get(ip, 0)
        if count >= self.max_per_ip:
            return False
        self._counts[ip] = count + 1
        return True

    def release(self, ip: str) -> None:
        """Forget one connection from `ip` (unknown IPs are ignored)."""
        count = self._counts.get(ip, 0)
        if count <= 1:
            self._counts.pop(ip, None)
        else:
            self._counts[ip] = count - 1

    def count(self, ip: str) -> int:
        """Current connections from `ip`."""
        return self._counts.get(ip, 0)


class OutputBudget(Generic[K]):
    """Caps the output held in memory for all clients together, besides each connection's own cap.

    Connections report what their write buffer holds while it is above its high mark (the client reads
    slower than it is written to), and 0 once it is below again or they are gone. `held` answers which
    connections to close so that the total fits the budget again: those holding the most first, since a
    client that reads nothing holds most, and one slow reader alone does not cost everyone else.
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("the output budget must be positive")
        self.total = total
        self._held: dict[K, int] = {}
        self.holding = 0  # bytes held by all connections together

    def held(self, key: K, size: int) -> list[K]:
        """Record that `key` holds `size` bytes; return the keys to close, largest first (now forgotten)."""
        self.holding += size - self._held.pop(key, 0)
        if size > 0:
            self._held[key] = size
        over: list[K] = []
        if self.holding > self.total:
            for other in sorted(self._held, key=self._held.__getitem__, reverse=True):
                over.append(other)
                self.holding -= self._held.pop(other)
                if self.holding <= self.total:
                    break
        return over
