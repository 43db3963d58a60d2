"""Logging on "celery_breaker" (transitions at WARNING/INFO, quiet hot path) and transition listeners."""

from __future__ import annotations

import functools
import logging
from typing import Any

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, State
from celery_breaker.core import Transition
from celery_breaker.testing import FakeClock, fresh_store

from .support import down, fail, ok, state_of


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="celery_breaker")
    return caplog


def make(clock: FakeClock, **policy: Any) -> CircuitBreaker:
    return CircuitBreaker("crm", BreakerPolicy(**policy), storage=fresh_store(), clock=clock)


def at_least(logs: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in logs.records if r.levelno >= level]


def test_successes_log_nothing_at_all(clock: FakeClock, logs: pytest.LogCaptureFixture) -> None:
    breaker = make(clock)
    for _ in range(1000):
        breaker.call(ok)
    assert logs.records == []


def test_failures_below_the_threshold_log_only_at_debug(clock: FakeClock, logs: pytest.LogCaptureFixture) -> None:
    breaker = make(clock, failure_threshold=5)
    fail(breaker, 4)
    assert at_least(logs, logging.INFO) == []
    debug = [r for r in logs.records if r.levelno == logging.DEBUG]
    assert len(debug) == 4
    assert all(getattr(r, "breaker", None) == "crm" for r in debug)


def test_trip_is_logged_at_warning_with_structured_fields(clock: FakeClock, logs: pytest.LogCaptureFixture) -> None:
    breaker = make(clock, failure_threshold=2, reset_timeout=30)
    fail(breaker, 2)
    (record,) = at_least(logs, logging.INFO)
    assert record.name == "celery_breaker"
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "breaker crm closed -> open (2 failures within 60 s; 2 failures, 0 calls in window, may half-open in 30.0 s)"
    )
    fields = vars(record)
    assert fields["breaker"] == "crm"
    assert fields["breaker_key"] is None
    assert fields["breaker_state"] == "open"
    assert fields["breaker_previous_state"] == "closed"
    assert fields["breaker_generation"] == 1
    assert fields["breaker_open_until"] == clock.time() + 30


def test_half_open_and_close_are_logged_at_info(clock: FakeClock, logs: pytest.LogCaptureFixture) -> None:
    breaker = make(clock, failure_threshold=1, success_threshold=1)
    fail(breaker)
    clock.advance(30)
    logs.clear()
    breaker.call(ok)
    records = at_least(logs, logging.INFO)
    assert [(r.levelno, vars(r)["breaker_state"]) for r in records] == [
        (logging.INFO, "half_open"),
        (logging.INFO, "closed"),
    ]


def test_rejections_log_nothing_at_info_or_above(clock: FakeClock, logs: pytest.LogCaptureFixture) -> None:
    breaker = make(clock, failure_threshold=1)
    fail(breaker)
    logs.clear()
    for _ in range(100):
        with pytest.raises(CircuitOpenError):
            breaker.call(ok)
    assert at_least(logs, logging.INFO) == []


def test_operator_moves_are_logged(clock: FakeClock, logs: pytest.LogCaptureFixture) -> None:
    breaker = make(clock)
    breaker.force_open()
    breaker.disable()
    levels = [(r.levelno, vars(r)["breaker_state"]) for r in at_least(logs, logging.INFO)]
    assert levels == [(logging.WARNING, "forced_open"), (logging.INFO, "disabled")]


def test_per_key_breakers_log_their_label(clock: FakeClock, logs: pytest.LogCaptureFixture) -> None:
    breaker = CircuitBreaker("crm", {"failure_threshold": 1}, storage=fresh_store(), clock=clock, key="t7")
    fail(breaker)
    (record,) = at_least(logs, logging.INFO)
    assert record.getMessage().startswith("breaker crm[t7] closed -> open")
    assert vars(record)["breaker_key"] == "t7"


def test_keys_are_logged_as_status_shows_them_so_no_two_look_alike(
    clock: FakeClock, logs: pytest.LogCaptureFixture
) -> None:
    # The empty key, a space at an end, a newline and a backslash followed by an n: the
    # log filter escaped only the unprintable, so the last two logged the same line.
    shown = {"": 'crm[""]', "tenant-7 ": "crm[tenant-7\\x20]", "a\nb": "crm[a\\nb]", "a\\nb": "crm[a\\\\nb]"}
    store = fresh_store()
    for key, label in shown.items():
        breaker = CircuitBreaker("crm", {"failure_threshold": 1}, storage=store, clock=clock, key=key)
        breaker.add_listener(_broken)
        fail(breaker)
        trip, listener = (r for r in logs.records if r.levelno >= logging.WARNING)
        assert trip.getMessage().startswith(f"breaker {label} closed -> open")
        assert vars(trip)["breaker_key"] == key  # the structured field keeps the key as it is
        assert listener.getMessage().startswith(f"breaker {label}: transition listener")
        logs.clear()


def _broken(transition: Transition) -> None:
    raise RuntimeError("listener bug")


# -- listeners -------------------------------------------------------------------------


def test_listeners_hear_every_transition_in_order(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, success_threshold=1)
    first: list[Transition] = []
    second: list[Transition] = []
    breaker.add_listener(first.append)
    breaker.add_listener(second.append)
    fail(breaker)
    clock.advance(30)
    breaker.call(ok)
    expected = [(State.CLOSED, State.OPEN), (State.OPEN, State.HALF_OPEN), (State.HALF_OPEN, State.CLOSED)]
    assert [(t.source, t.target) for t in first] == expected
    assert first == second
    assert [t.generation for t in first] == [1, 2, 3]


def test_raising_listener_is_logged_and_does_not_break_the_call(
    clock: FakeClock, logs: pytest.LogCaptureFixture
) -> None:
    breaker = make(clock, failure_threshold=1, success_threshold=1)
    heard: list[Transition] = []

    def broken(transition: Transition) -> None:
        raise RuntimeError("listener bug")

    breaker.add_listener(broken)
    breaker.add_listener(heard.append)
    fail(breaker)  # the original ConnectionError still reaches the caller
    assert state_of(breaker) is State.OPEN
    clock.advance(30)
    assert breaker.call(ok) == "ok"  # a success result survives a raising listener
    assert state_of(breaker) is State.CLOSED
    assert len(heard) == 3  # later listeners still run
    errors = [r for r in logs.records if r.levelno == logging.ERROR]
    assert len(errors) == 3
    assert all("transition listener" in r.getMessage() and r.exc_info is not None for r in errors)


def test_a_raising_listener_is_named_never_shown_with_its_arguments(
    clock: FakeClock, logs: pytest.LogCaptureFixture
) -> None:
    # Its repr was logged: a partial's shows its arguments (a webhook URL, a token).
    def notify(url: str, transition: Transition) -> None:
        raise ConnectionError("webhook down")

    breaker = make(clock, failure_threshold=1)
    breaker.add_listener(functools.partial(notify, "https://hooks.example/services/T0/B0/s3cr3t-token"))
    fail(breaker)
    (error,) = [r.getMessage() for r in logs.records if r.levelno == logging.ERROR]
    assert error.endswith(
        "transition listener tests.unit.test_logging_and_listeners:"
        "test_a_raising_listener_is_named_never_shown_with_its_arguments.<locals>.notify raised"
    )
    assert "s3cr3t" not in logs.text


def test_the_traceback_of_a_raising_listener_is_masked(clock: FakeClock, logs: pytest.LogCaptureFixture) -> None:
    """The listener's own error and the source lines its traceback quotes show no secret:
    before, the log line was masked and its traceback printed the password twice (the
    raise's line and the exception's message). The rest of the traceback is kept."""

    def notify(transition: Transition) -> None:
        raise ConnectionError("cannot post to https://alerts:pa55w0rd@partner.example/notify?token=t0k3n-x")

    breaker = make(clock, failure_threshold=1)
    breaker.add_listener(notify)
    fail(breaker)
    (error,) = [r for r in logs.records if r.levelno == logging.ERROR]
    assert error.exc_text is not None
    assert "pa55w0rd" not in logs.text
    assert "t0k3n" not in logs.text
    assert "Traceback (most recent call last):" in error.exc_text
    assert "in notify" in error.exc_text  # (its frames and their lines are kept)
    assert "ConnectionError: cannot post to https://alerts:***@partner.example/notify?token=***" in error.exc_text
    assert error.exc_text.count("alerts:***@") == 2  # the raise's source line, and the message


def test_raising_listener_on_an_operator_move_does_not_undo_it(clock: FakeClock) -> None:
    breaker = make(clock)

    def broken(transition: Transition) -> None:
        raise RuntimeError("listener bug")

    breaker.add_listener(broken)
    breaker.force_open()
    assert state_of(breaker) is State.FORCED_OPEN


def test_listener_is_told_about_transitions_its_own_breaker_object_causes(clock: FakeClock) -> None:
    store = fresh_store()
    watcher = CircuitBreaker("crm", {"failure_threshold": 1}, storage=store, clock=clock)
    actor = CircuitBreaker("crm", {"failure_threshold": 1}, storage=store, clock=clock)
    heard: list[Transition] = []
    watcher.add_listener(heard.append)
    with pytest.raises(ConnectionError):
        actor.call(down)
    assert heard == []  # documented: listeners hear their own object's transitions
    assert watcher.state is State.OPEN
