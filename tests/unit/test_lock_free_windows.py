"""Successes counted into rate windows without the lock: folded in later, the window stays exact."""

from __future__ import annotations

import random
import threading

import pytest

from celery_breaker import BreakerPolicy, State
from celery_breaker.core.windows import TIME_BUCKETS, CountWindow, TimeWindow
from celery_breaker.storage.memory import MemoryCell
from celery_breaker.testing import FakeClock


def test_a_time_window_takes_fast_successes_only_in_its_newest_bucket() -> None:
    window = TimeWindow(60.0)  # buckets of 3 s
    assert window.add_success_unlocked(1.0) is False  # no bucket yet: counted under the lock
    window.add(1.0, False, False)
    assert window.add_success_unlocked(2.9) is True
    assert window.add_success_unlocked(3.0) is False  # the next bucket: the window must move
    assert window.totals(2.9) == (2, 0, 0)


def test_fast_successes_leave_the_window_with_their_bucket() -> None:
    window = TimeWindow(60.0)
    window.add(0.0, True, False)
    for _ in range(4):
        assert window.add_success_unlocked(0.5)
    window.add(30.0, False, True)
    assert window.totals(30.0) == (6, 1, 1)
    assert window.totals(62.9) == (1, 0, 1)  # the first bucket (0-3 s) has gone


@pytest.mark.parametrize("seed", range(20))
def test_a_time_window_counts_as_if_every_success_took_the_lock(seed: int) -> None:
    draw = random.Random(seed)
    width = draw.choice([1.0, 7.5, 60.0])
    exact, fast = TimeWindow(width), TimeWindow(width)
    now = 100.0
    for _ in range(400):
        now += draw.choice([0.0, 0.01, width / TIME_BUCKETS / 3, width / 2, width * 1.2])
        kind = draw.random()
        if kind < 0.6:
            exact.add(now, False, False)
            if not fast.add_success_unlocked(now):
                fast.add(now, False, False)
        elif kind < 0.9:
            failed, slow = draw.random() < 0.5, draw.random() < 0.5
            exact.add(now, failed, slow)
            fast.add(now, failed, slow)
        elif kind < 0.97:
            assert fast.totals(now) == exact.totals(now)
        else:
            exact.clear()
            fast.clear()
    assert fast.totals(now) == exact.totals(now)


@pytest.mark.parametrize("seed", range(20))
def test_a_count_window_keeps_every_outcome_in_its_place(seed: int) -> None:
    draw = random.Random(seed)
    size = draw.choice([1, 3, 10, 50])
    exact, fast = CountWindow(size), CountWindow(size)
    for _ in range(600):
        kind = draw.random()
        if kind < 0.7:
            exact.add(0.0, False, False)
            assert fast.add_success_unlocked(0.0)
        elif kind < 0.95:
            failed, slow = draw.random() < 0.6, draw.random() < 0.3
            exact.add(0.0, failed, slow)
            fast.add(0.0, failed, slow)
        else:
            assert fast.totals(0.0) == exact.totals(0.0)
    assert fast.totals(0.0) == exact.totals(0.0)


def test_a_count_window_forgets_pending_successes_when_cleared() -> None:
    window = CountWindow(5)
    window.add(0.0, True, False)
    window.add_success_unlocked(0.0)
    window.clear()
    assert window.totals(0.0) == (0, 0, 0)


@pytest.mark.parametrize(
    "fields", [{"failure_rate_threshold": 0.5}, {"failure_rate_threshold": 0.5, "count_window": 20}]
)
def test_a_rate_policy_success_takes_no_lock(clock: FakeClock, fields: dict[str, object]) -> None:
    memory = MemoryCell("svc", None, BreakerPolicy(**fields), clock.monotonic())  # type: ignore[arg-type]
    policy = memory.policy
    ticket, _ = memory.acquire(policy, clock.monotonic())
    memory.record_success(ticket, 0.0, policy, clock.monotonic())  # (a time window's first bucket)
    done = threading.Event()

    def succeed() -> None:
        memory.record_success(ticket, 0.0, policy, clock.monotonic())
        done.set()

    with memory.lock:  # held by someone else: a success that needed it would wait
        worker = threading.Thread(target=succeed)
        worker.start()
        assert done.wait(10)
    worker.join()
    snapshot = memory.snapshot(clock.monotonic())
    assert (snapshot.successes, snapshot.window_calls) == (2, 2)


def test_a_slow_success_still_takes_the_lock_and_can_trip(clock: FakeClock) -> None:
    policy = BreakerPolicy(
        failure_threshold=None, slow_call_duration=1.0, slow_call_rate_threshold=0.5, minimum_calls=2
    )
    memory = MemoryCell("svc", None, policy, clock.monotonic())
    ticket, _ = memory.acquire(policy, clock.monotonic())
    memory.record_success(ticket, 0.1, policy, clock.monotonic())
    memory.record_success(ticket, 2.0, policy, clock.monotonic())
    assert memory.snapshot(clock.monotonic()).state.value == "open"


def test_no_lock_free_success_beside_a_run_of_consecutive_failures(clock: FakeClock) -> None:
    both = BreakerPolicy(failure_threshold=None, consecutive_failures=3, failure_rate_threshold=0.5)
    memory = MemoryCell("svc", None, both, clock.monotonic())
    assert memory.unlocked_success is None  # a failure starting a run must see every success before it
    rate_only = MemoryCell("svc", None, BreakerPolicy(failure_rate_threshold=0.5), clock.monotonic())
    assert rate_only.unlocked_success is not None
    rate_only.force(State.DISABLED, rate_only.policy, clock.monotonic())
    assert rate_only.unlocked_success is None  # only in CLOSED
