"""BreakerTask: a Celery task whose breaker defers it, without spending retries, while its downstream is down."""

from __future__ import annotations

import inspect
import logging
import sys
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from celery import Task
from celery.app.task import X_DEATH_HEADERS
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.time import maybe_iso8601, maybe_make_aware

from . import events
from .breaker import _RUN, CircuitBreaker, RunAdmission, current_run
from .core import BreakerPolicy, Outcome, State
from .deferral import DEFERRALS_HEADER, EXPIRY_OVERSHOOT, SINCE_HEADER, plan_deferral, read_headers
from .errors import CircuitOpenError, ConfigurationError
from .parking import encode_message, parking_of
from .registry import registry_for
from .settings import get_settings
from .storage import StorageError

__all__ = ["BreakerTask", "TaskBreakerConfig", "task_breaker_config"]

logger = logging.getLogger("celery_breaker")

FAILURE = Outcome.FAILURE
_RUN_ATTR = "_celery_breaker_run"  # the request attribute naming the task's own run admission
_CONFIG = "_celery_breaker_config"  # the class attribute caching the resolved options
_REQUEUE_PAUSE = 1.0  # seconds before requeueing a task whose deferral could not be published


@dataclass(frozen=True, slots=True)
class TaskBreakerConfig:
    """A task's breaker options, resolved against the app's settings and validated."""

    name: str
    policy: BreakerPolicy
    max_deferrals: int | None
    max_defer_age: float | None
    defer_spread: float | None
    counts_runs: bool
    """``breaker_scope="run"``: a run that made no guarded call records its own outcome."""


def _translate(exc: BaseException) -> BaseException | None:
    """What a Celery control-flow exception raised inside a run says about the downstream:
    a ``Retry`` counts as its cause (neutral without one); ``Ignore``/``Reject`` are neutral."""
    if isinstance(exc, Retry):
        cause = exc.exc
        return cause if isinstance(cause, BaseException) else None
    if isinstance(exc, (Ignore, Reject)):
        return None
    return exc


def _running(task: BreakerTask) -> RunAdmission | None:
    """The admission of ``task``'s run in this context (not another task's)."""
    run = current_run()
    if run is not None and getattr(task.request, _RUN_ATTR, None) is run:
        return run
    return None


def _failed_while_open(run: RunAdmission) -> bool:
    """The run recorded a failure, and its breaker no longer admits calls freely."""
    if run.recorded is not FAILURE:
        return False
    breaker = run.breaker
    return breaker.state not in (State.CLOSED, State.DISABLED)  # (re-reads an evicted cell)


class _BreakerAttribute:
    """``task.breaker``: the running call's breaker inside a task body (its first guarded
    call uses the run's admission), else the task's key-less breaker. The ``breaker=``
    task option names it (``task.breaker_name``)."""

    def __get__(self, task: BreakerTask | None, owner: type | None = None) -> Any:
        if task is None:
            return self
        run = _running(task)
        if run is not None:
            return run.breaker
        config = task_breaker_config(task)
        return registry_for(task.app).get(config.name, None, config.policy)


class BreakerTask(Task):  # type: ignore[misc]
    """A task guarded by a circuit breaker: ``@app.task(base=BreakerTask, breaker="crm")``.

    While the breaker rejects calls the task is deferred: published again with the
    same id, arguments and ``request.retries``, after the time until the breaker can
    next admit a probe plus a spread. Options (``None`` means the app setting):

    * ``breaker``: the breaker's name (default: the task's name). Inside the body,
      ``self.breaker`` is this call's ``CircuitBreaker``, so ``with self.breaker:``
      can guard just the downstream call.
    * ``breaker_key``: ``(args, kwargs) -> str`` (or a method name) for per-key breakers.
    * ``breaker_policy``: a dict of ``BreakerPolicy`` fields or a ``BreakerPolicy``.
    * ``breaker_fallback``: a callable (or method name) called with the task's
      arguments whose result is returned instead of deferring.
    * ``breaker_scope``: ``"run"`` (default) — a run that made no guarded call
      (``with self.breaker:``) counts as one call; ``"calls"`` — only guarded calls
      count, so a run served from a cache says nothing about the downstream.
    * ``breaker_max_deferrals``, ``breaker_max_defer_age``, ``breaker_defer_spread``.
    """

    breaker_name: ClassVar[str | None] = None
    breaker: Any = _BreakerAttribute()
    breaker_key: Any = None
    breaker_policy: Any = None
    breaker_fallback: Any = None
    breaker_max_deferrals: Any = None
    breaker_max_defer_age: Any = None
    breaker_defer_spread: Any = None
    breaker_scope: Any = None
    #: ``autoretry_for=(Exception,)`` must never spend a retry on an open breaker.
    dont_autoretry_for = (CircuitOpenError,)

    @classmethod
    def bind(cls, app: Any) -> Any:
        """Bind the task class to ``app``: resolve its breaker options and install the plugin."""
        result = super().bind(app)
        prepare_task_class(cls)
        from .signals import install

        install(app)
        return result

    # -- execution -----------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            # Called as a plain function (not by a worker): set up the request the way
            # Task.__call__ does, so the body sees its arguments.
            from celery.app.task import _task_stack

            _task_stack.push(self)
            self.push_request(args=args, kwargs=kwargs)
            try:
                outcome = self._run_guarded(args, kwargs)
            finally:
                self.pop_request()
                _task_stack.pop()
        else:
            outcome = self._run_guarded(args, kwargs)
        if type(outcome) is _Deferred:
            # Raised here, outside any handler: the traceback Celery copies for the
            # RETRY (billiard copies every frame's co_positions, ~0.1 ms per frame) is
            # its tracer and this frame only, and the Retry has no __context__.
            raise outcome.retry
        return outcome

    def on_retry(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """After a deferral, let go of its frames (subclasses overriding this must call it).

        A deferral is a ``Retry``, whose traceback holds Celery's still-running tracer
        frame, which holds the ``Retry``: a reference cycle carrying billiard's copy of
        the traceback (about 0.5 MB on Python 3.11+, which copies each frame's
        ``co_positions``). Only the cyclic GC's rare full collections freed them, so a
        pool process that deferred a few hundred tasks had grown by 100+ MB. Broken
        here, everything is freed when the run ends. Other retries are left as Celery
        handles them."""
        super().on_retry(exc, task_id, args, kwargs, einfo)
        wrapped = getattr(einfo, "exception", None)  # billiard wraps it: ExceptionWithTraceback
        retry = getattr(wrapped, "exc", wrapped)
        if isinstance(retry, Retry) and isinstance(exc, CircuitOpenError):
            _drop_frames(retry)

    def _unguarded(self) -> bool:
        # Celery's own tasks (celery.map, chord_unlock, ...) become BreakerTasks under
        # task_cls="celery_breaker:BreakerTask"; they get a breaker only when named.
        return self.breaker_name is None and self.name.startswith("celery.")

    def _can_defer(self) -> bool:
        request = self.request
        return not (request.is_eager or request.called_directly)

    def _run_guarded(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._unguarded():
            return self.run(*args, **kwargs)
        config = task_breaker_config(self)
        breaker = self._breaker_for(config, args, kwargs)
        try:
            cell, ticket, start = breaker._admit()
        except CircuitOpenError as rejected:
            return self._on_rejected(breaker, rejected, args, kwargs)
        run = RunAdmission(breaker, cell, ticket, start, _translate, counts_itself=config.counts_runs)
        request = self.request
        setattr(request, _RUN_ATTR, run)
        token = _RUN.set(run)
        try:
            result = self.run(*args, **kwargs)
        except Retry as retry:
            # self.retry() / autoretry_for: count the cause, then let Celery retry.
            run.settle(retry)
            raise
        except (Ignore, Reject):
            run.settle(None, neutral=True)
            raise
        except CircuitOpenError as rejected:  # from a guarded call or a nested breaker
            run.settle(None, neutral=True)
            if getattr(rejected, "final", False):
                raise
            return self._on_rejected(breaker, rejected, args, kwargs)
        except BaseException:
            run.settle(sys.exc_info()[1])
            if _failed_while_open(run) and (self._can_defer() or self.breaker_fallback is not None):
                # This run's downstream call failed and the breaker is open now: the
                # task too waits for recovery instead of failing. (Eager and direct
                # calls cannot wait: they keep their real error.)
                return self._on_rejected(breaker, _rejection_now(breaker), args, kwargs)
            raise
        else:
            run.settle(None)
            return result
        finally:
            _RUN.reset(token)
            setattr(request, _RUN_ATTR, None)

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: Any = None,
        throw: bool = True,
        eta: Any = None,
        countdown: Any = None,
        max_retries: Any = None,
        **options: Any,
    ) -> Any:
        """Celery's retry, except that an open breaker defers instead of spending a retry."""
        run = _running(self)
        if isinstance(exc, CircuitOpenError) and run is not None:
            raise exc  # the run's handler defers (or falls back); never a retry
        if run is not None and isinstance(exc, BaseException):
            run.settle(exc)
            if _failed_while_open(run) and self._can_defer():
                # It failed and the breaker is open now: defer instead of retrying.
                raise _rejection_now(run.breaker) from exc
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)

    # -- rejection: fallback, error or deferral -------------------------------

    def _breaker_for(self, config: TaskBreakerConfig, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CircuitBreaker:
        key = None
        key_fn = self.breaker_key
        if key_fn is not None:
            if isinstance(key_fn, str):
                key_fn = getattr(self, key_fn)
            key = key_fn(args, kwargs)
            if key is not None and not isinstance(key, str):
                key = str(key)
        return registry_for(self.app).get(config.name, key, config.policy)

    def _on_rejected(
        self, breaker: CircuitBreaker, rejected: CircuitOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        fallback = self.breaker_fallback
        if fallback is not None:
            if isinstance(fallback, str):
                fallback = getattr(self, fallback)
            return fallback(*args, **kwargs)
        if not self._can_defer():
            raise rejected  # nothing to requeue; Celery's eager retry would recurse
        return _Deferred(self._defer(breaker, rejected, args, kwargs))

    def _park(
        self,
        breaker: CircuitBreaker,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        headers: dict[str, Any],
        plan: Any,
        settings: Any,
        now: float,
    ) -> bool:
        """Park this delivery in the breaker's store instead of publishing a countdown
        message; False when parking is off, impossible, or failed (then the caller
        publishes a countdown message as before: nothing is lost either way)."""
        if settings.park is False:
            return False
        parking = parking_of(breaker.store)
        if parking is None:
            return False
        request = self.request
        signature = self.signature_from_request(request, args, kwargs, headers=headers)
        body = dict(signature)
        body["options"] = {k: v for k, v in body.get("options", {}).items() if k not in ("countdown", "eta")}
        try:
            payload = encode_message(body, self.serializer or self.app.conf.task_serializer)
        except Exception as exc:
            logger.warning("task %s[%s]: cannot park it (%r); deferring with a countdown", self.name, request.id, exc)
            return False
        config = task_breaker_config(self)
        deadline = _deadline(request, plan, config.max_defer_age, now)
        try:
            parking.park(breaker.name, breaker.key, f"{request.id}:{plan.count}", plan.since, payload, deadline)
        except StorageError as exc:
            logger.warning("task %s[%s]: cannot park it (%s); deferring with a countdown", self.name, request.id, exc)
            return False
        return True

    def _defer(
        self, breaker: CircuitBreaker, rejected: CircuitOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Retry:
        """Park or republish this delivery; return the ``Retry`` that ends the run."""
        request = self.request
        config = task_breaker_config(self)
        settings = get_settings(self.app)
        now = time.time()
        past = read_headers(request.headers, now=now)
        for problem in past.problems:
            logger.warning("task %s[%s]: %s", self.name, request.id, problem)
        retry_after = rejected.retry_after
        if retry_after is None:
            retry_after = breaker.policy.reset_timeout
        spread = config.defer_spread if config.defer_spread is not None else breaker.policy.reset_timeout
        state = getattr(rejected.state, "value", rejected.state) or "open"
        plan = plan_deferral(
            label=rejected.label if rejected.name else breaker.label,
            state=state,
            retry_after=retry_after,
            spread=spread,
            past=past,
            now=now,
            max_deferrals=config.max_deferrals,
            max_defer_age=config.max_defer_age,
            expires_in=_seconds_until(request.expires, now),
            cap=settings.defer_cap(_hard_time_limit(request)),
        )
        if plan.give_up is not None:
            final = CircuitOpenError(
                plan.give_up, name=breaker.name, key=breaker.key, state=rejected.state,
                retry_after=rejected.retry_after,
            )  # fmt: skip
            final.final = True  # type: ignore[attr-defined]
            logger.warning("task %s[%s]: %s", self.name, request.id, plan.give_up)
            raise final from rejected
        headers = {k: v for k, v in (request.headers or {}).items() if k not in X_DEATH_HEADERS}
        headers[DEFERRALS_HEADER] = plan.count
        headers[SINCE_HEADER] = plan.since
        if not plan.expires_first and self._park(breaker, args, kwargs, headers, plan, settings, now):
            parked = True
        else:
            parked = False
            signature = self.signature_from_request(request, args, kwargs, countdown=plan.delay, headers=headers)
        try:
            if not parked:
                signature.apply_async()
        except Exception as exc:
            if self.acks_late:
                # Not acknowledged: the broker gives the message back, nothing is lost.
                # Pause first, so a broker that delivers but will not take a publish
                # does not turn this into a busy loop.
                logger.warning("task %s[%s]: could not defer (%r); requeueing it", self.name, request.id, exc)
                time.sleep(_REQUEUE_PAUSE)
                raise Reject(exc, requeue=True) from exc
            failed = CircuitOpenError(
                f"breaker {breaker.label!r} open and the task could not be deferred: {exc!r}",
                name=breaker.name, key=breaker.key, state=rejected.state,
            )  # fmt: skip
            failed.final = True  # type: ignore[attr-defined]
            raise failed from exc
        if not rejected.name or (rejected.name, rejected.key) == (breaker.name, breaker.key):
            breaker.note_deferral()  # (a nested breaker's rejection is not this breaker's deferral)
        label = rejected.label if rejected.name else breaker.label
        if plan.expires_first:
            text = (
                f"breaker {label!r} {state}, task expires first: requeued to arrive after "
                f"its expiry in {plan.delay:.1f} s (deferral {plan.count})"
            )
        else:  # (parked or not: the delay is when the breaker may admit it)
            text = f"breaker {label!r} {state}, deferred {plan.delay:.1f} s (deferral {plan.count})"
        logger.debug("task %s[%s]: %s%s", self.name, request.id, text, ", parked" if parked else "")
        if events.enabled():
            events.send(
                self.app, events.DEFERRED_EVENT, uuid=request.id, name=self.name,
                breaker=rejected.name or breaker.name, key=rejected.key if rejected.name else breaker.key,
                state=state, delay=plan.delay, deferral=plan.count, parked=parked, reason=text,
            )  # fmt: skip
        reason = CircuitOpenError(
            text, name=rejected.name or breaker.name, key=rejected.key if rejected.name else breaker.key,
            state=rejected.state, retry_after=rejected.retry_after,
        )  # fmt: skip
        return Retry(exc=reason, when=plan.delay)


@dataclass(frozen=True, slots=True)
class _Deferred:
    """What a deferred run returns to ``BreakerTask.__call__``, which raises the ``Retry``."""

    retry: Retry


def _drop_frames(exc: BaseException) -> None:
    """Clear the tracebacks of ``exc``, its cause, context and a ``Retry``'s ``exc``:
    finished frames drop their locals (running ones are left alone) and no exception
    keeps a traceback, so nothing of the run waits for the cyclic GC."""
    pending: list[Any] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
            current.__traceback__ = None
        pending += [current.__cause__, current.__context__, getattr(current, "exc", None)]


def _deadline(request: Any, plan: Any, max_defer_age: float | None, now: float) -> float | None:
    """When a parked task must be released whatever its breaker says (epoch seconds):
    just after its ``expires`` (so the worker revokes it), or when its deferral budget
    by age runs out (so it fails with a clear CircuitOpenError)."""
    found = []
    expires_in = _seconds_until(request.expires, now)
    if expires_in is not None:
        found.append(now + expires_in + EXPIRY_OVERSHOOT)
    if max_defer_age is not None:
        found.append(plan.since + max_defer_age)
    return min(found) if found else None


def _rejection_now(breaker: CircuitBreaker) -> CircuitOpenError:
    """The rejection an open breaker would give a new call right now."""
    snapshot = breaker.snapshot()
    retry_after = snapshot.retry_after
    if snapshot.state is State.HALF_OPEN and not retry_after:
        retry_after = breaker.policy.reset_timeout  # probes are out: wait for their verdict
    return CircuitOpenError._rejected(breaker.name, breaker.key, snapshot.state, retry_after)


def _seconds_until(expires: Any, now: float) -> float | None:
    if not expires:
        return None
    try:
        when = maybe_make_aware(maybe_iso8601(expires))
        return float(when.timestamp() - now)
    except (TypeError, ValueError, AttributeError, OverflowError):
        logger.warning("celery_breaker: ignoring unreadable expires=%r", expires)
        return None


def _hard_time_limit(request: Any) -> float | None:
    limits = getattr(request, "timelimit", None) or (None, None)
    try:
        return float(limits[0]) if limits[0] else None
    except (TypeError, ValueError, IndexError):
        return None


# -- class preparation -------------------------------------------------------


def prepare_task_class(cls: type[BreakerTask]) -> None:
    """Turn decorator options into their working form (idempotent).

    ``@app.task(base=BreakerTask, breaker="crm")`` makes ``breaker`` a class attribute
    string, which would hide the ``self.breaker`` accessor: move it to ``breaker_name``.
    Functions given as ``breaker_key``/``breaker_fallback`` would become methods of the
    task class: keep them plain.
    """
    raw = inspect.getattr_static(cls, "breaker")
    if not isinstance(raw, _BreakerAttribute):
        if raw is not None and (not isinstance(raw, str) or not raw):
            raise ConfigurationError(
                f"task {cls.name!r}: the breaker option must be a breaker name (a non-empty str), got {raw!r}"
            )
        cls.breaker_name = raw
        cls.breaker = _BreakerAttribute()
    for option in ("breaker_key", "breaker_fallback"):
        owner = next((klass for klass in cls.__mro__ if option in vars(klass)), None)
        value = inspect.getattr_static(cls, option)
        if isinstance(value, types.FunctionType) and owner is not None and vars(owner).get("_decorated"):
            # Given to @app.task(...): a plain function, not a method of the task.
            setattr(owner, option, staticmethod(value))
        elif value is not None and not isinstance(value, (str, staticmethod, classmethod)) and not callable(value):
            raise ConfigurationError(f"task {cls.name!r}: {option} must be a callable or a method name, got {value!r}")

    if _CONFIG in cls.__dict__:
        delattr(cls, _CONFIG)  # options changed: resolve them again


def _scope(where: str, value: Any) -> str:
    if value not in ("run", "calls"):
        raise ConfigurationError(f"{where} must be 'run' or 'calls', got {value!r}")
    return str(value)


def task_breaker_config(task: BreakerTask | type[BreakerTask]) -> TaskBreakerConfig:
    """The task's resolved breaker options (validated once, cached on its class)."""
    # task.__class__, not type(task): @shared_task hands out a Proxy that forwards it.
    cls = cast("type[BreakerTask]", task if isinstance(task, type) else task.__class__)
    found: TaskBreakerConfig | None = cls.__dict__.get(_CONFIG)
    if found is not None:
        return found
    settings = get_settings(cls.app)
    name = cls.breaker_name or cls.name
    where = f"task {cls.name!r}"
    base_policy = settings.policy_for(name)
    policy = BreakerPolicy.coerce(cls.breaker_policy, base=base_policy, source=f"{where}: breaker_policy")
    from .settings import _seconds, _seconds_or_zero, _whole

    def option(attr: str, setting_value: Any, check: Callable[[str, Any], Any]) -> Any:
        value = getattr(cls, attr)
        if value is None:
            return setting_value
        return check(f"{where}: {attr}", value)

    for attr in ("breaker_key", "breaker_fallback"):
        value = getattr(cls, attr)
        if isinstance(value, str) and not callable(getattr(cls, value, None)):
            raise ConfigurationError(
                f"{where}: {attr}={value!r} names no method of the task; "
                f"define {value}() on the task class or give a callable"
            )
    config = TaskBreakerConfig(
        name=name,
        policy=policy,
        max_deferrals=option("breaker_max_deferrals", settings.max_deferrals, _whole),
        max_defer_age=option("breaker_max_defer_age", settings.max_defer_age, _seconds),
        defer_spread=option("breaker_defer_spread", settings.defer_spread, _seconds_or_zero),
        counts_runs=option("breaker_scope", "run", _scope) == "run",
    )
    setattr(cls, _CONFIG, config)
    return config
