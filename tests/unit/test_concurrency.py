"""Threads against one breaker: exact counters, one trip, the probe limit, and no lock around the user's call."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, State
from celery_breaker.core import Transition
from celery_breaker.testing import FakeClock, fresh_store

from .support import down, ok

THREADS = 8
CALLS = 2000
TIMEOUT = 10.0


def run_threads(count: int, target: Callable[[int], None]) -> None:
    """Start ``count`` threads together; re-raise the first error any of them hit."""
    start = threading.Barrier(count, timeout=TIMEOUT)
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            start.wait()
            target(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 3)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize(
    "policy",
    [
        {"failure_threshold": 10**6},
        {"failure_threshold": None, "failure_rate_threshold": 1.0, "minimum_calls": 10**6},
        {"failure_threshold": None, "failure_rate_threshold": 1.0, "minimum_calls": 10**5, "count_window": 10**5},
    ],
    ids=["threshold", "time-rate-window", "count-rate-window"],
)
def test_counters_are_exact_under_threads(policy: dict[str, Any]) -> None:
    breaker = CircuitBreaker("svc", policy, storage=fresh_store())  # the real clock

    def work(index: int) -> None:
        for i in range(CALLS):
            if (index + i) % 2:
                with contextlib.suppress(ConnectionError):
                    breaker.call(down)
            else:
                breaker.call(ok)

    run_threads(THREADS, work)
    snap = breaker.snapshot()
    assert snap.state is State.CLOSED
    assert snap.successes + snap.failures == THREADS * CALLS
    assert snap.failures == THREADS * CALLS // 2
    assert snap.rejections == 0


def test_concurrent_failures_trip_exactly_once() -> None:
    breaker = CircuitBreaker("svc", {"failure_threshold": 5, "reset_timeout": 3600}, storage=fresh_store())
    heard: list[Transition] = []
    heard_lock = threading.Lock()

    def listener(transition: Transition) -> None:
        with heard_lock:
            heard.append(transition)

    breaker.add_listener(listener)

    def work(index: int) -> None:
        for _ in range(CALLS // 4):
            with contextlib.suppress(ConnectionError, CircuitOpenError):
                breaker.call(down)

    run_threads(THREADS, work)
    snap = breaker.snapshot()
    assert snap.trips == 1
    assert [(t.source, t.target) for t in heard] == [(State.CLOSED, State.OPEN)]
    assert snap.failures + snap.rejections == THREADS * CALLS // 4
    assert snap.failures >= 5


class ProbeGate:
    """Holds probes inside the wrapped call and counts how many were ever inside at once."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.release = threading.Event()
        self.inside = self.peak = self.admitted = self.rejected = 0

    def probe(self) -> str:
        with self.condition:
            self.inside += 1
            self.admitted += 1
            self.peak = max(self.peak, self.inside)
            self.condition.notify_all()
        assert self.release.wait(TIMEOUT), "probe never released"
        with self.condition:
            self.inside -= 1
        return "probed"

    def attempt(self, breaker: CircuitBreaker) -> None:
        try:
            breaker.call(self.probe)
        except CircuitOpenError:
            with self.condition:
                self.rejected += 1
                self.condition.notify_all()

    def wait_until_decided(self, callers: int) -> None:
        with self.condition:
            decided = self.condition.wait_for(lambda: self.admitted + self.rejected == callers, TIMEOUT)
        assert decided, "callers were neither admitted nor rejected"


@pytest.mark.parametrize("max_calls", [1, 3])
def test_half_open_never_admits_more_than_the_probe_limit(max_calls: int) -> None:
    clock = FakeClock()  # threads only read it: the test moves it between rounds
    policy = BreakerPolicy(failure_threshold=1, half_open_max_calls=max_calls, success_threshold=max_calls)
    breaker = CircuitBreaker("svc", policy, storage=fresh_store(), clock=clock)
    callers = 16
    for _ in range(10):
        with pytest.raises(ConnectionError):
            breaker.call(down)
        clock.advance(30)
        gate = ProbeGate()
        errors: list[BaseException] = []

        def run_round(gate: ProbeGate = gate, errors: list[BaseException] = errors) -> None:
            try:
                run_threads(callers, lambda _index: gate.attempt(breaker))
            except BaseException as exc:
                errors.append(exc)

        runner = threading.Thread(target=run_round)
        runner.start()
        try:
            gate.wait_until_decided(callers)
            assert gate.admitted == max_calls
            assert breaker.snapshot().probes_in_flight == max_calls
        finally:
            gate.release.set()  # never leave probes hanging, even when an assertion failed
            runner.join(TIMEOUT * 3)
        assert not runner.is_alive()
        assert errors == []
        assert gate.peak == max_calls
        assert gate.rejected == callers - max_calls
        assert breaker.snapshot().state is State.CLOSED
        assert breaker.state is State.CLOSED


def meet_in_two_threads(use: Callable[[Callable[[], str]], str]) -> list[str]:
    """Both threads must be inside the guarded call at once to pass the barrier."""
    barrier = threading.Barrier(2, timeout=5)

    def meet() -> str:
        barrier.wait()
        return "met"

    results: list[str] = []
    run_threads(2, lambda _index: results.append(use(meet)))
    return results


def test_closed_breaker_does_not_serialise_calls() -> None:
    breaker = CircuitBreaker("svc", storage=fresh_store())
    assert meet_in_two_threads(breaker.call) == ["met", "met"]


def test_rate_policy_breaker_does_not_serialise_calls() -> None:
    breaker = CircuitBreaker("svc", {"failure_threshold": None, "failure_rate_threshold": 0.5}, storage=fresh_store())
    assert meet_in_two_threads(breaker.call) == ["met", "met"]


def test_half_open_probes_do_not_serialise() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        "svc", {"failure_threshold": 1, "half_open_max_calls": 2}, storage=fresh_store(), clock=clock
    )
    with pytest.raises(ConnectionError):
        breaker.call(down)
    clock.advance(30)
    assert meet_in_two_threads(breaker.call) == ["met", "met"]
    assert breaker.state is State.CLOSED


def test_with_blocks_do_not_serialise() -> None:
    breaker = CircuitBreaker("svc", storage=fresh_store())

    def guarded(fn: Callable[[], str]) -> str:
        with breaker:
            return fn()

    assert meet_in_two_threads(guarded) == ["met", "met"]
    assert breaker.snapshot().successes == 2


def test_listener_runs_outside_the_lock() -> None:
    """A listener that reads the breaker (and so takes its lock) must not deadlock."""
    breaker = CircuitBreaker("svc", {"failure_threshold": 1}, storage=fresh_store())
    seen: list[int] = []
    breaker.add_listener(lambda _t: seen.append(breaker.snapshot().trips))
    done = threading.Event()

    def trip(_index: int) -> None:
        with pytest.raises(ConnectionError):
            breaker.call(down)
        done.set()

    run_threads(1, trip)
    assert done.is_set()
    assert seen == [1]
