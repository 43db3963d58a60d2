"""The once-a-minute rule for WARNINGs every deferral (or every tick) would repeat."""

from __future__ import annotations

from celery_breaker.integration.deferral.throttle import Throttle
from celery_breaker.testing import FakeClock


def test_one_warning_a_minute_per_subject_saying_how_many_were_kept_quiet() -> None:
    clock = FakeClock()
    throttle = Throttle(60.0, clock.monotonic)
    assert throttle.due("broker-delay") == 0  # the first is told at once
    assert [throttle.due("broker-delay") for _ in range(3)] == [None, None, None]
    assert throttle.due("parking") == 0  # another subject is not held back
    clock.advance(59.9)
    assert throttle.due("broker-delay") is None
    clock.advance(0.1)
    assert throttle.due("broker-delay") == 4  # a minute on: told, with the four kept quiet
    assert throttle.due("broker-delay") is None


def test_a_subject_forgotten_is_told_at_once_next_time() -> None:
    clock = FakeClock()
    throttle = Throttle(60.0, clock.monotonic)
    assert throttle.due("tag") == 0
    assert throttle.due("tag") is None
    throttle.forget("tag")  # (the problem is over)
    assert throttle.due("tag") == 0
