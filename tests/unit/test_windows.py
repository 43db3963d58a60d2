"""Sliding windows on their own: exact failure times, subtract-on-evict counts, time buckets."""

from __future__ import annotations

import pytest

from celery_breaker.core.windows import TIME_BUCKETS, CountWindow, FailureTimes, TimeWindow

# -- FailureTimes: "N failures within T seconds" -------------------------------


def test_failure_times_trips_on_the_nth_failure_within_the_window() -> None:
    times = FailureTimes(threshold=3, window=60.0)
    assert times.add(0.0) is False
    assert times.add(10.0) is False
    assert times.add(20.0) is True


def test_failure_times_window_boundary_is_inclusive() -> None:
    times = FailureTimes(threshold=2, window=60.0)
    times.add(0.0)
    assert times.add(60.0) is True


def test_failure_times_spread_beyond_the_window_never_trip() -> None:
    times = FailureTimes(threshold=3, window=60.0)
    # One failure every 31 s: any three span 62 s, so none may trip (the seed's defect).
    assert not any(times.add(31.0 * i) for i in range(100))


def test_failure_times_forgets_the_oldest_beyond_threshold() -> None:
    times = FailureTimes(threshold=3, window=60.0)
    times.add(0.0)
    times.add(100.0)
    times.add(101.0)  # 0.0 is out of the window: 2 recent failures only
    assert times.count(101.0) == 2
    assert times.add(102.0) is True  # 100, 101, 102


def test_failure_times_count_drops_failures_as_they_age() -> None:
    times = FailureTimes(threshold=5, window=60.0)
    for t in (0.0, 10.0, 20.0):
        times.add(t)
    assert times.count(20.0) == 3
    assert times.count(60.0) == 3
    assert times.count(70.5) == 1
    assert times.count(81.0) == 0


def test_failure_times_clear_forgets_everything() -> None:
    times = FailureTimes(threshold=2, window=60.0)
    times.add(0.0)
    times.clear()
    assert times.count(0.0) == 0
    assert times.add(1.0) is False


def test_failure_times_threshold_one_trips_immediately() -> None:
    assert FailureTimes(threshold=1, window=1.0).add(5.0) is True


# -- CountWindow: the last N outcomes -------------------------------------------


def test_count_window_totals_grow_until_full() -> None:
    window = CountWindow(4)
    assert window.totals(0.0) == (0, 0, 0)
    window.add(0.0, True, False)
    window.add(0.0, False, True)
    window.add(0.0, True, True)
    assert window.totals(0.0) == (3, 2, 2)


def test_count_window_subtracts_the_evicted_outcome() -> None:
    window = CountWindow(3)
    window.add(0.0, True, True)  # will be evicted first
    window.add(0.0, False, False)
    window.add(0.0, False, False)
    assert window.totals(0.0) == (3, 1, 1)
    window.add(0.0, False, False)  # evicts the failed, slow one
    assert window.totals(0.0) == (3, 0, 0)
    window.add(0.0, True, False)  # evicts a success
    assert window.totals(0.0) == (3, 1, 0)


def test_count_window_matches_a_naive_model_over_many_adds() -> None:
    size = 7
    window = CountWindow(size)
    history: list[tuple[bool, bool]] = []
    for i in range(200):
        failed, slow = i % 3 == 0, i % 5 == 0
        window.add(float(i), failed, slow)
        history.append((failed, slow))
        last = history[-size:]
        expected = (len(last), sum(f for f, _ in last), sum(s for _, s in last))
        assert window.totals(float(i)) == expected


def test_count_window_ignores_time() -> None:
    window = CountWindow(2)
    window.add(0.0, True, False)
    assert window.totals(1e9) == (1, 1, 0)


def test_count_window_clear_resets_totals_and_ring() -> None:
    window = CountWindow(2)
    window.add(0.0, True, True)
    window.add(0.0, True, True)
    window.clear()
    assert window.totals(0.0) == (0, 0, 0)
    window.add(0.0, False, False)
    window.add(0.0, False, False)
    window.add(0.0, False, False)  # evicting after clear must not subtract stale bits
    assert window.totals(0.0) == (2, 0, 0)


# -- TimeWindow: the last `window` seconds in buckets -------------------------------


def test_time_window_counts_outcomes_inside_the_window() -> None:
    window = TimeWindow(60.0)
    window.add(100.0, True, False)
    window.add(110.0, False, True)
    window.add(120.0, False, False)
    assert window.totals(120.0) == (3, 1, 1)


def test_time_window_outcome_leaves_between_window_and_one_bucket_later() -> None:
    window = TimeWindow(60.0)
    bucket = 60.0 / TIME_BUCKETS
    window.add(300.0, True, False)  # 300.0 starts a bucket
    assert window.totals(300.0 + 60.0 - 0.001) == (1, 1, 0)
    assert window.totals(300.0 + 60.0 + bucket) == (0, 0, 0)


def test_time_window_evicts_everything_after_a_long_idle_gap() -> None:
    window = TimeWindow(60.0)
    for t in range(0, 60, 3):
        window.add(float(t), True, True)
    assert window.totals(59.0) == (20, 20, 20)
    assert window.totals(10_000.0) == (0, 0, 0)
    window.add(10_001.0, False, False)
    assert window.totals(10_001.0) == (1, 0, 0)


def test_time_window_partial_eviction_keeps_recent_buckets() -> None:
    window = TimeWindow(60.0)
    window.add(0.0, True, False)
    window.add(30.0, True, False)
    window.add(59.0, False, False)
    assert window.totals(75.0) == (2, 1, 0)  # 0.0 is gone, 30 and 59 remain
    assert window.totals(95.0) == (1, 0, 0)


def test_time_window_outcome_older_than_the_window_is_dropped() -> None:
    window = TimeWindow(60.0)
    window.add(1000.0, False, False)
    window.add(100.0, True, True)  # a reading from before the window: not counted
    assert window.totals(1000.0) == (1, 0, 0)


def test_time_window_clear_resets_totals() -> None:
    window = TimeWindow(10.0)
    window.add(5.0, True, True)
    window.clear()
    assert window.totals(5.0) == (0, 0, 0)
    window.add(6.0, True, False)
    assert window.totals(6.0) == (1, 1, 0)


@pytest.mark.parametrize("step", [0.7, 3.0, 11.0, 59.0])
def test_time_window_never_counts_more_than_one_bucket_beyond_the_window(step: float) -> None:
    width = 60.0 / TIME_BUCKETS
    window = TimeWindow(60.0)
    added: list[float] = []
    t = 0.0
    for _ in range(300):
        t += step
        window.add(t, True, False)
        added.append(t)
        calls, failures, _ = window.totals(t)
        assert calls == failures
        at_least = sum(1 for a in added if t - a < 60.0 - width)
        at_most = sum(1 for a in added if t - a < 60.0 + width)
        assert at_least <= calls <= at_most
