"""The Celery app bench/backlog_memory.py runs in a real worker: one BreakerTask whose breaker the bench holds open.

Configured from the environment by the bench:

* ``BENCH_BROKER``: the broker URL (Redis); there is no result backend.
* ``BENCH_BREAKER_URL``: ``breaker_storage_url`` (a ``redis://`` store URL with a ``key_prefix``).
* ``BENCH_EXTRA_CONF``: JSON merged into the app's conf (``breaker_park`` and friends,
  passed only by the modes that need them: an unknown ``breaker_*`` setting stops the worker).
* ``BENCH_READY_KEY``: set on the broker's Redis when the worker is ready (``worker_ready``),
  so the bench can wait for it without reading INFO logs.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready

from celery_breaker import BreakerTask

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
BREAKER_URL = os.environ.get("BENCH_BREAKER_URL", "redis://127.0.0.1:6379/1?key_prefix=bench-backlog")
READY_KEY = os.environ.get("BENCH_READY_KEY", "bench:backlog:ready")

BREAKER_NAME = "bench-backlog"
#: Held open by the bench (forced open), a deferred task comes back after
#: reset_timeout + uniform(0, reset_timeout): 10 to 20 minutes, well after the measurement.
POLICY = {"failure_threshold": 5, "reset_timeout": 600}
TASK = "bench.backlog"

app = Celery("bench_backlog", broker=BROKER)
app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    breaker_storage_url=BREAKER_URL,
    breaker_default_policy=POLICY,
    # Should the store fail, tasks are deferred (not run under a process-local breaker).
    breaker_on_storage_error="deny",
)
app.conf.update(json.loads(os.environ.get("BENCH_EXTRA_CONF", "{}")))


@functools.cache
def counter() -> redis.Redis:
    """One client per worker process, made on first use (after the fork)."""
    return redis.Redis.from_url(BROKER)


def backlog(done_key: str, payload: str) -> None:
    """Counts itself done; never runs while the bench holds the breaker open."""
    counter().incr(done_key)


def _announce_ready(sender: Any = None, **kwargs: Any) -> None:
    redis.Redis.from_url(BROKER).set(READY_KEY, os.getpid())


worker_ready.connect(_announce_ready, weak=False)


# Registered by calling app.task rather than decorating: Celery's decorators are untyped.
app.task(name=TASK, base=BreakerTask, breaker=BREAKER_NAME)(backlog)
