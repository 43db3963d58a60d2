"""The worker's consumer step that declares broker-delay's topology and binds its queues each time it connects.

broker-delay's runs wait in RabbitMQ's ``celery_breaker_delayed_*`` queues and come back
through ``celery_breaker_delayed_delivery``, bound to each queue by its token
(``broker_delay.py``).
A RabbitMQ restarted without its definitions (a node reset, a container without a
volume) has none of that; a plain restart keeps the durable delay queues and their
messages but deletes a transient (``durable=False``) queue with its bindings, and the
queue kombu declares again on reconnecting is bound to nothing: each delayed run that
comes due for it is dropped. The pool processes declare the topology on their own
connections before they publish, but runs already waiting need the bindings back
before they come due, whether or not anything is deferred again. So the worker's main
process declares the topology and binds every queue it consumes (those added with
``add_consumer`` too) whenever its consumer starts: a consumer step's ``start`` runs
again on every connection restart, after the task consumer has declared its queues and
before any message is handled. It warns when deferred runs wait in
``celery_breaker_delayed_unroutable``: they came due for a queue that no longer existed.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from ...storage.masking import MaskedRepr
from ..broker import AMQP, broker_kind
from .broker_delay import UNROUTABLE, BrokerDelay, ensure_topology
from .delay_depth import unroutable_count
from .selection import deferral_strategies

__all__ = ["DelayTopologyStep"]

logger = logging.getLogger("celery_breaker")


class DelayTopologyStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """On every (re)start of the worker's consumer: declare the delay topology and bind each
    consumed queue to the delivery exchange by its token, when the worker defers by
    broker-delay. A failure is a WARNING, not a stopped worker: the pool processes declare
    the topology again before their next publish."""

    label = "celery-breaker delay topology"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def include_if(self, c: Any) -> bool:
        """Only on RabbitMQ."""
        return broker_kind(c.app.conf) == AMQP

    def start(self, c: Any) -> None:
        """Declare the topology and bind the consumed queues (broker-delay workers only)."""
        app = c.app
        if not any(isinstance(strategy, BrokerDelay) for strategy in deferral_strategies(app)):
            return
        consumer = getattr(c, "task_consumer", None)
        consumed = [queue.name for queue in getattr(consumer, "queues", None) or ()]
        try:
            with app.connection_for_write() as connection:
                bound = ensure_topology(connection, app, consumed)  # (a queue that fails is left out, warned)
                unroutable = unroutable_count(connection)
        except Exception as exc:
            if _another_type(exc):
                logger.error(
                    "celery-breaker: broker-delay's delay queues exist on this vhost with another type than "
                    "broker_native_delayed_delivery_queue_type (%r) says (%r): runs are deferred by countdown instead. "
                    "Fix: make the setting the type of the existing celery_breaker_delayed_* queues (and "
                    "celery_delayed_*), or delete those queues (when empty) so they are declared again",
                    app.conf.broker_native_delayed_delivery_queue_type, MaskedRepr(exc),
                )  # fmt: skip
                return
            logger.warning(
                "celery-breaker: could not declare broker-delay's topology or bind queues %s to it (%r): runs "
                "already delayed for them may not come back until a deferral declares it again",
                ", ".join(consumed) or "(none)", MaskedRepr(exc),
            )  # fmt: skip
            return
        logger.debug("celery-breaker: broker-delay topology declared; bound %s", ", ".join(sorted(bound)))
        if unroutable:
            logger.warning(
                "celery-breaker: %d deferred task(s) came due for a queue that no longer existed (deleted, auto-delete "
                "or expired) and wait in RabbitMQ's queue %r; move them back to their queue (shovel, or the management "
                "UI) or purge it",
                unroutable, UNROUTABLE,
            )  # fmt: skip


#: The arguments a delay queue of the other type differs by (a classic one has no
#: dead-letter strategy, so RabbitMQ may name that one first).
_TYPE_ARGUMENTS = ("'x-queue-type'", "'x-dead-letter-strategy'")


def _another_type(exc: BaseException) -> bool:
    """Whether ``exc`` is RabbitMQ's 406 for a delay queue that exists with another queue type."""
    text = str(getattr(exc, "reply_text", "") or exc)
    return (
        getattr(exc, "reply_code", None) == 406
        and "celery_breaker_delayed_" in text
        and any(argument in text for argument in _TYPE_ARGUMENTS)
    )
