"""The Celery app bench/outage_timeline.py runs in real workers: one BreakerTask that GETs a real HTTP downstream.

Configured from the environment by the bench:

* ``BENCH_BROKER``: the broker URL (Redis); there is no result backend.
* ``BENCH_BREAKER_URL``: ``breaker_storage_url`` (a ``redis://`` store URL with a ``key_prefix``).
* ``BENCH_POLICY``: the breaker's policy, as JSON (``breaker_default_policy``).
* ``BENCH_EXTRA_CONF``: JSON merged into the app's conf (``breaker_release_rate`` and friends).
* ``BENCH_NS``: the prefix of the keys the task writes its outcomes to (on the broker's Redis):
  ``{ns}:done`` and ``{ns}:failed`` are lists of ``"<n> <epoch seconds>"``, one per task
  that got a 200 / that failed; ``{ns}:ready`` counts the workers that are ready.
"""

from __future__ import annotations

import functools
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

import redis
from celery import Celery
from celery.signals import task_failure, worker_ready

from celery_breaker import BreakerTask

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
BREAKER_URL = os.environ.get("BENCH_BREAKER_URL", "redis://127.0.0.1:6379/1?key_prefix=bench-outage")
NS = os.environ.get("BENCH_NS", "bench-outage")
POLICY: dict[str, Any] = json.loads(os.environ.get("BENCH_POLICY", "{}")) or {"failure_threshold": 5}

BREAKER_NAME = "downstream"
TASK = "bench.outage.call_downstream"
#: The client's timeout: the downstream's hanging answers take longer.
TIMEOUT_S = 0.5

app = Celery("bench_outage", broker=BROKER)
app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    breaker_storage_url=BREAKER_URL,
    breaker_default_policy=POLICY,
    # task-breaker-deferred and the transition events, without Celery's own task events.
    breaker_send_events=True,
    # Should the store fail, tasks are deferred (not run under a process-local breaker).
    breaker_on_storage_error="deny",
)
app.conf.update(json.loads(os.environ.get("BENCH_EXTRA_CONF", "{}")))


def done_key(ns: str) -> str:
    return f"{ns}:done"


def failed_key(ns: str) -> str:
    return f"{ns}:failed"


def ready_key(ns: str) -> str:
    return f"{ns}:ready"


class DownstreamError(Exception):
    """The downstream answered 5xx, or not within ``TIMEOUT_S``."""


@functools.cache
def counter() -> redis.Redis:
    """One client per worker process, made on first use (after the fork)."""
    return redis.Redis.from_url(BROKER, socket_timeout=5, socket_connect_timeout=5)


def call_downstream(url: str, n: int) -> None:
    """One GET to the downstream under the task's breaker (the whole run is guarded)."""
    try:
        with urllib.request.urlopen(f"{url}/call?n={n}", timeout=TIMEOUT_S) as response:
            response.read()
    except urllib.error.HTTPError as exc:  # 5xx (urlopen raises for every status >= 400)
        raise DownstreamError(f"downstream answered {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise DownstreamError(f"downstream did not answer: {exc}") from None
    counter().rpush(done_key(NS), f"{n} {time.time():.4f}")


def _count_failure(sender: Any = None, args: Any = None, **kwargs: Any) -> None:
    n = args[1] if isinstance(args, (list, tuple)) and len(args) > 1 else -1
    counter().rpush(failed_key(NS), f"{n} {time.time():.4f}")


def _announce_ready(sender: Any = None, **kwargs: Any) -> None:
    redis.Redis.from_url(BROKER).incr(ready_key(NS))


task_failure.connect(_count_failure, weak=False)
worker_ready.connect(_announce_ready, weak=False)

# Registered by calling app.task rather than decorating: Celery's decorators are untyped.
# max_retries=0: a task whose call fails while the breaker is still closed fails (the
# failures that trip it); deferrals never spend a retry.
app.task(name=TASK, base=BreakerTask, breaker=BREAKER_NAME, acks_late=True, max_retries=0)(call_downstream)
