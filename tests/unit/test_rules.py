"""Trip rules (core/rules.py) on their own, on a FakeClock, and as the machine and the memory store use them."""

from __future__ import annotations

import threading

import pytest

from celery_breaker import BreakerPolicy, ConfigurationError, State
from celery_breaker.core import rules_for
from celery_breaker.core.rules import ConsecutiveFailures, FailuresWithin, Rates
from celery_breaker.storage.memory import MemoryCell
from celery_breaker.testing import FakeClock

from .support import fail, make, ok, state_of

# -- failures within a window ------------------------------------------------------


def test_failures_within_trips_on_the_nth_failure_within_the_window(clock: FakeClock) -> None:
    rule = FailuresWithin(3, 10.0)
    assert rule.observe(True, False, clock.monotonic()) is None
    assert rule.observe(False, False, clock.advance(1)) is None  # successes change nothing
    assert rule.observe(True, False, clock.advance(4)) is None
    assert (rule.failures(clock.monotonic()), rule.calls(clock.monotonic())) == (2, 0)
    assert rule.observe(True, False, clock.advance(5)) == "3 failures within 10 s"


def test_failures_within_forgets_failures_older_than_the_window(clock: FakeClock) -> None:
    rule = FailuresWithin(2, 10.0)
    rule.observe(True, False, clock.monotonic())
    assert not rule.at_rest(clock.monotonic())
    clock.advance(10.5)
    assert rule.failures(clock.monotonic()) == 0
    assert rule.at_rest(clock.monotonic())
    assert rule.observe(True, False, clock.monotonic()) is None


def test_failures_within_is_always_quiet_and_describes_itself(clock: FakeClock) -> None:
    rule = FailuresWithin(5, 60.0)
    rule.observe(True, False, clock.monotonic())
    assert rule.quiet
    assert (rule.kind, dict(rule.parameters)) == ("failures_within", {"threshold": 5, "window": 60.0})
    rule.clear()
    assert rule.at_rest(clock.monotonic())


# -- consecutive failures ------------------------------------------------------------


def test_consecutive_failures_trip_on_the_nth_in_a_row(clock: FakeClock) -> None:
    rule = ConsecutiveFailures(3)
    now = clock.monotonic()
    assert [rule.observe(True, False, now) for _ in range(3)] == [None, None, "3 consecutive failures"]


def test_a_success_ends_the_run_even_a_slow_one(clock: FakeClock) -> None:
    rule = ConsecutiveFailures(2)
    now = clock.monotonic()
    rule.observe(True, False, now)
    assert (rule.failures(now), rule.quiet, rule.at_rest(now)) == (1, False, False)
    rule.observe(False, True, now)
    assert (rule.failures(now), rule.quiet, rule.at_rest(now)) == (0, True, True)
    assert rule.observe(True, False, now) is None


def test_the_run_does_not_age(clock: FakeClock) -> None:
    rule = ConsecutiveFailures(2)
    rule.observe(True, False, clock.monotonic())
    clock.advance(86_400)
    assert rule.observe(True, False, clock.monotonic()) == "2 consecutive failures"


def test_consecutive_failures_count_no_calls_and_clear(clock: FakeClock) -> None:
    rule = ConsecutiveFailures(4)
    now = clock.monotonic()
    rule.observe(True, False, now)
    assert (rule.calls(now), rule.slow_calls(now)) == (0, 0)
    rule.clear()
    assert (rule.failures(now), rule.quiet) == (0, True)
    assert (rule.kind, dict(rule.parameters)) == ("consecutive_failures", {"threshold": 4})


# -- rates ---------------------------------------------------------------------------


def rates(**given: object) -> Rates:
    options: dict[str, object] = {
        "failure_rate": 0.5, "slow_rate": None, "calls_to_judge": 4, "count_window": 4, "window": 60.0,
    }  # fmt: skip
    options.update(given)
    return Rates(**options)  # type: ignore[arg-type]


def test_the_failure_rate_is_judged_once_enough_calls_are_in(clock: FakeClock) -> None:
    rule = rates()
    now = clock.monotonic()
    assert [rule.observe(True, False, now) for _ in range(3)] == [None, None, None]
    assert rule.observe(True, False, now) == "failure rate 4/4 >= 50%"


def test_a_fast_success_is_counted_but_never_judged(clock: FakeClock) -> None:
    rule = rates(calls_to_judge=1, failure_rate=0.1)
    now = clock.monotonic()
    assert rule.observe(False, False, now) is None
    assert (rule.calls(now), rule.failures(now), rule.quiet) == (1, 0, False)
    assert rule.observe(True, False, now) == "failure rate 1/2 >= 10%"


def test_the_slow_call_rate(clock: FakeClock) -> None:
    rule = rates(failure_rate=None, slow_rate=0.5, calls_to_judge=2)
    now = clock.monotonic()
    assert rule.observe(False, False, now) is None
    assert rule.observe(False, True, now) == "slow-call rate 1/2 >= 50%"
    assert (rule.calls(now), rule.failures(now), rule.slow_calls(now)) == (2, 0, 1)


def test_a_time_window_forgets_old_calls(clock: FakeClock) -> None:
    rule = rates(count_window=None, window=10.0, calls_to_judge=1)
    rule.observe(False, False, clock.monotonic())
    assert not rule.at_rest(clock.monotonic())
    clock.advance(11)
    assert rule.at_rest(clock.monotonic())
    assert rule.observe(True, False, clock.monotonic()) == "failure rate 1/1 >= 50%"
    assert dict(rule.parameters) == {"failure_rate_threshold": 0.5, "calls_to_judge": 1, "window": 10.0}


def test_a_count_window_describes_its_size_not_a_time(clock: FakeClock) -> None:
    rule = rates(slow_rate=0.9)
    assert (rule.kind, dict(rule.parameters)) == (
        "rates",
        {"failure_rate_threshold": 0.5, "slow_call_rate_threshold": 0.9, "calls_to_judge": 4, "count_window": 4},
    )
    rule.observe(True, False, clock.monotonic())
    rule.clear()
    assert rule.at_rest(clock.monotonic())


# -- rules_for -------------------------------------------------------------------------


def test_rules_come_in_a_fixed_order() -> None:
    policy = BreakerPolicy(
        failure_rate_threshold=0.5, slow_call_duration=1, slow_call_rate_threshold=0.5, consecutive_failures=3
    )
    assert [rule.kind for rule in rules_for(policy)] == ["failures_within", "consecutive_failures", "rates"]
    assert [rule.kind for rule in rules_for(BreakerPolicy())] == ["failures_within"]
    alone = rules_for(BreakerPolicy(failure_threshold=None, consecutive_failures=2))
    assert [rule.kind for rule in alone] == ["consecutive_failures"]


def test_consecutive_failures_alone_is_a_trip_rule() -> None:
    assert BreakerPolicy(failure_threshold=None, consecutive_failures=1).consecutive_failures == 1
    with pytest.raises(ConfigurationError, match="never trips: set failure_threshold, consecutive_failures"):
        BreakerPolicy(failure_threshold=None, consecutive_failures=None)


# -- in the machine ------------------------------------------------------------------


def test_the_first_rule_with_a_reason_names_the_trip_and_every_rule_counts(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=2, consecutive_failures=2, failure_rate_threshold=1.0, minimum_calls=2)
    seen: list[str] = []
    breaker.add_listener(lambda moved: seen.append(moved.reason))
    fail(breaker, 2)
    assert seen == ["2 failures within 60 s"]


def test_the_last_rule_shows_its_counts(clock: FakeClock) -> None:
    both = make(clock, failure_threshold=5, consecutive_failures=4)
    fail(both)
    both.call(ok)
    fail(both)
    assert both.snapshot().window_failures == 1  # the run, not the 2 failures within the window


def cell(clock: FakeClock, **policy: object) -> MemoryCell:
    return MemoryCell("svc", None, BreakerPolicy(**policy), clock.monotonic())  # type: ignore[arg-type]


def quiet(memory: MemoryCell) -> bool:
    """Read afresh: a call, so type checkers do not narrow it across calls."""
    return memory.quiet_success


def test_a_success_is_quiet_only_while_no_run_is_going(clock: FakeClock) -> None:
    memory = cell(clock, failure_threshold=None, consecutive_failures=3)
    ticket, _ = memory.acquire(memory.policy, clock.monotonic())
    assert quiet(memory)
    memory.finish(ticket, memory.policy.classify(ConnectionError()), 0.0, memory.policy, clock.monotonic())
    assert not quiet(memory)  # the next success must end the run, under the lock
    memory.record_success(ticket, 0.0, memory.policy, clock.monotonic())
    assert quiet(memory)
    assert memory.snapshot(clock.monotonic()).window_failures == 0
    assert not quiet(cell(clock, failure_rate_threshold=0.5))  # a rate window counts every success


def test_a_quiet_success_takes_no_lock(clock: FakeClock) -> None:
    memory = cell(clock, failure_threshold=None, consecutive_failures=3)
    ticket, _ = memory.acquire(memory.policy, clock.monotonic())
    done = threading.Event()

    def succeed() -> None:
        memory.record_success(ticket, 0.0, memory.policy, clock.monotonic())
        done.set()

    with memory.lock:  # held by someone else: a success that needed it would wait
        worker = threading.Thread(target=succeed)
        worker.start()
        assert done.wait(10)
    worker.join()
    assert memory.successes == 1


def test_a_disabled_breaker_keeps_no_run(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=None, consecutive_failures=2)
    fail(breaker)
    breaker.disable()
    fail(breaker, 3)
    breaker.close()
    fail(breaker)
    assert state_of(breaker) is State.CLOSED
    fail(breaker)
    assert state_of(breaker) is State.OPEN
