"""A deferred copy keeps its delivery's own ``delivery_mode`` and priority, on a real RabbitMQ with a real worker.

Celery's ``signature_from_request`` carries a delivery's priority but not its delivery
mode, so a copy went out in ``task_default_delivery_mode``: a task sent persistent by an
app whose default is transient was deferred as a transient copy, which a broker restart
drops. The copy is read here as RabbitMQ holds it, with a raw consumer, after the worker
has stopped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from kombu.entity import Exchange, Queue

from celery_breaker import CircuitBreaker
from celery_breaker.integration.deferral.plan import DEFERRALS_HEADER
from celery_breaker.storage import close_stores
from tests.integration.backlog_proj import BREAKER, TASK
from tests.integration.deployments import deploy
from tests.integration.downstream import Downstream
from tests.integration.workers import wait_for
from tests.rabbitmq import RabbitMQServer, taken_off
from tests.servers import RedisServer

pytestmark = pytest.mark.slow

POLICY = {"failure_threshold": 1, "reset_timeout": 1.0}
PERSISTENT, TRANSIENT = 2, 1


@pytest.fixture(autouse=True)
def _let_go() -> Iterator[None]:
    yield
    close_stores()


def _copies(url: str, name: str) -> list[Any]:
    """The deferred copies waiting in queue ``name`` (taken off it), once any has come."""
    queue = Queue(name, Exchange(name), routing_key=name)  # type: ignore[no-untyped-call]  # (as Celery declares it)
    found: list[Any] = []

    def arrived() -> bool:
        found.extend(message for message in taken_off(url, queue) if DEFERRALS_HEADER in message.headers)
        return bool(found)

    wait_for(arrived, 15, "the deferred copy in its queue")
    return found


@pytest.mark.parametrize("mode", ["park", "countdown"])
@pytest.mark.parametrize(("default", "sent"), [("transient", PERSISTENT), ("persistent", TRANSIENT)])
def test_a_deferred_copy_keeps_the_delivery_mode_and_priority_it_was_sent_with(
    mode: str, default: str, sent: int, rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """broker-delay (``park`` on RabbitMQ) and the countdown: the copy has the delivery
    mode and the priority of the message it stands for, not the app's default."""
    cell = deploy("rabbitmq-classic", "redis", mode, rabbitmq=rabbitmq, redis_server=redis_server, policy=POLICY,
                  breaker_defer_spread=0, task_default_delivery_mode=default)  # fmt: skip
    publisher = cell.publisher(task_default_delivery_mode=default)
    breaker = CircuitBreaker(BREAKER, POLICY, storage=cell.store_url)
    breaker.force_open()
    try:
        with Downstream() as downstream, cell.worker(concurrency=1) as started:
            publisher.send_task(TASK, args=(cell.ns, downstream.url, 0), delivery_mode=sent, priority=3)
            wait_for(lambda: "retry: deferred" in started.log(), 20, "the task deferred")
        copies = _copies(cell.broker_url, cell.queue)
    finally:
        with contextlib.suppress(Exception):
            breaker.close()
        publisher.close()
    assert {(copy.properties.get("delivery_mode"), copy.properties.get("priority")) for copy in copies} == {(sent, 3)}
