"""Generation fencing: outcomes of calls admitted under an earlier state never move the current one."""

from __future__ import annotations

import pytest

from celery_breaker import CircuitOpenError, State
from celery_breaker.testing import FakeClock

from .support import HeldCall, fail, make, ok, state_of


def test_late_failure_from_before_the_trip_does_not_touch_the_open_breaker(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=2, reset_timeout=30)
    early = HeldCall(breaker)
    fail(breaker, 2)
    before = breaker.snapshot()
    clock.advance(10)
    early.fail()
    after = breaker.snapshot()
    assert after.state is State.OPEN
    assert (after.generation, after.trips, after.open_until) == (before.generation, 1, before.open_until)
    assert after.failures == 3  # counted in the metrics all the same


def test_late_failure_from_an_earlier_closed_period_cannot_trip_the_new_one(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, success_threshold=1)
    early = HeldCall(breaker)
    fail(breaker)  # trip
    clock.advance(30)
    breaker.call(ok)  # probe closes it: a new CLOSED generation
    assert state_of(breaker) is State.CLOSED
    early.fail()
    snap = breaker.snapshot()
    assert snap.state is State.CLOSED
    assert snap.window_failures == 0
    assert snap.failures == 2


def test_late_success_from_closed_does_not_count_as_a_probe(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, success_threshold=1, half_open_max_calls=1)
    early = HeldCall(breaker)
    fail(breaker)
    clock.advance(30)
    probe = HeldCall(breaker)
    assert state_of(breaker) is State.HALF_OPEN
    early.succeed()
    assert state_of(breaker) is State.HALF_OPEN
    probe.succeed()
    assert state_of(breaker) is State.CLOSED


def test_late_failure_from_closed_does_not_reopen_half_open(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)
    early = HeldCall(breaker)
    fail(breaker)
    clock.advance(30)
    HeldCall(breaker)
    early.fail()
    assert state_of(breaker) is State.HALF_OPEN


def test_stale_probe_success_cannot_close_a_later_half_open(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, success_threshold=1, half_open_max_calls=2)
    fail(breaker)
    clock.advance(30)
    stale = HeldCall(breaker)  # probe of the first HALF_OPEN
    fail(breaker)  # another probe fails: reopened
    clock.advance(60)  # (the second trip in a row: backed off to 2 x 30 s)
    current = HeldCall(breaker)  # probe of the second HALF_OPEN
    stale.succeed()
    assert state_of(breaker) is State.HALF_OPEN
    assert breaker.snapshot().probes_in_flight == 1  # the stale report freed nobody's slot
    current.succeed()
    assert state_of(breaker) is State.CLOSED


def test_stale_probe_failure_cannot_reopen_a_later_half_open(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, success_threshold=1, half_open_max_calls=2)
    fail(breaker)
    clock.advance(30)
    stale = HeldCall(breaker)
    fail(breaker)
    clock.advance(60)  # (the second trip in a row: backed off)
    HeldCall(breaker)
    stale.fail()
    assert state_of(breaker) is State.HALF_OPEN
    assert breaker.snapshot().trips == 2


def test_stale_ignored_probe_does_not_free_a_current_slot(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, half_open_max_calls=1, success_threshold=1)
    fail(breaker)
    clock.advance(30)
    stale = HeldCall(breaker)
    breaker.force_open()
    breaker.close()
    fail(breaker)
    clock.advance(30)
    HeldCall(breaker)  # takes the only slot
    stale.fail(CircuitOpenError(name="other"))  # neutral, and from an old generation
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)


def test_operator_moves_fence_calls_in_flight(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)
    early = HeldCall(breaker)
    breaker.force_open()
    breaker.close()
    early.fail()
    assert state_of(breaker) is State.CLOSED


def test_every_transition_increments_the_generation(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, success_threshold=1)
    generations = [breaker.snapshot().generation]
    fail(breaker)
    generations.append(breaker.snapshot().generation)
    clock.advance(30)
    breaker.call(ok)  # OPEN -> HALF_OPEN -> CLOSED in one call
    generations.append(breaker.snapshot().generation)
    breaker.force_open()
    generations.append(breaker.snapshot().generation)
    assert generations == [0, 1, 3, 4]
