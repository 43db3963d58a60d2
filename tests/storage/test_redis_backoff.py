"""Backoff in Redis alone: the policy text's versions, and state written by a release without backoff."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import redis

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, State
from celery_breaker.storage.redis import RedisStore, policy_text
from celery_breaker.storage.redis.replies import policy_from_text
from celery_breaker.testing import FakeClock

from ..unit.support import fail, ok, state_of
from .conftest import unique_prefix


@pytest.fixture
def server(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_policy_text_round_trips_the_backoff_fields() -> None:
    policy = BreakerPolicy(reset_timeout=7, backoff_multiplier=3, max_reset_timeout=100, reset_jitter=0.25)
    text = policy_text(policy)
    described = json.loads(text)
    assert described["v"] == 3
    assert (described["backoff_multiplier"], described["longest_open"], described["reset_jitter"]) == (3.0, 100.0, 0.25)
    assert described["fields"]["max_reset_timeout"] == 100.0
    assert policy_from_text(text, BreakerPolicy()) == policy
    assert policy_from_text(policy_text(BreakerPolicy()), BreakerPolicy(reset_timeout=1)) == BreakerPolicy()


#: The fields of the positional policy texts (versions 1 and 2), in order, after the version.
POSITIONAL_FIELDS = (
    "failure_threshold", "window", "failure_rate_threshold", "minimum_calls", "count_window",
    "slow_call_duration", "slow_call_rate_threshold", "reset_timeout", "half_open_max_calls",
    "success_threshold", "half_open_max_wait", "calls_to_judge", "probes_to_close",
)  # fmt: skip


def v1_text(policy: BreakerPolicy) -> str:
    """The policy as a release without backoff wrote it."""
    values = (getattr(policy, name) for name in POSITIONAL_FIELDS)
    return "1;" + ";".join("" if value is None else repr(value) for value in values)


def test_a_version_1_policy_reads_as_no_backoff() -> None:
    policy = policy_from_text(v1_text(BreakerPolicy(reset_timeout=900)), BreakerPolicy(max_reset_timeout=60))
    assert (policy.reset_timeout, policy.backoff_multiplier, policy.max_reset_timeout, policy.reset_jitter) == (
        900.0,
        1.0,
        None,
        0.0,
    )


def test_state_written_without_backoff_keeps_working_without_a_reset(
    redis_url: str, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore.from_url(f"{redis_url}?time=client&key_prefix={unique_prefix()}")
    clock = FakeClock()
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=10, half_open_max_calls=1)
    breaker = CircuitBreaker("svc", policy, storage=store, clock=clock)
    fail(breaker)
    state_key = store.keys_for("svc", None)[0]
    # What the previous release left: a version-1 policy, no streak, no open duration.
    server.hset(state_key, "pol", v1_text(policy))
    server.hdel(state_key, "stk", "od")
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        clock.advance(10)
        fail(breaker)  # the probe fails: without backoff, 10 s again
        with pytest.raises(CircuitOpenError) as info:
            breaker.call(ok)
    assert info.value.retry_after == pytest.approx(10)
    assert state_of(breaker) is State.OPEN
    assert "unreadable" not in caplog.text
    assert breaker._cell.policy.backoff_multiplier == 1.0  # adopted the stored policy
    assert breaker.snapshot().trips == 2
