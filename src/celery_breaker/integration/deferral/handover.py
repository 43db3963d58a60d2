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
its new delivery's window starts when a worker takes it. A task with a ``rate_limit``
comes due through its bucket (``Consumer._limit_post_eta``), which is wrapped alike. The
copy is compressed again as its message was (kombu gave the body decompressed); task
protocol 1, which keeps the ETA in the body, is left as it was. The consumer's event loop
waits ``CONFIRM_WAIT`` at most for the confirm; a copy written while RabbitMQ blocks
publishers (a memory or disk alarm) is routed once the alarm clears, so it counts as
handed back, and no hand-over is tried for ``BLOCKED_PAUSE``. Anything else that does not
work out (the queue cannot be told, the publish is refused or unconfirmed) leaves the
task to run where it is, as before (an unconfirmed copy may have been routed: it may run
twice, never not at all). What a busy pool holds up after that is any message's lot: a
prefetched task waits for a process too (``worker_prefetch_multiplier``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

from ...errors import ConfigurationError
from ...storage.masking import MaskedRepr
from ..broker import AMQP, broker_kind
from ..settings import get_settings
from .broker_delay import QUEUE_KEY
from .confirms import Confirm, ConfirmingPublisher
from .plan import DEFERRALS_HEADER

__all__ = ["CONFIRM_WAIT", "HandOverStep", "hand_on"]

logger = logging.getLogger("celery_breaker")

#: Seconds the consumer's event loop waits for RabbitMQ to confirm a copy: it serves
#: nothing else meanwhile (the countdown's and the releaser's 10 s are theirs to wait).
CONFIRM_WAIT = 2.0
#: Seconds no hand-over is tried after RabbitMQ said it blocks publishers (a memory or
#: disk alarm): each would hold the event loop ``CONFIRM_WAIT`` for nothing.
BLOCKED_PAUSE = 60.0

#: One per process (the worker's main process: where the consumer applies due ETA tasks).
_PUBLISHER = ConfirmingPublisher(confirm_timeout=CONFIRM_WAIT)
#: ``time.monotonic()`` before which no hand-over is tried (``BLOCKED_PAUSE``).
_PAUSED_UNTIL = [0.0]


class HandOverStep(bootsteps.Step):  # type: ignore[misc]
    """A consumer step: wraps the consumer's ``apply_eta_task`` as it is made, before the
    task strategies (which take it once, as they are built) exist. Only on RabbitMQ with
    a window (``breaker_consumer_timeout``), the one broker whose consumer it stops."""

    label = "celery-breaker hand-over"

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        app = consumer.app
        try:
            if broker_kind(app.conf) != AMQP or get_settings(app).hold_limit is None:
                return
        except ConfigurationError:
            return  # (the worker's own step reports it, and stops the worker)
        apply, limited = consumer.apply_eta_task, consumer._limit_post_eta

        def apply_eta_task(request: Any) -> None:
            if _busy(consumer) and hand_on(app, request):
                consumer.qos.decrement_eventually()  # (as apply_eta_task would: it was held)
                return
            apply(request)

        def limit_post_eta(request: Any, bucket: Any, tokens: Any) -> Any:
            # (a task with a rate_limit: due, it goes to its bucket, then to the pool)
            if _busy(consumer) and hand_on(app, request):
                consumer.qos.decrement_eventually()
                return None
            return limited(request, bucket, tokens)

        consumer.apply_eta_task = apply_eta_task
        consumer._limit_post_eta = limit_post_eta


def _busy(consumer: Any) -> bool:
    """Whether every pool process is taken: as many requests reserved (running, or waiting
    for a process) as the pool has processes."""
    pool = getattr(consumer, "pool", None)
    processes = getattr(pool, "num_processes", None) or getattr(pool, "limit", None)
    return isinstance(processes, int) and processes > 0 and len(worker_state.reserved_requests) >= processes


def _forget(request: Any) -> None:
    """Drop a handed-back request from the worker's state, as its run would have: it was
    noted as scheduled when it came (``requests``, ``scheduled_requests``), and would have
    stayed there, its body held, ``inspect query_task`` saying it is scheduled here."""
    scheduled = getattr(worker_state, "scheduled_requests", None)
    if scheduled is not None:
        with contextlib.suppress(TypeError):  # (a WeakSet: a request that cannot be referred to weakly is not in it)
            scheduled.discard(request)
    known = getattr(worker_state, "requests", None)
    task_id = getattr(request, "id", None)
    if isinstance(known, dict) and known.get(task_id) is request:
        known.pop(task_id, None)


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
        or "task" not in headers  # (task protocol 1 keeps the ETA in the body: the copy would be held again)
        or not isinstance(queue, str) or not queue or getattr(request, "acknowledged", True)
        or time.monotonic() < _PAUSED_UNTIL[0]
    ):  # fmt: skip
        return False
    properties = dict(getattr(message, "properties", None) or {})
    # kombu gave the body decompressed: the copy is compressed again by the publish, which
    # sets the header (the header alone, a worker would decompress plain text, fail to
    # decode it, and drop the task; neither, the copy went out megabytes larger, and so
    # did its next deferral: the request no longer named a compression).
    compression = headers.get("compression") or None
    copy = {key: value for key, value in headers.items() if key != "compression"}
    copy["eta"] = None

    def send(producer: Any) -> object:
        return producer.publish(
            message.body, exchange="", routing_key=queue, headers=copy, retry=False, compression=compression,
            content_type=message.content_type, content_encoding=message.content_encoding,
            priority=properties.get("priority"), correlation_id=properties.get("correlation_id"),
            reply_to=properties.get("reply_to"), delivery_mode=properties.get("delivery_mode", 2),
        )  # fmt: skip

    failure: BaseException | None
    name, task_id = getattr(request, "name", "?"), getattr(request, "id", "?")
    try:
        published = _PUBLISHER.publish(app, [send])
    except Exception as exc:  # (it runs where it is)
        failure = exc
    else:
        result = published.results[0]
        failure = None if result is Confirm.CONFIRMED else published.failure(0)
        if result is Confirm.UNCONFIRMED and published.stopped_by_timeout and published.blocked:
            # Written under a memory or disk alarm: RabbitMQ routes it once the alarm clears
            # (the connection is kept for that). Run here as well, it would run twice.
            _PAUSED_UNTIL[0] = time.monotonic() + BLOCKED_PAUSE
            logger.warning(
                "task %s[%s]: handed back to queue %r while RabbitMQ blocks publishers (a memory or disk alarm): "
                "it is routed once the alarm clears; no hand-over is tried for %g s",
                name, task_id, queue, BLOCKED_PAUSE,
            )  # fmt: skip
            failure = None
    if failure is not None:
        logger.warning(
            "task %s[%s]: its held deferral came due with every pool process busy and could not be handed back to "
            "queue %r (%r): it waits for a process here, and RabbitMQ may close the channel if that outlasts "
            "breaker_consumer_timeout",
            name, task_id, queue, MaskedRepr(failure),
        )  # fmt: skip
        return False
    request.acknowledge()
    _forget(request)
    logger.info(
        "task %s[%s]: its held deferral came due with every pool process busy: handed back to queue %r, to wait "
        "there rather than unacknowledged in this worker",
        name, task_id, queue,
    )  # fmt: skip
    return True
