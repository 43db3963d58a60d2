"""celery-breaker: circuit breakers for Celery tasks that defer work, not fail it, while a downstream is down.

The public names are imported on first use (PEP 562): every ``celery`` command imports
this package through the ``celery breaker`` entry point, and should not pay for the
breaker, the task class and the worker wiring unless it uses them.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from .integration import plugin as _plugin  # noqa: F401  (connects the worker_init hook: see integration/plugin.py)
from .labels import PrintableLog as _PrintableLog

# (a key from a task's arguments may hold a newline or an escape: no raw one in a log line)
logging.getLogger("celery_breaker").addFilter(_PrintableLog())

if TYPE_CHECKING:
    from .breaker import CircuitBreaker
    from .core import BreakerPolicy, State, downstream_error
    from .errors import CircuitBreakerError, CircuitOpenError, ConfigurationError, RetryAfter, TooManyRequests
    from .health import HealthCheck
    from .integration.install import install
    from .integration.task import BreakerTask

__version__ = "0.1.0"

__all__ = [
    "BreakerPolicy",
    "BreakerTask",
    "CircuitBreaker",
    "CircuitBreakerError",
    "CircuitOpenError",
    "ConfigurationError",
    "HealthCheck",
    "RetryAfter",
    "State",
    "TooManyRequests",
    "downstream_error",
    "install",
]

_HOMES = {
    "BreakerPolicy": ".core",
    "BreakerTask": ".integration.task",
    "CircuitBreaker": ".breaker",
    "CircuitBreakerError": ".errors",
    "CircuitOpenError": ".errors",
    "ConfigurationError": ".errors",
    "HealthCheck": ".health",
    "RetryAfter": ".errors",
    "State": ".core",
    "TooManyRequests": ".errors",
    "downstream_error": ".core",
    "install": ".integration.install",
}


if not TYPE_CHECKING:  # (a module __getattr__ a type checker sees makes any name pass, as Any)

    def __getattr__(name: str) -> Any:
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module 'celery_breaker' has no attribute {name!r}")
        value = getattr(importlib.import_module(home, __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
