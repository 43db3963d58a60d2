"""celery-breaker: circuit breakers for Celery tasks that defer work, not fail it, while a downstream is down."""

from __future__ import annotations

from .breaker import CircuitBreaker
from .core import BreakerPolicy, State
from .errors import CircuitBreakerError, CircuitOpenError, ConfigurationError, RetryAfter
from .signals import install
from .task import BreakerTask

__version__ = "0.1.0"

__all__ = [
    "BreakerPolicy",
    "BreakerTask",
    "CircuitBreaker",
    "CircuitBreakerError",
    "CircuitOpenError",
    "ConfigurationError",
    "RetryAfter",
    "State",
    "install",
]
