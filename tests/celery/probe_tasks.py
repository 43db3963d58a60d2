"""Tasks whose breakers have a health check (loaded by the session worker with ``tasks.py``)."""

from __future__ import annotations

import threading
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from celery_breaker import BreakerTask, CircuitBreaker
from celery_breaker.health import HealthCheck

from .support import DEFAULT_POLICY
from .tasks import DOWN, STORE_URL, call_downstream, report

#: How many times each breaker's health check ran.
CHECKS: dict[str, int] = {}
_LOCK = threading.Lock()


def check(name: str) -> None:
    """The downstream's health endpoint: counted, and failing while ``DOWN[name]`` is set."""
    with _LOCK:
        CHECKS[name] = CHECKS.get(name, 0) + 1
    if DOWN.get(name, False):
        raise ConnectionError(f"health check of {name}: down")


def check_two(name: str, key: str | None) -> None:
    """A check that needs two arguments: refused (it may take one, the breaker's key)."""
    check(f"{name}[{key}]")


def check_option() -> None:
    check("t-probe-option")


def check_setting() -> None:
    """Named in ``breaker_probes`` by its dotted path (conftest)."""
    check("t-probe-setting")


@shared_task(base=BreakerTask, bind=True, breaker="t-probe-option", breaker_probe=check_option)
def probe_option_task(self: Any, n: int) -> dict[str, Any]:
    with self.breaker:
        value = call_downstream("t-probe-option")
    return report(self, (n, value))


@shared_task(base=BreakerTask, bind=True, breaker="t-probe-setting")
def probe_setting_task(self: Any, n: int) -> dict[str, Any]:
    with self.breaker:
        value = call_downstream("t-probe-setting")
    return report(self, (n, value))


@shared_task(name="tests.celery.probe_tasks.health")
def health() -> str:
    """A plain task used as a health check by name (``breaker_probes``)."""
    check("t-probe-task")
    return "healthy"


@shared_task(base=BreakerTask, bind=True, breaker="t-probe-task")
def probe_by_task_task(self: Any) -> dict[str, Any]:
    with self.breaker:
        value = call_downstream("t-probe-task")
    return report(self, value)


class Unprintable(ConnectionError):
    """A health endpoint's error whose ``str()`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("cannot render me")


def check_unprintable() -> None:
    with _LOCK:
        CHECKS["t-probe-unprintable"] = CHECKS.get("t-probe-unprintable", 0) + 1
    if DOWN.get("t-probe-unprintable", False):
        raise Unprintable()


@shared_task(base=BreakerTask, bind=True, breaker="t-probe-unprintable", breaker_probe=check_unprintable)
def probe_unprintable_task(self: Any) -> dict[str, Any]:
    with self.breaker:
        value = call_downstream("t-probe-unprintable")
    return report(self, value)


class InterruptedCheck(HealthCheck):
    """A health check the task's soft time limit interrupts (as billiard's signal does
    while the task waits for the check's thread): ``run`` raises in the caller."""

    def run(self, timeout: float | None = None) -> Any:
        with _LOCK:
            CHECKS["t-probe-soft-limit"] = CHECKS.get("t-probe-soft-limit", 0) + 1
        if DOWN.get("t-probe-soft-limit-check", True):
            raise SoftTimeLimitExceeded()
        return super().run(timeout)


@shared_task(
    base=BreakerTask,
    bind=True,
    breaker="t-probe-soft-limit",
    breaker_probe=InterruptedCheck(lambda: None),
    max_retries=0,
)
def probe_soft_limit_task(self: Any) -> dict[str, Any]:
    with self.breaker:
        value = call_downstream("t-probe-soft-limit")
    return report(self, value)


#: Set when the slow health check (``check_slowly``) may answer, healthy.
SLOW_CHECK_ANSWERS = threading.Event()


def check_slowly() -> None:
    """A health check that takes longer than its task's soft time limit: it answers only
    once ``SLOW_CHECK_ANSWERS`` is set."""
    with _LOCK:
        CHECKS["t-probe-slow"] = CHECKS.get("t-probe-slow", 0) + 1
    SLOW_CHECK_ANSWERS.wait(30)


@shared_task(
    base=BreakerTask,
    bind=True,
    breaker="t-probe-slow",
    breaker_probe=check_slowly,
    breaker_probe_timeout=30,
    soft_time_limit=0.5,
    max_retries=0,
)
def probe_slow_check_task(self: Any) -> dict[str, Any]:
    with self.breaker:
        value = call_downstream("t-probe-slow")
    return report(self, value)


#: Set when the client library's slow health check (``check_client_slowly``) may answer, healthy.
CLIENT_CHECK_ANSWERS = threading.Event()


def check_client_slowly() -> None:
    """A client library's own health check, slow to answer: only once ``CLIENT_CHECK_ANSWERS`` is set."""
    with _LOCK:
        CHECKS["t-body-client"] = CHECKS.get("t-body-client", 0) + 1
    CLIENT_CHECK_ANSWERS.wait(30)


#: A client library's breaker, with a health check of its own, called inside a task's
#: body (not the task's breaker: no admission of the task runs its check).
BODY_CLIENT = CircuitBreaker(
    "t-body-client", DEFAULT_POLICY, storage=STORE_URL, probe=HealthCheck(check_client_slowly, timeout=30)
)


@shared_task(base=BreakerTask, bind=True, breaker="t-body-task", max_retries=0)
def body_client_task(self: Any) -> dict[str, Any]:
    value = BODY_CLIENT.call(call_downstream, "t-body-client")
    return report(self, value)


def check_kept() -> None:
    check("t-probe-kept")


#: A health check kept in a module with its own timeout: named by its dotted path, as a
#: setting read from a file or the environment can only name it.
KEPT_CHECK = HealthCheck(check_kept, timeout=3.0, name="kept check")
