"""Exception classification: recorded failures, neutral (ignored) outcomes and everything else a success."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import sys
import uuid
from typing import Any

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, ConfigurationError, State, downstream_error
from celery_breaker.core import Outcome
from celery_breaker.testing import FakeClock, fresh_store

SUCCESS, FAILURE, IGNORED = Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED


class ValidationError(Exception):
    pass


class HTTPError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def is_server_error(exc: BaseException) -> bool:
    return isinstance(exc, HTTPError) and exc.status >= 500


class CertificateExpired(ssl.SSLCertVerificationError):
    """An OSError that is also a ValueError, as every TLS verification failure is."""


class PydanticLikeValidationError(ValueError):
    pass


PydanticLikeValidationError.__name__ = "ValidationError"


class DjangoLikeValidationError(Exception):
    pass


DjangoLikeValidationError.__name__ = "ValidationError"


class FormError(DjangoLikeValidationError):
    """A subclass: its ancestry holds a ValidationError."""


class SDKError(Exception):
    """What a client library raises for a downstream failure: a plain Exception."""


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionError(),
        TimeoutError(),
        OSError(),
        CertificateExpired(),
        RuntimeError(),
        SDKError(),
        HTTPError(503),
        asyncio.TimeoutError(),
        socket.gaierror(),
    ],
)
def test_the_default_policy_records_downstream_errors(exc: Exception) -> None:
    assert BreakerPolicy().classify(exc) is FAILURE


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad amount"),
        TypeError(),
        KeyError("id"),
        IndexError(),
        AttributeError(),
        AssertionError(),
        NotImplementedError(),
        PydanticLikeValidationError(),
        DjangoLikeValidationError(),
        FormError(),
    ],
)
def test_the_default_policy_counts_the_callers_own_errors_as_the_downstream_answering(exc: Exception) -> None:
    """The seed's defect: every outcome counted as a failure, so bad input tripped the breaker."""
    policy = BreakerPolicy()
    assert policy.classify(None) is SUCCESS
    assert policy.classify(exc) is SUCCESS
    assert not downstream_error(exc)


def test_downstream_error_extends_to_the_users_own_types() -> None:
    policy = BreakerPolicy(record_exceptions=(downstream_error, KeyError))
    assert policy.classify(KeyError("missing in the downstream's answer")) is FAILURE
    assert policy.classify(ValueError()) is SUCCESS
    assert policy.classify(ConnectionError()) is FAILURE
    assert BreakerPolicy(record_exceptions=(Exception,)).classify(ValueError()) is FAILURE  # the old default


def test_narrow_record_list_makes_other_exceptions_successes() -> None:
    policy = BreakerPolicy(record_exceptions=(ConnectionError, TimeoutError))
    assert policy.classify(ConnectionRefusedError()) is FAILURE  # a subclass matches
    assert policy.classify(TimeoutError()) is FAILURE
    assert policy.classify(ValidationError()) is SUCCESS  # the downstream answered


def test_ignored_exceptions_are_neutral_and_win_over_recorded() -> None:
    policy = BreakerPolicy(record_exceptions=(Exception,), ignore_exceptions=(ValidationError,))
    assert policy.classify(ValidationError()) is IGNORED
    assert policy.classify(RuntimeError()) is FAILURE


def test_open_error_of_another_breaker_is_always_neutral() -> None:
    policy = BreakerPolicy(record_exceptions=(Exception,))
    assert policy.classify(CircuitOpenError(name="other")) is IGNORED
    assert BreakerPolicy().ignore_exceptions == ()  # applied internally, not shown as a setting
    assert BreakerPolicy(record_exceptions=(CircuitOpenError,)).classify(CircuitOpenError()) is IGNORED


def test_predicates_classify_by_content() -> None:
    policy = BreakerPolicy(record_exceptions=(is_server_error,))
    assert policy.classify(HTTPError(503)) is FAILURE
    assert policy.classify(HTTPError(404)) is SUCCESS
    assert policy.classify(ConnectionError()) is SUCCESS


def test_ignore_predicates() -> None:
    policy = BreakerPolicy(ignore_exceptions=(lambda exc: isinstance(exc, HTTPError) and exc.status == 429,))
    assert policy.classify(HTTPError(429)) is IGNORED
    assert policy.classify(HTTPError(500)) is FAILURE


@pytest.mark.parametrize(
    "path",
    # (the colon form, as breaker_probes and task_cls take a path, was refused: "cannot import")
    ["builtins.ConnectionError", "ConnectionError", "socket.timeout", "socket:timeout", "builtins:ConnectionError"],
)
def test_dotted_paths_resolve_to_exception_types(path: str) -> None:
    policy = BreakerPolicy.from_mapping({"record_exceptions": [path]})
    (resolved,) = policy.record_exceptions
    assert isinstance(resolved, type)
    assert issubclass(resolved, OSError)
    assert policy.classify(resolved()) is FAILURE
    assert policy.classify(ValueError()) is SUCCESS


def test_a_single_matcher_need_not_be_in_a_sequence() -> None:
    policy = BreakerPolicy.from_mapping({"record_exceptions": "builtins.TimeoutError", "ignore_exceptions": KeyError})
    assert policy.record_exceptions == (TimeoutError,)
    assert policy.ignore_exceptions == (KeyError,)


def test_none_means_no_ignored_exceptions() -> None:
    policy = BreakerPolicy.from_mapping({"ignore_exceptions": None})
    assert policy.ignore_exceptions == ()
    assert policy.classify(RuntimeError()) is FAILURE


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["no_such_module_xyz.Error"], "cannot import 'no_such_module_xyz.Error'"),
        (["builtins.NoSuchError"], "cannot import 'builtins.NoSuchError'"),
        (["builtins.len"], "'builtins.len' is not an exception type"),
        (["builtins:len"], "'builtins:len' is not an exception type; name an exception class"),
        (["socket:no_such_error"], "cannot import 'socket:no_such_error'"),
        (["socket.timeot"], "has no attribute 'timeot') (did you mean 'socket:timeout'?); write"),
        ([":Error"], "':Error' names no module and class; write 'package.module:ExceptionClass'"),
        (["socket:"], "'socket:' names no module and class"),
        ([int], "int is not an exception type"),
        ([42], "42 is neither an exception type"),
        (42, "must be a sequence"),
    ],
)
def test_bad_matchers_are_configuration_errors_naming_the_field(value: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match="record_exceptions") as info:
        BreakerPolicy.from_mapping({"record_exceptions": value})
    assert message in str(info.value)


def _takes_two(exc: BaseException, attempt: int) -> bool:
    return True


def _takes_none() -> bool:
    return True


class _Matcher:
    def __call__(self, exc: BaseException, *, strict: bool = False) -> bool:
        return isinstance(exc, ConnectionError)


@pytest.mark.parametrize("field", ["record_exceptions", "ignore_exceptions"])
@pytest.mark.parametrize("predicate", [_takes_two, _takes_none, lambda: True])
def test_a_predicate_that_cannot_take_the_exception_alone_is_refused(field: str, predicate: Any) -> None:
    # Every call of it raised TypeError, logged and read as no match: the breaker never
    # tripped on the failures it was meant to count, with no error at start.
    with pytest.raises(ConfigurationError, match=f"BreakerPolicy.{field}: predicate .* cannot be called") as info:
        BreakerPolicy.from_mapping({field: [predicate]})
    assert "predicate(exc) -> bool" in str(info.value)


@pytest.mark.parametrize(
    "predicate",
    [
        _Matcher(),  # a callable object, a keyword-only option
        functools.partial(_takes_two, attempt=1),
        lambda exc, *more: isinstance(exc, ConnectionError),
        callable,  # a builtin (no signature to read: called as given)
    ],
)
def test_predicates_that_take_the_exception_are_accepted(predicate: Any) -> None:
    policy = BreakerPolicy.from_mapping({"record_exceptions": [predicate]})
    assert policy.record_exceptions == (predicate,)


def test_raising_predicate_is_logged_and_treated_as_no_match(caplog: pytest.LogCaptureFixture) -> None:
    def broken(exc: BaseException) -> bool:
        raise RuntimeError("predicate bug")

    policy = BreakerPolicy(record_exceptions=(broken, ConnectionError), ignore_exceptions=(broken,))
    with caplog.at_level(logging.ERROR, logger="celery_breaker"):
        assert policy.classify(ValueError()) is SUCCESS
        assert policy.classify(ConnectionError()) is FAILURE
    records = [r for r in caplog.records if "predicate" in r.getMessage()]
    assert records
    assert all(r.name == "celery_breaker" and r.exc_info is not None for r in records)


def test_a_raising_predicate_is_named_never_shown_with_its_arguments(caplog: pytest.LogCaptureFixture) -> None:
    # Its repr was logged: a partial's shows its arguments (a URL with a password).
    def matches(url: str, exc: BaseException) -> bool:
        raise RuntimeError("predicate bug")

    policy = BreakerPolicy(record_exceptions=(functools.partial(matches, "https://ops:hunter2@api.example/"),))
    with caplog.at_level(logging.ERROR, logger="celery_breaker"):
        assert policy.classify(ConnectionError()) is SUCCESS
    (message,) = [r.getMessage() for r in caplog.records]
    assert message == (
        "celery_breaker: exception predicate tests.unit.test_classification:"
        "test_a_raising_predicate_is_named_never_shown_with_its_arguments.<locals>.matches raised; treated as no match"
    )
    assert "hunter2" not in caplog.text


def test_the_other_policy_warning_masks_what_a_predicate_holds(caplog: pytest.LogCaptureFixture) -> None:
    # The warning that a breaker exists with another policy shows both policies' reprs,
    # and a policy's repr its predicates as given: a partial's arguments, masked now.
    def matches(url: str, exc: BaseException) -> bool:
        return False

    store = fresh_store()
    CircuitBreaker("svc", BreakerPolicy(failure_threshold=1), storage=store)
    given = BreakerPolicy(record_exceptions=(functools.partial(matches, "https://ops:hunter2@api.example/"),))
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        CircuitBreaker("svc", given, storage=store)
    (message,) = [r.getMessage() for r in caplog.records if "another policy" in r.getMessage()]
    assert "https://ops:***@api.example/" in message
    assert "hunter2" not in caplog.text


def test_the_other_policy_warning_is_said_once_per_process_for_a_name_not_per_key_or_object(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A rolling deploy that changes a policy: the new code meets breakers the old code made.
    # A WARNING for each breaker object made flooded the log: one per tenant of a per-key
    # breaker, and one per run under a registry that makes them again.
    store = fresh_store()
    # (names of this test alone: what the process warned of is kept for its lifetime, and
    # every fresh_store() is memory://test, so another test's "svc" would count here)
    svc, other = f"svc-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    kept, given = BreakerPolicy(failure_threshold=5), BreakerPolicy(failure_threshold=1)
    for key in ("tenant-1", "tenant-2", "tenant-3"):
        CircuitBreaker(svc, kept, storage=store, key=key)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        for key in ("tenant-1", "tenant-2", "tenant-3", "tenant-1"):
            CircuitBreaker(svc, given, storage=store, key=key)
        warned = [r for r in caplog.records if "another policy" in r.getMessage()]
        assert len(warned) == 1
        assert "said once per process" in warned[0].getMessage()
        # Another breaker, or the same one met with yet another policy, is said again.
        CircuitBreaker(other, kept, storage=store)
        CircuitBreaker(other, given, storage=store)
        CircuitBreaker(svc, BreakerPolicy(failure_threshold=2), storage=store, key="tenant-1")
    assert len([r for r in caplog.records if "another policy" in r.getMessage()]) == 3


# -- through a breaker ------------------------------------------------------------


def make(clock: FakeClock, **policy: Any) -> CircuitBreaker:
    return CircuitBreaker("svc", BreakerPolicy(failure_threshold=1, **policy), storage=fresh_store(), clock=clock)


def test_a_validation_error_does_not_trip_a_default_breaker() -> None:
    """The seed's defect, through a breaker with the default policy."""
    breaker = make(FakeClock())

    def invalid() -> None:
        raise ValueError("amount must be positive")

    for _ in range(10):
        with pytest.raises(ValueError, match="positive"):
            breaker.call(invalid)
    snap = breaker.snapshot()
    assert snap.state is State.CLOSED
    assert (snap.successes, snap.failures) == (10, 0)

    def down() -> None:
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        breaker.call(down)
    assert breaker.state is State.OPEN  # failure_threshold=1: the one downstream error trips it


def test_validation_error_does_not_trip_a_narrow_breaker() -> None:
    """The seed's defect: every outcome counted as a failure."""
    breaker = make(FakeClock(), record_exceptions=(ConnectionError,))

    def invalid() -> None:
        raise ValidationError("bad input")

    for _ in range(10):
        with pytest.raises(ValidationError):
            breaker.call(invalid)
    snap = breaker.snapshot()
    assert snap.state is State.CLOSED
    assert (snap.successes, snap.failures) == (10, 0)


def test_ignored_exception_through_a_breaker_changes_nothing() -> None:
    breaker = make(FakeClock(), ignore_exceptions=("builtins.KeyError",))

    def missing() -> None:
        raise KeyError("k")

    for _ in range(10):
        with pytest.raises(KeyError):
            breaker.call(missing)
    assert breaker.state is State.CLOSED


def test_open_error_raised_inside_a_call_does_not_trip() -> None:
    breaker = make(FakeClock())

    def nested() -> None:
        raise CircuitOpenError(name="inner")

    with pytest.raises(CircuitOpenError):
        breaker.call(nested)
    assert breaker.state is State.CLOSED


def probe_then_raise(exc: BaseException) -> State:
    """Half-open a breaker (one probe closes it), let its probe raise ``exc``, return the state."""
    clock = FakeClock()
    breaker = make(clock, half_open_max_calls=1, success_threshold=1)

    def down() -> None:
        raise ConnectionError("down")

    def interrupted() -> None:
        raise exc

    with pytest.raises(ConnectionError):
        breaker.call(down)
    clock.advance(30)
    with pytest.raises(type(exc)):
        breaker.call(interrupted)
    return breaker.state


@pytest.mark.parametrize(
    "exc",
    [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1)],
    ids=["CancelledError", "KeyboardInterrupt", "SystemExit"],
)
def test_interrupted_probe_is_neutral_not_a_success(exc: BaseException) -> None:
    assert probe_then_raise(exc) is State.HALF_OPEN


def _green_timeout(module: str, *, subclass: bool = False) -> type[BaseException]:
    """A stand-in for gevent's or eventlet's ``Timeout`` (a BaseException), as ``module`` defines it."""
    timeout = type("Timeout", (BaseException,), {"__module__": module})
    if subclass:
        return type("TaskTimeout", (timeout,), {"__module__": "app.errors"})
    return timeout


@pytest.mark.parametrize(
    ("module", "subclass"),
    [("gevent.timeout", False), ("gevent", False), ("eventlet.timeout", False), ("gevent.timeout", True)],
)
def test_gevents_and_eventlets_timeout_is_a_failure_though_a_base_exception(module: str, subclass: bool) -> None:
    # gevent raises its Timeout into a task at the task's hard time limit: a hung downstream
    # then never opened a breaker on a gevent pool (an acceptance tester's five hung runs
    # recorded no failure). It is a timeout like any other.
    timeout = _green_timeout(module, subclass=subclass)
    assert BreakerPolicy().classify(timeout()) is FAILURE
    assert BreakerPolicy(ignore_exceptions=(timeout,)).classify(timeout()) is IGNORED  # (the user may say otherwise)
    # (as a TimeoutError counts under the policy's rules: not recorded, it is a success)
    assert BreakerPolicy(record_exceptions=(ValueError,)).classify(timeout()) is SUCCESS
    assert BreakerPolicy(record_exceptions=(TimeoutError,)).classify(timeout()) is FAILURE


def test_another_libraries_timeout_base_exception_stays_neutral() -> None:
    assert BreakerPolicy().classify(_green_timeout("trio")()) is IGNORED


def test_a_module_that_fails_as_it_is_imported_is_a_configuration_error(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "failing_errors_module.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "failing_errors_module", raising=False)
    with pytest.raises(ConfigurationError, match="record_exceptions") as info:
        BreakerPolicy.from_mapping({"record_exceptions": ["failing_errors_module.Error"]})
    assert "importing 'failing_errors_module' failed (RuntimeError: broken at import)" in str(info.value)
