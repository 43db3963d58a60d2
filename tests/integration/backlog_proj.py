"""A Celery project whose one BreakerTask calls a real HTTP downstream (urllib) and counts its runs in Redis.

The broker is ``PROJ_BROKER`` (Redis or RabbitMQ: ``PROJ_QUEUE_TYPE=quorum`` declares
the queues as RabbitMQ quorum queues on a topic exchange); the counts go to the Redis
at ``PROJ_COUNTER`` (default: the broker). Every key the project writes is under the
test's namespace ``ns`` (the task's first argument):

* ``executions_key(ns)``: hash task id -> runs that got a 200 (more than 1 is a duplicate);
* ``deferred_key(ns)``: set of task ids deferred at least once (``task_retry`` for a ``CircuitOpenError``);
* ``deferral_counts_key(ns)``: hash task id -> deferrals (each one a copy published now or
  on release, so a task is delivered 1 + deferrals times);
* ``failures_key(ns)``: hash exception type -> tasks that failed; ``failed_ids_key(ns)``: their ids;
* ``revoked_key(ns)``: set of task ids revoked as expired (``task_revoked`` with ``expired=True``);
* ``finished_key(ns)``: hash task id -> runs of ``slow`` that came to their end;
* with ``PROJ_RUN`` set, ``transitions_key(run)``: every breaker transition each process
  made, ``pid:source>target`` (with a memory store each process has its own breaker).
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
from celery.app.task import get_actual_ignore_result
from celery.signals import task_failure, task_retry, task_revoked
from kombu.serialization import register

from celery_breaker import BreakerTask, CircuitOpenError
from celery_breaker.core import Transition
from celery_breaker.integration.deferral.broker_delay import QUEUE_KEY
from celery_breaker.monitoring import add_transition_listener

BROKER = os.environ.get("PROJ_BROKER", "redis://127.0.0.1:6379/0")
COUNTER = os.environ.get("PROJ_COUNTER", BROKER)
RUN = os.environ.get("PROJ_RUN")
BREAKER = "downstream"
TASK = "backlog.call_downstream"
#: The same task acknowledged early, as Celery does by default (it is lost if it fails to be deferred).
EARLY_ACK_TASK = "backlog.call_downstream_early_ack"
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
if os.environ.get("PROJ_QUEUE_TYPE") == "quorum":
    # Quorum queues allow no global QoS; Celery delays their countdowns in the broker,
    # which needs a topic exchange.
    app.conf.update(task_default_queue_type="quorum", task_default_exchange_type="topic")
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


def finished_key(ns: str) -> str:
    return f"{ns}:finished"


def revoked_key(ns: str) -> str:
    return f"{ns}:revoked"


def transitions_key(run: str) -> str:
    return f"{run}:transitions"


@functools.cache
def counter() -> redis.Redis:
    """One client per worker process, made on first use (after the fork)."""
    return redis.Redis.from_url(COUNTER, socket_timeout=5, socket_connect_timeout=5)


def _call_downstream(task: Any, ns: str, url: str, n: int) -> None:
    """One GET to the downstream under the task's breaker (the whole run is guarded)."""
    try:
        with urllib.request.urlopen(f"{url}/call?n={n}", timeout=TIMEOUT_S) as response:
            response.read()
    except urllib.error.HTTPError as exc:  # 5xx (urlopen raises for every status >= 400)
        raise DownstreamError(f"downstream answered {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise DownstreamError(f"downstream did not answer: {exc}") from None
    counter().hincrby(executions_key(ns), task.request.id, 1)


@app.task(name=TASK, base=BreakerTask, bind=True, breaker=BREAKER, acks_late=True, max_retries=0)
def call_downstream(self: Any, ns: str, url: str, n: int) -> None:
    """One GET to the downstream under the task's breaker (acknowledged once it has run)."""
    _call_downstream(self, ns, url, n)


@app.task(name=EARLY_ACK_TASK, base=BreakerTask, bind=True, breaker=BREAKER, acks_late=False, max_retries=0)
def call_downstream_early_ack(self: Any, ns: str, url: str, n: int) -> None:
    """``call_downstream``, acknowledged when it starts (Celery's default)."""
    _call_downstream(self, ns, url, n)


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


@task_revoked.connect
def _count_revoked(sender: Any = None, request: Any = None, expired: bool = False, **kwargs: Any) -> None:
    ns = _ns(getattr(request, "args", None))
    if ns is not None and expired:
        counter().sadd(revoked_key(ns), request.id)


def _note_transition(transition: Transition) -> None:
    if RUN is not None:
        counter().rpush(transitions_key(RUN), f"{os.getpid()}:{transition.source.value}>{transition.target.value}")


add_transition_listener(app, _note_transition)


#: A task whose run takes a while (a slow downstream), and whose time limit is the task's own.
SLOW_TASK = "backlog.slow"


@app.task(name=SLOW_TASK, base=BreakerTask, bind=True, breaker=BREAKER, acks_late=True, max_retries=0,
          time_limit=5)  # fmt: skip
def slow(self: Any, ns: str, seconds: float) -> None:
    """Counts its run, takes ``seconds`` (a slow downstream's answer), then counts its end."""
    counter().hincrby(executions_key(ns), self.request.id, 1)
    time.sleep(seconds)
    counter().hincrby(finished_key(ns), self.request.id, 1)


#: The same slow task without a time limit: nothing tells how long its run takes.
UNBOUNDED_SLOW_TASK = "backlog.slow_unbounded"


@app.task(name=UNBOUNDED_SLOW_TASK, base=BreakerTask, bind=True, breaker=BREAKER, acks_late=True, max_retries=0)
def slow_unbounded(self: Any, ns: str, seconds: float) -> None:
    """As ``slow``, without a time limit."""
    counter().hincrby(executions_key(ns), self.request.id, 1)
    time.sleep(seconds)
    counter().hincrby(finished_key(ns), self.request.id, 1)


#: A plain task (no breaker) that keeps a pool process busy for a while.
PLAIN_SLOW_TASK = "backlog.plain_slow"


@app.task(name=PLAIN_SLOW_TASK, acks_late=False)  # (acknowledged as it starts: its own run is outside the window)
def plain_slow(ns: str, seconds: float) -> None:
    """Takes ``seconds``, then counts its end."""
    time.sleep(seconds)
    counter().hincrby(finished_key(ns), "plain", 1)


#: A task whose arguments its sender hides (``argsrepr``, ``kwargsrepr``).
HIDDEN_TASK = "backlog.hidden"


def shown_key(ns: str) -> str:
    return f"{ns}:shown"


@app.task(name=HIDDEN_TASK, base=BreakerTask, bind=True, breaker=BREAKER, acks_late=True, max_retries=0)
def hidden(self: Any, ns: str, card: str, token: str = "") -> None:
    """Notes how the worker shows its arguments (its events, its logs, Flower), then counts its run."""
    request = self.request
    counter().rpush(shown_key(ns), f"{request.argsrepr} {request.kwargsrepr}")
    counter().hincrby(executions_key(ns), request.id, 1)


# -- Celery's canvas under a breaker (results in the result backend) ---------------------


def links_key(ns: str) -> str:
    return f"{ns}:links"


@app.task(name="backlog.add", base=BreakerTask, bind=True, breaker=BREAKER, acks_late=True, max_retries=0)
def add(self: Any, x: int, y: int, ns: str) -> int:
    """``x + y``, under the breaker (it makes no call: an open breaker defers it all the same)."""
    counter().hincrby(executions_key(ns), self.request.id, 1)
    return x + y


@app.task(name="backlog.total", base=BreakerTask, bind=True, breaker=BREAKER, acks_late=True, max_retries=0)
def total(self: Any, values: list[int], ns: str) -> int:
    """A chord's body, under the breaker too."""
    counter().hincrby(executions_key(ns), self.request.id, 1)
    return sum(values)


@app.task(name="backlog.refuse", base=BreakerTask, bind=True, breaker=BREAKER, acks_late=True, max_retries=0)
def refuse(self: Any, ns: str) -> None:
    """Fails with the caller's own error (never the downstream's): its ``link_error`` runs."""
    raise ValueError("refused")


@app.task(name="backlog.note")
def note(result: Any, tag: str, ns: str) -> None:
    """A ``link`` callback: records that it ran, with what."""
    counter().rpush(links_key(ns), f"{tag}:{result}")


@app.task(name="backlog.note_error")
def note_error(request: Any, exc: Any, traceback: Any, tag: str, ns: str) -> None:
    """A ``link_error`` errback: records that it ran, and for what error."""
    counter().rpush(links_key(ns), f"{tag}:{type(exc).__name__}")


# -- a retry its failure turns into a deferral (tests/integration/test_broker_cases.py) ----------

#: A task whose first run fails and asks for a retry elsewhere: another queue, a priority, time limits.
RETRY_ELSEWHERE_TASK = "backlog.retry_elsewhere"


def seen_key(ns: str) -> str:
    return f"{ns}:seen"


@app.task(name=RETRY_ELSEWHERE_TASK, base=BreakerTask, bind=True, breaker=BREAKER, acks_late=True, max_retries=3)
def retry_elsewhere(self: Any, ns: str, queue: str) -> None:
    """Notes where each run came from and what it was sent with; the first run fails
    (which trips a breaker of ``failure_threshold`` 1) and asks to be retried on ``queue``."""
    request = self.request
    info = request.delivery_info or {}
    counter().rpush(
        seen_key(ns),
        json.dumps(
            {
                "queue": info.get(QUEUE_KEY) or info.get("routing_key"),
                "priority": info.get("priority"),
                "timelimit": list(request.timelimit or (None, None)),
                "retries": request.retries,
            }
        ),
    )
    if counter().hsetnx(f"{ns}:failed-once", request.id, 1):
        raise self.retry(
            exc=DownstreamError("down"), queue=queue, priority=7, time_limit=40, soft_time_limit=30, countdown=0
        )
    counter().hincrby(executions_key(ns), request.id, 1)


#: A task that retries itself once to the queue it was delivered from, as its request names it.
RETRY_TO_ITS_QUEUE_TASK = "backlog.retry_to_its_queue"


@app.task(name=RETRY_TO_ITS_QUEUE_TASK, base=BreakerTask, bind=True, breaker=BREAKER, acks_late=True, max_retries=1)
def retry_to_its_queue(self: Any, ns: str) -> None:
    """Notes the delivery's routing key; its first run retries to the queue that key names
    (``self.retry(queue=self.request.delivery_info["routing_key"])``), the second counts itself."""
    request = self.request
    key = (request.delivery_info or {}).get("routing_key")
    counter().rpush(seen_key(ns), f"{key} {request.retries}")
    if not request.retries:
        raise self.retry(queue=key, countdown=0.1)
    counter().hincrby(executions_key(ns), request.id, 1)


# -- one breaker per tenant (tests/integration/test_corruption.py) --------------------------

#: The per-key task's breaker: one per tenant, its key the task's fourth argument.
KEYED_BREAKER = "tenants"
KEYED_TASK = "backlog.keyed"


@app.task(name=KEYED_TASK, base=BreakerTask, bind=True, breaker=KEYED_BREAKER,
          breaker_key=lambda args, kwargs: args[3], acks_late=True, max_retries=0)  # fmt: skip
def keyed(self: Any, ns: str, url: str, n: int, tenant: str) -> None:
    """``call_downstream`` under the breaker of ``tenant``."""
    _call_downstream(self, ns, url, n)


# -- every form a task message takes, through a deferral (tests/integration/test_message_forms.py) ----

#: A task that notes, at each run that gets past its breaker, what its message said.
MIRROR_TASK = "backlog.mirror"


def mirrored_key(ns: str) -> str:
    return f"{ns}:mirrored"


@app.task(name=MIRROR_TASK, base=BreakerTask, bind=True, breaker=BREAKER, acks_late=True, max_retries=0)
def mirror(self: Any, ns: str, *args: Any, **kwargs: Any) -> None:
    """Notes its request (arguments, headers, options) as ``repr`` texts, then counts its run."""
    request = self.request
    info = request.delivery_info or {}
    headers = {k: v for k, v in (request.headers or {}).items() if not k.startswith("x-breaker-")}
    seen = {
        "args": repr(args), "kwargs": repr(sorted(kwargs.items())), "headers": repr(sorted(headers.items())),
        "shadow": request.shadow, "timelimit": repr(request.timelimit), "expires": repr(request.expires),
        "priority": info.get("priority"), "reply_to": request.reply_to, "correlation_id": request.correlation_id,
        "ignore_result": get_actual_ignore_result(self, request), "callbacks": repr(request.callbacks),
        "errbacks": repr(request.errbacks), "compression": getattr(request, "compression", None),
        "content_type": info.get("celery_breaker_content_type"), "retries": request.retries,
        "deferrals": (request.headers or {}).get("x-breaker-deferrals"),
        "delivery_mode": (request.properties or {}).get("delivery_mode"),
        "routing_key": info.get(QUEUE_KEY) or info.get("routing_key"),
        "stamps": repr(sorted((request.stamps or {}).items())), "stamped_headers": repr(request.stamped_headers),
    }  # fmt: skip
    counter().rpush(mirrored_key(ns), json.dumps({"id": request.id, **seen}))
    counter().hincrby(executions_key(ns), request.id, 1)


#: A serializer of the project's own, registered with kombu: JSON in UTF-16 (a content
#: encoding other than UTF-8), accepted by its workers when a test lists it.
UTF16_SERIALIZER = "json-utf16"
register(  # type: ignore[no-untyped-call]
    UTF16_SERIALIZER, lambda value: json.dumps(value, ensure_ascii=False), json.loads,
    content_type="application/x-json-utf16", content_encoding="utf-16",
)  # fmt: skip
