"""Metrics accuracy: every snapshot field, epoch timestamps from the clock, and the JSON form."""

from __future__ import annotations

import dataclasses
import json

import pytest

from celery_breaker import CircuitBreaker, CircuitOpenError, State
from celery_breaker.core import BreakerSnapshot
from celery_breaker.testing import FakeClock, fresh_store

from .support import down, fail, make, ok

EPOCH = 1_700_000_000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=500.0, epoch=EPOCH)


def test_fresh_breaker_snapshot(clock: FakeClock) -> None:
    snap = make(clock, name="crm").snapshot()
    assert snap == BreakerSnapshot(
        name="crm",
        key=None,
        state=State.CLOSED,
        generation=0,
        failures=0,
        successes=0,
        rejections=0,
        deferrals=0,
        trips=0,
        last_failure=None,
        last_success=None,
        opened_at=None,
        open_until=None,
        retry_after=0.0,
        window_calls=0,
        window_failures=0,
        window_slow_calls=0,
        probes_in_flight=0,
    )
    assert snap.failure_rate is None


def test_counters_and_last_times_are_exact_epoch_seconds(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.call(ok)
    clock.advance(3)
    fail(breaker)
    failed_at = clock.time()
    clock.advance(4)
    breaker.call(ok)
    succeeded_at = clock.time()
    clock.advance(5)
    snap = breaker.snapshot()
    assert (snap.successes, snap.failures) == (2, 1)
    assert snap.last_failure == failed_at == EPOCH + 3
    assert snap.last_success == succeeded_at == EPOCH + 7
    assert snap.window_failures == 1


def test_trip_sets_opened_at_open_until_trips_and_generation(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=2, reset_timeout=30)
    fail(breaker, 2)
    opened = clock.time()
    clock.advance(12)
    snap = breaker.snapshot()
    assert snap.state is State.OPEN
    assert snap.opened_at == opened
    assert snap.open_until == opened + 30
    assert snap.retry_after == pytest.approx(18.0)
    assert (snap.trips, snap.generation) == (1, 1)
    assert snap.window_failures == 0  # the window restarts at the trip


def test_rejections_are_counted_in_every_rejecting_state(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, half_open_max_calls=1, success_threshold=1)
    fail(breaker)
    for _ in range(3):
        with pytest.raises(CircuitOpenError):
            breaker.call(ok)
    clock.advance(30)
    with breaker:  # the only probe
        with pytest.raises(CircuitOpenError):
            breaker.call(ok)
        assert breaker.snapshot().probes_in_flight == 1
    breaker.force_open()
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    snap = breaker.snapshot()
    assert snap.rejections == 5
    assert snap.successes == 1
    assert snap.failures == 1


def test_rejected_calls_are_neither_successes_nor_failures(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)
    fail(breaker)
    for _ in range(10):
        with pytest.raises(CircuitOpenError):
            breaker.call(down)
    snap = breaker.snapshot()
    assert (snap.failures, snap.successes, snap.rejections) == (1, 0, 10)


def test_ignored_outcomes_are_not_counted(clock: FakeClock) -> None:
    breaker = make(clock, ignore_exceptions=(KeyError,))

    def missing() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        breaker.call(missing)
    snap = breaker.snapshot()
    assert (snap.failures, snap.successes, snap.last_failure, snap.last_success) == (0, 0, None, None)


def test_window_fields_and_failure_rate_under_a_rate_policy(clock: FakeClock) -> None:
    breaker = make(
        clock,
        failure_threshold=None,
        failure_rate_threshold=0.9,
        minimum_calls=10,
        slow_call_duration=1.0,
        slow_call_rate_threshold=0.9,
    )

    def slow() -> None:
        clock.advance(1.5)

    for _ in range(3):
        breaker.call(ok)
    breaker.call(slow)
    fail(breaker)
    snap = breaker.snapshot()
    assert (snap.window_calls, snap.window_failures, snap.window_slow_calls) == (5, 1, 1)
    assert snap.failure_rate == pytest.approx(0.2)


def test_failure_rate_is_none_under_a_threshold_only_policy(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 2)
    snap = breaker.snapshot()
    assert snap.window_failures == 2
    assert snap.window_calls == 0
    assert snap.failure_rate is None


def test_deferrals_are_counted(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.note_deferral()
    breaker.note_deferral()
    assert breaker.snapshot().deferrals == 2


def test_as_dict_is_json_ready(clock: FakeClock) -> None:
    breaker = CircuitBreaker("crm", storage=fresh_store(), clock=clock, key="t1")
    fail(breaker, 5)
    data = breaker.snapshot().as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["state"] == "open"
    assert type(data["state"]) is str
    assert data["key"] == "t1"
    assert data["failure_rate"] is None
    assert set(data) == {f.name for f in dataclasses.fields(BreakerSnapshot)} | {"failure_rate"}


def test_snapshot_is_frozen(clock: FakeClock) -> None:
    snap = make(clock).snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.failures = 3  # type: ignore[misc]


def test_store_snapshots_list_every_breaker(clock: FakeClock) -> None:
    store = fresh_store()
    a = CircuitBreaker("a", storage=store, clock=clock)
    CircuitBreaker("b", storage=store, clock=clock, key="k")
    a.call(ok)
    by_label = {(s.name, s.key): s for s in store.snapshots(clock)}
    assert set(by_label) == {("a", None), ("b", "k")}
    assert by_label[("a", None)].successes == 1


def test_many_calls_are_counted_exactly(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=10**6)
    for i in range(3000):
        if i % 3 == 0:
            fail(breaker)
        else:
            breaker.call(ok)
    snap = breaker.snapshot()
    assert (snap.failures, snap.successes) == (1000, 2000)
