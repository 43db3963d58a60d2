"""How long a health check may run: within its probe slot's lease, and within what a run's admission allows."""

from __future__ import annotations

from contextvars import ContextVar

from ..core import BreakerPolicy
from ..errors import ConfigurationError
from ..health import LEAST_PROBE_TIMEOUT, HealthCheck

__all__ = ["CHECK_LEASE_MARGIN", "CHECK_WITHIN", "check_fits", "check_time"]

#: Seconds the health checks run for ``enter_run(check_within=...)`` may take at most, all
#: together (a task's own time limit): set only around that admission.
CHECK_WITHIN: ContextVar[float | None] = ContextVar("celery_breaker_check_within", default=None)
#: Seconds past its timeout a health check's probe slot stays held (``_check_lease``):
#: time for its verdict to reach the store.
CHECK_LEASE_MARGIN = 5.0


def check_time(half_open_max_wait: float) -> float:
    """The longest a health check runs under a probe slot leased for at most
    ``half_open_max_wait`` seconds: ``CHECK_LEASE_MARGIN`` less, or a fifth less where
    that is shorter. Cut at the lease's end (a ``probe_timeout`` of ``half_open_max_wait``
    or more), its verdict was recorded as the lease ran out, and another caller could take
    the slot and start a second check beside it in the same half-open period."""
    return half_open_max_wait - min(CHECK_LEASE_MARGIN, half_open_max_wait / 5)


def check_fits(policy: BreakerPolicy, probe: HealthCheck | None, where: str) -> None:
    """Refuse a health check under a ``half_open_max_wait`` that leaves it less than
    ``LEAST_PROBE_TIMEOUT`` (``check_time``: a fifth of the wait goes to the slot's
    margin): every check was cut before it could answer, and the breaker never closed."""
    if probe is None:
        return
    wait = policy.half_open_max_wait
    if check_time(wait) < LEAST_PROBE_TIMEOUT:
        least = LEAST_PROBE_TIMEOUT * 5 / 4  # (check_time(least) is LEAST_PROBE_TIMEOUT)
        raise ConfigurationError(
            f"{where}: half_open_max_wait={wait:g} s leaves its health check {probe.name} {check_time(wait):g} s, "
            f"less than the {LEAST_PROBE_TIMEOUT:g} s a check needs; raise half_open_max_wait to {least:g} s or "
            "more, or give the breaker no probe"
        )
