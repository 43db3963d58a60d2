"""Failure threshold within a time window (the seed's rule, fixed) and the reset timeout."""

from __future__ import annotations

from datetime import timedelta

import pytest

from celery_breaker import CircuitOpenError, State
from celery_breaker.testing import FakeClock

from .support import fail, make, ok, state_of

# -- N failures within T seconds ------------------------------------------------------


def test_five_failures_within_sixty_seconds_trip(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=5, window=60)
    for _ in range(4):
        fail(breaker)
        clock.advance(14.9)
    assert state_of(breaker) is State.CLOSED
    fail(breaker)  # 5th failure, 59.6 s after the first
    assert state_of(breaker) is State.OPEN


def test_five_failures_exactly_sixty_seconds_apart_end_to_end_trip(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=5, window=60)
    for _ in range(4):
        fail(breaker)
        clock.advance(15)
    fail(breaker)
    assert state_of(breaker) is State.OPEN


def test_five_failures_spread_over_more_than_sixty_seconds_do_not_trip(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=5, window=60)
    for _ in range(4):
        fail(breaker)
        clock.advance(15.1)
    fail(breaker)  # first-to-last is 60.4 s
    assert state_of(breaker) is State.CLOSED


def test_failures_a_day_apart_never_trip(clock: FakeClock) -> None:
    """The seed's defect: failures never decayed, so 5 failures a day apart tripped it."""
    breaker = make(clock, failure_threshold=5, window=60)
    for _ in range(50):
        fail(breaker)
        clock.advance(24 * 3600)
    assert state_of(breaker) is State.CLOSED
    assert breaker.snapshot().trips == 0


def test_steady_trickle_below_the_rate_never_trips(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=5, window=60)
    for _ in range(500):
        fail(breaker)
        clock.advance(16)  # at most 4 failures in any 60 s
    assert state_of(breaker) is State.CLOSED


def test_successes_between_failures_do_not_reset_the_count(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=5, window=60)
    for _ in range(4):
        fail(breaker)
        for _ in range(10):
            assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.CLOSED
    fail(breaker)
    assert state_of(breaker) is State.OPEN


def test_old_failures_age_out_and_recent_ones_still_count(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=3, window=60)
    fail(breaker, 2)
    clock.advance(61)
    fail(breaker, 2)  # the first two are out of the window
    assert state_of(breaker) is State.CLOSED
    clock.advance(30)
    fail(breaker)  # 3 within 30 s
    assert state_of(breaker) is State.OPEN


def test_window_accepts_a_timedelta(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=2, window=timedelta(minutes=5))
    fail(breaker)
    clock.advance(299)
    fail(breaker)
    assert state_of(breaker) is State.OPEN


def test_threshold_of_one_trips_on_the_first_failure(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)
    fail(breaker)
    assert state_of(breaker) is State.OPEN


def test_count_restarts_after_the_breaker_recovers(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=3, success_threshold=1)
    fail(breaker, 3)
    clock.advance(30)
    breaker.call(ok)
    assert state_of(breaker) is State.CLOSED
    fail(breaker, 2)  # failures before the trip must not be remembered
    assert state_of(breaker) is State.CLOSED


# -- reset timeout -------------------------------------------------------------------


def test_stays_open_until_exactly_reset_timeout(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, reset_timeout=30)
    fail(breaker)
    tripped_at = clock.monotonic()
    clock.set(tripped_at + 29.999)
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    clock.set(tripped_at + 30)  # exactly reset_timeout after the trip
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.HALF_OPEN


def test_retry_after_counts_down(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, reset_timeout=30)
    fail(breaker)
    seen: list[float | None] = []
    for _ in range(3):
        with pytest.raises(CircuitOpenError) as info:
            breaker.call(ok)
        seen.append(info.value.retry_after)
        clock.advance(10)
    assert seen == pytest.approx([30.0, 20.0, 10.0])
    assert breaker.snapshot().retry_after == 0.0  # 30 s over: the next call may probe


def test_snapshot_retry_after_counts_down(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, reset_timeout=timedelta(seconds=45))
    fail(breaker)
    assert breaker.snapshot().retry_after == 45.0
    clock.advance(44.5)
    assert breaker.snapshot().retry_after == pytest.approx(0.5)
    clock.advance(100)
    assert breaker.snapshot().retry_after == 0.0


def test_failed_probe_restarts_the_full_reset_timeout_without_backoff(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, reset_timeout=30, backoff_multiplier=1)
    fail(breaker)
    clock.advance(100)
    fail(breaker)  # the probe fails
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    assert info.value.retry_after == 30.0
    clock.advance(30)
    assert breaker.call(ok) == "ok"


def test_rejections_while_open_do_not_extend_the_open_period(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, reset_timeout=30)
    fail(breaker)
    for _ in range(29):
        clock.advance(1)
        with pytest.raises(CircuitOpenError):
            breaker.call(ok)
    clock.advance(1)
    assert breaker.call(ok) == "ok"
    assert breaker.snapshot().rejections == 29
