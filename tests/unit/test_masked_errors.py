"""Errors of brokers and stores, quoted in a log line or raised on into Celery's: never their passwords."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from kombu.exceptions import OperationalError

from celery_breaker.integration import events
from celery_breaker.integration.throttle import Throttle
from celery_breaker.storage.masking import masked_error
from celery_breaker.testing import FakeClock

#: What redis-py's or kombu's error may say: the URL it connects to, the password in it.
LEAKY = "Error connecting to redis://:hunter2@broker.example:6379/0"


def test_an_event_that_cannot_be_sent_is_logged_without_the_password(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(events, "_unsent", Throttle(60.0, FakeClock().monotonic))

    class Unreachable:
        def default_dispatcher(self, **options: object) -> object:
            raise OperationalError(LEAKY)

    with caplog.at_level(logging.DEBUG):
        assert events.send(SimpleNamespace(events=Unreachable()), "breaker-opened", breaker="crm") is False
    assert "could not send the breaker-opened event (OperationalError('Error connecting to redis://:***@" in caplog.text
    assert "hunter2" not in caplog.text


def test_an_error_raised_on_is_masked_with_the_errors_it_came_from() -> None:
    # (Celery's log of a failed task prints the error and its whole chain)
    try:
        try:
            raise ConnectionError(LEAKY)
        except ConnectionError as inner:
            raise OperationalError(f"publish failed: {inner}", 7) from inner
    except OperationalError as caught:
        error = caught
    assert masked_error(error) is error
    assert error.args == ("publish failed: Error connecting to redis://:***@broker.example:6379/0", 7)
    assert error.__cause__ is not None
    assert str(error.__cause__) == "Error connecting to redis://:***@broker.example:6379/0"


def test_an_error_without_a_secret_is_left_as_it_is() -> None:
    error = OperationalError("[Errno 111] Connection refused", 111)
    masked_error(error)
    assert error.args == ("[Errno 111] Connection refused", 111)
