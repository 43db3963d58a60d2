"""The library's randomness (jitter, deferral spread) is its own: the global ``random`` stays the application's."""

from __future__ import annotations

import os
import random

from celery_breaker import BreakerPolicy, CircuitBreaker
from celery_breaker.core.chance import CHANCE
from celery_breaker.integration.deferral.plan import plan_deferral, read_headers
from celery_breaker.testing import FakeClock, fresh_store

from .support import fail


def test_jitter_and_spread_neither_shift_nor_follow_a_seeded_global_random() -> None:
    random.seed(1234)
    expected = [random.random() for _ in range(3)]
    random.seed(1234)
    clock = FakeClock()
    breaker = CircuitBreaker(
        "svc", BreakerPolicy(failure_threshold=1, reset_jitter=0.5), storage=fresh_store(), clock=clock
    )
    fail(breaker)  # trips: the open time is drawn with jitter
    plans = [
        plan_deferral(
            label="svc", retry_after=1.0, spread=5.0, past=read_headers({}, now=0.0), now=0.0, max_deferrals=None,
            max_defer_age=None, expires_in=None, cap=None,
        ).delay
        for _ in range(20)
    ]  # fmt: skip
    assert [random.random() for _ in range(3)] == expected  # the application's sequence, untouched
    assert len(set(plans)) > 1  # (the spread is drawn)


def test_a_forked_process_draws_a_sequence_of_its_own() -> None:
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its first draw, then gone
        os.write(write, repr(CHANCE.random()).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    drawn_in_child = float(os.read(read, 64).decode())
    os.close(read)
    assert drawn_in_child != CHANCE.random()
