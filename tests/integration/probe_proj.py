"""A Celery project for the health-check tests: breaker "partner" with a probe; the downstream's health lives in Redis.

The downstream is down while the key ``<PROBE_KEYS>:down`` exists; real calls and health
checks are counted in ``<PROBE_KEYS>:calls`` and ``<PROBE_KEYS>:checks``, so the test (another
process) sees what reached the downstream. Those keys and the results live in the Redis at
``PROJ_COUNTER`` (default: the broker, which may be RabbitMQ).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from celery_breaker import BreakerTask

BROKER = os.environ.get("PROJ_BROKER", "redis://127.0.0.1:6379/0")
COUNTER = os.environ.get("PROJ_COUNTER", BROKER)
KEYS = os.environ.get("PROBE_KEYS", "probe")
POLICY = {"failure_threshold": 1, "reset_timeout": 0.5, "half_open_max_calls": 1, "success_threshold": 1}

app = Celery("probe_proj", broker=BROKER, backend=COUNTER)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    breaker_default_policy=POLICY,
    breaker_defer_spread=0,
    breaker_release_rate=200.0,
    breaker_release_ramp=0,
    breaker_probes={"partner": "tests.integration.probe_proj:check"},
    breaker_probe_timeout=2.0,
)
app.conf.update(json.loads(os.environ.get("PROJ_EXTRA_CONF", "{}")))

_CLIENTS: dict[str, redis.Redis] = {}


def client() -> redis.Redis:
    """One client per process (made in the pool process that first needs it)."""
    if COUNTER not in _CLIENTS:
        _CLIENTS[COUNTER] = redis.Redis.from_url(COUNTER)
    return _CLIENTS[COUNTER]


#: Seconds the health endpoint takes to answer (``PROBE_SLEEP``; default: at once).
CHECK_TAKES = float(os.environ.get("PROBE_SLEEP", "0"))


def check() -> None:
    """The downstream's health endpoint."""
    client().incr(f"{KEYS}:checks")
    if CHECK_TAKES:
        time.sleep(CHECK_TAKES)  # (a slow health endpoint, slower than a task's admission waits)
    if client().exists(f"{KEYS}:down"):
        raise ConnectionError("partner health endpoint: down")


def call_partner(n: int) -> int:
    """The real (non-idempotent) call: counted, failing while the downstream is down."""
    client().incr(f"{KEYS}:calls")
    if client().exists(f"{KEYS}:down"):
        raise ConnectionError("partner: down")
    return n


@app.task(base=BreakerTask, bind=True, breaker="partner", max_retries=0, acks_late=True)
def pay(self: Any, n: int) -> dict[str, Any]:
    with self.breaker:
        value = call_partner(n)
    return {"n": value, "retries": self.request.retries}
