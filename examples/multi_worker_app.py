"""The Celery app of examples/multi_worker.py, which starts workers with ``celery -A multi_worker_app worker``.

One Redis serves as broker, result backend and (by default, being the broker) breaker
store, so every worker process shares one ``inventory-api`` breaker. Configured from the
environment, which multi_worker.py sets for the workers it starts:

* ``DEMO_REDIS_URL``: the Redis URL.
* ``DEMO_DOWNSTREAM_URL``: the inventory API (an HTTP server in multi_worker.py).
* ``DEMO_PREFIX``: names the queue, the breaker keys and the demo's counters, so a
  shared Redis keeps this run apart from anything else on it.
"""

from __future__ import annotations

import functools
import os
import time
import urllib.request
from typing import Any

import redis
from celery import Celery
from celery.signals import task_retry

from celery_breaker import BreakerTask, CircuitOpenError

REDIS_URL = os.environ.get("DEMO_REDIS_URL", "redis://127.0.0.1:6379/0")
DOWNSTREAM_URL = os.environ.get("DEMO_DOWNSTREAM_URL", "http://127.0.0.1:8000")
PREFIX = os.environ.get("DEMO_PREFIX", "multi-worker-demo")
DEFERRALS_KEY = f"{PREFIX}:deferrals"  # hash: worker -> tasks it deferred
FIRST_DEFERRAL_KEY = f"{PREFIX}:first-deferral"  # hash: worker -> when it first deferred one (epoch s)

app = Celery("multi_worker_app", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=PREFIX,
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    breaker_key_prefix=PREFIX,  # the breaker store is the broker's Redis (the default)
    breaker_default_policy={
        "failure_threshold": 3,  # 3 failures within 10 s, in any process, open it for all
        "window": 10,
        "reset_timeout": 1.0,  # then 2 s, 4 s ... while probes keep failing
        "half_open_max_calls": 1,  # one probe at a time across every worker process
        "success_threshold": 1,
    },
    breaker_defer_spread=0.5,
    # Deferred tasks are parked in Redis (the default with a Redis store); once the
    # breaker closes they are released at the adaptive pace (the default): 10 tasks/s,
    # growing by 40 % every 0.5 s while they succeed, so the ~50 parked here drain
    # in a few seconds. breaker_release_pace="fixed" would go at breaker_release_rate
    # (default 50/s), reached after breaker_release_ramp (default 30 s).
)


@functools.cache
def stats() -> redis.Redis:
    """One client per worker process, made on first use (after the fork)."""
    return redis.Redis.from_url(REDIS_URL)


@app.task(
    base=BreakerTask,
    bind=True,
    breaker="inventory-api",
    autoretry_for=(OSError,),  # urllib's HTTPError and URLError are OSErrors
    retry_kwargs={"max_retries": 3, "countdown": 0.5},
)
def check_stock(self: Any, item: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"{DOWNSTREAM_URL}/stock/{item}", timeout=2) as response:
        response.read()
    headers = self.request.headers or {}
    return {
        "worker": self.request.hostname,
        "retries": self.request.retries,
        "deferrals": int(headers.get("x-breaker-deferrals", 0)),
    }


def count_deferral(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    """``task_retry`` fires for deferrals too: count them per worker."""
    if isinstance(getattr(reason, "exc", None), CircuitOpenError):
        worker = str(request.hostname)
        stats().hincrby(DEFERRALS_KEY, worker, 1)
        stats().hsetnx(FIRST_DEFERRAL_KEY, worker, time.time())


task_retry.connect(count_deferral, weak=False)
