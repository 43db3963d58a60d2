"""A project whose queues are routed every way Celery allows: broker-delay must bring each run back to its own queue.

Queue names start with ``ROUTES_NS`` (one namespace per test). ``ROUTES_STORE`` is the
shared Redis store and ``ROUTES_COUNTER`` the Redis where the task counts its runs: the
downstream is down while ``<ns>:down`` exists; ``<ns>:calls`` and ``<ns>:runs`` hash a
task's number to the times it reached the downstream and ran to the end.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import redis
from celery import Celery
from kombu import entity

from celery_breaker import BreakerTask

NS = os.environ.get("ROUTES_NS", "routes")
COUNTER = os.environ.get("ROUTES_COUNTER", "redis://127.0.0.1:6379/0")
POLICY = {"failure_threshold": 1, "reset_timeout": 2, "half_open_max_calls": 1, "success_threshold": 1}
TASK = "routes.work"


def queues(ns: str) -> list[Any]:
    """The declared queues: a direct queue whose routing key is not its name, one with two
    bindings, two whose names and keys end alike (``high-<ns>``, ``emails.high-<ns>``), and
    two that a topic exchange both routes ``user.created`` to (one task, a copy in each)."""
    tasks = entity.Exchange(f"{ns}-tasks", type="direct")  # type: ignore[no-untyped-call]
    media = entity.Exchange(f"{ns}-media", type="direct")  # type: ignore[no-untyped-call]
    high = entity.Exchange(f"{ns}-high", type="direct")  # type: ignore[no-untyped-call]
    emails = entity.Exchange(f"{ns}-emails", type="direct")  # type: ignore[no-untyped-call]
    events = entity.Exchange(f"{ns}-events", type="topic")  # type: ignore[no-untyped-call]
    media_keys = [f"{ns}.media.video", f"{ns}.media.image"]
    bindings = [entity.binding(media, routing_key=key) for key in media_keys]  # type: ignore[no-untyped-call]
    return [
        entity.Queue(f"{ns}-work", tasks, routing_key=f"{ns}.work.rk"),  # type: ignore[no-untyped-call]
        entity.Queue(f"{ns}-media", bindings=bindings),  # type: ignore[no-untyped-call]
        entity.Queue(f"high-{ns}", high, routing_key=f"high-{ns}"),  # type: ignore[no-untyped-call]
        entity.Queue(f"emails.high-{ns}", emails, routing_key=f"emails.high-{ns}"),  # type: ignore[no-untyped-call]
        entity.Queue(f"{ns}-audit", events, routing_key="user.*"),  # type: ignore[no-untyped-call]
        entity.Queue(f"{ns}-mail", events, routing_key="user.created"),  # type: ignore[no-untyped-call]
    ]


def make_app(broker: str, ns: str, **conf: Any) -> Celery:
    app = Celery(f"routes-{ns}", broker=broker, set_as_current=False)
    app.conf.update(
        task_queues=queues(ns),
        task_default_queue=f"{ns}-work",
        task_ignore_result=True,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_heartbeat=2,
        breaker_default_policy=POLICY,
        breaker_defer_spread=0,
        **conf,
    )
    app.task(name=TASK, base=BreakerTask, bind=True, breaker="partner", acks_late=True, max_retries=0)(_work)
    return app


@functools.cache
def counter() -> redis.Redis:
    return redis.Redis.from_url(COUNTER)


def _work(self: Any, ns: str, n: int) -> int:
    with self.breaker:
        counter().hincrby(f"{ns}:calls", str(n), 1)
        if counter().exists(f"{ns}:down"):
            raise ConnectionError("partner: down")
    counter().hincrby(f"{ns}:runs", str(n), 1)
    return n


app = make_app(os.environ.get("PROJ_BROKER", "amqp://"), NS, breaker_storage_url=os.environ.get("ROUTES_STORE"))
