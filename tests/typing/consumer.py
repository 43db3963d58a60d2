"""A program written against celery-breaker's public API, as a user would write it.

mypy --strict checks it twice: with the project (``files`` in pyproject.toml) and, in
``scripts/test.sh``, against the installed wheel (``--python-executable``), which proves
the wheel ships ``py.typed`` and its inline types. ``tests/test_typing.py`` runs it under
mypy and under Python. Each ``assert_type`` pins a public type; each ``# type: ignore[code]``
marks a misuse that must stay a type error (``warn_unused_ignores`` fails the check if
it ever stops being one).

It imports nothing but the standard library, Celery and celery_breaker.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from types import MappingProxyType
from typing import assert_type

from celery import Celery

import celery_breaker
import celery_breaker.ops
import celery_breaker.storage.redis
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
from celery_breaker.monitoring import BreakerStatus, collect_metrics
from celery_breaker.storage import Listing
from celery_breaker.testing import FakeClock, fresh_store, use_clock


def charge(order_id: int, *, amount: float) -> str:
    return f"charged {order_id}: {amount:.2f}"


async def fetch(url: str) -> bytes:
    return url.encode()


def breaker_api() -> None:
    clock = FakeClock()
    policy = BreakerPolicy(failure_threshold=2, window=60, reset_timeout=timedelta(seconds=30))
    breaker = CircuitBreaker("payments", policy, storage=fresh_store(), clock=clock)
    CircuitBreaker("crm", {"failure_rate_threshold": 0.5, "minimum_calls": 10}, storage="memory://typed")
    # (any mapping of fields, as at run time: a read-only constant, a TypedDict)
    CircuitBreaker("erp", MappingProxyType({"failure_threshold": 3}), storage="memory://typed")
    assert_type(downstream_error(ValueError("bad input")), bool)
    BreakerPolicy(record_exceptions=(downstream_error, KeyError, "builtins.TimeoutError"))
    # (as the docs teach: durations as timedelta, matchers as a list or a single one)
    BreakerPolicy(window=timedelta(minutes=1), max_reset_timeout=timedelta(minutes=5), ignore_exceptions=[KeyError])
    assert BreakerPolicy(record_exceptions=ConnectionError).record_exceptions == (ConnectionError,)
    assert_type(policy.window, float)

    assert_type(breaker.call(charge, 1, amount=9.5), str)
    guarded = breaker(charge)
    assert_type(guarded(2, amount=1.0), str)

    assert_type(asyncio.run(breaker.acall(fetch, "https://partner.example")), bytes)
    # (a decorated coroutine function still returns a coroutine: asyncio.run and
    # create_task take nothing less)
    guarded_fetch = breaker(fetch)
    assert_type(asyncio.run(guarded_fetch("https://partner.example")), bytes)

    with breaker as entered:
        assert_type(entered, CircuitBreaker)

    assert_type(breaker.state, State)
    snapshot = breaker.snapshot()
    assert_type(snapshot, BreakerSnapshot)
    assert_type(snapshot.state, State)

    breaker.force_open()
    rejected: CircuitOpenError | None = None
    try:
        breaker.call(charge, 3, amount=1.0)
    except CircuitOpenError as error:
        rejected = error
    assert rejected is not None, "a forced-open breaker admitted a call"
    assert_type(rejected.retry_after, float | None)
    assert_type(rejected.state, State | None)
    assert_type(rejected.label, str)
    assert rejected.state is State.FORCED_OPEN
    breaker.close()
    breaker.reset()
    assert_type(clock.advance(30), float)

    statuses = collect_metrics(breaker.store)
    assert_type(statuses, Listing[BreakerStatus])
    assert [status.snapshot.name for status in statuses] == ["payments"]
    assert_type(statuses.unreached, tuple[str, ...])
    assert statuses.unreached == ()  # (servers the listing could not read: a Cluster's, in part)


def misuses(breaker: CircuitBreaker, task: BreakerTask) -> None:
    """Never run: each line must stay a type error."""
    task.breaker.call(charge, "1", amount=9.5)  # type: ignore[arg-type]
    print(celery_breaker.CircuitBreakr)  # type: ignore[attr-defined]
    print(celery_breaker.ops.operat, celery_breaker.storage.redis.RedisStor)  # type: ignore[attr-defined]
    breaker.call(charge, "1", amount=9.5)  # type: ignore[arg-type]
    breaker.call(charge, 1)  # type: ignore[call-arg]
    breaker(charge)(2, amount="1")  # type: ignore[arg-type]
    CircuitBreaker("x", storage=42)  # type: ignore[arg-type]
    BreakerPolicy(failure_threshold="5")  # type: ignore[arg-type]
    BreakerPolicy(5)  # type: ignore[call-arg]
    State.OPEN = State.CLOSED  # type: ignore[misc]


def errors_api() -> None:
    assert_type(RetryAfter(12).seconds, float)
    assert issubclass(CircuitOpenError, CircuitBreakerError)
    assert issubclass(ConfigurationError, ValueError)
    message = ""
    try:
        BreakerPolicy(failure_threshold=0)
    except ConfigurationError as bad:
        message = str(bad)
    assert "failure_threshold" in message, "failure_threshold=0 was accepted"


def task_api() -> None:
    app = Celery("typed", broker="memory://", backend="cache+memory://")
    app.conf.breaker_default_policy = {"failure_threshold": 3}
    install(app)

    @app.task(base=BreakerTask, bind=True, breaker="payments")
    def pay(self: BreakerTask, order_id: int) -> str:
        assert_type(self.breaker, CircuitBreaker)  # (the run's breaker: typed, not Any)
        with self.breaker:
            return charge(order_id, amount=1.0)

    # (a task class of one's own names its breaker with breaker_name: ``breaker`` is the
    # typed accessor, so ``breaker = "refunds"`` there would be a type error)
    class RefundTask(BreakerTask):
        breaker_name = "refunds"

    @app.task(base=RefundTask, bind=True)
    def refund(self: RefundTask, order_id: int) -> str:
        return self.breaker.call(charge, order_id, amount=-1.0)

    use_clock(app, FakeClock())
    assert pay.apply(args=(7,)).get() == "charged 7: 1.00"
    assert refund.apply(args=(8,)).get() == "charged 8: -1.00"
    assert refund.breaker.name == "refunds"


def main() -> None:
    assert celery_breaker.__version__
    breaker_api()
    errors_api()
    task_api()
    print("public API ok")


if __name__ == "__main__":
    main()
