"""Retry-After: parsing the hint, RetryAfter, and a failure that carries one opening the breaker for that long."""

from __future__ import annotations

import asyncio
import email.message
import pickle
import urllib.error
from email.utils import formatdate
from typing import Any

import pytest

from celery_breaker import CircuitBreakerError, CircuitOpenError, RetryAfter, State, TooManyRequests
from celery_breaker.core.retry_after import REFUSAL_WAIT, asked_of, parse_retry_after, refusal_of, retry_after_of
from celery_breaker.testing import FakeClock

from .support import HeldCall, fail, make, ok, state_of

NOW = 1_700_000_000.0


class Response:
    """What requests and httpx responses look like to ``retry_after_of``."""

    def __init__(self, status_code: int, headers: dict[str, str]) -> None:
        self.status_code = status_code
        self.headers = headers


class HTTPError(Exception):
    """Shaped like ``requests.HTTPError`` / ``httpx.HTTPStatusError``: ``exc.response``."""

    def __init__(self, status_code: int, **headers: str) -> None:
        super().__init__(f"HTTP {status_code}")
        self.response = Response(status_code, {k.replace("_", "-"): v for k, v in headers.items()})


# -- parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        (b"30", 30.0),
        ("1.5", 1.5),
        (formatdate(NOW + 90, usegmt=True), 90.0),
        (formatdate(NOW + 90), 90.0),  # "-0000" zone
        ("Sun, 06 Nov 1994 08:49:37 GMT", None),  # in the past
        ("0", None),
        ("-5", None),
        ("1e999", None),
        ("soon", None),
        ("120, 120", 120.0),  # two Retry-After headers, as requests and httpx join them
        ("30,120", 120.0),  # (the longest wait asked for)
        ("0, 45, soon", 45.0),
        ("0, -1", None),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_parse_retry_after(value: Any, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_requests_like_429_carries_its_retry_after() -> None:
    assert retry_after_of(HTTPError(429, Retry_After="30"), NOW) == 30.0


def test_a_429_with_its_retry_after_sent_twice_waits_that_long() -> None:
    """requests (urllib3) and httpx join repeated headers with commas: a 429 whose
    Retry-After: 120 came twice read as unreadable, and its refusal waited 1 s."""
    error = HTTPError(429, Retry_After="120, 120")
    assert retry_after_of(error, now=NOW) == 120.0
    assert refusal_of(error, now=NOW) == 120.0


def test_httpx_like_503_with_lowercase_headers_carries_its_retry_after() -> None:
    assert retry_after_of(HTTPError(503, retry_after=formatdate(NOW + 12, usegmt=True)), NOW) == 12.0


@pytest.mark.parametrize(
    "exc",
    [
        HTTPError(500, Retry_After="30"),  # only 429 and 503 mean "unavailable for this long"
        HTTPError(301, Retry_After="30"),
        HTTPError(429),
        HTTPError(429, Retry_After="garbage"),
        ConnectionError("down"),
        RetryAfter(-1),
        RetryAfter(0),
        RetryAfter("later"),  # type: ignore[arg-type]
        RetryAfter(float("nan")),
    ],
)
def test_no_usable_hint_gives_none(exc: BaseException) -> None:
    assert retry_after_of(exc, NOW) is None


def test_a_response_that_raises_gives_none() -> None:
    class Broken:
        status_code = 429

        @property
        def headers(self) -> Any:
            raise RuntimeError("boom")

    exc = ConnectionError("x")
    exc.response = Broken()  # type: ignore[attr-defined]
    assert retry_after_of(exc, NOW) is None


# -- RetryAfter --------------------------------------------------------------------------


def test_retry_after_exception() -> None:
    err = RetryAfter(30)
    assert isinstance(err, CircuitBreakerError)
    assert (err.seconds, str(err)) == (30, "retry after 30 s")
    assert str(RetryAfter(2.5, "quota exhausted")) == "quota exhausted"
    copy = pickle.loads(pickle.dumps(RetryAfter(7, "x")))
    assert (copy.seconds, copy.message) == (7, "x")
    assert retry_after_of(RetryAfter(12.5), NOW) == 12.5


def test_retry_after_is_a_failure_whatever_record_exceptions_says(clock: FakeClock) -> None:
    breaker = make(clock, record_exceptions=(KeyError,))
    assert breaker.policy.classify(RetryAfter(1)).name == "FAILURE"
    ignoring = make(clock, ignore_exceptions=(RetryAfter,))
    assert ignoring.policy.classify(RetryAfter(1)).name == "IGNORED"


# -- the breaker -------------------------------------------------------------------------


def raise_(exc: BaseException) -> None:
    raise exc


def retry_after_of_rejection(breaker: Any) -> float:
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    assert info.value.retry_after is not None
    return float(info.value.retry_after)


def test_a_failure_with_a_retry_after_opens_at_once_for_that_long(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=5, reset_timeout=30)
    seen: list[Any] = []
    breaker.add_listener(seen.append)
    with pytest.raises(RetryAfter):
        breaker.call(raise_, RetryAfter(90))
    assert state_of(breaker) is State.OPEN
    assert seen[-1].reason == "retry-after 90 s"
    assert seen[-1].open_until == pytest.approx(clock.time() + 90)
    assert retry_after_of_rejection(breaker) == 90
    clock.advance(89)
    assert retry_after_of_rejection(breaker) == pytest.approx(1)
    clock.advance(1)
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.HALF_OPEN


def test_an_http_429_opens_the_breaker_and_a_500_counts_as_one_failure(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=2)
    with pytest.raises(HTTPError):
        breaker.call(raise_, HTTPError(500, Retry_After="60"))
    assert state_of(breaker) is State.CLOSED
    with pytest.raises(HTTPError):
        breaker.call(raise_, HTTPError(429, Retry_After=formatdate(clock.time() + 45, usegmt=True)))
    assert state_of(breaker) is State.OPEN
    assert retry_after_of_rejection(breaker) == pytest.approx(45, abs=1)  # an HTTP-date has whole seconds


def test_a_huge_retry_after_is_capped_by_max_reset_timeout(clock: FakeClock) -> None:
    breaker = make(clock, reset_timeout=30, max_reset_timeout=120)
    seen: list[Any] = []
    breaker.add_listener(seen.append)
    with pytest.raises(RetryAfter):
        breaker.call(raise_, RetryAfter(86400))
    assert retry_after_of_rejection(breaker) == 120
    assert seen[-1].reason == "retry-after 86400 s (capped at 120 s)"


def test_a_probe_failing_with_a_retry_after_reopens_for_that_long(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, reset_timeout=30, half_open_max_calls=1)
    seen: list[Any] = []
    breaker.add_listener(seen.append)
    fail(breaker)
    clock.advance(30)
    with pytest.raises(RetryAfter):
        breaker.call(raise_, RetryAfter(5))  # shorter than the backed-off 60 s: the server knows
    assert seen[-1].reason == "probe failed, retry-after 5 s"
    assert retry_after_of_rejection(breaker) == 5
    snap = breaker.snapshot()
    assert (snap.streak, snap.open_duration) == (2, 5.0)
    clock.advance(5)
    fail(breaker)  # the next probe fails without a hint: the streak goes on
    assert retry_after_of_rejection(breaker) == 120


def test_a_retry_after_from_an_earlier_generation_moves_nothing(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, reset_timeout=30, half_open_max_calls=1, success_threshold=1)
    late = HeldCall(breaker)
    fail(breaker)
    clock.advance(30)
    breaker.call(ok)
    assert state_of(breaker) is State.CLOSED
    late.fail(RetryAfter(600))
    assert state_of(breaker) is State.CLOSED


def test_an_ignored_retry_after_is_neutral(clock: FakeClock) -> None:
    breaker = make(clock, ignore_exceptions=(RetryAfter,))
    with pytest.raises(RetryAfter):
        breaker.call(raise_, RetryAfter(60))
    assert state_of(breaker) is State.CLOSED


def test_a_disabled_breaker_ignores_retry_after(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.disable()
    with pytest.raises(RetryAfter):
        breaker.call(raise_, RetryAfter(60))
    assert state_of(breaker) is State.DISABLED


def test_async_calls_carry_the_hint_too(clock: FakeClock) -> None:
    breaker = make(clock)

    async def throttled() -> None:
        raise RetryAfter(15)

    with pytest.raises(RetryAfter):
        asyncio.run(breaker.acall(throttled))
    assert retry_after_of_rejection(breaker) == 15


def test_with_block_carries_the_hint(clock: FakeClock) -> None:
    breaker = make(clock)
    with pytest.raises(HTTPError), breaker:
        raise HTTPError(503, Retry_After="20")
    assert retry_after_of_rejection(breaker) == 20


def test_urllib_http_errors_carry_their_retry_after() -> None:
    import email.message
    import io
    import urllib.error

    headers = email.message.Message()
    headers["Retry-After"] = "7"
    error = urllib.error.HTTPError("http://api.test/x", 429, "Too Many Requests", headers, io.BytesIO(b""))
    assert retry_after_of(error, now=0.0) == 7.0
    plain = urllib.error.HTTPError("http://api.test/x", 500, "Oops", headers, io.BytesIO(b""))
    assert retry_after_of(plain, now=0.0) is None  # only 429 and 503 speak for the downstream


# -- refusals: what a released task's 429 is ------------------------------------------


def urllib_error(code: int, **headers: str) -> urllib.error.HTTPError:
    message = email.message.Message()
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    return urllib.error.HTTPError("http://partner.test/", code, "refused", message, None)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (HTTPError(429, Retry_After="30"), 30.0),
        (HTTPError(429), REFUSAL_WAIT),  # no Retry-After: refused all the same
        (HTTPError(429, Retry_After="garbage"), REFUSAL_WAIT),
        (urllib_error(429, Retry_After="2"), 2.0),
        (urllib_error(429), REFUSAL_WAIT),
        (TooManyRequests(4), 4.0),
        (TooManyRequests(0), REFUSAL_WAIT),
        (HTTPError(503, Retry_After="30"), None),  # unavailable, not busy
        (urllib_error(503, Retry_After="30"), None),
        (RetryAfter(30), None),
        (HTTPError(500), None),
        (ConnectionError("down"), None),
    ],
)
def test_refusal_of_tells_a_429_from_an_outage(exc: BaseException, expected: float | None) -> None:
    assert refusal_of(exc, NOW) == expected
    # (a recorded failure reads both at once: its Retry-After parsed once)
    assert asked_of(exc, NOW) == (retry_after_of(exc, NOW), expected)


def test_too_many_requests_is_a_retry_after_and_survives_pickling() -> None:
    exc = pickle.loads(pickle.dumps(TooManyRequests(3, "partner quota")))
    assert isinstance(exc, RetryAfter)
    assert (exc.seconds, str(exc)) == (3, "partner quota")
    assert retry_after_of(exc, NOW) == 3.0  # outside a release it opens the breaker as a RetryAfter


def test_a_refusal_check_that_raises_gives_none() -> None:
    class Broken:
        @property
        def status_code(self) -> Any:
            raise RuntimeError("boom")

    exc = ConnectionError("x")
    exc.response = Broken()  # type: ignore[attr-defined]
    assert refusal_of(exc, NOW) is None
