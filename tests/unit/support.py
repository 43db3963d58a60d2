"""Small helpers the unit tests share: a breaker on a private store, calls that pass or fail."""

from __future__ import annotations

import contextvars
from typing import Any

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, State
from celery_breaker.core.pacing import PacingLaw
from celery_breaker.testing import FakeClock, fresh_store


def make(clock: FakeClock, *, name: str = "svc", **policy: Any) -> CircuitBreaker:
    """A breaker named ``name`` on a store of its own, reading ``clock``."""
    return CircuitBreaker(name, BreakerPolicy(**policy), storage=fresh_store(), clock=clock)


def down() -> None:
    raise ConnectionError("down")


def ok() -> str:
    return "ok"


def state_of(breaker: CircuitBreaker) -> State:
    """The state read afresh: a call, so type checkers do not narrow it across calls."""
    return breaker.state


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionError):
            breaker.call(down)


class HeldCall:
    """A call admitted now and finished later, in its own context as a thread or task would be."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._context = contextvars.copy_context()
        self._context.run(breaker.__enter__)

    def succeed(self) -> None:
        self._context.run(self._breaker.__exit__, None, None, None)

    def fail(self, exc: BaseException | None = None) -> None:
        err = exc if exc is not None else ConnectionError("late")
        self._context.run(self._breaker.__exit__, type(err), err, None)


#: The adaptive release's law with round numbers (the defaults are tuned by
#: bench/recovery.py): 5/s at first, judged every second, doubling, cut to 70 %, a tenth
#: more per second above the threshold. The unit tests of the law and the Python-vs-Lua
#: contract against Redis (tests/storage/test_pacing.py) share it.
ROUND_LAW = PacingLaw(
    start=5.0,
    judge_every=1.0,
    slow_start=2.0,
    step=0.1,
    back_off=0.7,
    bad_share=0.05,
    floor=1.0,
    least_bad=1,
    in_flight_s=1000.0,
)
