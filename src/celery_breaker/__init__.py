"""celery-breaker: circuit breakers for Celery tasks, with deferral instead of failure."""

from __future__ import annotations

from .breaker import CircuitBreaker
from .core import BreakerPolicy, State
from .errors import CircuitBreakerError, CircuitOpenError, ConfigurationError

__version__ = "0.1.0"

__all__ = [
    "BreakerPolicy",
    "CircuitBreaker",
    "CircuitBreakerError",
    "CircuitOpenError",
    "ConfigurationError",
    "State",
]
