"""The once-a-minute rule for WARNINGs every deferral (or every tick) would repeat."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from celery_breaker.integration import events
from celery_breaker.integration.throttle import Throttle
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


def test_events_that_cannot_be_sent_are_reported_once_a_minute(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``events.send`` keeps to the same rule: a broker that takes no events during an
    outage of thousands of transitions and deferrals gets one WARNING a minute, which
    says how many more went unsent."""
    clock = FakeClock()
    monkeypatch.setattr(events, "_unsent", Throttle(60.0, clock.monotonic))

    class Unreachable:
        def default_dispatcher(self, **options: object) -> object:
            raise ConnectionError("broker unreachable")

    app = SimpleNamespace(events=Unreachable())
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert [events.send(app, "breaker-opened", breaker="crm") for _ in range(5)] == [False] * 5
        clock.advance(60.0)
        assert events.send(app, "breaker-closed", breaker="crm") is False
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "could not send the breaker-opened event" in messages[0]
    assert "broker unreachable" in messages[0]
    assert "could not send the breaker-closed event" in messages[1]
    assert "(4 more could not be sent in the last minute)" in messages[1]
