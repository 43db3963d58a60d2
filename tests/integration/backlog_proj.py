"""A Celery project whose one BreakerTask calls a real HTTP downstream (urllib) and counts its runs in Redis.

Every key the project writes is under the test's namespace ``ns`` (the task's first argument):

* ``executions_key(ns)``: hash task id -> runs that got a 200 (more than 1 is a duplicate);
* ``deferred_key(ns)``: set of task ids deferred at least once (``task_retry`` for a ``CircuitOpenError``);
* ``deferral_counts_key(ns)``: hash task id -> deferrals (each one a copy published now or
  on release, so a task is delivered 1 + deferrals times);
* ``failures_key(ns)``: hash exception type -> tasks that failed; ``failed_ids_key(ns)``: their ids.
"""

from __future__ import annotations

import functools
import json
import os
import urllib.error
import urllib.request
from typing import Any

import redis
from celery import Celery
from celery.signals import task_failure, task_retry

from celery_breaker import BreakerTask, CircuitOpenError

BROKER = os.environ.get("PROJ_BROKER", "redis://127.0.0.1:6379/0")
BREAKER = "downstream"
TASK = "backlog.call_downstream"
#: The client's timeout: the downstream's hanging answers take longer.
TIMEOUT_S = 0.5

app = Celery("backlog_proj", broker=BROKER)
app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    breaker_defer_spread=1.0,
)
app.conf.update(json.loads(os.environ.get("PROJ_EXTRA_CONF", "{}")))


class DownstreamError(Exception):
    """The downstream answered 5xx, or not within ``TIMEOUT_S``."""


def executions_key(ns: str) -> str:
    return f"{ns}:executions"


def deferred_key(ns: str) -> str:
    return f"{ns}:deferred"


def deferral_counts_key(ns: str) -> str:
    return f"{ns}:deferral-counts"


def failures_key(ns: str) -> str:
    return f"{ns}:failures"


def failed_ids_key(ns: str) -> str:
    return f"{ns}:failed-ids"


@functools.cache
def counter() -> redis.Redis:
    """One client per worker process, made on first use (after the fork)."""
    return redis.Redis.from_url(BROKER, socket_timeout=5, socket_connect_timeout=5)


@app.task(name=TASK, base=BreakerTask, bind=True, breaker=BREAKER, acks_late=True, max_retries=0)
def call_downstream(self: Any, ns: str, url: str, n: int) -> None:
    """One GET to the downstream under the task's breaker (the whole run is guarded)."""
    try:
        with urllib.request.urlopen(f"{url}/call?n={n}", timeout=TIMEOUT_S) as response:
            response.read()
    except urllib.error.HTTPError as exc:  # 5xx (urlopen raises for every status >= 400)
        raise DownstreamError(f"downstream answered {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise DownstreamError(f"downstream did not answer: {exc}") from None
    counter().hincrby(executions_key(ns), self.request.id, 1)


def _ns(args: Any) -> str | None:
    return args[0] if isinstance(args, (list, tuple)) and args and isinstance(args[0], str) else None


@task_retry.connect
def _count_deferral(sender: Any = None, request: Any = None, reason: Any = None, **kwargs: Any) -> None:
    ns = _ns(getattr(request, "args", None))
    if ns is not None and isinstance(getattr(reason, "exc", reason), CircuitOpenError):
        with counter().pipeline() as pipe:
            pipe.sadd(deferred_key(ns), request.id)
            pipe.hincrby(deferral_counts_key(ns), request.id, 1)
            pipe.execute()


@task_failure.connect
def _count_failure(sender: Any = None, task_id: str | None = None, exception: Any = None, args: Any = None,
                   **kwargs: Any) -> None:  # fmt: skip
    ns = _ns(args)
    if ns is not None and task_id is not None:
        counter().hincrby(failures_key(ns), type(exception).__name__, 1)
        counter().sadd(failed_ids_key(ns), task_id)
