"""Deferring a rejected run: plan its delay, deliver it by the app's strategies, announce it."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from celery.exceptions import Retry

from ...breaker import CircuitBreaker
from ...errors import CircuitOpenError
from ...labels import breaker_label
from ...names import kept_form, key_text
from ...storage.masking import MaskedRepr
from .. import events
from ..broker import DEAD_LETTER_HEADERS
from ..settings import get_settings
from ..task_options import task_breaker_config
from ..throttle import Throttle
from . import expiry  # noqa: F401  (connects the handler that keeps expired deferrals for the worker to revoke)
from .countdown import RECEIVED_KEY, CountdownRepublish
from .plan import (
    DEFERRALS_HEADER,
    PARKED_HEADER,
    SINCE_HEADER,
    plan_deferral,
    read_headers,
    run_time_limit,
    seconds_until,
)
from .selection import deferral_strategies
from .strategy import Deferral, DeferralStrategy, Handed

__all__ = ["REFRESH_AFTER", "defer", "refreshed"]

logger = logging.getLogger("celery_breaker")

#: A countdown deferral the worker held longer than this share of the broker's window
#: (``hold_limit``) is sent again before it runs (``refreshed``).
REFRESH_AFTER = 0.1


def defer(
    task: Any,
    breaker: CircuitBreaker,
    rejected: CircuitOpenError,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    asked: Mapping[str, Any] | None = None,
    failed: bool = False,
) -> Retry:
    """Deliver this run (a ``BreakerTask``'s) again by the first strategy that takes it;
    return the ``Retry`` that ends the run. Raises a final ``CircuitOpenError`` when the
    task's deferral budget is spent. ``asked``: the options of the ``self.retry(...)``
    this deferral replaces (``queue``, ``priority``, ``time_limit``...): the run comes
    back with them, as the retry would have. ``failed``: the run ran and failed, and
    its breaker is open now (``Deferral.failed``)."""
    request = task.request
    config = task_breaker_config(task)
    settings = get_settings(task.app)
    now = time.time()
    retry_options = _retry_options(asked or {}, now)
    past = read_headers(request.headers, now=now)
    for problem in past.problems:
        logger.warning("task %s[%s]: %s", task.name, request.id, problem)
    retry_after = rejected.retry_after
    if retry_after is None:
        retry_after = breaker.policy.reset_timeout
    spread = config.defer_spread if config.defer_spread is not None else breaker.policy.reset_timeout
    state = getattr(rejected.state, "value", rejected.state) or "open"
    expires_in = seconds_until(retry_options.get("expires", request.expires), now)
    plan = plan_deferral(
        label=_rejecting_label(breaker, rejected),
        state=state,
        retry_after=retry_after,
        spread=spread,
        past=past,
        now=now,
        max_deferrals=config.max_deferrals,
        max_defer_age=config.max_defer_age,
        expires_in=expires_in,
        cap=settings.defer_cap(run_time_limit(task, request)),  # (the task's own limit too, not only the message's)
    )
    if plan.give_up is not None:
        logger.warning("task %s[%s]: %s", task.name, request.id, plan.give_up)
        raise CircuitOpenError(
            plan.give_up, name=breaker.name, key=breaker.key, state=rejected.state,
            retry_after=rejected.retry_after, final=True,
        ) from rejected  # fmt: skip
    sent = retry_options.pop("headers", request.headers)  # (a retry's own headers replace the request's, as in Celery)
    headers = {
        k: v for k, v in (sent or {}).items() if k not in DEAD_LETTER_HEADERS and k != PARKED_HEADER
    }  # (the parking sets PARKED_HEADER on what it parks; nothing else carries it)
    headers[DEFERRALS_HEADER] = plan.count
    headers[SINCE_HEADER] = plan.since
    deferral = Deferral(
        task=task, breaker=breaker, rejected=rejected, state=state, args=args, kwargs=kwargs, headers=headers,
        plan=plan, expires_in=expires_in, max_defer_age=config.max_defer_age, now=now, failed=failed,
        options={**_unsent_options(request, args, kwargs), **retry_options},
    )  # fmt: skip
    strategy, delay = _deliver(deferral, deferral_strategies(task.app))
    if not rejected.name or (rejected.name, rejected.key) == (breaker.name, breaker.key):
        breaker.note_deferral()  # (a nested breaker's rejection is not this breaker's deferral)
    return _announce(deferral, strategy, delay)


def refreshed(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Retry | None:
    """A ``Retry`` that ends this run after sending it again at once, when it is a countdown
    deferral the worker held for more than ``REFRESH_AFTER`` of the broker's window; else
    ``None`` (run it).

    The window (RabbitMQ's ``consumer_timeout``, Redis's or SQS's ``visibility_timeout``)
    runs from the delivery to its acknowledgement, which comes after the run
    (``acks_late``). A countdown may hold the delivery for up to 90 % of it, so a run that
    took more than what was left, fine undeferred, made RabbitMQ close the worker's
    channel (``Unrecoverable error: PreconditionFailed``: the worker exited, the task ran
    again elsewhere), or Redis give the task to another worker. Sent again without a
    countdown, it runs in a fresh delivery, with the whole window. If that publish fails
    it runs where it is. A task acknowledged early (Celery's default) is acknowledged as
    its run starts, outside the window: it runs where it is, and nothing is sent."""
    if not task.acks_late:
        return None
    request = task.request
    info = request.delivery_info
    received = info.get(RECEIVED_KEY) if isinstance(info, dict) else None
    headers = request.headers
    if not isinstance(received, (int, float)) or not headers or DEFERRALS_HEADER not in headers:
        return None  # (not received by a worker that notes it, or not one of our deferrals)
    limit = get_settings(task.app).hold_limit
    held = time.time() - received
    if limit is None or held <= limit * REFRESH_AFTER:
        return None
    kept = {k: v for k, v in headers.items() if k not in DEAD_LETTER_HEADERS}
    countdown = deferral_strategies(task.app)[-1]  # (the last: a countdown, whose copies RabbitMQ confirms)
    if not isinstance(countdown, CountdownRepublish):
        countdown = CountdownRepublish()
    signature = task.signature_from_request(
        request, args, kwargs, headers=kept, **_unsent_options(request, args, kwargs), **countdown.route(task)
    )
    try:
        countdown.send(task, signature)
    except Exception as exc:
        logger.warning(
            "task %s[%s]: held %.1f s of the broker's %g s window and could not be sent again (%r): run in the held "
            "delivery",
            task.name, request.id, held, limit, MaskedRepr(exc),
        )  # fmt: skip
        return None
    name, key = _breaker_of(task, args, kwargs)
    label = breaker_label(name, key)
    text = (
        f"breaker {label!r}, deferral {headers[DEFERRALS_HEADER]} held {held:.1f} s of the broker's {limit:g} s "
        "window by a countdown: sent again to run in a fresh delivery"
    )
    logger.debug("task %s[%s]: %s", task.name, request.id, text)
    # Celery records it as a RETRY, as the deferral it continues: with that deferral's
    # error (a Retry without one showed "None" as the reason in Flower, read as a retry
    # of the task's own to a task_retry handler, and kept its frames for the cyclic GC).
    reason = CircuitOpenError(text, name=name, key=key)
    return Retry(message=f"sent again: {text}", exc=reason, when=0)


def _breaker_of(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str | None]:
    """The name and key of the breaker ``task`` defers behind, for its reason's text: the
    key its ``breaker_key`` makes of these arguments (``None`` when it raises: the run it
    ends raises nothing, its next run does)."""
    name = task_breaker_config(task).name
    key_fn = getattr(task, "breaker_key", None)
    if key_fn is None:
        return name, None
    try:
        if isinstance(key_fn, str):
            key_fn = getattr(task, key_fn)
        key = kept_form(key_text(key_fn(args, kwargs), f"task {task.name!r}: breaker_key"))
    except Exception:  # (a ConfigurationError too: a key that is no key)
        return name, None
    return name, key


def _unsent_options(request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options the task was sent with that Celery's ``signature_from_request`` leaves
    out, for its deferral.

    Its ``compression`` (``apply_async(compression="gzip")``): the copy went out in
    ``task_compression`` (none by default), its arguments megabytes larger in the broker
    and in the parking than the sender had made them.

    Its ``argsrepr`` and ``kwargsrepr``: the copy showed the real arguments in the
    worker's events and logs (Flower) where the sender had hidden them
    (``apply_async(argsrepr="('****',)")``). Only while the arguments are the ones they
    stand for: a ``self.retry(args=...)`` deferred instead gets reprs of its own.

    Its ``delivery_mode`` (``apply_async(delivery_mode=2)`` where ``task_default_delivery_mode``
    is ``"transient"``, or the other way round): the copy went out in the app's default, so
    a persistent task deferred became transient, and a broker restarted while it waited
    dropped it. (Celery's own retry drops it too.) Its priority Celery keeps already."""
    found: dict[str, Any] = {}
    properties = getattr(request, "properties", None)  # (the message's, passed on to the pool by the worker)
    mode = properties.get("delivery_mode") if isinstance(properties, dict) else None
    if mode in (1, 2) and not isinstance(mode, bool):
        found["delivery_mode"] = mode
    compression = getattr(request, "compression", None)  # (its content type: kombu takes it as a name)
    if isinstance(compression, str) and compression:
        found["compression"] = compression
    for option, given, sent in (("argsrepr", args, request.args), ("kwargsrepr", kwargs, request.kwargs)):
        text = getattr(request, option, None)
        if isinstance(text, str) and _same(given, sent):
            found[option] = text
    return found


#: Options of a ``self.retry(...)`` a deferral does not take: the deferral plans its own
#: time, and keeps the task's id and its retry count (no retry is spent).
_NOT_TAKEN_FROM_RETRY = frozenset({"countdown", "eta", "retries", "task_id"})


def _retry_options(asked: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The options of the ``self.retry(...)`` a deferral replaces that the deferral is
    published with: where to (``queue``, ``exchange``, ``routing_key``), ``priority``,
    time limits, ``expires``, ``headers``... as Celery's retry would have sent it. Its
    ``countdown`` and ``eta`` are not: the run waits for its breaker instead. An
    ``expires`` in seconds becomes a time (from now), since the parking publishes it later."""
    found = {k: v for k, v in asked.items() if k not in _NOT_TAKEN_FROM_RETRY and v is not None}
    expires = found.get("expires")
    if isinstance(expires, (int, float)) and not isinstance(expires, bool):
        found["expires"] = datetime.fromtimestamp(now + expires, tz=timezone.utc)
    return found


def _same(given: Any, sent: Any) -> bool:
    """Whether the arguments a deferral publishes are the ones the request came with (a
    list or a tuple alike)."""
    if isinstance(given, (list, tuple)) and isinstance(sent, (list, tuple)):
        given, sent = tuple(given), tuple(sent)
    try:
        return bool(given == sent)
    except Exception:  # (arguments whose == does not answer a bool: take them for new)
        return False


def _rejecting_label(breaker: CircuitBreaker, rejected: CircuitOpenError) -> str:
    """The breaker that rejected the run: the task's own, or one nested in its body."""
    return rejected.label if rejected.name else breaker.label


def _deliver(deferral: Deferral, strategies: tuple[DeferralStrategy, ...]) -> tuple[DeferralStrategy, float]:
    """Hand the run to each strategy in turn until one delivers it; return it and the delay
    it delivered with. A strategy that fails to publish passes the run on; the last one
    takes every run (or raises: requeue, or a final error)."""
    task = deferral.task
    *others, last = strategies
    for strategy in others:
        try:
            delay = strategy.deliver(deferral)
        except Exception as exc:
            _passed_on(task, strategy, exc)
            continue
        if delay is not None:
            _passing_on.forget(strategy.name)
            return _by(strategy, delay)
    delay = last.deliver(deferral)
    if delay is None:
        raise RuntimeError(f"the last deferral strategy ({last.name}) refused a run: every run must be taken")
    return _by(last, delay)


def _by(strategy: DeferralStrategy, delay: float | Handed) -> tuple[DeferralStrategy, float]:
    """The strategy that took the run, and its delay: ``strategy``'s own, or the one it handed the run to."""
    return (delay.by, delay.delay) if isinstance(delay, Handed) else (strategy, delay)


#: One WARNING a minute per strategy that fails to defer runs (a broker refusing its
#: topology, a store that went away): in an outage every deferral meets the same refusal.
_passing_on = Throttle()


def _passed_on(task: Any, strategy: DeferralStrategy, exc: Exception) -> None:
    """Log that ``strategy`` could not defer this run, which goes to the next one."""
    quiet = _passing_on.due(strategy.name)
    if quiet is None:
        logger.debug(
            "task %s[%s]: could not defer it by %s (%r)", task.name, task.request.id, strategy.name, MaskedRepr(exc)
        )
        return
    logger.warning(
        "task %s[%s]: could not defer it by %s (%r); trying the next way (logged at most once a minute per "
        "way; %d more runs since the last time, at DEBUG)",
        task.name, task.request.id, strategy.name, MaskedRepr(exc), quiet,
    )  # fmt: skip


def _announce(deferral: Deferral, strategy: DeferralStrategy, delay: float) -> Retry:
    """Log the deferral, send its ``task-breaker-deferred`` event, and make the ``Retry`` that ends the run."""
    task, rejected, plan, state = deferral.task, deferral.rejected, deferral.plan, deferral.state
    request = task.request
    name, key = (rejected.name, rejected.key) if rejected.name else (deferral.breaker.name, deferral.breaker.key)
    label = breaker_label(name, key)
    if plan.expires_first:
        text = (
            f"breaker {label!r} {state}, task expires first: requeued to arrive after "
            f"its expiry in {delay:.1f} s (deferral {plan.count})"
        )
    elif state == "forced_open" and strategy.name == "park" and not rejected.detail:
        # (parked behind an operator's open: nothing releases it after a delay, and a
        # delay named here read as a promise Flower showed while the task waited on)
        text = f"breaker {label!r} forced_open, parked until an operator closes it (deferral {plan.count})"
    elif rejected.detail:  # (why, beyond the state: "the downstream refused it", task.py _refusal)
        text = f"breaker {label!r} {state}, deferred {delay:.1f} s (deferral {plan.count}): {rejected.detail}"
    else:  # (parked or not: the delay is when the breaker may admit it)
        text = f"breaker {label!r} {state}, deferred {delay:.1f} s (deferral {plan.count})"
    logger.debug("task %s[%s]: %s (%s)", task.name, request.id, text, strategy.name)
    if events.enabled():
        events.send(
            task.app, events.DEFERRED_EVENT, uuid=request.id, name=task.name, breaker=name, key=key,
            state=state, delay=delay, deferral=plan.count, parked=strategy.parks, mechanism=strategy.name,
            reason=text,
        )  # fmt: skip
    reason = CircuitOpenError(text, name=name, key=key, state=rejected.state, retry_after=rejected.retry_after)
    # The text is the Retry's own message too: the worker's "retry:" log line and the last
    # line of the traceback Flower's task page shows read as the reason, not "Retry in
    # 24.36597550242707s"; ``when`` is rounded as the text is.
    return Retry(message=f"deferred: {text}", exc=reason, when=round(delay, 1))
