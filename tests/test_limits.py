"""Rate limits, auth throttling and per-IP caps with a fake clock."""

from __future__ import annotations

import pytest

from server.limits import AuthThrottle, ConnectionCounter, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_token_bucket_burst_then_delay() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100.0, burst=500.0, clock=clock)
    assert bucket.consume(300) == 0.0
    assert bucket.consume(200) == 0.0
    assert bucket.consume(50) == pytest.approx(0.5)  # 50 bytes of debt at 100 B/s
    clock.advance(0.5)
    assert bucket.consume(0) == 0.0
    assert bucket.consume(100) == pytest.approx(1.0)


def test_token_bucket_refill_capped_at_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=20.0, clock=clock)
    bucket.consume(20)
    clock.advance(3600)
    assert bucket.consume(20) == 0.0
    assert bucket.consume(10) == pytest.approx(1.0)


def test_token_bucket_large_read_waits_proportionally() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1000.0, burst=1000.0, clock=clock)
    assert bucket.consume(5000) == pytest.approx(4.0)
    clock.advance(4.0)
    assert bucket.consume(0) == 0.0


def test_token_bucket_ignores_clock_going_backwards() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=10.0, clock=clock)
    bucket.consume(10)
    clock.advance(-5)
    assert bucket.consume(10) == pytest.approx(1.0)


def test_token_bucket_validates() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 10)
    with pytest.raises(ValueError):
        TokenBucket(10, 0)


def test_auth_throttle_blocks_after_max_failures() -> None:
    clock = FakeClock()
    throttle = AuthThrottle(max_failures=3, window=300, lockout=60, clock=clock)
    for _ in range(2):
        throttle.failed("ip:1.2.3.4")
        assert throttle.blocked_for("ip:1.2.3.4") == 0.0
    throttle.failed("ip:1.2.3.4")
    assert throttle.blocked_for("ip:1.2.3.4") == pytest.approx(60)
    assert throttle.blocked_for("ip:5.6.7.8") == 0.0
    clock.advance(45)
    assert throttle.blocked_for("ip:1.2.3.4") == pytest.approx(15)
    clock.advance(15)
    assert throttle.blocked_for("ip:1.2.3.4") == 0.0


def test_auth_throttle_failures_outside_window_do_not_count() -> None:
    clock = FakeClock()
    throttle = AuthThrottle(max_failures=3, window=100, lockout=60, clock=clock)
    throttle.failed("k")
    throttle.failed("k")
    clock.advance(150)
    throttle.failed("k")
    throttle.failed("k")
    assert throttle.blocked_for("k") == 0.0
    throttle.failed("k")
    assert throttle.blocked_for("k") == pytest.approx(60)


def test_auth_throttle_doubles_up_to_an_hour() -> None:
    clock = FakeClock()
    throttle = AuthThrottle(max_failures=2, window=300, lockout=60, clock=clock)
    throttle.failed("account:alice@host")
    throttle.failed("account:alice@host")
    assert throttle.blocked_for("account:alice@host") == pytest.approx(60)
    expected = 60.0
    for _ in range(10):
        clock.advance(throttle.blocked_for("account:alice@host"))
        throttle.failed("account:alice@host")
        expected = min(expected * 2, 3600.0)
        assert throttle.blocked_for("account:alice@host") == pytest.approx(expected)
    assert expected == 3600.0


def test_auth_throttle_success_clears() -> None:
    clock = FakeClock()
    throttle = AuthThrottle(max_failures=2, clock=clock)
    throttle.failed("k")
    throttle.failed("k")
    assert throttle.blocked_for("k") > 0
    throttle.succeeded("k")
    assert throttle.blocked_for("k") == 0.0
    throttle.failed("k")
    assert throttle.blocked_for("k") == 0.0
    throttle.succeeded("never-seen")


def test_auth_throttle_forgets_idle_keys() -> None:
    clock = FakeClock()
    throttle = AuthThrottle(max_failures=2, window=100, lockout=60, clock=clock)
    throttle.failed("old")
    throttle.failed("old")  # blocked, penalty 60
    clock.advance(1000)
    throttle.failed("new")
    assert len(throttle) == 1
    # A fresh start: the old penalty no longer doubles.
    throttle.failed("old")
    throttle.failed("old")
    assert throttle.blocked_for("old") == pytest.approx(60)


def test_auth_throttle_idle_key_resets_even_when_not_oldest() -> None:
    clock = FakeClock()
    throttle = AuthThrottle(max_failures=2, window=100, lockout=60, clock=clock)
    for _ in range(8):  # "front" ends up blocked for an hour, ahead of "k" in the table
        throttle.failed("front")
    throttle.failed("k")
    throttle.failed("k")
    clock.advance(200)
    assert throttle.blocked_for("front") > 0
    throttle.failed("k")
    assert throttle.blocked_for("k") == 0.0
    assert len(throttle) == 2


def test_auth_throttle_table_is_capped() -> None:
    clock = FakeClock()
    throttle = AuthThrottle(max_failures=1, max_keys=100, clock=clock)
    for i in range(1000):
        throttle.failed(f"ip:{i}")
    assert len(throttle) == 100
    assert throttle.blocked_for("ip:999") > 0
    assert throttle.blocked_for("ip:0") == 0.0


def test_auth_throttle_validates() -> None:
    with pytest.raises(ValueError):
        AuthThrottle(max_failures=0)


def test_connection_counter() -> None:
    counter = ConnectionCounter(max_per_ip=2)
    assert counter.acquire("1.2.3.4")
    assert counter.acquire("1.2.3.4")
    assert not counter.acquire("1.2.3.4")
    assert counter.acquire("::1")
    assert counter.count("1.2.3.4") == 2
    counter.release("1.2.3.4")
    assert counter.acquire("1.2.3.4")
    counter.release("1.2.3.4")
    counter.release("1.2.3.4")
    counter.release("1.2.3.4")  # extra release is harmless
    assert counter.count("1.2.3.4") == 0
    assert counter.acquire("1.2.3.4")
    with pytest.raises(ValueError):
        ConnectionCounter(0)
