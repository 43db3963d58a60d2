"""Helpers shared by the in-process Celery tests."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest

#: The policy every breaker starts from: trips on one failure, half-opens after 0.3 s.
DEFAULT_POLICY: dict[str, Any] = {
    "failure_threshold": 1,
    "reset_timeout": 0.3,
    "half_open_max_calls": 1,
    "success_threshold": 1,
}
DEFER_SPREAD = 0.1
#: Bound on every wait for an event (a deferral, a result); never an expected duration.
TIMEOUT = 10.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll for an event with a bounded deadline (the sleep only spaces the polls)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def deferral_text(result: Any) -> str:
    """The reason a deferred task shows (what Flower shows as its exception)."""
    return str(result.info)


DEFERRED = re.compile(
    r"breaker '(?P<label>[^']+)' (?P<state>\w+), deferred (?P<delay>\d+\.\d) s \(deferral (?P<count>\d+)\)"
)
