"""A Celery project for the parking tests: one task on breaker "partner", results in Redis."""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery

from celery_breaker import BreakerTask, TooManyRequests

BROKER = os.environ.get("PROJ_BROKER", "redis://127.0.0.1:6379/0")
POLICY = {"failure_threshold": 1, "reset_timeout": 1.0, "half_open_max_calls": 1, "success_threshold": 1}

app = Celery("parking_proj", broker=BROKER, backend=BROKER)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    breaker_default_policy=POLICY,
    breaker_defer_spread=0,
    breaker_release_pace="fixed",  # (the tests time their waits by it)
    breaker_release_rate=200.0,
    breaker_release_ramp=0,
)
app.conf.update(json.loads(os.environ.get("PROJ_EXTRA_CONF", "{}")))


@app.task(base=BreakerTask, bind=True, breaker="partner", max_retries=0, acks_late=True)
def job(self: Any, n: int) -> dict[str, Any]:
    return {"n": n, "retries": self.request.retries, "headers": dict(self.request.headers or {})}


@app.task(base=BreakerTask, bind=True, breaker="partner", max_retries=0, acks_late=True)
def refused_once(self: Any, n: int) -> dict[str, Any]:
    """Refused (429) the first time it runs after the test marked it (``refuse:<n>`` in the broker's Redis)."""
    import redis

    if redis.Redis.from_url(self.app.conf.broker_url).delete(f"refuse:{n}"):
        raise TooManyRequests(0.5)
    return {"n": n, "retries": self.request.retries, "headers": dict(self.request.headers or {})}


@app.task(base=BreakerTask, bind=True, breaker="partner", max_retries=0, acks_late=True)
def through_dependency(self: Any, n: int) -> dict[str, Any]:
    """Admitted by its own breaker ("partner"); calls a dependency behind breaker "dependency"
    (same store) inside its body."""
    from celery_breaker import CircuitBreaker

    with CircuitBreaker("dependency", storage=self.app.conf.breaker_storage_url):
        return {"n": n, "deferrals": int((self.request.headers or {}).get("x-breaker-deferrals", 0))}


@app.task(base=BreakerTask, bind=True, breaker="partner", max_retries=0, acks_late=False)
def count_of(self: Any, items: Any) -> dict[str, Any]:
    """Sent with ``serializer="pickle"`` (a set, which JSON cannot carry)."""
    return {"count": len(items), "retries": self.request.retries}


@app.task(base=BreakerTask, bind=True, breaker="partner", max_retries=0, acks_late=False)
def shape_of(self: Any, mapping: Any, pair: Any) -> dict[str, Any]:
    """Sent with ``serializer="pickle"``: arguments JSON encodes, but as others (its keys
    as strings, the tuple as a list)."""
    return {"keys": sorted(type(key).__name__ for key in mapping), "pair": type(pair).__name__}
