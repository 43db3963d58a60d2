"""The public surface: exactly the names the design promises, typed as users will see them.

mypy --strict checks this file too, so the ``assert_type`` lines prove the public API's
types (ParamSpec-preserving ``call``/decorators, enum states, error attributes).
"""

from __future__ import annotations

import asyncio
from typing import assert_type

import pytest

import celery_breaker
from celery_breaker import (
    BreakerPolicy,
    BreakerTask,
    CircuitBreaker,
    CircuitBreakerError,
    CircuitOpenError,
    ConfigurationError,
    RetryAfter,
    State,
    downstream_error,
    install,
)
from celery_breaker.core import BreakerSnapshot
from celery_breaker.testing import FakeClock, fresh_store


def test_public_names_are_exactly_the_promised_ones_sorted() -> None:
    assert celery_breaker.__all__ == sorted(celery_breaker.__all__)
    assert set(celery_breaker.__all__) == {
        "BreakerPolicy",
        "BreakerTask",
        "CircuitBreaker",
        "CircuitBreakerError",
        "CircuitOpenError",
        "ConfigurationError",
        "HealthCheck",
        "RetryAfter",
        "State",
        "TooManyRequests",
        "downstream_error",
        "install",
    }
    assert issubclass(CircuitOpenError, CircuitBreakerError)
    assert issubclass(ConfigurationError, CircuitBreakerError)
    assert issubclass(RetryAfter, CircuitBreakerError)
    assert_type(RetryAfter(3).seconds, float)
    assert callable(install)
    assert BreakerPolicy().record_exceptions == (downstream_error,)
    assert BreakerTask.dont_autoretry_for == (CircuitOpenError,)


def add(a: int, b: int) -> int:
    return a + b


async def async_add(a: int, b: int) -> int:
    return a + b


def test_types_flow_through_the_breaker() -> None:
    breaker = CircuitBreaker("typed", BreakerPolicy(failure_threshold=2), storage=fresh_store(), clock=FakeClock())
    assert_type(breaker.call(add, 1, 2), int)
    guarded = breaker(add)
    assert_type(guarded(1, 2), int)
    assert guarded(1, 2) == 3
    assert_type(asyncio.run(breaker.acall(async_add, 1, 2)), int)
    assert_type(breaker.state, State)
    assert_type(breaker.snapshot(), BreakerSnapshot)
    with breaker as entered:
        assert_type(entered, CircuitBreaker)
    breaker.force_open()
    with pytest.raises(CircuitOpenError) as caught:
        breaker.call(add, 1, 2)
    assert_type(caught.value.retry_after, float | None)
    assert_type(caught.value.state, State | None)
    assert caught.value.name == "typed"
    assert caught.value.state is State.FORCED_OPEN
