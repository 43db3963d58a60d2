"""Deferring a rejected run: plan its delay, park or republish its delivery, announce it."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from celery.exceptions import Reject, Retry

from . import events
from .breaker import CircuitBreaker
from .deferral import (
    DEFERRALS_HEADER,
    SINCE_HEADER,
    DeferralPlan,
    hard_time_limit,
    park_deadline,
    plan_deferral,
    read_headers,
    seconds_until,
)
from .errors import CircuitOpenError
from .labels import breaker_label
from .parking import encode_message, parking_of
from .settings import get_settings
from .storage import StorageError
from .task_options import task_breaker_config

if TYPE_CHECKING:
    from .task import BreakerTask

__all__ = ["defer"]

logger = logging.getLogger("celery_breaker")

#: RabbitMQ's dead-lettering headers, never carried into a deferral: RabbitMQ would read
#: them as a dead-letter cycle. (Celery 5.7 drops the same set from retries; 5.5 and 5.6
#: have no such list to import.)
DEAD_LETTER_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
_REQUEUE_PAUSE = 1.0  # seconds before requeueing a task whose deferral could not be published


def defer(
    task: BreakerTask,
    breaker: CircuitBreaker,
    rejected: CircuitOpenError,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Retry:
    """Park or republish this delivery; return the ``Retry`` that ends the run."""
    request = task.request
    config = task_breaker_config(task)
    settings = get_settings(task.app)
    now = time.time()
    past = read_headers(request.headers, now=now)
    for problem in past.problems:
        logger.warning("task %s[%s]: %s", task.name, request.id, problem)
    retry_after = rejected.retry_after
    if retry_after is None:
        retry_after = breaker.policy.reset_timeout
    spread = config.defer_spread if config.defer_spread is not None else breaker.policy.reset_timeout
    state = getattr(rejected.state, "value", rejected.state) or "open"
    # The breaker that rejected the run: this task's, or one nested in its body.
    name, key = (rejected.name, rejected.key) if rejected.name else (breaker.name, breaker.key)
    expires_in = seconds_until(request.expires, now)
    plan = plan_deferral(
        label=breaker_label(name, key),
        state=state,
        retry_after=retry_after,
        spread=spread,
        past=past,
        now=now,
        max_deferrals=config.max_deferrals,
        max_defer_age=config.max_defer_age,
        expires_in=expires_in,
        cap=settings.defer_cap(hard_time_limit(request)),
    )
    if plan.give_up is not None:
        final = CircuitOpenError(
            plan.give_up, name=breaker.name, key=breaker.key, state=rejected.state,
            retry_after=rejected.retry_after,
        )  # fmt: skip
        final.final = True  # type: ignore[attr-defined]
        logger.warning("task %s[%s]: %s", task.name, request.id, plan.give_up)
        raise final from rejected
    headers = {k: v for k, v in (request.headers or {}).items() if k not in DEAD_LETTER_HEADERS}
    headers[DEFERRALS_HEADER] = plan.count
    headers[SINCE_HEADER] = plan.since
    parked = False
    if not plan.expires_first and settings.park is not False:
        deadline = park_deadline(expires_in, plan.since, config.max_defer_age, now)
        parked = _park(task, breaker, args, kwargs, headers, f"{request.id}:{plan.count}", plan.since, deadline)
    if not parked:
        _republish(task, breaker, rejected, state, args, kwargs, headers, plan.delay)
    if (name, key) == (breaker.name, breaker.key):
        breaker.note_deferral()  # (a nested breaker's rejection is not this breaker's deferral)
    return _announce(task, name, key, rejected, state, plan, parked)


def _park(
    task: BreakerTask,
    breaker: CircuitBreaker,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    headers: dict[str, Any],
    entry: str,
    since: float,
    deadline: float | None,
) -> bool:
    """Park this delivery in the breaker's store instead of publishing a countdown
    message; False when the store cannot park or parking failed (then the caller
    publishes a countdown message as before: nothing is lost either way)."""
    store = breaker.store
    parking = parking_of(store)
    if parking is None or getattr(store, "down", False):
        # No parking here, or the shared store is down (its outage is logged once per
        # interval): a countdown message now, rather than Redis's timeouts for each task.
        return False
    request = task.request
    signature = task.signature_from_request(request, args, kwargs, headers=headers)
    body = dict(signature)
    body["options"] = {k: v for k, v in body.get("options", {}).items() if k not in ("countdown", "eta")}
    try:
        payload = encode_message(body, task.serializer or task.app.conf.task_serializer)
    except Exception as exc:
        logger.warning("task %s[%s]: cannot park it (%r); deferring with a countdown", task.name, request.id, exc)
        return False
    try:
        parking.park(breaker.name, breaker.key, entry, since, payload, deadline)
    except StorageError as exc:
        store_failed = getattr(store, "store_failed", None)
        if store_failed is not None:  # an outage: logged once per interval, not per task
            store_failed(exc, time.monotonic())
        else:
            logger.warning("task %s[%s]: cannot park it (%s); deferring with a countdown", task.name, request.id, exc)
        return False
    return True


def _republish(
    task: BreakerTask,
    breaker: CircuitBreaker,
    rejected: CircuitOpenError,
    state: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    headers: dict[str, Any],
    delay: float,
) -> None:
    """Publish this delivery again to arrive in ``delay`` seconds (same id, arguments, retries)."""
    request = task.request
    signature = task.signature_from_request(request, args, kwargs, countdown=delay, headers=headers)
    try:
        signature.apply_async()
    except Exception as exc:
        if task.acks_late:
            # Not acknowledged: the broker gives the message back, nothing is lost.
            # Pause first, so a broker that delivers but will not take a publish
            # does not turn this into a busy loop.
            logger.warning("task %s[%s]: could not defer (%r); requeueing it", task.name, request.id, exc)
            time.sleep(_REQUEUE_PAUSE)
            raise Reject(exc, requeue=True) from exc
        failed = CircuitOpenError(
            f"breaker {breaker.label!r} {state} and the task could not be deferred: {exc!r}",
            name=breaker.name, key=breaker.key, state=rejected.state,
        )  # fmt: skip
        failed.final = True  # type: ignore[attr-defined]
        raise failed from exc


def _announce(
    task: BreakerTask,
    name: str,
    key: str | None,
    rejected: CircuitOpenError,
    state: str,
    plan: DeferralPlan,
    parked: bool,
) -> Retry:
    """Log the deferral of a run breaker ``name``/``key`` rejected, send its ``task-deferred``
    event, and make the ``Retry`` that ends the run."""
    request = task.request
    label = breaker_label(name, key)
    if plan.expires_first:
        text = (
            f"breaker {label!r} {state}, task expires first: requeued to arrive after "
            f"its expiry in {plan.delay:.1f} s (deferral {plan.count})"
        )
    else:  # (parked or not: the delay is when the breaker may admit it)
        text = f"breaker {label!r} {state}, deferred {plan.delay:.1f} s (deferral {plan.count})"
    logger.debug("task %s[%s]: %s%s", task.name, request.id, text, ", parked" if parked else "")
    if events.enabled():
        events.send(
            task.app, events.DEFERRED_EVENT, uuid=request.id, name=task.name, breaker=name, key=key,
            state=state, delay=plan.delay, deferral=plan.count, parked=parked, reason=text,
        )  # fmt: skip
    reason = CircuitOpenError(text, name=name, key=key, state=rejected.state, retry_after=rejected.retry_after)
    return Retry(exc=reason, when=plan.delay)
