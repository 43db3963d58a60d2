"""Deferral by RabbitMQ's own delayed delivery: the run waits in the broker, in durable queues, not in a worker.

Celery delays quorum-queue countdowns this way ("native delayed delivery"): 28 exchanges
and queues ``celery_delayed_0`` .. ``celery_delayed_27``, queue *n* holding messages for
2**n seconds, route a message whose routing key spells its delay in binary, then hand it
to the topic exchange ``celery_delayed_delivery``, which the work queues are bound to.
The same topology serves every RabbitMQ deployment here, classic queues and direct
exchanges included: ``ensure_topology`` declares it when a worker starts (with Celery's
queue type for it, ``broker_native_delayed_delivery_queue_type``) and binds every queue
the app declares.

So a deferred run survives what a queued task survives, no worker holds it (RabbitMQ's
``consumer_timeout`` cannot strike), and it comes back by itself when its delay is up.
Delays are whole seconds, at least one.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from typing import Any

from kombu.entity import Exchange
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange,
    calculate_routing_key,
    declare_native_delayed_delivery_exchanges_and_queues,
)

from .strategy import Deferral, publish

__all__ = ["DELAY_EXCHANGE", "DELIVERY_EXCHANGE", "BrokerDelay", "destination_routing_key", "ensure_topology"]

logger = logging.getLogger("celery_breaker")

#: Where a delayed message enters (the longest level) and where it leaves for its queue.
DELAY_EXCHANGE = "celery_delayed_27"
DELIVERY_EXCHANGE = "celery_delayed_delivery"
#: The longest delay the topology spells (28 bits of seconds, about 8.5 years).
LONGEST_DELAY = 2**28 - 1
#: A delayed message's routing key: 28 binary digits, then the destination's own key.
_DELAY_PREFIX = re.compile(r"^(?:[01]\.){28}")


def destination_routing_key(delivery_info: dict[str, Any] | None, default: str) -> str:
    """The routing key that brings a message back to the queue it came from: the queue's
    name for the default exchange, the key it was delivered with (less any delay prefix)
    otherwise; ``default`` when the delivery says nothing."""
    info = delivery_info or {}
    key = info.get("routing_key")
    if not isinstance(key, str) or not key:
        return default
    return _DELAY_PREFIX.sub("", key)


def ensure_topology(connection: Any, app: Any) -> None:
    """Declare the delay exchanges and queues (as Celery does for quorum queues) and bind
    every queue of ``app`` to ``celery_delayed_delivery``: through its exchange when that
    routes by pattern (kombu's own binding), directly for a direct exchange, whose
    routing would not match a delayed message's key. Idempotent; raises what the broker
    answers (a queue already declared with other arguments, say)."""
    declare_native_delayed_delivery_exchanges_and_queues(connection, app.conf.broker_native_delayed_delivery_queue_type)
    for queue in app.amqp.queues.values():
        exchange = queue.exchange
        if exchange is not None and exchange.type != "direct" and exchange.name:
            bind_queue_to_native_delayed_delivery_exchange(connection, queue)
            continue
        routing_key = queue.routing_key or queue.name
        bound = queue.bind(connection.default_channel)
        bound.declare()
        pattern = routing_key if routing_key.startswith("#") else f"#.{routing_key}"
        bound.bind_to(exchange=DELIVERY_EXCHANGE, routing_key=pattern)


class BrokerDelay:
    """Publish the run into RabbitMQ's delay topology, to come back after the planned delay
    (rounded up to whole seconds, at least one). Each process makes sure of the topology
    once (``ensure_topology``) before its first delivery; if that fails, the run goes to
    the next strategy and the next delivery tries again."""

    name = "broker-delay"
    parks = True

    def __init__(self) -> None:
        self._ready_in: int | None = None  # the process that has made sure of the topology
        self._lock = threading.Lock()

    def _ensure(self, app: Any) -> None:
        if self._ready_in == os.getpid():
            return
        with self._lock:
            if self._ready_in != os.getpid():
                with app.connection_for_write() as connection:
                    ensure_topology(connection, app)
                self._ready_in = os.getpid()

    def deliver(self, deferral: Deferral) -> float | None:
        seconds = min(LONGEST_DELAY, max(1, math.ceil(deferral.plan.delay)))
        task = deferral.task
        request = task.request
        self._ensure(task.app)
        conf = task.app.conf
        destination = destination_routing_key(
            request.delivery_info, conf.task_default_routing_key or conf.task_default_queue or "celery"
        )
        signature = task.signature_from_request(request, deferral.args, deferral.kwargs, headers=deferral.headers)
        # No countdown or eta: the broker holds it for exactly that long, and a worker
        # must not hold it again. The explicit exchange and key replace the delivery's own.
        signature.options.pop("queue", None)
        publish(
            task,
            signature,
            exchange=Exchange(DELAY_EXCHANGE, type="topic"),  # type: ignore[no-untyped-call]
            routing_key=calculate_routing_key(seconds, destination),
        )
        return float(seconds)
