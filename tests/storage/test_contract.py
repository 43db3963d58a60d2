"""The store contract: the same behaviour, test for test, over every store (memory and Redis)."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, RetryAfter, State, TooManyRequests
from celery_breaker.core import BreakerSnapshot, Probe, Transition
from celery_breaker.core.policy import LARGEST_COUNT, LONGEST_SECONDS
from celery_breaker.names import MAX_KEY_LENGTH
from celery_breaker.storage import Store
from celery_breaker.storage.redis import RedisStore
from celery_breaker.testing import FakeClock

from ..unit.support import HeldCall, fail, ok, state_of
from .conftest import IDLE_MAX_BREAKERS, IDLE_TTL, expire_now, following, key_ttls


def make(store: Store, clock: FakeClock, *, name: str = "svc", **policy: Any) -> CircuitBreaker:
    return CircuitBreaker(name, BreakerPolicy(**policy), storage=store, clock=clock)


def recorder(breaker: CircuitBreaker) -> list[Transition]:
    seen: list[Transition] = []
    breaker.add_listener(seen.append)
    return seen


def half_open(store: Store, clock: FakeClock, **policy: Any) -> CircuitBreaker:
    """A breaker whose next call is its first probe."""
    breaker = make(store, clock, failure_threshold=1, **policy)
    fail(breaker)
    clock.advance(breaker.policy.reset_timeout)
    return breaker


def rejected(breaker: CircuitBreaker) -> CircuitOpenError:
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    return info.value


# -- failure threshold -----------------------------------------------------------


def test_threshold_failures_within_the_window_trip(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock, failure_threshold=3, window=10)
    seen = recorder(breaker)
    fail(breaker, 2)
    clock.advance(5)
    fail(breaker)
    assert state_of(breaker) is State.OPEN
    [trip] = seen
    assert (trip.source, trip.target, trip.trips, trip.failures) == (State.CLOSED, State.OPEN, 1, 3)
    assert trip.reason == "3 failures within 10 s"
    assert trip.at == pytest.approx(clock.time())
    assert trip.open_until == pytest.approx(clock.time() + 30)


def test_failures_spread_wider_than_the_window_do_not_trip(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock, failure_threshold=3, window=10)
    for _ in range(2):
        fail(breaker)
        clock.advance(6)
    fail(breaker)  # failures at 0, 6 and 12 s
    assert state_of(breaker) is State.CLOSED
    clock.advance(1)
    fail(breaker)  # 6, 12 and 13 s: within 10 s
    assert state_of(breaker) is State.OPEN


def test_successes_do_not_reset_the_failure_count(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock, failure_threshold=2, window=10)
    fail(breaker)
    assert breaker.call(ok) == "ok"
    fail(breaker)
    assert state_of(breaker) is State.OPEN


# -- consecutive failures ------------------------------------------------------------


def consecutive(store: Store, clock: FakeClock, threshold: int, **policy: Any) -> CircuitBreaker:
    return make(store, clock, failure_threshold=None, consecutive_failures=threshold, **policy)


def test_consecutive_failures_trip_after_exactly_n_in_a_row(store: Store, clock: FakeClock) -> None:
    breaker = consecutive(store, clock, 3)
    seen = recorder(breaker)
    fail(breaker, 2)
    assert state_of(breaker) is State.CLOSED
    fail(breaker)
    assert state_of(breaker) is State.OPEN
    [trip] = seen
    assert (trip.source, trip.target, trip.reason) == (State.CLOSED, State.OPEN, "3 consecutive failures")
    assert (trip.failures, trip.calls, trip.trips) == (3, 0, 1)


def test_a_success_in_between_ends_the_run(store: Store, clock: FakeClock) -> None:
    breaker = consecutive(store, clock, 3)
    fail(breaker, 2)
    assert breaker.call(ok) == "ok"
    fail(breaker, 2)
    assert state_of(breaker) is State.CLOSED
    fail(breaker)
    assert state_of(breaker) is State.OPEN


def test_an_ignored_outcome_leaves_the_run_as_it_is(store: Store, clock: FakeClock) -> None:
    breaker = consecutive(store, clock, 3, ignore_exceptions=(KeyError,))
    fail(breaker, 2)
    with pytest.raises(KeyError):
        breaker.call(raise_, KeyError("neutral"))
    assert breaker.snapshot().window_failures == 2
    fail(breaker)
    assert state_of(breaker) is State.OPEN


def test_snapshot_window_failures_is_the_run(store: Store, clock: FakeClock) -> None:
    breaker = consecutive(store, clock, 5)
    fail(breaker, 3)
    snap = breaker.snapshot()
    assert (snap.window_failures, snap.window_calls, snap.window_slow_calls, snap.failures) == (3, 0, 0, 3)
    assert breaker.call(ok) == "ok"
    snap = breaker.snapshot()
    assert (snap.window_failures, snap.failures, snap.successes) == (0, 3, 1)


def test_a_failed_probe_reopens_a_consecutive_failures_breaker(store: Store, clock: FakeClock) -> None:
    breaker = consecutive(store, clock, 2, reset_timeout=10, half_open_max_calls=1, success_threshold=1)
    seen = recorder(breaker)
    fail(breaker, 2)
    clock.advance(10)
    fail(breaker)  # the probe
    assert state_of(breaker) is State.OPEN
    assert seen[-1].reason == "probe failed"
    assert rejected(breaker).retry_after == pytest.approx(20)  # the streak backs off as ever
    clock.advance(20)
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.CLOSED
    fail(breaker)  # closing started a new run
    assert state_of(breaker) is State.CLOSED
    fail(breaker)
    assert state_of(breaker) is State.OPEN
    assert breaker.snapshot().trips == 3


def test_a_success_counted_locally_ends_the_run_before_the_next_failure(store: Store, clock: FakeClock) -> None:
    # On Redis a CLOSED success is counted in this process and sent with its next script
    # call (or by the flusher, within a second): the script applies it before the failure.
    breaker = consecutive(store, clock, 2)
    fail(breaker)
    assert breaker.call(ok) == "ok"
    fail(breaker)
    assert state_of(breaker) is State.CLOSED
    assert breaker.snapshot().window_failures == 1


def test_reset_ends_the_run_and_adopts_the_callers_threshold(store: Store, clock: FakeClock) -> None:
    first = consecutive(store, clock, 3)
    fail(first, 2)
    second = consecutive(store, clock, 2)
    second.reset()
    fail(second)
    assert state_of(second) is State.CLOSED  # the run started over
    fail(second)
    assert state_of(second) is State.OPEN
    assert second.snapshot().trips == 1


def test_consecutive_failures_beside_failures_within_a_window(store: Store, clock: FakeClock) -> None:
    # Both rules see every outcome; the run is what a snapshot shows (the later rule).
    breaker = make(store, clock, failure_threshold=3, window=10, consecutive_failures=2)
    seen = recorder(breaker)
    fail(breaker)
    assert breaker.call(ok) == "ok"
    fail(breaker)
    assert breaker.snapshot().window_failures == 1
    fail(breaker)  # three within 10 s, and two in a row: the first rule names the trip
    assert seen[-1].reason == "3 failures within 10 s"


def test_consecutive_failures_beside_a_failure_rate(store: Store, clock: FakeClock) -> None:
    breaker = make(
        store, clock, failure_threshold=None, consecutive_failures=3, failure_rate_threshold=0.9,
        count_window=10, minimum_calls=10,
    )  # fmt: skip
    seen = recorder(breaker)
    for _ in range(4):
        assert breaker.call(ok) == "ok"
    fail(breaker, 3)
    assert state_of(breaker) is State.OPEN
    assert seen[-1].reason == "3 consecutive failures"
    assert (seen[-1].failures, seen[-1].calls) == (3, 7)  # the rate window's counts are shown


# -- open, half-open, closed -------------------------------------------------------


def test_open_rejects_until_reset_timeout_then_probes_close_it(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock, failure_threshold=1, reset_timeout=30)
    fail(breaker)
    error = rejected(breaker)
    assert error.state is State.OPEN
    assert error.retry_after == pytest.approx(30)
    clock.advance(29.5)
    assert rejected(breaker).retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.HALF_OPEN
    assert breaker.call(ok) == "ok"  # success_threshold defaults to 2
    assert state_of(breaker) is State.CLOSED


def test_half_open_admits_at_most_half_open_max_calls_probes(store: Store, clock: FakeClock) -> None:
    breaker = half_open(store, clock, half_open_max_calls=2)
    probes = [HeldCall(breaker) for _ in range(2)]
    for _ in range(3):
        assert rejected(breaker).state is State.HALF_OPEN
    snap = breaker.snapshot()
    assert (snap.state, snap.probes_in_flight) == (State.HALF_OPEN, 2)
    probes[0].succeed()
    probes[1].succeed()
    assert state_of(breaker) is State.CLOSED


def test_a_hung_probe_frees_its_slot_after_half_open_max_wait(store: Store, clock: FakeClock) -> None:
    breaker = half_open(store, clock, half_open_max_calls=1, success_threshold=1, half_open_max_wait=10)
    HeldCall(breaker)  # never reports
    clock.advance(4)
    assert rejected(breaker).retry_after == pytest.approx(6)
    assert breaker.snapshot().retry_after == pytest.approx(6)
    clock.advance(6)
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.CLOSED


def test_a_probe_slot_won_for_a_shorter_lease_is_freed_after_it(store: Store, clock: FakeClock) -> None:
    # A health check's slot is leased for its timeout and a margin (``lease_for``), not
    # half_open_max_wait: the check of a worker killed mid-check held every other off 60 s.
    breaker = half_open(store, clock, half_open_max_calls=1, success_threshold=1, half_open_max_wait=30)
    cell = breaker._cell
    ticket, _ = cell.acquire(breaker.policy, clock.monotonic(), 7.0)  # (never reports: its worker was killed)
    assert isinstance(ticket, Probe)
    clock.advance(5)
    assert rejected(breaker).retry_after == pytest.approx(2)
    clock.advance(2)
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.CLOSED
    # A lease_for past half_open_max_wait (or none that makes sense) is held to it.
    for asked in (90.0, 0.0, -1.0):
        breaker.force_open()
        breaker.reset()
        fail(breaker)
        clock.advance(breaker.policy.reset_timeout)
        cell = breaker._cell
        ticket, _ = cell.acquire(breaker.policy, clock.monotonic(), asked)
        assert isinstance(ticket, Probe)
        clock.advance(29)
        assert rejected(breaker).retry_after == pytest.approx(1), asked
        clock.advance(1)


def test_an_ignored_outcome_frees_a_probe_slot(store: Store, clock: FakeClock) -> None:
    breaker = half_open(store, clock, half_open_max_calls=1, success_threshold=1, ignore_exceptions=(KeyError,))
    HeldCall(breaker).fail(KeyError("neutral"))
    assert state_of(breaker) is State.HALF_OPEN
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.CLOSED


def test_success_threshold_successes_close(store: Store, clock: FakeClock) -> None:
    breaker = half_open(store, clock, half_open_max_calls=3, success_threshold=3)
    seen = recorder(breaker)
    first, second, third = (HeldCall(breaker) for _ in range(3))
    first.succeed()
    second.succeed()
    assert state_of(breaker) is State.HALF_OPEN
    third.succeed()
    assert state_of(breaker) is State.CLOSED
    assert [(t.target, t.reason) for t in seen] == [
        (State.HALF_OPEN, "open duration over"),
        (State.CLOSED, "3 probes succeeded"),
    ]


def test_a_failed_probe_reopens_and_late_probes_change_nothing(store: Store, clock: FakeClock) -> None:
    breaker = half_open(store, clock, half_open_max_calls=3, success_threshold=3)
    first, second, third = (HeldCall(breaker) for _ in range(3))
    first.succeed()
    second.fail()
    assert state_of(breaker) is State.OPEN
    third.succeed()  # from the previous half-open period
    assert state_of(breaker) is State.OPEN
    assert breaker.snapshot().trips == 2


def test_a_slow_probe_reopens(store: Store, clock: FakeClock) -> None:
    breaker = half_open(store, clock, slow_call_duration=2, slow_call_rate_threshold=1.0)
    seen = recorder(breaker)
    probe = HeldCall(breaker)
    clock.advance(2)
    probe.succeed()
    assert state_of(breaker) is State.OPEN
    assert seen[-1].reason == "slow probe"


def test_an_outcome_from_an_earlier_generation_is_fenced(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock, failure_threshold=1, half_open_max_calls=1, success_threshold=1)
    late = HeldCall(breaker)  # admitted while CLOSED
    fail(breaker)
    clock.advance(30)
    breaker.call(ok)
    assert state_of(breaker) is State.CLOSED
    generation = breaker.snapshot().generation
    late.fail()  # counted, but cannot trip the breaker it did not run under
    snap = breaker.snapshot()
    assert (snap.state, snap.generation, snap.failures) == (State.CLOSED, generation, 2)


# -- open durations: backoff, jitter, Retry-After -------------------------------------


def raise_(exc: BaseException) -> None:
    raise exc


def test_consecutive_trips_back_off_up_to_the_cap_and_closing_starts_over(store: Store, clock: FakeClock) -> None:
    breaker = make(
        store, clock, failure_threshold=1, reset_timeout=10, max_reset_timeout=50,
        half_open_max_calls=1, success_threshold=1,
    )  # fmt: skip
    seen = recorder(breaker)
    fail(breaker)
    durations = []
    for _ in range(4):
        durations.append(rejected(breaker).retry_after)
        snap = breaker.snapshot()
        assert snap.streak == len(durations)
        assert snap.open_duration == pytest.approx(durations[-1])
        clock.advance(durations[-1] or 0)
        fail(breaker)  # the probe fails
    assert durations == [pytest.approx(d) for d in (10, 20, 40, 50)]
    assert seen[-1].open_until == pytest.approx(clock.time() + 50)
    clock.advance(50)
    assert breaker.call(ok) == "ok"
    snap = breaker.snapshot()
    assert (snap.state, snap.streak, snap.open_duration) == (State.CLOSED, 0, None)
    fail(breaker)
    assert rejected(breaker).retry_after == pytest.approx(10)


def test_jitter_keeps_open_durations_within_bounds(store: Store, clock: FakeClock) -> None:
    durations = []
    for i in range(40):
        breaker = make(store, clock, name=f"j{i}", failure_threshold=1, reset_timeout=100, reset_jitter=0.5)
        fail(breaker)
        retry_after = rejected(breaker).retry_after
        assert retry_after is not None
        durations.append(retry_after)
    assert all(50 <= d <= 150 for d in durations)
    # 40 uniform draws all on one side of 100 s: probability 2 * 2^-40.
    assert min(durations) < 100 < max(durations)


def test_a_retry_after_opens_at_once_for_that_long(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock, failure_threshold=5, reset_timeout=30)
    seen = recorder(breaker)
    with pytest.raises(RetryAfter):
        breaker.call(raise_, RetryAfter(90))
    assert state_of(breaker) is State.OPEN
    assert seen[-1].reason == "retry-after 90 s"
    assert rejected(breaker).retry_after == pytest.approx(90)
    assert breaker.snapshot().open_duration == pytest.approx(90)


def test_a_huge_retry_after_is_capped(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock, reset_timeout=30)
    seen = recorder(breaker)
    with pytest.raises(RetryAfter):
        breaker.call(raise_, RetryAfter(1e9))
    assert rejected(breaker).retry_after == pytest.approx(300)
    assert seen[-1].reason == "retry-after 1e+09 s (capped at 300 s)"


@pytest.mark.parametrize("rule", ["failures", "rates"])
def test_the_largest_policy_values_trip_open_and_close(store: Store, clock: FakeClock, rule: str) -> None:
    # Every bound BreakerPolicy allows (LARGEST_COUNT, LONGEST_SECONDS) must be readable by
    # every store: a value the Redis scripts could not parse took the whole store for down.
    trips: dict[str, Any] = (
        {"failure_threshold": LARGEST_COUNT, "window": LONGEST_SECONDS, "consecutive_failures": 1}
        if rule == "failures"
        else {"count_window": LARGEST_COUNT, "failure_rate_threshold": 1.0, "minimum_calls": 1}
    )
    breaker = make(
        store, clock, reset_timeout=LONGEST_SECONDS, half_open_max_calls=LARGEST_COUNT,
        success_threshold=1, half_open_max_wait=LONGEST_SECONDS, **trips,
    )  # fmt: skip
    breaker.call(ok)
    if rule == "rates":
        breaker = make(
            store, clock, name="svc2", reset_timeout=LONGEST_SECONDS, half_open_max_calls=LARGEST_COUNT,
            success_threshold=1, half_open_max_wait=LONGEST_SECONDS, **trips,
        )  # fmt: skip
    fail(breaker)
    assert rejected(breaker).retry_after == pytest.approx(LONGEST_SECONDS)
    clock.advance(LONGEST_SECONDS)
    breaker.call(ok)
    assert state_of(breaker) is State.CLOSED


def test_a_time_window_puts_an_outcome_in_the_same_bucket_on_every_store(store: Store, clock: FakeClock) -> None:
    # A width not exact in binary (1 s / 20 buckets = 0.05): at 1000.0, 1000.0 // 0.05 is
    # 19999 but floor(1000.0 / 0.05) is 20000. Python floored one way and the Redis scripts
    # the other, so these two failures tripped Redis and not memory.
    clock.set(1000.0)
    breaker = make(store, clock, failure_threshold=None, failure_rate_threshold=0.5, minimum_calls=2, window=1.0)
    fail(breaker)
    clock.set(1000.96)
    fail(breaker)
    assert state_of(breaker) is State.OPEN  # both in the window's last 20 buckets (20000, 20019)


@pytest.mark.parametrize(
    ("key", "other"),
    [
        ("x" * 5_000_000, "x" * 4_999_999 + "y"),  # (the same first characters)
        ("caf\udce9", "caf\udce8"),  # (bytes decoded with surrogateescape: no UTF-8 for Redis)
        ("t" * MAX_KEY_LENGTH, "t" * (MAX_KEY_LENGTH - 1)),  # (kept as it is)
    ],
    ids=["huge", "lone-surrogate", "longest-kept"],
)
def test_any_key_a_task_makes_is_a_breaker_of_its_own_on_every_store(
    store: Store, clock: FakeClock, key: str, other: str
) -> None:
    # A task's breaker_key may make any text a key: a 5,000,000-character key flooded
    # `status` (90 MB) and the metrics, and no command line could name it; a lone
    # surrogate failed every task on Redis with a bare UnicodeEncodeError.
    breaker = CircuitBreaker("svc", BreakerPolicy(failure_threshold=1), storage=store, clock=clock, key=key)
    assert breaker.key is not None
    assert len(breaker.key) <= MAX_KEY_LENGTH
    assert (breaker.key == key) is (len(key) <= MAX_KEY_LENGTH and key.isascii())
    fail(breaker)
    again = CircuitBreaker("svc", BreakerPolicy(failure_threshold=1), storage=store, clock=clock, key=key)
    assert state_of(again) is State.OPEN  # the same key: the same breaker
    elsewhere = CircuitBreaker("svc", BreakerPolicy(failure_threshold=1), storage=store, clock=clock, key=other)
    assert elsewhere.call(ok) == "ok"  # another key: another breaker
    assert {s.key for s in store.snapshots(clock)} >= {breaker.key, elsewhere.key}


def test_find_reads_one_breaker_as_the_listing_shows_it_and_creates_none(store: Store, clock: FakeClock) -> None:
    # (What an operator's action looks up, instead of listing every breaker: seconds with
    # 40,000 per-key breakers in Redis.)
    tenant = CircuitBreaker("svc", BreakerPolicy(failure_threshold=1), storage=store, clock=clock, key="t:{1}*")
    fail(tenant)
    keyless = make(store, clock)
    keyless.call(ok)
    store.flush()
    listed = {(s.name, s.key): s for s in store.snapshots(clock)}
    for name, key in (("svc", "t:{1}*"), ("svc", None)):
        found = store.find(name, key, clock)
        assert found is not None
        assert found == listed[(name, key)]
    assert listed[("svc", None)].successes == 1
    assert store.find("svc", "t:{1}", clock) is None  # (a key that looks like the other one)
    assert store.find("svc", "t:*", clock) is None  # (no pattern)
    assert store.find("other", None, clock) is None
    assert {(s.name, s.key) for s in store.snapshots(clock)} == set(listed)  # nothing created


def test_a_listing_picks_breakers_by_name_and_key_before_reading_them(store: Store, clock: FakeClock) -> None:
    # (``inspect breakers 'partner*'`` read every breaker of the store for its one row.)
    for key in ("t:{1}*", "tenant 2", None):
        CircuitBreaker("svc", BreakerPolicy(), storage=store, clock=clock, key=key).call(ok)
    make(store, clock, name="partner").call(ok)
    store.flush()
    asked: list[tuple[str, str | None]] = []

    def partner_or_a_tenant(name: str, key: str | None) -> bool:
        asked.append((name, key))
        return name == "partner" or (key or "").startswith("t")

    picked = store.snapshots(clock, partner_or_a_tenant)
    assert sorted((s.name, s.key or "") for s in picked) == [("partner", ""), ("svc", "t:{1}*"), ("svc", "tenant 2")]
    assert sorted(asked, key=str) == sorted(
        [("svc", "t:{1}*"), ("svc", "tenant 2"), ("svc", None), ("partner", None)], key=str
    )
    listed = {(s.name, s.key): s for s in store.snapshots(clock)}
    assert all(s == listed[(s.name, s.key)] for s in picked)  # (read as the whole listing reads them)


def test_a_probe_failing_with_a_retry_after_reopens_for_that_long(store: Store, clock: FakeClock) -> None:
    breaker = half_open(store, clock, reset_timeout=30, half_open_max_calls=1)
    seen = recorder(breaker)
    with pytest.raises(RetryAfter):
        breaker.call(raise_, RetryAfter(5))
    assert seen[-1].reason == "probe failed, retry-after 5 s"
    assert rejected(breaker).retry_after == pytest.approx(5)
    clock.advance(5)
    fail(breaker)  # no hint: the streak (now 3) backs off
    assert rejected(breaker).retry_after == pytest.approx(120)


def test_a_stale_retry_after_moves_nothing(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock, failure_threshold=3)
    late = HeldCall(breaker)
    breaker.force_open()
    breaker.close()
    late.fail(RetryAfter(60))
    assert state_of(breaker) is State.CLOSED


# -- refusals: a 429 met by a task released from the parking -----------------------


def released_call(breaker: CircuitBreaker, exc: BaseException) -> None:
    """``exc`` raised by a run that is a task released from the parking (as BreakerTask runs it)."""
    run = breaker.begin_run(lambda e: e)
    run.released = True
    with run:
        with pytest.raises(type(exc)):
            breaker.call(raise_, exc)
        run.settle(None)


def test_a_refusal_of_a_released_task_opens_nothing_and_no_rule_sees_it(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock, failure_threshold=2, reset_timeout=30)
    seen = recorder(breaker)
    for _ in range(5):
        released_call(breaker, TooManyRequests(2))
    assert state_of(breaker) is State.CLOSED
    assert seen == []
    assert breaker.snapshot().failures == 5  # counted, as failed calls
    fail(breaker)  # the consecutive-failures run did not grow: one more is not a trip
    assert state_of(breaker) is State.CLOSED


def test_a_429_met_by_a_task_that_was_never_deferred_opens_the_breaker(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock, failure_threshold=5, reset_timeout=30)
    with pytest.raises(TooManyRequests):
        breaker.call(raise_, TooManyRequests(7))
    assert state_of(breaker) is State.OPEN
    assert rejected(breaker).retry_after == pytest.approx(7)


def test_a_fresh_run_refused_with_nothing_parked_opens_the_breaker_and_is_told_no_wait(
    store: Store, clock: FakeClock
) -> None:
    """A run that was not released (a fresh task's) meets a 429 while nothing is parked
    (the memory store never parks): the Retry-After opens the breaker, as before, and the
    run is not told to wait as a refused one (it waits, if at all, because the breaker is
    open). With tasks parked, a Redis store counts it as a refusal:
    ``tests/storage/test_pacing.py``."""
    breaker = make(store, clock, failure_threshold=5, reset_timeout=30)
    run = breaker.begin_run(lambda e: e)
    with run:
        with pytest.raises(TooManyRequests):
            breaker.call(raise_, TooManyRequests(7))
        run.settle(None)
    assert run.refused_for is None
    assert state_of(breaker) is State.OPEN
    assert rejected(breaker).retry_after == pytest.approx(7)


def test_a_probe_refused_reopens_as_a_retry_after_does(store: Store, clock: FakeClock) -> None:
    breaker = half_open(store, clock, reset_timeout=30, half_open_max_calls=1)
    seen = recorder(breaker)
    released_call(breaker, TooManyRequests(5))
    assert seen[-1].reason == "probe failed, retry-after 5 s"
    assert rejected(breaker).retry_after == pytest.approx(5)


def test_a_retry_after_that_is_not_a_refusal_still_opens_for_a_released_task(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock, failure_threshold=5)
    released_call(breaker, RetryAfter(9))  # (a 503's Retry-After says "down", not "too fast")
    assert state_of(breaker) is State.OPEN
    assert rejected(breaker).retry_after == pytest.approx(9)


# -- rate rules --------------------------------------------------------------------


def rate_breaker(store: Store, clock: FakeClock, **policy: Any) -> CircuitBreaker:
    return make(store, clock, failure_threshold=None, **policy)


def test_failure_rate_over_a_count_window_evicts_the_oldest(store: Store, clock: FakeClock) -> None:
    breaker = rate_breaker(store, clock, failure_rate_threshold=0.5, count_window=4, minimum_calls=4)
    seen = recorder(breaker)
    fail(breaker)
    for _ in range(4):
        breaker.call(ok)  # the last of these evicts the failure
    assert breaker.snapshot().window_failures == 0
    fail(breaker)
    assert state_of(breaker) is State.CLOSED
    fail(breaker)
    assert state_of(breaker) is State.OPEN
    assert seen[-1].reason == "failure rate 2/4 >= 50%"
    assert (seen[-1].calls, seen[-1].failures) == (4, 2)


def test_failure_rate_needs_minimum_calls(store: Store, clock: FakeClock) -> None:
    breaker = rate_breaker(store, clock, failure_rate_threshold=0.5, minimum_calls=3)
    fail(breaker, 2)
    assert state_of(breaker) is State.CLOSED
    fail(breaker)
    assert state_of(breaker) is State.OPEN


def test_failure_rate_over_a_time_window_forgets_old_calls(store: Store, clock: FakeClock) -> None:
    breaker = rate_breaker(store, clock, failure_rate_threshold=0.6, window=10, minimum_calls=2)
    fail(breaker)
    clock.advance(11)  # the failure leaves the window
    breaker.call(ok)
    fail(breaker)  # 1/2 < 60%
    assert state_of(breaker) is State.CLOSED
    assert breaker.snapshot().window_calls == 2


def test_failure_rate_over_a_time_window_trips(store: Store, clock: FakeClock) -> None:
    breaker = rate_breaker(store, clock, failure_rate_threshold=0.6, window=10, minimum_calls=2)
    fail(breaker)
    clock.advance(5)
    breaker.call(ok)
    fail(breaker)  # 2/3 >= 60%
    assert state_of(breaker) is State.OPEN


@pytest.mark.parametrize(("threshold", "shown"), [(0.5, "50%"), (0.001, "0.1%")])
def test_slow_call_rate_trips(store: Store, clock: FakeClock, threshold: float, shown: str) -> None:
    """(0.001: a trip's reason rounded the threshold to whole percents, ">= 0%".)"""
    breaker = rate_breaker(store, clock, slow_call_duration=1, slow_call_rate_threshold=threshold, count_window=2)
    seen = recorder(breaker)
    breaker.call(ok)
    slow = HeldCall(breaker)
    clock.advance(1)
    slow.succeed()
    assert state_of(breaker) is State.OPEN
    assert seen[-1].reason == f"slow-call rate 1/2 >= {shown}"


def test_a_fractional_rate_threshold_is_named_as_it_was_set(store: Store, clock: FakeClock) -> None:
    """A trip's reason rounded the threshold to whole percents: 0.125 read ">= 12%" (a
    rate of 12.1% did not trip it); the slow-call rate's 0.001 is in test_slow_call_rate_trips."""
    other = make(store, clock, name="eighth", failure_threshold=None, failure_rate_threshold=0.125, minimum_calls=8)
    seen = recorder(other)
    for _ in range(7):
        other.call(ok)
    fail(other)
    assert seen[-1].reason == "failure rate 1/8 >= 12.5%"


# -- operators -------------------------------------------------------------------


def test_forced_open_rejects_until_an_operator_closes(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock)
    breaker.force_open()
    error = rejected(breaker)
    assert (error.state, error.retry_after) == (State.FORCED_OPEN, None)
    clock.advance(3600)
    rejected(breaker)
    breaker.close()
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.CLOSED


def test_disabled_admits_everything_and_never_trips(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock, failure_threshold=1)
    breaker.disable()
    fail(breaker, 3)
    assert state_of(breaker) is State.DISABLED
    assert breaker.snapshot().failures == 3
    breaker.close()
    fail(breaker)
    assert state_of(breaker) is State.OPEN


def test_an_operator_move_that_changes_nothing_is_none(store: Store, clock: FakeClock) -> None:
    """``celery control breaker_open`` reaches every worker, and each acts on the shared
    breaker: the first makes the move; the others find the breaker there already and
    make no transition, no event and no generation of their own."""
    workers = [make(store, clock, failure_threshold=5) for _ in range(3)]
    seen = [recorder(worker) for worker in workers]
    fail(workers[0], 2)  # closed, two failures in its window

    def made() -> list[tuple[State, State]]:
        return [(t.source, t.target) for heard in seen for t in heard]

    for action, target in (("force_open", State.FORCED_OPEN), ("disable", State.DISABLED),
                           ("close", State.CLOSED), ("reset", State.CLOSED)):  # fmt: skip
        before = workers[0].snapshot().generation
        for worker in workers:
            getattr(worker, action)()
        assert workers[0].snapshot().generation == before + 1, action
        assert workers[0].state is target
        assert len(made()) == 1, (action, made())
        for heard in seen:
            heard.clear()
    fail(workers[1])  # a failure in the window: a close forgets it, so it is a move
    workers[2].close()
    assert made() == [(State.CLOSED, State.CLOSED)]
    assert workers[0].snapshot().window_failures == 0
    workers[0].reset()  # its lifetime counters are not zero: a move
    assert made()[1:] == [(State.CLOSED, State.CLOSED)]
    assert workers[0].snapshot().failures == 0
    stricter = make(store, clock, failure_threshold=2)
    before = stricter.snapshot().generation
    stricter.reset()  # another policy to adopt: a move
    assert stricter.snapshot().generation == before + 1


# -- operator states and the idle TTL ---------------------------------------------------

_BYSTANDERS = itertools.count()


def outlive_idle_ttl(store: Store, clock: FakeClock) -> None:
    """What passing the idle TTL does to breaker ``svc`` if nobody uses it: Redis drops
    its keys that have a TTL (done here at once, no waiting); a full memory store sweeps
    idle breakers out (here: as many new breakers as it takes to sweep twice)."""
    clock.advance(2 * IDLE_TTL)
    if isinstance(store, RedisStore):
        store.flush()  # what this process counted is sent long before the TTL runs out
        expire_now(store, "svc", after=2 * IDLE_TTL)
        return
    for _ in range(2 * IDLE_MAX_BREAKERS):
        CircuitBreaker(f"bystander-{next(_BYSTANDERS)}", storage=store, clock=clock)


def read_afresh(store: Store, clock: FakeClock) -> tuple[BreakerSnapshot, bool]:
    """Breaker ``svc`` as another process reads it (for Redis, through a new store on the
    same URL, nothing cached): its snapshot, then whether a call passes."""
    if not isinstance(store, RedisStore):
        return _read(store, clock)
    view = RedisStore.from_url(store.url)
    try:
        return _read(view, clock)
    finally:
        view.close()


def _read(store: Store, clock: FakeClock) -> tuple[BreakerSnapshot, bool]:
    breaker = make(store, clock)
    snap = breaker.snapshot()
    try:
        breaker.call(ok)
    except CircuitOpenError:
        return snap, False
    return snap, True


def assert_idle_ttl(store: Store) -> None:
    """On Redis, every key of breaker ``svc`` expires within the idle TTL."""
    if isinstance(store, RedisStore):
        ttls = key_ttls(store, "svc")
        assert ttls
        assert all(0 < ttl <= IDLE_TTL * 1000 for ttl in ttls.values()), ttls


@pytest.mark.parametrize(("move", "target"), [("force_open", State.FORCED_OPEN), ("disable", State.DISABLED)])
def test_an_operator_state_outlives_the_idle_ttl(idle_store: Store, clock: FakeClock, move: str, target: State) -> None:
    breaker = make(idle_store, clock)
    assert breaker.call(ok) == "ok"
    getattr(breaker, move)()
    if isinstance(idle_store, RedisStore):
        assert set(key_ttls(idle_store, "svc").values()) == {-1}  # no TTL while the operator's state holds
    outlive_idle_ttl(idle_store, clock)
    snap, passed = read_afresh(idle_store, clock)
    assert (snap.state, snap.successes) == (target, 1)  # the same breaker, not a fresh CLOSED one
    assert passed is (target is State.DISABLED)
    assert state_of(breaker) is target


@pytest.mark.parametrize("leave", ["close", "reset"])
@pytest.mark.parametrize("move", ["force_open", "disable"])
def test_leaving_an_operator_state_brings_the_idle_ttl_back(
    idle_store: Store, clock: FakeClock, move: str, leave: str
) -> None:
    breaker = make(idle_store, clock)
    getattr(breaker, move)()
    outlive_idle_ttl(idle_store, clock)
    getattr(breaker, leave)()
    assert_idle_ttl(idle_store)
    assert breaker.call(ok) == "ok"
    outlive_idle_ttl(idle_store, clock)
    snap, _ = read_afresh(idle_store, clock)
    assert (snap.state, snap.successes) == (State.CLOSED, 0)  # forgotten, like any idle breaker


def test_an_idle_closed_breaker_is_forgotten(idle_store: Store, clock: FakeClock) -> None:
    breaker = make(idle_store, clock)
    assert breaker.call(ok) == "ok"
    assert_idle_ttl(idle_store)
    outlive_idle_ttl(idle_store, clock)
    snap, passed = read_afresh(idle_store, clock)
    assert (snap.state, snap.successes, passed) == (State.CLOSED, 0, True)


def test_an_idle_open_breaker_stays_open_until_its_period_ends_then_is_forgotten(
    idle_store: Store, clock: FakeClock
) -> None:
    # Idle while open (every task parked, none calling), a breaker whose open period is
    # longer than the idle TTL came back CLOSED early, and its parked tasks were released.
    breaker = make(idle_store, clock, failure_threshold=1, reset_timeout=10 * IDLE_TTL)
    fail(breaker)
    if isinstance(idle_store, RedisStore):
        ttls = key_ttls(idle_store, "svc")
        assert ttls
        assert all(10 * IDLE_TTL * 1000 < ttl <= 11 * IDLE_TTL * 1000 for ttl in ttls.values()), ttls
    outlive_idle_ttl(idle_store, clock)
    snap, passed = read_afresh(idle_store, clock)
    assert (snap.state, snap.failures, passed) == (State.OPEN, 1, False)
    clock.advance(10 * IDLE_TTL)  # the open period is over: it may half-open, then is idle
    outlive_idle_ttl(idle_store, clock)
    if isinstance(idle_store, RedisStore):
        expire_now(idle_store, "svc", after=14 * IDLE_TTL)  # (14 idle TTLs have passed since the trip)
    snap, passed = read_afresh(idle_store, clock)
    assert (snap.state, snap.failures, passed) == (State.CLOSED, 0, True)  # forgotten


def test_reset_forgets_everything_and_adopts_the_callers_policy(store: Store, clock: FakeClock) -> None:
    first = make(store, clock, failure_threshold=1)
    fail(first)
    rejected(first)
    second = make(store, clock, failure_threshold=3)
    second.reset()
    snap = second.snapshot()
    assert (snap.state, snap.failures, snap.rejections, snap.trips, snap.last_failure) == (State.CLOSED, 0, 0, 0, None)
    fail(second, 2)
    assert state_of(second) is State.CLOSED  # the new threshold applies
    fail(second)
    assert state_of(second) is State.OPEN


def test_an_outcome_admitted_before_a_reset_is_not_counted_after_it(store: Store, clock: FakeClock) -> None:
    # A call in flight across an operator's reset belongs to the breaker that was reset:
    # its failure (or success) is neither judged nor counted by the fresh one.
    breaker = make(store, clock, failure_threshold=2)
    fail(breaker)  # (a breaker with nothing to forget is not reset)
    failing, succeeding = HeldCall(breaker), HeldCall(breaker)
    breaker.reset()
    failing.fail()
    succeeding.succeed()
    snap = breaker.snapshot()
    assert (snap.state, snap.failures, snap.successes, snap.last_failure) == (State.CLOSED, 0, 0, None)
    late = HeldCall(breaker)  # admitted after the reset: counted, and judged
    late.fail()
    fail(breaker)
    assert (state_of(breaker), breaker.snapshot().failures) == (State.OPEN, 2)


def test_a_breaker_keeps_the_policy_it_was_created_with(
    store: Store, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    first = make(store, clock, failure_threshold=1)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        second = make(store, clock, failure_threshold=5)
    assert "already exists" in caplog.text
    fail(second)
    assert state_of(second) is State.OPEN
    assert state_of(first) is State.OPEN


# -- metrics ---------------------------------------------------------------------


def test_snapshot_counts_and_times(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock, failure_threshold=2, reset_timeout=30)
    breaker.call(ok)
    clock.advance(1)
    fail(breaker)
    snap = breaker.snapshot()
    assert (snap.successes, snap.failures, snap.window_failures, snap.trips) == (1, 1, 1, 0)
    assert snap.last_success == pytest.approx(clock.time() - 1)
    assert snap.last_failure == pytest.approx(clock.time())
    assert (snap.opened_at, snap.open_until, snap.retry_after) == (None, None, 0.0)
    fail(breaker)
    snap = breaker.snapshot()
    assert (snap.state, snap.trips, snap.name, snap.key) == (State.OPEN, 1, "svc", None)
    assert snap.opened_at == pytest.approx(clock.time())
    assert snap.open_until == pytest.approx(clock.time() + 30)
    assert snap.retry_after == pytest.approx(30)


def test_rejections_and_deferrals_are_counted(store: Store, clock: FakeClock) -> None:
    breaker = half_open(store, clock, half_open_max_calls=1)
    HeldCall(breaker)
    rejected(breaker)  # HALF_OPEN, every slot taken
    breaker.note_deferral()
    other = make(store, clock, name="other", failure_threshold=1)
    fail(other)
    for _ in range(3):
        rejected(other)  # OPEN
    assert breaker.snapshot().rejections == 1
    assert breaker.snapshot().deferrals == 1
    assert other.snapshot().rejections == 3


def test_per_key_breakers_are_separate(store: Store, clock: FakeClock) -> None:
    tenant_a = CircuitBreaker("svc", {"failure_threshold": 1}, storage=store, clock=clock, key="a")
    tenant_b = CircuitBreaker("svc", {"failure_threshold": 1}, storage=store, clock=clock, key="b")
    fail(tenant_a)
    assert (state_of(tenant_a), state_of(tenant_b)) == (State.OPEN, State.CLOSED)
    assert tenant_a.snapshot().key == "a"
    assert {(s.name, s.key, s.state) for s in store.snapshots(clock)} == {
        ("svc", "a", State.OPEN),
        ("svc", "b", State.CLOSED),
    }


# -- deleting a breaker (an operator's `celery breaker delete`) ------------------------


def test_a_deleted_breaker_leaves_the_listing_and_its_next_call_starts_afresh(store: Store, clock: FakeClock) -> None:
    breaker = make(store, clock, name="stray", failure_threshold=1, reset_timeout=60.0)
    other = make(store, clock, name="kept", failure_threshold=1, reset_timeout=60.0)
    fail(breaker)
    fail(other)
    assert state_of(breaker) is State.OPEN
    following(store)  # (it hears the delete: its view of the tripped breaker would reject)
    assert store.delete("stray", None) is True
    assert {snapshot.name for snapshot in store.snapshots(clock)} == {"kept"}
    assert store.sync()  # (every process hears it: this one too)
    assert breaker.call(ok) == "ok"  # found afresh: closed, counters zeroed
    fresh = breaker.snapshot()
    assert (fresh.state, fresh.trips, fresh.failures, fresh.successes) == (State.CLOSED, 0, 0, 1)
    assert state_of(other) is State.OPEN  # another breaker is untouched
    assert store.delete("stray", "no-such-key") is False
    assert store.delete("never-was", None) is False


def test_what_a_breaker_counted_before_its_delete_does_not_bring_it_back(store: Store, clock: FakeClock) -> None:
    # On Redis a process sends its rejections and deferrals up to a second later: their
    # send made the deleted breaker again, closed and empty, listed as if never deleted.
    breaker = make(store, clock, name="stray", failure_threshold=1, reset_timeout=60.0)
    fail(breaker)
    following(store)
    for _ in range(3):
        rejected(breaker)
    breaker.note_deferral()
    assert store.delete("stray", None) is True
    store.flush()
    assert store.snapshots(clock) == []
    assert store.sync()  # (heard by this process now, if not before)
    store.flush()
    assert store.snapshots(clock) == []


def test_deleting_a_per_key_breaker_leaves_its_siblings(store: Store, clock: FakeClock) -> None:
    policy = BreakerPolicy(failure_threshold=1)
    tenants = {key: CircuitBreaker("crm", policy, storage=store, clock=clock, key=key) for key in ("t1", "t2")}
    for breaker in tenants.values():
        fail(breaker)
    following(store)
    assert store.delete("crm", "t1") is True
    assert {(s.name, s.key) for s in store.snapshots(clock)} == {("crm", "t2")}
    assert state_of(tenants["t2"]) is State.OPEN


@pytest.mark.parametrize("outcome", ["success", "failure", "ignored"])
def test_a_probe_of_a_deleted_breaker_never_judges_the_one_made_afresh(
    store: Store, clock: FakeClock, outcome: str
) -> None:
    """Generations and probe leases restart with a breaker made afresh (on Redis, a new
    incarnation): a probe the deleted breaker admitted is counted, but closes, reopens and
    frees nothing of the new one, whose own probe holds the same numbers."""
    policy = {"half_open_max_calls": 1, "success_threshold": 1, "ignore_exceptions": (KeyError,)}
    old = half_open(store, clock, **policy)
    late = HeldCall(old)  # the deleted breaker's probe: generation 2, lease 0
    following(store)
    assert store.delete("svc", None) is True
    assert store.sync()
    new = half_open(store, clock, **policy)
    own = HeldCall(new)  # the new breaker's probe: generation 2, lease 0 again
    assert state_of(new) is State.HALF_OPEN
    if outcome == "success":
        late.succeed()
    else:
        late.fail(KeyError("neutral") if outcome == "ignored" else None)
    assert store.sync()
    snap = new.snapshot()
    assert (snap.state, snap.probes_in_flight) == (State.HALF_OPEN, 1)
    assert rejected(new).state is State.HALF_OPEN  # the new probe's slot is still taken
    own.succeed()
    assert state_of(new) is State.CLOSED
