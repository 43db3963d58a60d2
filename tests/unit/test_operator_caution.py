"""``operator.caution``: which operator moves warn that deferred tasks would meet a failing downstream.

Breakers on a fake clock are driven into each state through real calls; ``caution`` reads
their snapshots as the CLI, remote control and the web page do before (or while) acting.
"""

from __future__ import annotations

import pytest

from celery_breaker import State
from celery_breaker.ops.actions import ACTIONS
from celery_breaker.ops.operator import caution
from celery_breaker.testing import FakeClock

from .support import fail, make, ok

POLICY = {"failure_threshold": 3, "window": 60.0, "reset_timeout": 30.0}
ADMITTING = ("close", "reset", "disable")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=100.0, epoch=1_700_000_000.0)


def test_only_the_actions_that_admit_calls_are_cautious() -> None:
    assert {name for name, action in ACTIONS.items() if action.cautious} == set(ADMITTING)


@pytest.mark.parametrize("action", ADMITTING)
def test_a_tripped_breaker_warns_with_when_it_tripped_and_what_it_costs(clock: FakeClock, action: str) -> None:
    breaker = make(clock, name="payments", **POLICY)
    fail(breaker, 3)
    clock.advance(40)
    warning = caution(action, breaker.snapshot(), breaker.policy, clock.time())
    assert warning is not None
    assert warning.startswith("payments tripped 40s ago (its last failure 40s ago): its downstream may still be")
    assert warning.endswith("tasks deferred behind it run against that downstream and spend their own retries")
    if action == "disable":
        assert "lets every call through and nothing trips it" in warning
    else:
        assert f"{'closing' if action == 'close' else 'resetting'} it lets calls through now:" in warning


def test_a_breaker_due_to_probe_warns_as_an_open_one_does(clock: FakeClock) -> None:
    breaker = make(clock, name="payments", **POLICY)
    fail(breaker, 3)
    clock.advance(31)  # past reset_timeout: its next call is a probe
    assert breaker.snapshot().retry_after == 0
    assert "payments tripped 31s ago" in (caution("close", breaker.snapshot(), breaker.policy, clock.time()) or "")


def test_a_rule_that_counts_only_failures_is_described_without_a_call_count(clock: FakeClock) -> None:
    breaker = make(clock, name="crm", failure_threshold=5, window=60.0)
    fail(breaker, 2)
    warning = caution("reset", breaker.snapshot(), breaker.policy, clock.time()) or ""
    assert warning.startswith("2 calls through crm failed in its window, the latest just now; resetting it")


def test_opening_never_warns(clock: FakeClock) -> None:
    breaker = make(clock, name="payments", **POLICY)
    fail(breaker, 3)
    assert caution("open", breaker.snapshot(), breaker.policy, clock.time()) is None


def test_a_closed_breaker_with_a_failure_in_its_window_warns_until_the_window_forgets_it(clock: FakeClock) -> None:
    breaker = make(clock, name="crm", failure_rate_threshold=0.5, minimum_calls=10, window=60.0)
    for _ in range(5):
        breaker.call(ok)
    fail(breaker, 2)
    clock.advance(10)
    assert breaker.snapshot().window_calls == 7, "this policy's rule counts calls (failure_rate_threshold)"
    warning = caution("disable", breaker.snapshot(), breaker.policy, clock.time())
    assert warning is not None
    assert warning.startswith("2 of the last 7 calls through crm failed, the latest 10s ago; disabling it")
    closing = caution("close", breaker.snapshot(), breaker.policy, clock.time())
    assert closing is not None
    assert "and forgets the failures that would trip it" in closing
    clock.advance(51)  # 61 s after the failures: older than the window
    assert caution("disable", breaker.snapshot(), breaker.policy, clock.time()) is None


def test_a_healthy_breaker_never_warns(clock: FakeClock) -> None:
    breaker = make(clock, name="crm", **POLICY)
    for _ in range(5):
        breaker.call(ok)
    for action in ACTIONS:
        assert caution(action, breaker.snapshot(), breaker.policy, clock.time()) is None
    assert caution("close", None, breaker.policy, clock.time()) is None  # (a breaker about to be created)


def test_forced_open_warns_only_when_a_failure_preceded_it_within_the_window(clock: FakeClock) -> None:
    breaker = make(clock, name="crm", **POLICY)
    fail(breaker)
    breaker.force_open()
    clock.advance(5)
    warning = caution("close", breaker.snapshot(), breaker.policy, clock.time())
    assert warning is not None
    assert warning.startswith("a call through crm failed 5s ago, before it was forced open; closing it")
    clock.advance(3600)  # held open for maintenance an hour: nothing is known about the downstream now
    assert caution("close", breaker.snapshot(), breaker.policy, clock.time()) is None


def test_turning_a_disabled_breakers_protection_back_on_never_warns(clock: FakeClock) -> None:
    breaker = make(clock, name="crm", **POLICY)
    breaker.disable()
    fail(breaker, 5)  # a disabled breaker counts but never trips
    assert breaker.snapshot().state is State.DISABLED
    for action in ("close", "reset"):
        assert caution(action, breaker.snapshot(), breaker.policy, clock.time()) is None
