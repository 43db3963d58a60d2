"""A Celery project for real-worker tests: its downstream is "down" while a Redis key exists."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import redis
from celery import Celery

from celery_breaker import BreakerTask

BROKER = os.environ.get("PROJ_BROKER", "redis://127.0.0.1:6379/0")
DOWN_KEY = "downstream:down"
CALLS_KEY = "downstream:calls"

app = Celery("proj", broker=BROKER, backend=BROKER)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    breaker_default_policy={"failure_threshold": 1, "reset_timeout": 1.5, "half_open_max_calls": 1,
                            "success_threshold": 1},
    breaker_defer_spread=0.5,
)  # fmt: skip
app.conf.update(json.loads(os.environ.get("PROJ_EXTRA_CONF", "{}")))


@functools.cache
def downstream() -> redis.Redis:
    """One client per worker process, made on first use (after the fork)."""
    return redis.Redis.from_url(BROKER, socket_timeout=5, socket_connect_timeout=5)


@app.task(base=BreakerTask, bind=True, breaker="partner-api", max_retries=0, acks_late=True)
def call_partner(self: Any, n: int) -> dict[str, Any]:
    """Calls the flaky downstream; while it is down the breaker defers this task."""
    client = downstream()
    with self.breaker:
        client.incr(CALLS_KEY)
        if client.exists(DOWN_KEY):
            raise ConnectionError("partner API is down")
    headers = self.request.headers or {}
    return {
        "n": n,
        "id": self.request.id,
        "retries": self.request.retries,
        "deferrals": headers.get("x-breaker-deferrals"),
        "pid": os.getpid(),
    }
