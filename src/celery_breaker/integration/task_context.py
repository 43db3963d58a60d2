"""Which request and which run a task is in: Celery's request stack, read directly, and the run admissions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Task

try:  # (Celery's own request stack, read directly by request_of)
    from celery.utils.threads import Local as _CeleryLocal
    from celery.utils.threads import _LocalStack as _CeleryLocalStack
except ImportError:  # pragma: no cover (a Celery without them: the request property)
    _CeleryLocal = _CeleryLocalStack = None

from ..breaker import RunAdmission, current_run

if TYPE_CHECKING:
    from .task import BreakerTask

__all__ = ["nested", "request_of", "running", "within_run_of"]


def request_of(task: Task) -> Any:
    """``task.request``, read from Celery's request stack itself when it is Celery's own
    (~0.15 µs where the property takes ~0.7 µs: each read of it misses a slot on
    Celery's ``Local`` before its ``__getattr__`` answers). The same request: the top
    of this thread's (or greenlet's) stack, else the task's default one."""
    stack = task.request_stack
    if type(stack) is _CeleryLocalStack:
        local = stack._local
        if type(local) is _CeleryLocal:
            try:
                request = local.__storage__[local.__ident_func__()]["stack"][-1]
            except (KeyError, IndexError):
                pass
            else:
                if request is not None:
                    return request
    return task.request


def nested(run: RunAdmission) -> bool:
    """Whether ``run`` is a direct call of its task inside a run of the same task (itself
    called directly or not: ``x`` calling ``y`` calling ``x``), on that run's request."""
    return within_run_of(run.owner, run.enclosing)


def within_run_of(task: object, run: RunAdmission | None) -> bool:
    """Whether ``run``, or a run it is nested in, is ``task``'s."""
    while run is not None:
        if run.owner is task:
            return True
        run = run.enclosing
    return False


def running(task: BreakerTask) -> RunAdmission | None:
    """The admission of ``task``'s run in this context (not another task's)."""
    run = current_run()
    if run is not None and run.owner is task:
        return run
    return None
