"""The Celery app that bench/redis_store.py runs in real workers: one no-op task, plain and under two breakers.

Every task only counts itself done (``INCR`` of the key it is given, on the broker's
Redis), so the bench can tell when a batch is finished; that one round trip is the same
in every variant. Configured from the environment by the bench:

* ``BENCH_BROKER``: the broker URL (Redis); there is no result backend.
* ``BENCH_BREAKER_URL``: ``breaker_storage_url`` (a ``redis://`` store URL).
* ``BENCH_PYBREAKER_REDIS``: the Redis that pybreaker's ``CircuitRedisStorage`` uses.
"""

from __future__ import annotations

import functools
import os

import pybreaker
import redis
from celery import Celery

from celery_breaker import BreakerTask

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
BREAKER_URL = os.environ.get("BENCH_BREAKER_URL", "redis://127.0.0.1:6379/1?key_prefix=bench")
PYBREAKER_REDIS = os.environ.get("BENCH_PYBREAKER_REDIS", "redis://127.0.0.1:6379/1")

BREAKER_NAME = "bench-noop"
POLICY = {"failure_threshold": 5, "reset_timeout": 30}

app = Celery("bench_redis_store", broker=BROKER)
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    breaker_storage_url=BREAKER_URL,
    breaker_default_policy=POLICY,
    # Should the store fail, tasks are deferred and the run stalls (and says so),
    # rather than run under a process-local breaker that costs no Redis traffic.
    breaker_on_storage_error="deny",
)

PLAIN = "bench.noop_plain"
BREAKER = "bench.noop_breaker"
PYBREAKER = "bench.noop_pybreaker"


@functools.cache
def counter() -> redis.Redis:
    """One client per worker process, made on first use (after the fork)."""
    return redis.Redis.from_url(BROKER)


@functools.cache
def pybreaker_guard() -> pybreaker.CircuitBreaker:
    """pybreaker with its Redis storage, one per worker process, made after the fork."""
    storage = pybreaker.CircuitRedisStorage(
        pybreaker.STATE_CLOSED, redis.Redis.from_url(PYBREAKER_REDIS), namespace="bench-celery"
    )
    return pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30, state_storage=storage)


def count_done(done_key: str) -> None:
    counter().incr(done_key)


def noop_plain(done_key: str) -> None:
    count_done(done_key)


def noop_breaker(done_key: str) -> None:
    count_done(done_key)  # the whole run is under the task's breaker (BreakerTask)


def noop_pybreaker(done_key: str) -> None:
    pybreaker_guard().call(count_done, done_key)


# Registered by calling app.task rather than decorating: Celery's decorators are untyped.
app.task(name=PLAIN)(noop_plain)
app.task(name=BREAKER, base=BreakerTask, breaker=BREAKER_NAME)(noop_breaker)
app.task(name=PYBREAKER)(noop_pybreaker)
