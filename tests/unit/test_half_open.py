"""HALF_OPEN: a bounded number of probes, slots freed by hung or neutral probes, closing and reopening."""

from __future__ import annotations

from typing import Any

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, ConfigurationError, State
from celery_breaker.testing import FakeClock, fresh_store

from .support import HeldCall, down, ok, state_of


def half_open(clock: FakeClock, **policy: Any) -> CircuitBreaker:
    """A breaker whose next call is its first probe."""
    breaker = CircuitBreaker("svc", BreakerPolicy(failure_threshold=1, **policy), storage=fresh_store(), clock=clock)
    with pytest.raises(ConnectionError):
        breaker.call(down)
    clock.advance(breaker.policy.reset_timeout)
    return breaker


def test_at_most_half_open_max_calls_probes_are_admitted(clock: FakeClock) -> None:
    breaker = half_open(clock, half_open_max_calls=3)
    probes = [HeldCall(breaker) for _ in range(3)]
    assert state_of(breaker) is State.HALF_OPEN
    for _ in range(5):
        with pytest.raises(CircuitOpenError) as info:
            breaker.call(ok)
        assert info.value.state is State.HALF_OPEN
    snap = breaker.snapshot()
    assert snap.probes_in_flight == 3
    assert snap.rejections == 5
    assert len(probes) == 3


def test_reported_successes_keep_their_slot_until_the_breaker_closes(clock: FakeClock) -> None:
    breaker = half_open(clock, half_open_max_calls=3, success_threshold=3)
    first, second, _third = (HeldCall(breaker) for _ in range(3))
    first.succeed()
    second.succeed()
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)  # 2 successes + 1 in flight fill the 3 slots
    assert state_of(breaker) is State.HALF_OPEN


def test_success_threshold_successes_close(clock: FakeClock) -> None:
    breaker = half_open(clock, half_open_max_calls=3, success_threshold=2)
    first, second, third = (HeldCall(breaker) for _ in range(3))
    first.succeed()
    assert state_of(breaker) is State.HALF_OPEN
    second.succeed()
    assert state_of(breaker) is State.CLOSED
    third.succeed()  # a probe from the HALF_OPEN generation reporting late
    assert state_of(breaker) is State.CLOSED


def test_one_failed_probe_reopens_despite_successes(clock: FakeClock) -> None:
    breaker = half_open(clock, half_open_max_calls=3, success_threshold=3)
    first, second, third = (HeldCall(breaker) for _ in range(3))
    first.succeed()
    second.fail()
    assert state_of(breaker) is State.OPEN
    third.succeed()  # stale: cannot close the reopened breaker
    assert state_of(breaker) is State.OPEN


def test_hung_probe_frees_its_slot_after_half_open_max_wait(clock: FakeClock) -> None:
    breaker = half_open(clock, half_open_max_calls=1, success_threshold=1, half_open_max_wait=10)
    HeldCall(breaker)  # never reports
    clock.advance(4)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    assert info.value.retry_after == pytest.approx(6.0)
    assert breaker.snapshot().retry_after == pytest.approx(6.0)
    clock.advance(5.999)
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    clock.advance(0.001)
    assert breaker.call(ok) == "ok"  # the lease expired: a new probe runs and closes
    assert state_of(breaker) is State.CLOSED


def test_hung_probe_no_longer_counts_in_flight(clock: FakeClock) -> None:
    breaker = half_open(clock, half_open_max_calls=2, half_open_max_wait=10)
    HeldCall(breaker)
    HeldCall(breaker)
    assert breaker.snapshot().probes_in_flight == 2
    clock.advance(10)
    assert breaker.snapshot().probes_in_flight == 0
    assert breaker.snapshot().retry_after == 0.0


def test_retry_after_while_full_is_capped_by_reset_timeout(clock: FakeClock) -> None:
    breaker = half_open(clock, half_open_max_calls=1, success_threshold=1, half_open_max_wait=600, reset_timeout=30)
    HeldCall(breaker)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    assert info.value.retry_after == 30.0


def test_ignored_outcome_frees_its_slot_and_counts_for_nothing(clock: FakeClock) -> None:
    breaker = half_open(clock, half_open_max_calls=1, success_threshold=1, ignore_exceptions=(KeyError,))

    def lookup() -> None:
        raise KeyError("not a downstream problem")

    with pytest.raises(KeyError):
        breaker.call(lookup)
    assert state_of(breaker) is State.HALF_OPEN  # neither closed nor reopened
    assert breaker.snapshot().probes_in_flight == 0
    assert breaker.call(ok) == "ok"  # the slot was free
    assert state_of(breaker) is State.CLOSED


def test_open_error_from_a_nested_breaker_frees_the_probe_slot(clock: FakeClock) -> None:
    breaker = half_open(clock, half_open_max_calls=1, success_threshold=1)

    def nested() -> None:
        raise CircuitOpenError(name="inner")

    with pytest.raises(CircuitOpenError, match="inner"):
        breaker.call(nested)
    assert state_of(breaker) is State.HALF_OPEN
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.CLOSED


def test_free_slots_mean_retry_after_zero(clock: FakeClock) -> None:
    breaker = half_open(clock, half_open_max_calls=3)
    HeldCall(breaker)
    snap = breaker.snapshot()
    assert snap.state is State.HALF_OPEN
    assert snap.retry_after == 0.0
    assert snap.probes_in_flight == 1


def test_probes_are_fresh_after_reopening(clock: FakeClock) -> None:
    breaker = half_open(clock, half_open_max_calls=2, success_threshold=2, reset_timeout=30)
    first = HeldCall(breaker)
    first.succeed()
    with pytest.raises(ConnectionError):
        breaker.call(down)
    clock.advance(60)  # (the second trip in a row: backed off)
    second = HeldCall(breaker)
    second.succeed()
    assert state_of(breaker) is State.HALF_OPEN  # the success before the reopening is forgotten
    breaker.call(ok)
    assert state_of(breaker) is State.CLOSED


def test_success_threshold_above_half_open_max_calls_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"success_threshold \(4\).*half_open_max_calls \(3\)"):
        BreakerPolicy(success_threshold=4, half_open_max_calls=3)


def test_success_threshold_equal_to_half_open_max_calls_is_allowed(clock: FakeClock) -> None:
    breaker = half_open(clock, half_open_max_calls=2, success_threshold=2)
    breaker.call(ok)
    breaker.call(ok)
    assert state_of(breaker) is State.CLOSED
