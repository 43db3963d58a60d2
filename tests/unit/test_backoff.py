"""Open durations: exponential backoff over consecutive trips, its cap, jitter, and its reset on close."""

from __future__ import annotations

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, ConfigurationError, State
from celery_breaker.storage.memory import MemoryCell
from celery_breaker.testing import FakeClock

from .support import fail, make, ok, state_of


def open_for(breaker: CircuitBreaker) -> float:
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    assert info.value.retry_after is not None
    return info.value.retry_after


# -- validation ------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.5, 0, -2, float("nan"), float("inf"), True, "2"])
def test_backoff_multiplier_must_be_at_least_one(value: object) -> None:
    with pytest.raises(ConfigurationError, match=r"BreakerPolicy\.backoff_multiplier must be a finite number >= 1"):
        BreakerPolicy(backoff_multiplier=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [1, 1.5, -0.1, float("nan"), True, "0.1"])
def test_reset_jitter_must_be_a_fraction_below_one(value: object) -> None:
    with pytest.raises(ConfigurationError, match=r"BreakerPolicy\.reset_jitter must be a fraction in \[0, 1\)"):
        BreakerPolicy(reset_jitter=value)  # type: ignore[arg-type]


def test_reset_jitter_given_as_a_percentage_gets_a_hint() -> None:
    with pytest.raises(ConfigurationError, match=r"got 10; for 10% write 0.1"):
        BreakerPolicy(reset_jitter=10)


def test_max_reset_timeout_must_not_be_below_reset_timeout() -> None:
    with pytest.raises(ConfigurationError, match=r"max_reset_timeout \(10\) must not be less than reset_timeout"):
        BreakerPolicy(max_reset_timeout=10)
    with pytest.raises(ConfigurationError, match=r"BreakerPolicy\.max_reset_timeout must be"):
        BreakerPolicy(max_reset_timeout=-1)


def test_defaults_double_up_to_ten_reset_timeouts_without_jitter() -> None:
    policy = BreakerPolicy()
    assert (policy.backoff_multiplier, policy.max_reset_timeout, policy.reset_jitter) == (2.0, None, 0.0)
    assert policy.longest_open == 300.0
    assert BreakerPolicy(reset_timeout=5).longest_open == 50.0
    assert BreakerPolicy(max_reset_timeout=45).longest_open == 45.0


# -- the open duration ---------------------------------------------------------------


def test_open_duration_doubles_per_consecutive_trip_up_to_the_cap() -> None:
    policy = BreakerPolicy(reset_timeout=30, max_reset_timeout=200)
    assert [policy.open_duration(k, 0.5) for k in range(1, 7)] == [30, 60, 120, 200, 200, 200]
    assert policy.open_duration(10**9, 0.5) == 200  # no overflow however long the streak


def test_open_duration_without_backoff_is_reset_timeout() -> None:
    policy = BreakerPolicy(reset_timeout=30, backoff_multiplier=1)
    assert {policy.open_duration(k, 0.5) for k in range(1, 50)} == {30.0}


def test_jitter_spans_plus_minus_the_fraction_and_never_passes_the_cap() -> None:
    policy = BreakerPolicy(reset_timeout=100, reset_jitter=0.2, max_reset_timeout=250)
    assert policy.open_duration(1, 0.0) == pytest.approx(80)
    assert policy.open_duration(1, 0.5) == pytest.approx(100)
    assert policy.open_duration(1, 0.999999) == pytest.approx(120, abs=1e-3)
    assert policy.open_duration(2, 0.0) == pytest.approx(160)
    assert policy.open_duration(2, 0.999999) == pytest.approx(240, abs=1e-3)
    assert policy.open_duration(3, 0.999999) == 250  # capped after the jitter
    assert policy.open_duration(3, 0.0) == pytest.approx(200)


# -- the streak in the machine ------------------------------------------------------


def test_failed_probes_back_off_and_closing_starts_over(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, reset_timeout=10, half_open_max_calls=1, success_threshold=1)
    seen: list[float] = []
    fail(breaker)
    for _ in range(5):
        duration = open_for(breaker)
        seen.append(duration)
        snap = breaker.snapshot()
        assert (snap.streak, snap.open_duration) == (len(seen), duration)
        clock.advance(duration)
        fail(breaker)  # the probe fails
    assert seen == [10, 20, 40, 80, 100]  # capped at 10 x reset_timeout
    assert open_for(breaker) == 100
    clock.advance(100)
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.CLOSED
    snap = breaker.snapshot()
    assert (snap.streak, snap.open_duration) == (0, None)
    fail(breaker)
    assert open_for(breaker) == 10  # a new streak


def test_half_open_keeps_the_latest_open_duration_in_the_snapshot(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, reset_timeout=10, half_open_max_calls=2)
    fail(breaker)
    clock.advance(10)
    breaker.call(ok)
    snap = breaker.snapshot()
    assert (snap.state, snap.streak, snap.open_duration) == (State.HALF_OPEN, 1, 10.0)


def test_operator_close_and_reset_end_the_streak(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, reset_timeout=10)
    fail(breaker)
    clock.advance(10)
    fail(breaker)
    assert breaker.snapshot().streak == 2
    breaker.close()
    fail(breaker)
    assert open_for(breaker) == 10
    clock.advance(10)
    fail(breaker)
    breaker.reset()
    assert breaker.snapshot().streak == 0
    fail(breaker)
    assert open_for(breaker) == 10


def test_forced_open_has_no_open_duration(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)
    fail(breaker)
    breaker.force_open()
    assert breaker.snapshot().open_duration is None


def test_jitter_spreads_open_durations_within_bounds(clock: FakeClock) -> None:
    durations = []
    for i in range(300):
        breaker = make(clock, name=f"svc{i}", failure_threshold=1, reset_timeout=100, reset_jitter=0.25)
        fail(breaker)
        durations.append(open_for(breaker))
    assert all(75 <= d <= 125 for d in durations)
    # Uniform over [75, 125]: 300 draws all landing in one half has probability 2 * 2^-300.
    assert min(durations) < 100 < max(durations)
    assert len(set(durations)) > 250
    mean = sum(durations) / len(durations)
    assert 95 < mean < 105  # sd of the mean ~0.83 s: a 6-sigma band


def test_jitter_uses_the_machines_draw(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, reset_timeout=100, reset_jitter=0.5)
    cell = breaker._cell
    assert isinstance(cell, MemoryCell)
    cell.draw = lambda: 0.0
    fail(breaker)
    assert open_for(breaker) == 50
