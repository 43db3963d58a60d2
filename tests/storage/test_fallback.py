"""breaker_on_storage_error: what breakers do while their Redis store is down, and rejoining it."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import cast

import pytest

from celery_breaker import CircuitBreaker, CircuitOpenError, ConfigurationError, State
from celery_breaker.storage import FallbackStore
from celery_breaker.storage.redis import RedisStore
from celery_breaker.testing import FakeClock

from ..servers import RedisServer
from ..unit.support import down, fail, ok, state_of


def dead_store() -> RedisStore:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket closes
    return RedisStore.from_url(f"redis://127.0.0.1:{port}?time=client")


def test_local_mode_keeps_a_working_breaker_of_this_process(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="celery_breaker")
    clock = FakeClock()
    breaker = CircuitBreaker("svc", {"failure_threshold": 2}, storage=dead_store(), clock=clock)
    assert breaker.call(ok) == "ok"
    fail(breaker, 2)
    assert state_of(breaker) is State.OPEN  # it still protects the downstream
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not per call
    assert "breaker_on_storage_error=local" in warnings[0].getMessage()


def test_allow_mode_lets_every_call_through_and_never_trips() -> None:
    breaker = CircuitBreaker("svc", {"failure_threshold": 1}, storage=dead_store(), clock=FakeClock(),
                             on_storage_error="allow")  # fmt: skip
    for _ in range(3):
        with pytest.raises(ConnectionError):
            breaker.call(down)
    assert breaker.call(ok) == "ok"


def test_deny_mode_rejects_every_call() -> None:
    breaker = CircuitBreaker("svc", storage=dead_store(), clock=FakeClock(), on_storage_error="deny")
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    assert info.value.state is State.FORCED_OPEN


def test_an_unknown_mode_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="breaker_on_storage_error must be one of local, allow, deny"):
        CircuitBreaker("svc", storage=dead_store(), on_storage_error="panic")


@pytest.fixture
def restartable_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_a_store_outage_falls_back_and_the_breaker_rejoins_when_redis_returns(restartable_redis: RedisServer) -> None:
    restartable_redis.start()
    clock = FakeClock()
    url = f"{restartable_redis.url}?time=client&key_prefix=fallback"
    breaker = CircuitBreaker("svc", {"failure_threshold": 2}, storage=url, clock=clock)
    assert isinstance(cast(object, breaker.store), FallbackStore)
    assert breaker.call(ok) == "ok"  # on the shared breaker

    restartable_redis.stop()
    # Recording that success fails: the stand-in takes over, and calls keep flowing.
    assert breaker.call(ok) == "ok"
    fail(breaker, 2)
    assert state_of(breaker) is State.OPEN  # the stand-in protects the downstream meanwhile

    restartable_redis.start()  # a fresh, empty Redis on the same port
    other = CircuitBreaker("svc", {"failure_threshold": 2}, storage=f"{url}&socket_timeout=0.6", clock=clock)
    other.force_open()  # written to the new Redis by another "process"
    clock.advance(6)  # past the retry interval: the next call asks Redis again
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    assert state_of(breaker) is State.FORCED_OPEN  # rejoined the shared state


def test_each_outage_starts_with_a_fresh_stand_in(restartable_redis: RedisServer) -> None:
    """The stand-in of one outage is dropped when the breaker rejoins Redis: the next
    outage starts CLOSED, not where the last one left off (OPEN, its windows full)."""
    restartable_redis.start()
    clock = FakeClock()
    url = f"{restartable_redis.url}?time=client&key_prefix=fresh-stand-in"
    breaker = CircuitBreaker("svc", {"failure_threshold": 2, "reset_timeout": 30.0}, storage=url, clock=clock)
    assert breaker.call(ok) == "ok"
    restartable_redis.stop()
    fail(breaker, 2)
    assert state_of(breaker) is State.OPEN  # (the stand-in of the first outage tripped)
    restartable_redis.start()
    clock.advance(6)  # (past the retry interval)
    assert breaker.call(ok) == "ok"  # rejoined: the shared breaker is CLOSED
    restartable_redis.stop()
    fail(breaker)  # (the second outage: on a stand-in again)
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.CLOSED
