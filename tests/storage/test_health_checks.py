"""Health-check probes, over every store: the check runs instead of the real call, and its verdict moves the breaker."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from typing import Any

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, RetryAfter, State
from celery_breaker.core import Transition
from celery_breaker.storage import Store
from celery_breaker.testing import FakeClock

from ..unit.support import HeldCall, down, fail, state_of


class Downstream:
    """A downstream with a health endpoint: counts real calls and checks apart."""

    def __init__(self) -> None:
        self.healthy = False
        self.calls = 0
        self.checks = 0

    def call(self) -> str:
        self.calls += 1
        return "done"

    def check(self) -> None:
        self.checks += 1
        if not self.healthy:
            raise ConnectionError("health endpoint down")


def tripped(
    store: Store, clock: FakeClock, probe: Any, *, probe_timeout: float | None = None, **policy: Any
) -> CircuitBreaker:
    """A breaker with ``probe`` as its health check, tripped by one failure."""
    fields: dict[str, Any] = {"failure_threshold": 1, "reset_timeout": 30, **policy}
    breaker = CircuitBreaker(
        "svc", BreakerPolicy(**fields), storage=store, clock=clock, probe=probe, probe_timeout=probe_timeout
    )
    fail(breaker)
    # The trip's transition message reaches this process's view later (a Redis store's
    # agent thread); heard after the clock moves, it would restart the open period.
    assert breaker.store.sync()
    return breaker


def transitions(breaker: CircuitBreaker) -> list[Transition]:
    seen: list[Transition] = []
    breaker.add_listener(seen.append)
    return seen


def test_the_check_runs_instead_of_the_call_and_a_failure_reopens(store: Store, clock: FakeClock) -> None:
    downstream = Downstream()
    breaker = tripped(store, clock, downstream.check)
    seen = transitions(breaker)
    clock.advance(30)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(downstream.call)
    assert (downstream.calls, downstream.checks) == (0, 1)
    assert info.value.state is State.OPEN
    assert info.value.retry_after == pytest.approx(60)  # the streak backs off as for a failed probe
    assert [(t.target, t.reason) for t in seen] == [
        (State.HALF_OPEN, "open duration over"),
        (State.OPEN, "health check failed"),
    ]
    assert breaker.snapshot().streak == 2


def test_checks_alone_close_the_breaker_and_then_the_call_runs(store: Store, clock: FakeClock) -> None:
    downstream = Downstream()
    breaker = tripped(store, clock, downstream.check, half_open_max_calls=3, success_threshold=3)
    seen = transitions(breaker)
    clock.advance(30)
    downstream.healthy = True
    assert breaker.call(downstream.call) == "done"
    assert (downstream.checks, downstream.calls) == (3, 1)  # three checks closed it, then the one call
    assert state_of(breaker) is State.CLOSED
    assert [(t.target, t.reason) for t in seen] == [
        (State.HALF_OPEN, "open duration over"),
        (State.CLOSED, "3 health checks succeeded"),
    ]
    snap = breaker.snapshot()
    assert (snap.successes, snap.failures) == (4, 1)  # the checks count as the probes they replace


def test_a_check_returning_false_is_unhealthy(store: Store, clock: FakeClock) -> None:
    answers = [False, True]
    breaker = tripped(store, clock, lambda: answers.pop(0), success_threshold=1)
    seen = transitions(breaker)
    clock.advance(30)
    with pytest.raises(CircuitOpenError):
        breaker.call(down)
    assert breaker.store.sync()
    clock.advance(60)
    assert breaker.call(lambda: "real") == "real"
    assert [t.reason for t in seen][-1] == "health check succeeded"


def test_an_async_check_and_the_async_guards(store: Store, clock: FakeClock) -> None:
    checks: list[str] = []

    async def check() -> None:
        await asyncio.sleep(0)
        checks.append("checked")

    breaker = tripped(store, clock, check, success_threshold=1)
    clock.advance(30)

    async def guarded() -> str:
        async with breaker:
            return "real"

    assert asyncio.run(guarded()) == "real"
    assert checks == ["checked"]
    assert state_of(breaker) is State.CLOSED


def test_a_check_that_hangs_times_out_as_a_failure(store: Store, clock: FakeClock) -> None:
    release = threading.Event()
    breaker = tripped(store, clock, release.wait, probe_timeout=0.05)
    seen = transitions(breaker)
    clock.advance(30)
    try:
        with pytest.raises(CircuitOpenError):
            breaker.call(lambda: "real")
    finally:
        release.set()
    assert state_of(breaker) is State.OPEN
    assert seen[-1].reason == "health check failed"


def test_a_check_holds_its_probe_slot_while_it_runs(store: Store, clock: FakeClock) -> None:
    """While one process's check runs, nobody else gets the slot: a second breaker object
    (any process) is rejected, and its real call does not run. (Called in a context of its
    own: the check's own calls on its breaker pass, a client library's breaker of the same
    name, say.)"""
    nested: list[BaseException] = []

    def check() -> None:
        try:
            contextvars.Context().run(other.call, lambda: "real, during the check")
        except CircuitOpenError as exc:
            nested.append(exc)

    breaker = tripped(store, clock, check, half_open_max_calls=1, success_threshold=1)
    other = CircuitBreaker("svc", breaker.policy, storage=store, clock=clock)
    clock.advance(30)
    assert breaker.call(lambda: "real") == "real"
    [rejection] = nested
    assert isinstance(rejection, CircuitOpenError)
    assert rejection.state is State.HALF_OPEN


def test_a_caller_whose_check_succeeded_but_finds_no_slot_left_is_told_when_one_frees(
    store: Store, clock: FakeClock
) -> None:
    """The caller's check succeeds, but another caller holds the second slot: rejected
    with the store's own retry_after (a lease's end, at most one open period), counted
    once. It said 0.0, so a task was deferred by the minimum, again and again."""
    held: list[HeldCall] = []

    def check() -> None:
        # another caller's probe (in a context of its own) takes the second slot meanwhile
        held.append(contextvars.Context().run(HeldCall, other))

    breaker = tripped(store, clock, check, half_open_max_calls=2, success_threshold=2, half_open_max_wait=60)
    other = CircuitBreaker("svc", breaker.policy, storage=store, clock=clock)
    clock.advance(30)
    rejections = breaker.snapshot().rejections
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(lambda: "real")
    assert info.value.state is State.HALF_OPEN
    assert info.value.retry_after == pytest.approx(30)
    assert info.value.retry_after == pytest.approx(breaker.snapshot().retry_after)
    assert breaker.snapshot().rejections == rejections + 1
    held[0].succeed()  # the other probe closes the breaker
    assert state_of(breaker) is State.CLOSED


def test_a_verdict_from_an_earlier_generation_moves_nothing(store: Store, clock: FakeClock) -> None:
    """An operator closes and reopens the breaker while the check runs: the failing
    check's lease belongs to a half-open period that is over, so it is ignored."""

    def check() -> None:
        operator.close()
        operator.force_open()
        raise ConnectionError("down, but too late to matter")

    breaker = tripped(store, clock, check)
    operator = CircuitBreaker("svc", breaker.policy, storage=store, clock=clock)
    clock.advance(30)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(lambda: "real")
    assert info.value.state is State.FORCED_OPEN
    snap = breaker.snapshot()
    assert (snap.state, snap.trips) == (State.FORCED_OPEN, 1)  # the late failure reopened nothing


def test_a_check_failing_with_a_retry_after_reopens_for_that_long(store: Store, clock: FakeClock) -> None:
    def check() -> None:
        raise RetryAfter(120)

    breaker = tripped(store, clock, check)
    clock.advance(30)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(lambda: "real")
    assert info.value.retry_after == pytest.approx(120)


def test_a_slow_check_reopens(store: Store, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    breaker = tripped(store, clock, lambda: clock.advance(3), slow_call_duration=2, slow_call_rate_threshold=1.0)
    seen = transitions(breaker)
    clock.advance(30)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"), pytest.raises(CircuitOpenError):
        breaker.call(lambda: "real")
    assert seen[-1].reason == "slow health check"
    # Said with the fix: checks as slow never close the breaker.
    (said,) = [r.getMessage() for r in caplog.records if "slow_call_duration" in r.getMessage()]
    assert said.startswith("breaker svc: health check tests.storage.test_health_checks:test_a_slow_check_reopens")
    assert "<lambda> succeeded in 3 s, over slow_call_duration=2 s, so it counted as a slow call" in said
    assert said.endswith("make the check faster, or raise slow_call_duration (and reset the breaker to adopt it)")


def test_check_health_runs_only_when_due_and_closes_on_checks_alone(store: Store, clock: FakeClock) -> None:
    downstream = Downstream()
    breaker = tripped(store, clock, downstream.check, success_threshold=2)
    health = breaker.check_health()
    assert health.state is State.OPEN
    assert health.open_for == pytest.approx(30)
    assert downstream.checks == 0  # not due yet: nothing ran, nothing was asked
    rejections = breaker.snapshot().rejections
    clock.advance(30)
    health = breaker.check_health()  # due: it ran, failed, and reopened
    assert health.state is State.OPEN
    assert health.open_for == pytest.approx(60)
    assert downstream.checks == 1
    assert breaker.store.sync()
    clock.advance(60)
    downstream.healthy = True
    assert breaker.check_health() == (State.CLOSED, None)
    assert (downstream.checks, downstream.calls) == (3, 0)
    assert breaker.snapshot().rejections == rejections
    assert breaker.check_health().state is State.CLOSED
    assert downstream.checks == 3


def test_check_health_counts_no_rejection_while_every_slot_is_taken(store: Store, clock: FakeClock) -> None:
    # The worker's releaser asks every tick (0.2 s) while tasks are parked: each time a
    # probe held the slot, it counted a rejection of a call nobody made.
    downstream = Downstream()
    breaker = tripped(store, clock, downstream.check, half_open_max_calls=1)
    other = CircuitBreaker("svc", breaker.policy, storage=store, clock=clock)
    clock.advance(30)
    held = HeldCall(other)  # a real probe holds the one slot
    rejections = breaker.snapshot().rejections
    for _ in range(5):
        assert breaker.check_health() == (State.HALF_OPEN, None)
    assert breaker.snapshot().rejections == rejections
    assert downstream.checks == 0
    held.fail()  # its verdict: reopened
    assert breaker.store.sync()
    clock.advance(60)
    downstream.healthy = True
    assert breaker.check_health() == (State.CLOSED, None)  # due again: checked, closed


def test_a_breaker_without_a_probe_is_probed_by_real_calls(store: Store, clock: FakeClock) -> None:
    breaker = tripped(store, clock, None, success_threshold=1)
    clock.advance(30)
    assert breaker.call(lambda: "real") == "real"
    assert state_of(breaker) is State.CLOSED
    with pytest.raises(ValueError, match="has no probe"):
        breaker.check_health()
