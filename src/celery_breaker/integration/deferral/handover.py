"""A countdown deferral that comes due while every pool process is busy is handed on.

A countdown deferral (``countdown.py``) is a message with an ETA that the worker that
receives it holds, unacknowledged, until it is due; it is capped at 90 % of the broker's
window (``breaker_consumer_timeout`` on RabbitMQ), which leaves the rest for the run to
start. Due, Celery hands it to the pool, and where every pool process is busy it waits
there, still unacknowledged. A wait longer than the rest of the window made RabbitMQ close
the channel (``PreconditionFailed``: "delivery acknowledgement on channel 1 timed out")
and the worker exit, the tasks it held waiting in the queue for the next worker (an
acceptance test: a 20 s ``consumer_timeout``, two 12 s tasks on ``-c 2``, 7 of 18 tasks
stranded).

So the worker's main process, where Celery's timer applies a due ETA task
(``Consumer.apply_eta_task``), looks first: a deferral of ours (``DEFERRALS_HEADER``) on
RabbitMQ that finds every pool process taken (as many requests reserved as processes) is
published again, as it came (its body and headers, without its ETA), to the queue it was
delivered from, with publisher confirms, and only once RabbitMQ confirmed the copy is the
held delivery acknowledged: the task then waits in the queue, not in the worker, and
its new delivery's window starts when a worker takes it. Anything that does not work out
(the queue cannot be told, the publish is refused) leaves the task to run where it is, as
before. What a busy pool holds up after that is any message's lot: a prefetched task
waits for a process too (``worker_prefetch_multiplier``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

from ..broker import AMQP, broker_kind
from ..settings import get_settings
from .broker_delay import QUEUE_KEY
from .confirms import Confirm, ConfirmingPublisher
from .plan import DEFERRALS_HEADER

__all__ = ["HandOverStep", "hand_on"]

logger = logging.getLogger("celery_breaker")

#: One per process (the worker's main process: where the consumer applies due ETA tasks).
_PUBLISHER = ConfirmingPublisher()


class HandOverStep(bootsteps.Step):  # type: ignore[misc]
    """A consumer step: wraps the consumer's ``apply_eta_task`` as it is made, before the
    task strategies (which take it once, as they are built) exist. Only on RabbitMQ with
    a window (``breaker_consumer_timeout``), the one broker whose consumer it stops."""

    label = "celery-breaker hand-over"

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        app = consumer.app
        if broker_kind(app.conf) != AMQP or get_settings(app).hold_limit is None:
            return
        apply = consumer.apply_eta_task

        def apply_eta_task(request: Any) -> None:
            if _busy(consumer) and hand_on(app, request):
                consumer.qos.decrement_eventually()  # (as apply_eta_task would: it was held)
                return
            apply(request)

        consumer.apply_eta_task = apply_eta_task


def _busy(consumer: Any) -> bool:
    """Whether every pool process is taken: as many requests reserved (running, or waiting
    for a process) as the pool has processes."""
    pool = getattr(consumer, "pool", None)
    processes = getattr(pool, "num_processes", None) or getattr(pool, "limit", None)
    return isinstance(processes, int) and processes > 0 and len(worker_state.reserved_requests) >= processes


def hand_on(app: Any, request: Any) -> bool:
    """Publish a held deferral ``request`` again as it came, without its ETA, to the queue
    it was delivered from, and acknowledge the held delivery once RabbitMQ confirmed the
    copy; ``False`` (nothing done) when it is not one of ours, its queue cannot be told or
    the copy was not confirmed: it runs where it is."""
    message = getattr(request, "_message", None) or getattr(request, "message", None)
    headers = getattr(message, "headers", None)
    info = getattr(request, "delivery_info", None)
    queue = info.get(QUEUE_KEY) if isinstance(info, dict) else None
    if (
        message is None or not isinstance(headers, dict) or DEFERRALS_HEADER not in headers
        or not isinstance(queue, str) or not queue or getattr(request, "acknowledged", True)
    ):  # fmt: skip
        return False
    properties = dict(getattr(message, "properties", None) or {})
    copy = {**headers, "eta": None}

    def send(producer: Any) -> object:
        return producer.publish(
            message.body, exchange="", routing_key=queue, headers=copy, retry=False,
            content_type=message.content_type, content_encoding=message.content_encoding,
            priority=properties.get("priority"), correlation_id=properties.get("correlation_id"),
            reply_to=properties.get("reply_to"), delivery_mode=properties.get("delivery_mode", 2),
        )  # fmt: skip

    failure: BaseException | None
    try:
        published = _PUBLISHER.publish(app, [send])
    except Exception as exc:  # (it runs where it is)
        failure = exc
    else:
        failure = None if published.results[0] is Confirm.CONFIRMED else published.failure(0)
    name, task_id = getattr(request, "name", "?"), getattr(request, "id", "?")
    if failure is not None:
        logger.warning(
            "task %s[%s]: its held deferral came due with every pool process busy and could not be handed back to "
            "queue %r (%r): it waits for a process here, and RabbitMQ may close the channel if that outlasts "
            "breaker_consumer_timeout",
            name, task_id, queue, failure,
        )  # fmt: skip
        return False
    request.acknowledge()
    logger.info(
        "task %s[%s]: its held deferral came due with every pool process busy: handed back to queue %r, to wait "
        "there rather than unacknowledged in this worker",
        name, task_id, queue,
    )  # fmt: skip
    return True
