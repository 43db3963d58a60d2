"""One deployment of ``tests.integration.backlog_proj`` for a test: a broker, a store, a deferral mode, real workers.

Brokers: ``redis``, ``rabbitmq-classic``, ``rabbitmq-quorum`` (quorum queues on a topic
exchange, as Celery's native delayed delivery needs). Stores: ``memory`` (each pool
process has its own breakers) and ``redis``. Modes: ``park`` (``breaker_park="auto"``,
the default), ``countdown`` (``breaker_park=False``) and ``store`` (``breaker_park=True``:
parked in the Redis store whatever the broker). Each deployment has a queue and
namespaces of its own, so tests never see each other's messages or counts.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from tests.integration.workers import WorkerProcess
from tests.rabbitmq import CONSUMER_TIMEOUT_S, RabbitMQServer
from tests.servers import RedisServer

__all__ = ["CONSUMER_TIMEOUT_S", "Deployment", "deploy"]

APP = "tests.integration.backlog_proj"
PARK_SETTING = {"park": "auto", "countdown": False, "store": True}


@dataclass
class Deployment:
    """Where tasks queue, where breakers live, how tasks are deferred; and the settings that say so."""

    broker: str
    store: str
    mode: str
    ns: str
    broker_url: str
    store_url: str
    counter_url: str
    backend_url: str | None
    queue: str
    conf: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.broker} x {self.store} x {self.mode}"

    def publisher(self, **conf: Any) -> Celery:
        """An app that publishes the project's tasks to this deployment's queue, configured as its workers are."""
        app = Celery(f"publisher-{self.ns}", broker=self.broker_url, backend=self.backend_url, set_as_current=False)
        app.conf.update(task_default_queue=self.queue, broker_connection_retry_on_startup=True, **conf)
        if self.broker == "rabbitmq-quorum":
            app.conf.update(task_default_queue_type="quorum", task_default_exchange_type="topic")
        return app

    @contextlib.contextmanager
    def worker(self, *, concurrency: int = 2, name: str = "w", queues: str | None = None) -> Iterator[WorkerProcess]:
        """A started ``celery worker`` (prefork) of this deployment, stopped on leaving;
        ``queues``: the queues it consumes (``-Q``; default: the deployment's own)."""
        with WorkerProcess(
            self.broker_url, concurrency=concurrency, extra_conf=json.dumps(self.conf), name=f"{name}-{self.ns}",
            app=APP, env=self.env, queues=queues,
        ) as started:  # fmt: skip
            started.wait_ready()
            yield started


def deploy(
    broker: str,
    store: str,
    mode: str,
    *,
    rabbitmq: RabbitMQServer | None = None,
    redis_server: RedisServer,
    policy: dict[str, Any],
    results: bool = False,
    **conf: Any,
) -> Deployment:
    """A new deployment on the session's servers: Redis db 0 is the Redis broker, db 1 the
    store, db 2 the project's counters, db 3 the result backend (``results=True``)."""
    ns = f"deploy-{uuid.uuid4().hex[:8]}"
    if broker == "redis":
        broker_url = f"{redis_server.url}/0"
    elif rabbitmq is not None:
        broker_url = rabbitmq.url
    else:
        raise ValueError(f"a {broker} deployment needs the rabbitmq server")
    store_url = "memory://" if store == "memory" else f"{redis_server.url}/1?key_prefix={ns}"
    backend_url = f"{redis_server.url}/3" if results else None
    queue = f"q-{ns}"
    settings: dict[str, Any] = {
        "breaker_storage_url": store_url,
        "breaker_default_policy": policy,
        "breaker_park": PARK_SETTING[mode],
        "breaker_consumer_timeout": CONSUMER_TIMEOUT_S,
        "task_default_queue": queue,
        "broker_heartbeat": 2,  # a worker on RabbitMQ stops in a second, not ten
        **({"result_backend": backend_url, "task_ignore_result": False} if results else {}),
        **conf,
    }
    env = {"PROJ_COUNTER": f"{redis_server.url}/2", "PROJ_RUN": ns}
    if broker == "rabbitmq-quorum":
        env["PROJ_QUEUE_TYPE"] = "quorum"
    return Deployment(broker, store, mode, ns, broker_url, store_url, f"{redis_server.url}/2", backend_url, queue,
                      settings, env)  # fmt: skip
