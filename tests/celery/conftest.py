"""One session app and one in-process solo worker (memory broker, cache+memory results) for every test here.

Each test uses its own task and breaker (see ``tasks.py``), so tests cannot disturb each
other; the memory store is process-global, so the test thread sees the worker's breakers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
from celery import _state

from celery_breaker import CircuitBreaker

from .support import DEFAULT_POLICY, DEFER_SPREAD
from .tasks import STORE_URL


@pytest.fixture(scope="session")
def celery_config() -> Mapping[str, Any]:
    return {
        "broker_url": "memory://",
        "result_backend": "cache+memory://",
        # The memory transport polls; the default 1 s would slow every deferral down.
        "broker_transport_options": {"polling_interval": 0.02},
        "breaker_storage_url": STORE_URL,
        "breaker_default_policy": DEFAULT_POLICY,
        "breaker_defer_spread": DEFER_SPREAD,
        "breaker_policies": {
            "t-stays-closed": {"failure_threshold": 2},
            "t-guard-once": {"failure_threshold": 5},
            "t-expires": {"reset_timeout": 60},
            "t-retry-after": {"failure_threshold": 5},
            "t-refused": {"failure_threshold": 5},
            "t-refused-autoretry": {"failure_threshold": 5},
            "t-retry-inside-closed": {"failure_threshold": 5},
            "t-bare-retry-eager": {"failure_threshold": 3},
        },
        "breaker_routes": {"tests.celery.tasks.routed_*": "t-routed"},
        "breaker_probes": {
            "t-probe-setting": "tests.celery.probe_tasks:check_setting",
            "t-probe-task": "tests.celery.probe_tasks.health",
        },
    }


@pytest.fixture(scope="session")
def celery_includes() -> Sequence[str]:
    return ["tests.celery.tasks", "tests.celery.probe_tasks"]


@pytest.fixture(scope="session")
def celery_worker_parameters() -> Mapping[str, Any]:
    return {"perform_ping_check": False, "shutdown_timeout": 10}


@pytest.fixture
def app(celery_session_app: Any, celery_session_worker: Any) -> Any:
    """The session app with its worker running, current and default for the test
    (``@shared_task`` proxies resolve against the current app)."""
    celery_session_app.set_current()
    celery_session_app.set_default()
    return celery_session_app


@pytest.fixture
def restore_worker_globals() -> Iterator[None]:
    """Building a worker changes process-wide state: ``start_worker`` makes its app current
    and default, and the pool step sets "joining a result would block". Put them back."""
    current = _state.get_current_app()
    default = _state.default_app
    join_will_block = _state.task_join_will_block()
    yield
    current.set_current()
    _state.set_default_app(default)
    _state._set_task_join_will_block(join_will_block)


@pytest.fixture
def operate() -> Iterator[Callable[[CircuitBreaker], CircuitBreaker]]:
    """Register a breaker the test operates on; it is reset afterwards, so a failed
    test does not leave a forced-open breaker deferring tasks for the rest of the session."""
    touched: list[CircuitBreaker] = []

    def register(breaker: CircuitBreaker) -> CircuitBreaker:
        touched.append(breaker)
        return breaker

    yield register
    for breaker in touched:
        breaker.reset()
