"""How long a task's admission waits for its health checks: a share of the time limits its pool enforces."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .deferral.plan import run_soft_time_limit, run_time_limit

if TYPE_CHECKING:
    from .task import BreakerTask

__all__ = [
    "ADMISSION_CHECK_WAIT",
    "CHECK_SHARE_OF_TIME_LIMIT",
    "SOFT_TIME_LIMITS_ENFORCED_ATTR",
    "TIME_LIMITS_ENFORCED_ATTR",
    "check_within",
]

#: Share of a task's hard time limit a health check run at its admission may take.
CHECK_SHARE_OF_TIME_LIMIT = 0.8
#: Seconds a task run waits at most for each health check it needs at its admission (the
#: policy's ``probes_to_close``); a check still running then goes on without it, in its
#: probe slot, and the run is deferred. A
#: check that hung held its pool process for the check's whole timeout (10 s by default):
#: with many per-key breakers coming due, it stalled every tenant's tasks on that worker
#: (an acceptance test: no task ran for 7 s, healthy tenants' latency 8.5 s at the worst).
ADMISSION_CHECK_WAIT = 1.0


#: Where the worker notes whether its pool enforces time limits (prefork and gevent do;
#: eventlet, threads and solo do not) ...
TIME_LIMITS_ENFORCED_ATTR = "_celery_breaker_time_limits_enforced"
#: ... and soft ones (prefork only: gevent drops them).
SOFT_TIME_LIMITS_ENFORCED_ATTR = "_celery_breaker_soft_time_limits_enforced"


def check_within(task: BreakerTask, request: Any, checks: int = 1) -> float | None:
    """How long the run may wait for the health checks at its admission (``checks`` of
    them close the breaker: the policy's ``probes_to_close``): at most
    ``ADMISSION_CHECK_WAIT`` for each, and a share of its time limit, the lower of the hard one
    (the message's, else the task's, else the worker's ``--time-limit``, else
    ``task_time_limit``) and the soft one (found alike; counted on prefork, the only pool
    that enforces it), so the run stops waiting, and is rejected and deferred, before the
    pool interrupts or kills it. A check still running then goes on without it, and
    counts when it ends. ``None`` (the check's own timeout) for an eager or a direct call."""
    if request.is_eager or request.called_directly:
        return None
    app = task.app
    # (for each check: with the default policy's two, a 0.6 s check ran out of time at the
    # second, and the task was deferred for the 9.4 s the check had left, not 1.2 s)
    most = ADMISSION_CHECK_WAIT * max(1, checks)
    if not getattr(app, TIME_LIMITS_ENFORCED_ATTR, False):
        return most
    limits = [run_time_limit(task, request)]
    if getattr(app, SOFT_TIME_LIMITS_ENFORCED_ATTR, False):
        limits.append(run_soft_time_limit(task, request))
    found = [limit * CHECK_SHARE_OF_TIME_LIMIT for limit in limits if limit is not None]
    return min([most, *found])
