"""BreakerTask: a Celery task whose breaker defers it, without spending retries, while its downstream is down."""

from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass
from typing import Any, ClassVar

from billiard.common import TERM_SIGNAL
from celery import Task
from celery.app.task import _task_stack
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.local import Proxy

from ..breaker import (
    CHECK_LEASE_MARGIN,
    CircuitBreaker,
    RunAdmission,
    bound_checks_in_runs,
    current_run,
    lease_runs_by,
)
from ..errors import CircuitOpenError
from ..names import key_text
from .broker import DEAD_LETTER_HEADERS
from .deferral.defer import defer, refreshed
from .deferral.plan import HEADERS as DEFERRAL_HEADERS
from .deferral.plan import PARKED_HEADER, run_time_limit
from .probes import breaker_with_probe
from .registry import BreakerRegistry, registry_for
from .task_context import nested as _nested
from .task_context import request_of as _request_of
from .task_context import running as _running
from .task_context import within_run_of as _within_run_of
from .task_limits import (  # (the first two are used here no more: still importable from here)
    ADMISSION_CHECK_WAIT,  # noqa: F401
    CHECK_SHARE_OF_TIME_LIMIT,  # noqa: F401
    SOFT_TIME_LIMITS_ENFORCED_ATTR,
    TIME_LIMITS_ENFORCED_ATTR,
)
from .task_limits import check_within as _check_within
from .task_options import (
    OPTIONS_FORGOTTEN,
    TaskBreakerConfig,
    task_breaker_config,
)
from .task_prepare import BreakerAttribute as _BreakerAttribute
from .task_prepare import prepare as _prepare
from .task_rejection import FAILED_ATTR as _FAILED_ATTR
from .task_rejection import RETRY_CALL_ATTR as _RETRY_CALL_ATTR
from .task_rejection import arguments as _arguments
from .task_rejection import drop_frames as _drop_frames
from .task_rejection import note_retry_call as _note_retry_call
from .task_rejection import rejection_now as _rejection_now
from .task_rejection import send_outcome as _send_outcome
from .task_rejection import waits_instead as _waits_instead

__all__ = ["BreakerTask"]


#: Where ``BreakerTask.retry`` notes a retry's cause on a ``Retry`` Celery made without one
#: (``self.retry()`` in an ``except`` clause): the exception being handled then.
_CAUSE_ATTR = "_celery_breaker_cause"


def _translate(exc: BaseException) -> BaseException | None:
    """What a Celery control-flow exception raised inside a run says about the downstream:
    a ``Retry`` counts as its cause (neutral without one); ``Ignore``/``Reject`` are neutral;
    the exit of a pool process killed at the run's hard time limit is a ``TimeLimitExceeded``
    (``_killed_at_limit``)."""
    if isinstance(exc, Retry):
        cause = exc.exc if isinstance(exc.exc, BaseException) else getattr(exc, _CAUSE_ATTR, None)
        return cause if isinstance(cause, BaseException) else None
    if isinstance(exc, (Ignore, Reject)):
        return None
    if type(exc) is SystemExit and exc.code == _SIGTERM_EXIT:
        return _killed_at_limit(exc)
    return exc


#: The exit billiard's handler raises in a prefork pool process sent its terminating
#: signal (SIGTERM, or what ``REMAP_SIGTERM`` names): by its pool at the run's hard time
#: limit (a SIGKILL follows a tenth of a second later), or at a cold shutdown, or by a
#: revoke that terminates.
_SIGTERM_EXIT = -(256 - TERM_SIGNAL)
#: A SIGTERM that comes no earlier than this many seconds (at most a fifth of the limit)
#: before the run's hard time limit, counted from when the task's call began, is the
#: limit's. The pool starts the limit's clock when the process tells it the job started,
#: a moment before the call: its SIGTERM comes at the limit or after. An operator's
#: terminating revoke or a cold shutdown earlier than that stays an exit (neutral).
KILLED_SLACK = 0.25
#: When this process's current task call began (``_clock()``, before its admission): read
#: only on prefork, which runs one task at a time per process.
_call_began: list[float] = [0.0]
_clock = time.monotonic  # (a seam for tests)


def _killed_at_limit(exc: SystemExit) -> BaseException:
    """The exit of a prefork pool process sent SIGTERM at the run's hard time limit, as the
    failure it is: ``TimeLimitExceeded`` (a hung downstream). As an exit it was neutral (a
    ``BaseException``), so on prefork a downstream that hung every call to the limit never
    opened its breaker, where gevent's timeout, raised in the run, did (decision 86). Any
    other exit (a cold shutdown, a revoke, more than ``KILLED_SLACK`` before the limit; a
    pool that does not kill at the limit) stays neutral."""
    run = current_run()
    if run is None:
        return exc
    # (only prefork sends the SIGTERM: its time limits are the only soft-enforced ones)
    limit = _enforced_time_limit(run.owner, SOFT_TIME_LIMITS_ENFORCED_ATTR)
    if limit is None or _clock() - _call_began[0] < limit - min(KILLED_SLACK, limit / 5):
        return exc
    killed: BaseException = TimeLimitExceeded(limit)
    return killed


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
    * ``breaker_probe``: a health check (a callable, a ``HealthCheck``, a dotted path or a task name) run
      instead of the task when the breaker may half-open; ``breaker_probe_timeout``.
    * ``breaker_max_deferrals``, ``breaker_max_defer_age``, ``breaker_defer_spread``.
    """

    breaker_name: ClassVar[str | None] = None
    #: (a subclass names its breaker with ``breaker_name = "crm"``: a class attribute
    #: ``breaker = "crm"`` works too, but is a string where mypy expects this accessor)
    breaker: _BreakerAttribute = _BreakerAttribute()
    breaker_key: Any = None
    breaker_policy: Any = None
    breaker_fallback: Any = None
    breaker_max_deferrals: Any = None
    breaker_max_defer_age: Any = None
    breaker_defer_spread: Any = None
    breaker_scope: Any = None
    breaker_probe: Any = None
    breaker_probe_timeout: Any = None
    #: ``autoretry_for=(Exception,)`` must never spend a retry on an open breaker.
    dont_autoretry_for = (CircuitOpenError,)
    #: The breaker of a task without ``breaker_key``, as ``_breaker_for`` last found it:
    #: ``(OPTIONS_FORGOTTEN[0], config, registry, registry version, breaker)``, each as
    #: it was before the breaker was asked for.
    _breaker_held: tuple[int, TaskBreakerConfig, BreakerRegistry, int, CircuitBreaker] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every task class is made by subclassing (``@app.task(base=...)``, ``task_cls``,
        # ``breaker_routes``): its options take their working form here.
        super().__init_subclass__(**kwargs)
        _prepare(cls, BreakerTask)

    @classmethod
    def on_bound(cls, app: Any) -> None:
        """Bound to ``app``: ``task_annotations`` may have set breaker options since the class was made."""
        super().on_bound(app)
        _prepare(cls, BreakerTask)

    # -- execution -----------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # (Celery's request is a thread-local stack lookup: read once per run.)
        request = _request_of(self)
        if request.called_directly:
            # Called as a plain function (not by a worker): set up the request the way
            # Task.__call__ does, so the body sees its arguments.
            _task_stack.push(self)
            self.push_request(args=args, kwargs=kwargs)
            try:
                outcome = self._run_guarded(args, kwargs, _request_of(self))
            except _PendingRetry as pending:  # (direct calls cannot defer: held back only by a fallback)
                outcome = pending
            finally:
                self.pop_request()
                _task_stack.pop()
        else:
            try:
                outcome = self._run_guarded(args, kwargs, request)
            except _PendingRetry as pending:  # (from a fallback: its retry is sent now)
                outcome = pending
        if type(outcome) is _Deferred:
            # Raised here, outside any handler: the traceback Celery copies for the
            # RETRY (billiard copies every frame's co_positions, ~0.1 ms per frame) is
            # its tracer and this frame only, and the Retry has no __context__.
            raise outcome.retry
        if type(outcome) is _PendingRetry:
            self._send_retry(outcome)  # (raises; outside any handler, as above)
        return outcome

    def _send_retry(self, pending: _PendingRetry) -> None:
        """Send the retry ``BreakerTask.retry`` held back: Celery's (or the next class's in
        the MRO), which raises the ``Retry`` it sent, or the error once out of retries."""
        sent = super().retry(*pending.call, **pending.options)
        raise sent  # (not reached: held back only with throw=True, so the call above raises)

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

    def is_guarded(self) -> bool:
        """Whether this task runs under a breaker. Celery's own tasks (celery.map,
        chord_unlock, ...) become BreakerTasks under ``task_cls="celery_breaker:BreakerTask"``;
        they get a breaker only when one is named for them."""
        return self.breaker_name is not None or not self.name.startswith("celery.")

    def _can_defer(self) -> bool:
        request = _request_of(self)
        return not (request.is_eager or request.called_directly)

    def _run_guarded(self, args: tuple[Any, ...], kwargs: dict[str, Any], request: Any) -> Any:
        _call_began[0] = _clock()  # (a SIGTERM near the hard time limit is the limit's: _killed_at_limit)
        held = self._breaker_held
        kept = (
            held is not None
            and held[0] == OPTIONS_FORGOTTEN[0]
            and held[2].version == held[3]
            and self.breaker_key is None
        )
        # A task that kept a breaker is guarded: it kept one after ``is_guarded`` said so,
        # and the stock answer depends on its options and name only (a task whose class
        # overrides ``is_guarded`` keeps none: ``_breaker_for``).
        if not kept and not self.is_guarded():
            return self.run(*args, **kwargs)
        if request.eta is not None and self._can_defer():
            # A countdown deferral the worker held: sent again if the run might not fit in
            # what is left of the broker's window (``refreshed``), before it takes a ticket.
            again = refreshed(self, args, kwargs)
            if again is not None:
                return _Deferred(again)
        if kept and held is not None:  # (``held`` is one when ``kept``: said for the type checker)
            # The key-less breaker this task last met, while every task's options and the
            # app's registry are as they were then (~0.4 µs a run less than asking).
            config: TaskBreakerConfig = held[1]
            breaker: CircuitBreaker = held[4]
            probe = config.probe
            if breaker.probe is not probe and breaker.probe != probe:  # (as breaker_with_probe)
                breaker.probe = probe
        else:
            forgotten = OPTIONS_FORGOTTEN[0]  # (read first: options forgotten meanwhile make it stale)
            config = task_breaker_config(self)
            breaker = self._breaker_for(config, args, kwargs, forgotten)
        try:
            # Admitted and current at once (``enter_run``: one call, no ``with`` block, its
            # arguments positional: ~20 ns less), owned by this task (``self.breaker``
            # knows its run by that); current until every handler below has run (they
            # settle the run), left by ``succeed`` or in the outer ``finally``.
            if breaker.probe is None:
                run = breaker.enter_run(_translate, config.counts_runs, None, self)
            else:  # (a health check this run may have to run must end before the task's hard limit)
                within = _check_within(self, request, breaker.policy.probes_to_close)
                run = breaker.enter_run(_translate, config.counts_runs, within, self)
        except CircuitOpenError as rejected:
            return self._on_rejected(breaker, rejected, args, kwargs, nested=_within_run_of(self, current_run()))
        except SoftTimeLimitExceeded:
            # The task's soft time limit fired during the health check it ran for its
            # breaker (the check gave no verdict; its slot is free): it waits, as a
            # rejected run does, rather than fail without having run.
            if not self._can_defer() or _within_run_of(self, current_run()):
                raise
            return self._on_rejected(breaker, _rejection_now(breaker), args, kwargs)
        left = False  # (a run that returned is left by ``succeed``, else in the ``finally``)
        try:
            headers = request.headers
            if headers and PARKED_HEADER in headers:
                run.released = True  # released from the parking: a 429 now slows the release, opens nothing
            try:
                result = self.run(*args, **kwargs)
            except Retry as retry:
                # self.retry() / autoretry_for: count the cause, then let Celery retry.
                run.settle(retry)
                if type(retry) is _PendingRetry:
                    # A self.retry() from inside a guarded block, which has now recorded
                    # its failure: wait if that opened the breaker, else retry (__call__
                    # sends it, outside this handler: its error is not chained to this one).
                    rejection = _waits_instead(run)
                    if rejection is not None:
                        retry_args, retry_kwargs = retry.call[:2]
                        return self._on_rejected(
                            breaker,
                            rejection,
                            *_arguments(retry_args, retry_kwargs, args, kwargs),
                            retry.asked,
                            nested=_nested(run),
                        )
                    return retry
                raise
            except (Ignore, Reject):
                run.settle(None, neutral=True)
                raise
            except CircuitOpenError as rejected:  # from a guarded call or a nested breaker
                run.settle(None, neutral=True)
                if rejected.final:
                    raise
                # (a self.retry(args=..., queue=...) deferred instead: its arguments and options,
                # as the retry would have run)
                call = getattr(rejected, _RETRY_CALL_ATTR, None)
                asked: dict[str, Any] = {}
                if call is not None:
                    args, kwargs = _arguments(call[0], call[1], args, kwargs)
                    asked = call[2]
                return self._on_rejected(breaker, rejected, args, kwargs, asked, nested=_nested(run))
            except BaseException as error:
                run.settle(error)
                # (Eager and direct calls cannot wait: they keep their real error, as does a
                # direct call of the task inside its own run; nor can a pool process that
                # is being killed: ``_killed_at_limit``.)
                if type(error) is not SystemExit and (
                    (self._can_defer() and not _nested(run)) or self.breaker_fallback is not None
                ):
                    rejection = _waits_instead(run)
                    if rejection is not None:
                        return self._on_rejected(breaker, rejection, args, kwargs, nested=_nested(run))
                raise
            else:
                left = True
                run.succeed()  # (settle(None) and leave() in one call)
                if run.released:
                    _send_outcome(breaker)
                return result
        finally:
            if not left:
                run.leave()

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
        """Celery's retry, except that an open breaker defers instead of spending a retry.

        The retry's cause is ``exc``, or without one the exception being handled (a bare
        ``self.retry()`` in an ``except`` clause): it is what the run and any guarded
        block it leaves record. Inside a guarded block (``with self.breaker:``) the
        failure is recorded only when the ``Retry`` leaves the block, after Celery would
        have sent the retry: so with ``throw=True`` the retry is held back
        (``_PendingRetry``) and sent once the failure is recorded, only if it did not open
        the breaker. With ``throw=False`` it is sent at once, as Celery does."""
        run = _running(self)
        asked = dict(options)  # (what the caller asked the retry to be sent with; headers are added below)
        cause = exc
        if exc is None and run is not None:
            handled = sys.exc_info()[1]
            if handled is not None and _handled_in_this_run(handled):
                cause = handled  # a bare retry in the body's except clause: what it handles
        if isinstance(cause, CircuitOpenError) and run is not None:
            _note_retry_call(cause, args, kwargs, asked)
            raise cause  # the run's handler defers (or falls back); never a retry
        postpone = False
        if run is not None:
            if isinstance(cause, BaseException):
                run.settle(cause)
            if self._can_defer():
                rejection = _waits_instead(run)  # defer instead of retrying
                if rejection is not None:
                    _note_retry_call(rejection, args, kwargs, asked)  # (deferred as the retry would run)
                    raise rejection from cause
                # A guarded call took the run's ticket: it may still be open around us.
                postpone = throw and run.claimed and isinstance(cause, BaseException)
        if "headers" not in options:
            # A retry is a new attempt: it starts a fresh deferral budget (count and age) and
            # is no parked task's release; Celery would copy these headers into it.
            headers = _request_of(self).headers
            if headers and any(name in headers for name in DEFERRAL_HEADERS):
                options["headers"] = {
                    k: v for k, v in headers.items() if k not in DEFERRAL_HEADERS and k not in DEAD_LETTER_HEADERS
                }
        if postpone and isinstance(cause, BaseException):
            raise _PendingRetry(cause, (args, kwargs, exc, throw, eta, countdown, max_retries), options, asked)
        try:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        except Retry as sent:
            if exc is None and isinstance(cause, BaseException):
                setattr(sent, _CAUSE_ATTR, cause)  # (what a block it leaves records)
            raise

    # -- rejection: fallback, error or deferral -------------------------------

    def _breaker_for(
        self, config: TaskBreakerConfig, args: tuple[Any, ...], kwargs: dict[str, Any], forgotten: int
    ) -> CircuitBreaker:
        """The breaker of this run; a key-less one is kept (``_breaker_held``), with
        ``forgotten``: ``OPTIONS_FORGOTTEN[0]`` as it was before ``config`` was resolved."""
        key_fn = self.breaker_key
        if key_fn is None:
            app = self.app
            registry = registry_for(app)
            version = registry.version  # (read first: a breaker made meanwhile moves it on)
            breaker = breaker_with_probe(app, config.name, None, config.policy, config.probe)
            if not isinstance(app, Proxy) and type(self).is_guarded is BreakerTask.is_guarded:
                # (not on ``current_app``: another app may be current next run; nor for a
                # class that decides ``is_guarded`` itself, which is asked on every run)
                self._breaker_held = (forgotten, config, registry, version, breaker)
            return breaker
        if isinstance(key_fn, str):
            key_fn = getattr(self, key_fn)
        try:
            key = key_fn(args, kwargs)
        except Exception as exc:
            # The task fails, unrun: its traceback alone showed a KeyError('tenant') from a
            # lambda, as if the task's own code had raised it.
            if hasattr(exc, "add_note"):  # (Python 3.11+)
                exc.add_note(
                    f"celery-breaker: raised by the breaker_key of task {self.name!r}, computing the breaker's key "
                    "from the task's arguments; the task failed without running (fix breaker_key, or the arguments "
                    "sent)"
                )
            raise
        if type(key) is not str:
            # (as a key that raises: this run fails without running, a ConfigurationError saying why)
            key = key_text(key, f"task {self.name!r}: breaker_key")
        return breaker_with_probe(self.app, config.name, key, config.policy, config.probe)

    def _on_rejected(
        self,
        breaker: CircuitBreaker,
        rejected: CircuitOpenError,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        asked: dict[str, Any] | None = None,
        *,
        nested: bool = False,
    ) -> Any:
        """The run's answer to a rejection: its fallback's result, else its deferral, with
        the options a retry it replaces ``asked`` for (``self.retry(queue=...)``).

        ``nested``: the run is a direct call of the task inside a run of its own (``self(...)``
        in its body), on the worker's request: it cannot defer, as a direct call cannot,
        and raises the rejection into the body. It deferred the task itself, with the
        nested call's arguments, and the run around it was lost."""
        fallback = self.breaker_fallback
        if fallback is not None:
            if isinstance(fallback, str):
                fallback = getattr(self, fallback)
            try:
                return fallback(*args, **kwargs)
            except CircuitOpenError as also:
                # The fallback's own breaker is open too (a secondary provider): the task
                # waits for its breaker, as it would without a fallback.
                if also.final or nested or not self._can_defer():
                    raise
        if nested or not self._can_defer():
            raise rejected  # nothing to requeue; Celery's eager retry would recurse
        failed = getattr(rejected, _FAILED_ATTR, False) is True
        return _Deferred(defer(self, breaker, rejected, args, kwargs, asked=asked, failed=failed))


class _PendingRetry(Retry):  # type: ignore[misc]
    """``BreakerTask.retry`` raised inside a run whose guarded call may still be open: the
    retry Celery would have sent, sent by the task (``__call__``, ``_send_retry``) once the
    body has unwound and the call has recorded its failure, unless that failure opened the
    breaker (the task is deferred then). A ``Retry`` whose ``exc`` is the cause, so the
    block that it leaves records the failure. ``options``: what the retry is sent with;
    ``asked``: the options its caller gave (the deferral takes those)."""

    def __init__(
        self, cause: BaseException, call: tuple[Any, ...], options: dict[str, Any], asked: dict[str, Any]
    ) -> None:
        super().__init__(None, cause)
        self.call = call
        self.options = options
        self.asked = asked


@dataclass(frozen=True, slots=True)
class _Deferred:
    """What a deferred run returns to ``BreakerTask.__call__``, which raises the ``Retry``."""

    retry: Retry


def _handled_in_this_run(exc: BaseException) -> bool:
    """Whether the frame handling ``exc`` (its traceback's first) is inside the current
    task run, below ``BreakerTask.__call__``, not a caller's frame above it (a direct call
    made in a caller's own ``except`` clause)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    handler = tb.tb_frame
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame is handler:
            return True
        if frame.f_code is _CALL_CODE:
            return False  # the run's entry reached first: handled outside the run
        frame = frame.f_back
    return False


def _body_check_within(run: RunAdmission, checks: int) -> float | None:
    """How long a health check run by a guarded call in a task's body may take
    (``breaker.bound_checks_in_runs``): as long as the task's admission would wait
    (``_check_within``), so a client library's breaker with a check of its own, called in
    the body, holds the pool process no longer than the task's own breaker would (it
    held it for the check's whole timeout); then the call is rejected and the task
    deferred while the check goes on in its slot. A run that is no task's (``begin_run``
    in a program) is not bounded here."""
    task = run.owner
    if not isinstance(task, BreakerTask):
        return None
    return _check_within(task, _request_of(task), checks)


bound_checks_in_runs(_body_check_within)


def _run_lease(owner: object) -> float | None:
    """How long the probe slot a task's run wins at its admission is held at most
    (``breaker.lease_runs_by``): its hard time limit (found as ``_check_within`` finds
    it) and ``CHECK_LEASE_MARGIN``, where its pool enforces that limit (prefork, gevent).
    Such a run gives its verdict within the limit, or is ended by it: on prefork the pool
    process is killed, and the verdict never comes. That slot was held for the policy's
    ``half_open_max_wait`` (60 s by default), and with ``half_open_max_calls=1`` no other
    probe could go meanwhile. ``None`` (``half_open_max_wait``) for a run not of a
    ``BreakerTask``, an eager or direct call, a pool that enforces no limit, or no limit."""
    limit = _enforced_time_limit(owner, TIME_LIMITS_ENFORCED_ATTR)
    return None if limit is None else limit + CHECK_LEASE_MARGIN


def _enforced_time_limit(owner: object, enforced_by: str) -> float | None:
    """The hard time limit of ``owner``'s run in this context (``run_time_limit``), where
    its worker's pool enforces time limits (the app notes it as ``enforced_by``:
    ``TIME_LIMITS_ENFORCED_ATTR``, prefork and gevent; ``SOFT_TIME_LIMITS_ENFORCED_ATTR``,
    prefork alone); ``None`` for a run not of a ``BreakerTask``, an eager or direct call,
    another pool, or no limit."""
    if not isinstance(owner, BreakerTask) or not getattr(owner.app, enforced_by, False):
        return None
    request = _request_of(owner)
    if request.is_eager or request.called_directly:
        return None
    return run_time_limit(owner, request)


lease_runs_by(_run_lease)


_CALL_CODE = BreakerTask.__call__.__code__
