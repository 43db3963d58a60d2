"""Rate rules: failure rate with minimum_calls over a time or count window, and slow-call rate."""

from __future__ import annotations

from typing import Any

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, ConfigurationError, State
from celery_breaker.core import Transition
from celery_breaker.testing import FakeClock

from .support import down, make, ok, state_of


def run(breaker: CircuitBreaker, pattern: str) -> None:
    """``pattern`` of outcomes: ``S`` success, ``F`` failure."""
    for outcome in pattern:
        if outcome == "S":
            breaker.call(ok)
        else:
            with pytest.raises(ConnectionError):
                breaker.call(down)


RATE: dict[str, Any] = {"failure_threshold": None, "failure_rate_threshold": 0.5, "minimum_calls": 4}


# -- failure rate over a time window ----------------------------------------------


def test_rate_trips_once_minimum_calls_are_seen(clock: FakeClock) -> None:
    breaker = make(clock, **RATE)
    run(breaker, "FFF")  # 100 % but only 3 calls
    assert state_of(breaker) is State.CLOSED
    run(breaker, "F")
    assert state_of(breaker) is State.OPEN


def test_rate_below_threshold_does_not_trip(clock: FakeClock) -> None:
    breaker = make(clock, **RATE)
    run(breaker, "SSSFSSSFSSF")  # 3/11
    assert state_of(breaker) is State.CLOSED


def test_rate_exactly_at_threshold_trips(clock: FakeClock) -> None:
    breaker = make(clock, **RATE)
    run(breaker, "SSF")
    assert state_of(breaker) is State.CLOSED
    run(breaker, "F")  # 2/4 == 0.5
    assert state_of(breaker) is State.OPEN


def test_old_successes_age_out_of_the_time_window(clock: FakeClock) -> None:
    breaker = make(clock, window=60, **RATE)
    run(breaker, "S" * 10)
    clock.advance(64)  # window plus one bucket: the successes are gone
    run(breaker, "SSF")
    assert state_of(breaker) is State.CLOSED
    run(breaker, "F")  # 2/4, where 2/14 would not trip
    assert state_of(breaker) is State.OPEN


def test_old_failures_age_out_of_the_time_window(clock: FakeClock) -> None:
    breaker = make(clock, window=60, **RATE)
    run(breaker, "FFF")
    clock.advance(64)
    run(breaker, "SF")  # 1/2 now; 4/5 had the old failures stayed
    assert state_of(breaker) is State.CLOSED
    assert breaker.snapshot().window_calls == 2


def test_outcomes_inside_the_window_still_count(clock: FakeClock) -> None:
    breaker = make(clock, window=60, **RATE)
    run(breaker, "FFF")
    clock.advance(50)
    run(breaker, "F")
    assert state_of(breaker) is State.OPEN


def test_rate_trip_reason_and_counts(clock: FakeClock) -> None:
    breaker = make(clock, **RATE)
    seen: list[Transition] = []
    breaker.add_listener(seen.append)
    run(breaker, "SSFF")
    (trip,) = seen
    assert trip.reason == "failure rate 2/4 >= 50%"
    assert (trip.calls, trip.failures) == (4, 2)


def test_threshold_and_rate_rules_together_whichever_first(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=3, failure_rate_threshold=0.9, minimum_calls=100)
    run(breaker, "SFSFSF")
    assert state_of(breaker) is State.OPEN  # 3 failures within the window, rate far below


# -- failure rate over a count window -----------------------------------------------


def test_count_window_rate_trips(clock: FakeClock) -> None:
    breaker = make(clock, count_window=4, **RATE)
    run(breaker, "SSSSF")  # window SSSF: 1/4
    assert state_of(breaker) is State.CLOSED
    run(breaker, "SF")  # window SFSF: 2/4
    assert state_of(breaker) is State.OPEN


def test_count_window_evicts_old_failures(clock: FakeClock) -> None:
    breaker = make(clock, count_window=4, **RATE)
    run(breaker, "FFSSSS")  # the two failures left the last 4 calls
    run(breaker, "F")  # window SSSF: 1/4; 3/4 had they stayed
    assert state_of(breaker) is State.CLOSED
    assert breaker.snapshot().window_failures == 1
    assert breaker.snapshot().window_calls == 4


def test_count_window_ignores_time(clock: FakeClock) -> None:
    breaker = make(clock, count_window=4, **RATE)
    run(breaker, "FFF")
    clock.advance(7 * 24 * 3600)
    run(breaker, "F")
    assert state_of(breaker) is State.OPEN


def test_minimum_calls_above_count_window_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"minimum_calls \(5\).*count_window \(4\)"):
        BreakerPolicy(failure_threshold=None, failure_rate_threshold=0.5, minimum_calls=5, count_window=4)


def test_windows_are_cleared_when_the_breaker_recovers(clock: FakeClock) -> None:
    breaker = make(clock, success_threshold=1, **RATE)
    run(breaker, "SSFF")
    clock.advance(30)
    run(breaker, "S")  # probe closes
    assert state_of(breaker) is State.CLOSED
    assert breaker.snapshot().window_calls == 0
    run(breaker, "FFS")
    assert state_of(breaker) is State.CLOSED


# -- slow calls ---------------------------------------------------------------------------


SLOW: dict[str, Any] = {
    "failure_threshold": None,
    "slow_call_duration": 2.0,
    "slow_call_rate_threshold": 0.5,
    "minimum_calls": 4,
}


def call_taking(breaker: CircuitBreaker, clock: FakeClock, seconds: float) -> None:
    def work() -> None:
        clock.advance(seconds)

    breaker.call(work)


def test_slow_call_rate_trips(clock: FakeClock) -> None:
    breaker = make(clock, **SLOW)
    seen: list[Transition] = []
    breaker.add_listener(seen.append)
    for seconds in (0.1, 0.1, 2.5):
        call_taking(breaker, clock, seconds)
    assert state_of(breaker) is State.CLOSED
    call_taking(breaker, clock, 2.0)  # exactly slow_call_duration counts as slow
    assert state_of(breaker) is State.OPEN
    assert seen[0].reason == "slow-call rate 2/4 >= 50%"


def test_fast_calls_keep_the_slow_rate_down(clock: FakeClock) -> None:
    breaker = make(clock, **SLOW)
    for seconds in (0.1, 1.99, 0.1, 2.5, 0.1, 0.1):
        call_taking(breaker, clock, seconds)
    assert state_of(breaker) is State.CLOSED
    snap = breaker.snapshot()
    assert (snap.window_calls, snap.window_slow_calls) == (6, 1)


def test_slow_failures_count_as_slow_and_failed(clock: FakeClock) -> None:
    breaker = make(clock, **SLOW)

    def slow_failure() -> None:
        clock.advance(3)
        raise ConnectionError("timeout")

    with pytest.raises(ConnectionError):
        breaker.call(slow_failure)
    snap = breaker.snapshot()
    assert (snap.window_calls, snap.window_failures, snap.window_slow_calls) == (1, 1, 1)


@pytest.mark.parametrize(
    "fields",
    [{"slow_call_duration": 1.0}, {"slow_call_rate_threshold": 0.5}],
    ids=["duration-only", "rate-only"],
)
def test_slow_call_settings_go_together(fields: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError, match="go together"):
        BreakerPolicy.from_mapping(fields)


def test_policy_with_no_trip_rule_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="never trips"):
        BreakerPolicy(failure_threshold=None)
