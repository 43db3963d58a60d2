"""Health checks on a memory store with a fake clock: the ``HealthCheck`` runner, the breaker's use of it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import logging
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import pytest

import celery_breaker.breaker as breaker_module
import celery_breaker.breaker.checks as checks_module
import celery_breaker.health as health_module
from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, ConfigurationError, State
from celery_breaker.core import BreakerMachine, Outcome, Probe, Transition
from celery_breaker.health import (
    DEFAULT_PROBE_TIMEOUT,
    CheckAbandoned,
    CheckResult,
    HealthCheck,
    ProbeTimeout,
    abandon_checks_on,
    abandon_pending_checks,
    await_pending_checks,
    shown_probe,
)
from celery_breaker.testing import FakeClock, fresh_store

from .support import HeldCall, fail, state_of


def down() -> None:
    raise ConnectionError("refused")


# -- the runner ------------------------------------------------------------------


def test_returning_normally_is_healthy_and_false_or_raising_is_not() -> None:
    assert HealthCheck(lambda: None).run() == CheckResult(True)
    assert HealthCheck(lambda: {"status": "ok"}).run().healthy
    assert HealthCheck(lambda: 0).run().healthy  # only False itself says unhealthy
    assert HealthCheck(lambda: False).run() == CheckResult(False)
    assert HealthCheck(lambda: False).run().detail == "returned False"
    failed = HealthCheck(down).run()
    assert not failed.healthy
    assert isinstance(failed.error, ConnectionError)
    assert failed.detail == "ConnectionError: refused"


class Response:
    """Shaped as an HTTP client's response: requests' and httpx's ``status_code``, or
    aiohttp's and urllib's ``status`` beside its ``headers``."""

    def __init__(self, status_code: int | None = None, *, status: int | None = None) -> None:
        if status_code is not None:
            self.status_code = status_code
        if status is not None:
            self.status = status
            self.headers: dict[str, str] = {}

    def __bool__(self) -> bool:  # (as requests' Response: False for an error status)
        return getattr(self, "status_code", 200) < 400


def test_a_check_returning_an_http_error_response_is_unhealthy() -> None:
    # `def check(): return requests.get(url, timeout=2)` without raise_for_status(): a 503
    # was "anything else than False", healthy, and the breaker closed on a downstream that
    # answered every call with 503 (decision 109).
    unhealthy = HealthCheck(lambda: Response(503)).run()
    assert not unhealthy.healthy
    assert unhealthy.detail == "UnhealthyResponse: the check returned an HTTP 503 response"
    assert not HealthCheck(lambda: Response(status=500)).run().healthy
    assert HealthCheck(lambda: Response(200)).run().healthy
    assert HealthCheck(lambda: Response(204)).run().healthy
    assert HealthCheck(lambda: Response(status=302)).run().healthy

    async def check() -> Response:
        return Response(502)

    assert not asyncio.run(HealthCheck(check).arun()).healthy


@pytest.mark.parametrize(
    ("message", "secret", "kept"),
    [
        ("cannot reach https://monitor:s3cr3t-pw@partner.example/health", "s3cr3t-pw", "partner.example/health"),
        ("Error connecting to redis://:s3cr3t-pw@cache:6379/0.", "s3cr3t-pw", "cache:6379/0"),
        ("('amqp://guest:s3cr3t-pw@mq:5672//', 'refused')", "s3cr3t-pw", "mq:5672//"),
        ("https://s3cr3t-token@api.example/v1 answered 401", "s3cr3t-token", "api.example/v1 answered 401"),
        ("GET /status?api_key=s3cr3t-key&region=eu: 503", "s3cr3t-key", "region=eu: 503"),
        ("login refused (password=s3cr3t-pw)", "s3cr3t-pw", "login refused"),
        # (quoted, as a repr or a keyword shows it; a dict's or JSON's key; a name ending
        # in token or secret; a header: each shown as it was before)
        ("connect(host='db', password='s3cr3t pw') failed", "s3cr3t", "connect(host='db', password='***') failed"),
        ("{'user': 'monitor', 'password': 's3cr3t-pw'}", "s3cr3t-pw", "{'user': 'monitor', 'password': '***'}"),
        ('token endpoint: {"client_secret": "s3cr3t-key", "x": 1}', "s3cr3t-key", '{"client_secret": "***", "x": 1}'),
        ("GET /v1?access_token=s3cr3t-token&page=2: 401", "s3cr3t-token", "access_token=***&page=2: 401"),
        ("Authorization: Bearer s3cr3t-token rejected", "s3cr3t-token", "Authorization: *** rejected"),
        ("sent Bearer eyJhbGciOi.s3cr3t-token, 401", "s3cr3t-token", "sent Bearer ***, 401"),
    ],
)
def test_a_checks_error_quoting_a_secret_is_logged_masked(
    message: str, secret: str, kept: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The check's error is the user's: the WARNING that quotes it (the check that reopened
    # the breaker) showed a URL's password, or a token, as the check's error had it.
    def check() -> None:
        raise ConnectionError(message)

    result = HealthCheck(check).run()
    assert secret not in result.detail
    assert kept in result.detail
    assert result.detail.startswith("ConnectionError: ")
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=10, backoff_multiplier=1, success_threshold=1)
    breaker = CircuitBreaker("svc", policy, storage=fresh_store(), clock=clock, probe=check)
    caplog.set_level(logging.DEBUG, logger="celery_breaker")
    fail(breaker)
    clock.advance(10)
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: "real")
    logged = [record.getMessage() for record in caplog.records if " failed (ConnectionError: " in record.getMessage()]
    assert len(logged) == 1
    assert kept in logged[0]
    assert secret not in caplog.text


def test_a_failure_quoting_a_secret_is_logged_masked(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    # Every failure a breaker records is logged at DEBUG with the downstream's error: the
    # user's, which may quote the URL it failed to reach, password and all.
    breaker = CircuitBreaker("svc", BreakerPolicy(failure_threshold=5), storage=fresh_store(), clock=clock)
    caplog.set_level(logging.DEBUG, logger="celery_breaker")
    with pytest.raises(ConnectionError):
        breaker.call(_raise, "POST https://shop:s3cr3t-pw@payments.example/charge refused")
    assert "recorded failure ConnectionError('POST https://shop:***@payments.example/charge refused')" in caplog.text
    assert "s3cr3t-pw" not in caplog.text


def test_a_long_failure_cut_before_a_urls_at_is_logged_masked(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Only the first 2,000 characters of a failure's repr are masked and logged: a URL the
    # cut ended before its "@" read as no user info, and its password was logged.
    breaker = CircuitBreaker("svc", BreakerPolicy(failure_threshold=5), storage=fresh_store(), clock=clock)
    caplog.set_level(logging.DEBUG, logger="celery_breaker")
    message = "x" * 1960 + " https://shop:s3cr3t-pw@payments.example/charge refused"
    assert len(repr(ConnectionError(message))[:2000].rpartition("@")[0]) < 1980  # (the cut is before its "@")
    with pytest.raises(ConnectionError):
        breaker.call(_raise, message)
    assert "recorded failure ConnectionError('xxx" in caplog.text
    assert "s3cr3t-pw" not in caplog.text


@pytest.mark.parametrize(
    "message",
    [
        "GET https://partner.example/health?region=eu: 503 from user@host (token expired)",
        "invalid token: expired; max_tokens=100, password_length=8 (bearer of bad news)",
    ],
)
def test_a_checks_error_with_no_secret_is_logged_as_it_is(message: str) -> None:
    assert HealthCheck(functools.partial(_raise, message)).run().detail == f"ConnectionError: {message}"


def _raise(message: str) -> None:
    raise ConnectionError(message)


def test_an_async_check_runs_on_its_own_loop() -> None:
    async def check() -> bool:
        await asyncio.sleep(0)
        return False

    assert HealthCheck(check).run() == CheckResult(False)


def test_a_check_that_hangs_is_left_behind_as_a_timeout() -> None:
    release = threading.Event()
    try:
        result = HealthCheck(release.wait, timeout=0.02, name="hangs").run()
    finally:
        release.set()
    assert not result.healthy
    assert isinstance(result.error, ProbeTimeout)
    assert "health check hangs did not answer within 0.02 s" in result.detail


def test_an_async_check_that_hangs_is_cancelled_as_a_timeout() -> None:
    async def check() -> None:
        await asyncio.Event().wait()

    result = HealthCheck(check, timeout=0.02).run()
    assert isinstance(result.error, ProbeTimeout)


async def timed_out() -> None:
    raise TimeoutError("connect to crm timed out")  # its client's own timeout: a verdict


def test_a_timeout_error_an_async_check_raises_is_its_verdict_not_our_time_limit(clock: FakeClock) -> None:
    # asyncio.wait_for made it "ProbeTimeout: did not answer within 10 s", and a task's
    # admission (check_within) under the check's timeout took it for its own budget cut
    # short: no verdict, the breaker left half-open for the next task to check again.
    for result in (HealthCheck(timed_out).run(), asyncio.run(HealthCheck(timed_out).arun())):
        assert type(result.error) is TimeoutError
        assert result.detail == "TimeoutError: connect to crm timed out"
    breaker = breaker_with(timed_out, clock)
    fail(breaker)
    clock.advance(10)
    with pytest.raises(CircuitOpenError):
        breaker.enter_run(lambda exc: exc, check_within=2.0)
    assert state_of(breaker) is State.OPEN  # the failed check reopened it


def test_an_async_check_is_not_waited_for_past_its_timeout_nor_healthy_after_it() -> None:
    # asyncio.wait_for waited for the cancelled check to end (a cleanup that hangs held
    # the caller, and its probe slot, for as long) and took what it then returned.
    async def main() -> None:
        release = asyncio.Event()

        async def check() -> bool:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await release.wait()  # (say, closing a connection the downstream never answers)
            return True

        caller = asyncio.ensure_future(HealthCheck(check, timeout=0.02).arun())
        done, _ = await asyncio.wait((caller,), timeout=5)
        release.set()
        result = await caller
        assert caller in done
        assert not result.healthy
        assert isinstance(result.error, ProbeTimeout)

    asyncio.run(main())

    async def answers_late() -> bool:
        with contextlib.suppress(asyncio.CancelledError):  # (it ignores its cancellation)
            await asyncio.Event().wait()
        return True

    assert isinstance(HealthCheck(answers_late, timeout=0.02).run().error, ProbeTimeout)


def test_a_sync_check_of_an_async_caller_does_not_wait_for_the_loops_executor() -> None:
    # It ran through asyncio.to_thread: queued behind whatever held the loop's default
    # executor (getaddrinfo during a DNS outage), it answered long past its timeout.
    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=1))
        release = threading.Event()
        busy = loop.run_in_executor(None, release.wait, 10)  # the executor's one thread, held
        caller = asyncio.ensure_future(HealthCheck(lambda: None, timeout=1).arun())
        done, _ = await asyncio.wait((caller,), timeout=2)
        release.set()
        await busy
        assert caller in done
        assert caller.result() == CheckResult(True)

    asyncio.run(main())


def test_a_shorter_limit_wins_over_the_checks_own_timeout() -> None:
    release = threading.Event()
    try:
        result = HealthCheck(release.wait, timeout=60).run(0.02)
    finally:
        release.set()
    assert isinstance(result.error, ProbeTimeout)


def test_even_a_base_exception_is_only_an_unhealthy_verdict() -> None:
    def check() -> None:
        raise KeyboardInterrupt

    assert not HealthCheck(check).run().healthy


@pytest.mark.parametrize(
    "timeout", [0, -1, float("inf"), float("nan"), "5", True, 1e-300, 0.009, pytest.param(10**400, id="10**400")]
)
def test_a_bad_timeout_names_probe_timeout(timeout: Any) -> None:
    # (1e-300 was accepted: every check then failed, and no breaker closed; 10**400, an
    # int no float holds, raised a bare OverflowError)
    with pytest.raises(ConfigurationError, match=r"probe_timeout must be a number of seconds of at least 0\.01"):
        HealthCheck(lambda: None, timeout)


@pytest.mark.parametrize("wait", [0.001, 0.0124])
def test_a_half_open_wait_that_leaves_a_check_no_time_is_refused(wait: float) -> None:
    with pytest.raises(
        ConfigurationError, match=r"breaker 'svc': half_open_max_wait=.* raise half_open_max_wait to 0\.0125 s"
    ):
        CircuitBreaker("svc", {"half_open_max_wait": wait}, probe=lambda: True, storage=fresh_store())
    CircuitBreaker("svc", {"half_open_max_wait": 0.0125}, probe=lambda: True, storage=fresh_store())  # (the least)
    CircuitBreaker("svc", {"half_open_max_wait": wait}, storage=fresh_store())  # (no check: nothing to fit)


def test_a_probe_that_is_not_callable_says_where_strings_belong() -> None:
    with pytest.raises(ConfigurationError, match=r"probe must be a callable.*breaker_probes"):
        CircuitBreaker("svc", probe="myapp.health:check", storage=fresh_store())  # type: ignore[arg-type]


async def checks_nothing() -> Any:
    if DOWN:
        raise ConnectionError("down")
    yield  # (a yield left in it: an async generator function, whose call runs none of its body)


DOWN = True


def test_a_generator_function_is_refused_as_a_probe_it_would_pass_every_check(clock: FakeClock) -> None:
    # Its call returned a generator, "anything else" than False: healthy, with nothing run.
    # The breaker closed on it, and the real calls went to a downstream that was down.
    with pytest.raises(ConfigurationError, match=r"probe .*:checks_nothing is a generator function"):
        breaker_with(checks_nothing, clock)
    result = HealthCheck(lambda: checks_nothing()).run()  # noqa: PLW0108 (returned by a plain callable)
    assert not result.healthy
    assert isinstance(result.error, TypeError)
    assert "whose body does not run: nothing was checked" in result.detail


class PartnerHealth:
    """A check written as a class, its check in ``__call__``: an instance is the check."""

    def __call__(self) -> None:
        if DOWN:
            raise ConnectionError("down")


def test_a_class_is_refused_as_a_probe_its_instance_would_pass_every_check(clock: FakeClock) -> None:
    # Named by its path ('myapp.health:PartnerHealth'), the class was accepted: each check
    # made an instance, "anything else" than False, healthy with its __call__ never run,
    # and the breaker closed on a downstream that was down.
    with pytest.raises(ConfigurationError, match=r"probe .*:PartnerHealth is a class.*PartnerHealth\(\)"):
        breaker_with(PartnerHealth, clock)
    assert not HealthCheck(PartnerHealth()).run().healthy  # (an instance is the check)


def test_coerce_wraps_a_callable_and_keeps_a_health_check() -> None:
    check = HealthCheck(lambda: None, 2.0, "mine")
    assert HealthCheck.coerce(check, None) is check
    assert HealthCheck.coerce(check, 3.0) == HealthCheck(check.fn, 3.0, "mine")
    assert HealthCheck.coerce(None, 3.0) is None
    wrapped = HealthCheck.coerce(down, None)
    assert wrapped is not None
    assert wrapped.timeout == DEFAULT_PROBE_TIMEOUT
    assert wrapped.name == f"{__name__}:down"


# -- the breaker -------------------------------------------------------------------


def breaker_with(probe: Any, clock: FakeClock, **policy: Any) -> CircuitBreaker:
    fields: dict[str, Any] = {"failure_threshold": 1, "reset_timeout": 10, **policy}
    return CircuitBreaker("svc", BreakerPolicy(**fields), storage=fresh_store(), clock=clock, probe=probe)


def test_a_task_run_that_wins_the_probe_slot_runs_the_check_and_is_rejected(clock: FakeClock) -> None:
    breaker = breaker_with(down, clock)
    fail(breaker)
    clock.advance(10)
    with pytest.raises(CircuitOpenError) as info:
        breaker.begin_run(lambda exc: exc)
    assert info.value.state is State.OPEN
    snap = breaker.snapshot()
    assert (snap.state, snap.trips, snap.rejections) == (State.OPEN, 2, 1)


def test_a_task_run_admitted_after_the_check_closed_the_breaker(clock: FakeClock) -> None:
    breaker = breaker_with(lambda: None, clock, success_threshold=1)
    fail(breaker)
    clock.advance(10)
    with breaker.begin_run(lambda exc: exc) as run:
        pass
    run.settle(None)
    assert state_of(breaker) is State.CLOSED
    assert breaker.snapshot().successes == 2  # the check, and the run


def test_a_check_slower_than_half_open_max_wait_is_cut_at_it(clock: FakeClock) -> None:
    release = threading.Event()
    breaker = breaker_with(release.wait, clock, half_open_max_wait=0.02)
    assert breaker.probe is not None
    assert breaker.probe.timeout == DEFAULT_PROBE_TIMEOUT
    fail(breaker)
    clock.advance(10)
    try:
        with pytest.raises(CircuitOpenError):
            breaker.call(lambda: "real")
    finally:
        release.set()
    assert state_of(breaker) is State.OPEN


def test_no_check_starts_beside_one_given_up_on_that_still_runs(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # A check with no timeout of its own, against a downstream that never answers, was left
    # behind each half-open period, and the next started beside it: an acceptance tester's
    # 100 per-key breakers had 904 checks hanging on the downstream at once, and the
    # worker 1,001 threads. The next check now fails at once, calling nothing, until the
    # one left behind returns.
    release = threading.Event()
    calls: list[int] = []

    def hangs() -> None:
        calls.append(1)
        release.wait()

    breaker = breaker_with(HealthCheck(hangs, timeout=0.02, name="hangs"), clock, backoff_multiplier=1)
    fail(breaker)
    caplog.set_level(logging.WARNING, logger="celery_breaker")
    try:
        for _ in range(3):
            clock.advance(10)
            with pytest.raises(CircuitOpenError):
                breaker.call(lambda: "real")
            assert state_of(breaker) is State.OPEN
        assert len(calls) == 1  # the first check only: the others were not started beside it
        assert "is still running, so no other is started beside it" in caplog.text
    finally:
        release.set()
    for thread in threading.enumerate():
        if thread.name == "celery-breaker probe hangs":
            thread.join(10)
    clock.advance(10)
    assert breaker.call(lambda: "real") == "real"  # returned: the next half-open period checks again
    assert len(calls) > 1
    assert state_of(breaker) is State.CLOSED


def test_a_check_not_started_beside_a_hung_one_fails_for_callers_that_wait_a_moment(clock: FakeClock) -> None:
    # The worker's releaser waits 0.25 s for a check, a task's admission 1 s: less than the
    # check's own timeout. The check refused because the one given up on still runs was
    # taken for one cut short by that wait, and gave no verdict: the breaker stayed
    # HALF_OPEN through the outage, and every releaser took and freed its slot each tick
    # (20 per-key breakers, 2 workers: 500 scripts a second against 80 while OPEN).
    release = threading.Event()
    calls: list[int] = []

    def hangs() -> None:
        calls.append(1)
        release.wait()

    breaker = breaker_with(HealthCheck(hangs, timeout=0.1, name="hangs"), clock, backoff_multiplier=1)
    fail(breaker)
    try:
        clock.advance(10)
        with pytest.raises(CircuitOpenError):
            breaker.call(lambda: "real")  # the first check, given up on at its timeout
        trips = breaker.snapshot().trips
        clock.advance(10)
        assert breaker.check_health(wait=0.05).state is State.OPEN  # (the releaser's wait: shorter)
        clock.advance(10)
        with pytest.raises(CircuitOpenError):
            breaker.enter_run(lambda exc: exc, check_within=0.05)  # (a task's admission)
        snap = breaker.snapshot()
        assert (snap.state, snap.trips, snap.probes_in_flight) == (State.OPEN, trips + 2, 0)
        assert len(calls) == 1  # none started beside it
    finally:
        release.set()


def test_a_check_that_never_returns_keeps_others_off_for_a_while_only(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (one that never returns, a read with no timeout on a dead connection, kept its breaker
    # from ever closing in this process: HUNG_ALONE_FOR bounds it; here 0, so at once)
    import celery_breaker.health as health_module

    release = threading.Event()
    calls: list[int] = []

    def first_hangs() -> None:
        calls.append(1)
        if len(calls) == 1:
            release.wait()

    breaker = breaker_with(HealthCheck(first_hangs, timeout=0.02, name="first-hangs"), clock, backoff_multiplier=1)
    fail(breaker)
    try:
        clock.advance(10)
        with pytest.raises(CircuitOpenError):
            breaker.call(lambda: "real")
        monkeypatch.setattr(health_module, "HUNG_ALONE_FOR", 0.0)
        clock.advance(10)
        assert breaker.call(lambda: "real") == "real"  # a check started beside it, and closed it
    finally:
        release.set()
    assert len(calls) > 1
    assert state_of(breaker) is State.CLOSED


def test_checks_of_other_breakers_start_beside_one_left_behind(clock: FakeClock) -> None:
    release = threading.Event()
    calls: list[str | None] = []

    def hangs(key: str | None) -> None:
        calls.append(key)
        release.wait()

    check = HealthCheck(hangs, timeout=0.02, name="per-key")
    store = fresh_store()
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=10)
    tenants = [CircuitBreaker("svc", policy, storage=store, clock=clock, probe=check, key=k) for k in ("a", "b")]
    try:
        for breaker in tenants:
            fail(breaker)
        clock.advance(10)
        for breaker in tenants:
            with pytest.raises(CircuitOpenError):
                breaker.call(lambda: "real")
    finally:
        release.set()
    assert sorted(c or "" for c in calls) == ["a", "b"]  # one per breaker, not one in all


def healthy_noting_limits(limits: list[float | None]) -> HealthCheck:
    """A healthy check that notes the time limit each run of it is given."""

    class Noting(HealthCheck):
        def run(self, timeout: float | None = None) -> CheckResult:
            limits.append(timeout)
            return CheckResult(True)

    return Noting(lambda: None)


def test_a_health_check_subclass_given_a_probe_timeout_stays_itself(clock: FakeClock) -> None:
    # probe_timeout made a plain HealthCheck of it: its own run() was never called.
    limits: list[float | None] = []
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=10, success_threshold=1)
    probe = healthy_noting_limits(limits)
    breaker = CircuitBreaker("svc", policy, storage=fresh_store(), clock=clock, probe=probe, probe_timeout=5)
    assert breaker.probe is not None
    assert (type(breaker.probe), breaker.probe.timeout) == (type(probe), 5.0)
    fail(breaker)
    clock.advance(10)
    assert breaker.call(lambda: "real") == "real"
    assert limits == [55.0]  # its run() ran the check (within its lease of 60 s, less 5 s to record it)


def test_checks_are_bounded_and_counted_by_the_policy_the_breaker_keeps(clock: FakeClock) -> None:
    # The breaker keeps its first policy; a caller made with another one ran the checks
    # under its own half_open_max_wait (a check outliving its lease ran beside the next
    # one) and its own success_threshold (it stopped one check short of closing).
    store = fresh_store()
    kept = BreakerPolicy(
        failure_threshold=1, reset_timeout=10, half_open_max_calls=2, success_threshold=2, half_open_max_wait=0.5
    )
    first = CircuitBreaker("svc", kept, storage=store, clock=clock)
    fail(first)
    limits: list[float | None] = []
    callers = BreakerPolicy(
        failure_threshold=1, reset_timeout=10, half_open_max_calls=1, success_threshold=1, half_open_max_wait=60
    )
    caller = CircuitBreaker("svc", callers, storage=store, clock=clock, probe=healthy_noting_limits(limits))
    clock.advance(10)
    assert caller.call(lambda: "real") == "real"  # two checks closed the breaker
    assert limits == [0.4, 0.4]  # (the kept lease of 0.5 s, less a fifth to record each verdict)
    assert state_of(caller) is State.CLOSED


def test_a_check_under_a_kept_policy_too_short_for_it_warns_once(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # check_fits refuses a probe whose half_open_max_wait leaves it no time, but it sees
    # only the caller's policy: the breaker keeps the one it was created with (here by a
    # caller with no probe), and its checks ran under that one, cut at 4 ms with nothing
    # saying why: a check slower than that failed every time, and the breaker never closed.
    store = fresh_store()
    kept = BreakerPolicy(
        failure_threshold=1, reset_timeout=10, backoff_multiplier=1, success_threshold=1, half_open_max_wait=0.005
    )
    first = CircuitBreaker("svc", kept, storage=store, clock=clock)
    limits: list[float | None] = []
    callers = BreakerPolicy(failure_threshold=1, reset_timeout=10, backoff_multiplier=1, success_threshold=1)
    caller = CircuitBreaker("svc", callers, storage=store, clock=clock, probe=healthy_noting_limits(limits))
    caplog.set_level(logging.WARNING, logger="celery_breaker")
    for _ in range(2):
        fail(first)
        clock.advance(10)
        assert caller.call(lambda: "real") == "real"
    assert limits == [pytest.approx(0.004)] * 2  # the kept wait's time, not the caller's (55 s)
    told = [record for record in caplog.records if "less than the 0.01 s a check needs" in record.getMessage()]
    assert len(told) == 1  # once, not at every check
    assert told[0].levelno == logging.WARNING
    message = told[0].getMessage()
    assert "breaker svc keeps half_open_max_wait=0.005 s" in message
    assert "reset the breaker to adopt this process's policy (half_open_max_wait=60 s)" in message
    assert "celery -A <app> breaker reset svc" in message


def test_a_probe_given_later_under_a_wait_too_short_for_it_warns(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # (check_fits runs where the breaker is made: a probe set afterwards passed it by)
    breaker = breaker_with(None, clock, success_threshold=1, half_open_max_wait=0.01)
    limits: list[float | None] = []
    breaker.probe = healthy_noting_limits(limits)
    fail(breaker)
    clock.advance(10)
    caplog.set_level(logging.WARNING, logger="celery_breaker")
    assert breaker.call(lambda: "real") == "real"
    assert limits == [pytest.approx(0.008)]
    assert "breaker svc keeps half_open_max_wait=0.01 s" in caplog.text
    assert "raise half_open_max_wait to 0.0125 s or more" in caplog.text


def test_a_check_cut_at_its_lease_is_given_up_so_none_starts_beside_it(clock: FakeClock) -> None:
    # Cut at its probe slot's lease, short of its own timeout, a check that hangs was not
    # given up on (only one cut at its own timeout was): each half-open period started
    # one more beside it, as before HUNG_ALONE_FOR's rule.
    release = threading.Event()
    calls: list[int] = []

    def hangs() -> None:
        calls.append(1)
        release.wait()

    breaker = breaker_with(
        HealthCheck(hangs, timeout=5.0, name="hangs-past-lease"), clock, backoff_multiplier=1, half_open_max_wait=0.025
    )
    fail(breaker)
    try:
        for _ in range(3):
            clock.advance(10)
            with pytest.raises(CircuitOpenError):
                breaker.call(lambda: "real")
            assert state_of(breaker) is State.OPEN
        assert len(calls) == 1  # cut at 0.02 s (the lease's 0.025 s less a fifth), then alone
    finally:
        release.set()
    for thread in threading.enumerate():
        if thread.name == "celery-breaker probe hangs-past-lease":
            thread.join(10)


@pytest.mark.parametrize(
    ("max_wait", "probe_timeout", "limit"),
    [(60.0, 60.0, 55.0), (60.0, 600.0, 55.0), (10.0, 10.0, 8.0), (0.5, 10.0, 0.4), (60.0, 5.0, 55.0)],
)
def test_a_check_ends_before_its_lease_so_no_second_starts_beside_it(
    clock: FakeClock, max_wait: float, probe_timeout: float, limit: float
) -> None:
    # With probe_timeout at half_open_max_wait or more, a check was cut as its slot's lease
    # ran out, and its verdict recorded after: another caller could take the slot in
    # between and start a second check in the same half-open period. A check now ends 5 s
    # (a fifth, where shorter) before its lease can, whatever its own timeout (which
    # HealthCheck.run applies itself, under this limit).
    limits: list[float | None] = []
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=10, success_threshold=1, half_open_max_wait=max_wait)
    breaker = CircuitBreaker(
        "svc", policy, storage=fresh_store(), clock=clock, probe=healthy_noting_limits(limits),
        probe_timeout=probe_timeout,
    )  # fmt: skip
    fail(breaker)
    clock.advance(10)
    assert breaker.call(lambda: "real") == "real"
    assert limits == [pytest.approx(limit)]
    assert breaker_module.check_time(max_wait) == pytest.approx(limit)


def test_a_probe_can_be_given_or_removed_later(clock: FakeClock) -> None:
    breaker = breaker_with(None, clock, success_threshold=1)
    breaker.probe = HealthCheck(down)
    fail(breaker)
    clock.advance(10)
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: "real")
    breaker.probe = None
    clock.advance(20)
    assert breaker.call(lambda: "real") == "real"  # a real probe again


@dataclasses.dataclass
class HttpCheck:
    """A check made with its URL, a password in it: its repr shows the field."""

    url: str

    def __call__(self) -> None:
        raise ConnectionError("refused")


def ping(url: str) -> None:
    raise ConnectionError("refused")


@pytest.mark.parametrize(
    ("probe", "name"),
    [
        (functools.partial(ping, "https://ops:s3cret@crm.example.com/health"), f"{__name__}:ping"),
        (HttpCheck("https://ops:s3cret@crm.example.com/health"), f"{__name__}:HttpCheck"),
    ],
    ids=["partial", "callable object"],
)
def test_a_check_is_named_by_its_function_never_by_a_repr_that_shows_its_arguments(
    clock: FakeClock, caplog: pytest.LogCaptureFixture, probe: Any, name: str
) -> None:
    # Named by repr(), a partial or a callable object logged its URL, password included,
    # with every failed check (and in a timeout's message, the thread's name).
    breaker = breaker_with(probe, clock)
    assert breaker.probe is not None
    assert breaker.probe.name == name
    fail(breaker)
    clock.advance(10)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"), pytest.raises(CircuitOpenError):
        breaker.call(lambda: "real")
    assert f"health check {name} failed (ConnectionError: refused)" in caplog.text
    assert "s3cret" not in caplog.text


def test_a_failed_check_is_logged_with_what_it_raised(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    breaker = breaker_with(down, clock)
    fail(breaker)
    clock.advance(10)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"), pytest.raises(CircuitOpenError):
        breaker.call(lambda: "real")
    assert f"breaker svc: health check {__name__}:down failed (ConnectionError: refused)" in caplog.text


class Unprintable(ConnectionError):
    """An error of the user's whose ``str()`` raises (a lazy message, a broken ``__str__``)."""

    def __str__(self) -> str:
        raise RuntimeError("cannot render me")


def raise_unprintable() -> None:
    raise Unprintable()


def test_an_error_that_cannot_be_shown_is_named_by_its_type() -> None:
    assert CheckResult(False, Unprintable()).detail == "Unprintable: <exception str() failed>"


def test_a_check_whose_error_cannot_be_shown_reopens_the_breaker_and_says_so(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Its detail was rendered after the move was stored and before it was announced: the
    # caller got the RuntimeError, and nobody heard of the reopening.
    breaker = breaker_with(raise_unprintable, clock)
    seen: list[Any] = []
    breaker.add_listener(seen.append)
    fail(breaker)
    clock.advance(10)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"), pytest.raises(CircuitOpenError) as info:
        breaker.call(lambda: "real")
    assert info.value.state is State.OPEN
    assert [(t.source, t.target, t.reason) for t in seen][-1] == (State.HALF_OPEN, State.OPEN, "health check failed")
    assert "failed (Unprintable: <exception str() failed>)" in caplog.text


def test_a_reopening_is_announced_even_when_logging_the_check_fails(
    clock: FakeClock, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(record: logging.LogRecord) -> bool:
        if "health check" in record.msg:
            raise LookupError("a logging filter of the user's")
        return True

    breaker = breaker_with(down, clock)
    seen: list[Any] = []
    breaker.add_listener(seen.append)
    fail(breaker)
    clock.advance(10)
    logger = logging.getLogger("celery_breaker")
    # The log must reach the filter, whatever earlier tests (a worker's logging set-up) left.
    monkeypatch.setattr(logger, "disabled", False)
    logger.addFilter(refuse)
    try:
        with caplog.at_level(logging.WARNING, logger="celery_breaker"), pytest.raises(LookupError):
            breaker.call(lambda: "real")
    finally:
        logger.removeFilter(refuse)
    assert (seen[-1].source, seen[-1].target) == (State.HALF_OPEN, State.OPEN)


# -- the machine's reasons ------------------------------------------------------------


def half_open_machine(clock: FakeClock, **policy: Any) -> BreakerMachine:
    machine = BreakerMachine("svc", None, BreakerPolicy(failure_threshold=1, **policy), clock.monotonic())
    machine.record(0, Outcome.FAILURE, 0.1, machine.policy, clock.monotonic())
    clock.advance(30)
    return machine


@pytest.mark.parametrize(
    ("check", "threshold", "reason"),
    [
        (True, 1, "health check succeeded"),
        (True, 2, "2 health checks succeeded"),
        (False, 1, "1 probes succeeded"),
    ],
)
def test_the_closing_reason_says_what_closed_it(clock: FakeClock, check: bool, threshold: int, reason: str) -> None:
    machine = half_open_machine(clock, success_threshold=threshold)
    for _ in range(threshold):
        ticket = machine.admit(machine.policy, clock.monotonic())
        assert isinstance(ticket, Probe)
        machine.record(ticket._replace(check=check), Outcome.SUCCESS, 0.1, machine.policy, clock.monotonic())
    assert machine.state is State.CLOSED
    assert machine.take_moves()[-1].reason == reason


# -- async callers: the check never blocks their event loop ---------------------------


async def _guarded(breaker: CircuitBreaker, form: str) -> str:
    if form == "async with":
        async with breaker:
            return "real"
    if form == "acall":

        async def real() -> str:
            return "real"

        return await breaker.acall(real)

    @breaker
    async def decorated() -> str:
        return "real"

    return await decorated()


@pytest.mark.parametrize("form", ["async with", "acall", "decorator"])
def test_a_sync_check_runs_off_the_event_loop_of_an_async_caller(clock: FakeClock, form: str) -> None:
    # The check waits for the loop to do something else: on the loop's own thread it would
    # wait its whole timeout (2 s) and fail, and the call would be rejected.
    ticked = threading.Event()
    breaker = breaker_with(lambda: ticked.wait(2) or False, clock, success_threshold=1)
    fail(breaker)
    clock.advance(10)

    async def main() -> str:
        async def tick() -> None:
            ticked.set()

        ticker = asyncio.ensure_future(tick())
        try:
            return await _guarded(breaker, form)
        finally:
            await ticker

    assert asyncio.run(main()) == "real"  # the check saw the tick, closed the breaker, the call ran
    assert state_of(breaker) is State.CLOSED


@pytest.mark.parametrize("form", ["async with", "acall", "decorator"])
def test_an_async_check_runs_on_the_callers_own_event_loop(clock: FakeClock, form: str) -> None:
    # What the check awaits belongs to the caller's loop (a client session, an Event): on
    # a loop of its own in another thread it could not await it.
    async def main() -> str:
        ready = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def check() -> bool:
            assert asyncio.get_running_loop() is loop
            await ready.wait()
            return True

        breaker = breaker_with(check, clock, success_threshold=1)
        fail(breaker)
        clock.advance(10)
        loop.call_soon(ready.set)
        return await _guarded(breaker, form)

    assert asyncio.run(main()) == "real"


def test_an_async_check_that_hangs_times_out_on_the_callers_loop(clock: FakeClock) -> None:
    async def main() -> None:
        async def check() -> None:
            await asyncio.Event().wait()

        breaker = breaker_with(HealthCheck(check, timeout=0.02), clock)
        fail(breaker)
        clock.advance(10)
        with pytest.raises(CircuitOpenError):
            async with breaker:
                pass
        assert state_of(breaker) is State.OPEN

    asyncio.run(main())


@pytest.mark.parametrize("form", ["async with", "acall", "decorator"])
def test_a_caller_cancelled_during_its_check_frees_the_probe_slot_at_once(clock: FakeClock, form: str) -> None:
    # asyncio.wait_for / asyncio.timeout around a call cancel it mid-check: without a
    # verdict the slot was held until its lease ran out (half_open_max_wait, 60 s).
    async def main() -> str:
        hang = True
        started = asyncio.Event()

        async def check() -> bool:
            if hang:
                started.set()
                await asyncio.Event().wait()
            return True

        breaker = breaker_with(check, clock, success_threshold=1, half_open_max_calls=1)
        fail(breaker)
        clock.advance(10)
        caller = asyncio.ensure_future(_guarded(breaker, form))
        await started.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert breaker.snapshot().state is State.HALF_OPEN
        hang = False
        return await _guarded(breaker, form)  # the slot is free: this call checks, closes, runs

    assert asyncio.run(main()) == "real"


def test_a_releaser_stopping_during_its_check_frees_the_probe_slot_at_once(clock: FakeClock) -> None:
    # A worker's releaser runs the checks of breakers whose tasks are parked: stopped (warm
    # shutdown) mid-check, it held the slot until half_open_max_wait after its worker left,
    # and the next worker's releaser waited that long (50 s measured) to check again.
    started, release, stop = threading.Event(), threading.Event(), threading.Event()
    hang = True

    def check() -> None:
        if hang:
            started.set()
            release.wait()

    breaker = breaker_with(check, clock, success_threshold=1, half_open_max_calls=1)
    fail(breaker)
    clock.advance(10)

    def stop_once_started() -> None:
        started.wait(5)
        stop.set()

    stopper = threading.Thread(target=stop_once_started)
    stopper.start()
    try:
        with abandon_checks_on(stop), pytest.raises(CheckAbandoned):
            breaker.check_health()
    finally:
        release.set()
        stopper.join()
    snap = breaker.snapshot()
    assert (snap.state, snap.probes_in_flight) == (State.HALF_OPEN, 0)
    hang = False
    assert breaker.check_health().state is State.CLOSED  # the slot is free: the next check closes it


def test_a_check_that_cancels_itself_is_a_failed_check_not_a_cancelled_caller(clock: FakeClock) -> None:
    async def check() -> None:
        raise asyncio.CancelledError

    async def main() -> None:
        breaker = breaker_with(check, clock)
        fail(breaker)
        clock.advance(10)
        with pytest.raises(CircuitOpenError):
            async with breaker:
                pass
        assert state_of(breaker) is State.OPEN  # the check failed: reopened, not left half-open

    asyncio.run(main())


def closes(breaker: CircuitBreaker) -> threading.Event:
    """Set when ``breaker`` next closes (a listener: a verdict recorded in another thread)."""
    closed = threading.Event()

    def hear(transition: Transition) -> None:
        if transition.target is State.CLOSED:
            closed.set()

    breaker.add_listener(hear)
    return closed


@pytest.mark.parametrize("healthy", [True, False])
def test_a_check_longer_than_its_callers_time_goes_on_and_its_verdict_counts(
    clock: FakeClock, caplog: pytest.LogCaptureFixture, healthy: bool
) -> None:
    # A task's time limit would stop its process during a longer check: the run stops
    # waiting when its time is up (check_within) and is rejected. The check goes on in its
    # slot, and its verdict counts. It used to give none and free the slot: the next run
    # began another check, cut short again, and a check slower than the runs' time limit
    # never closed the breaker (nor reopened it).
    release, calls = threading.Event(), []

    def check() -> None:
        calls.append(1)
        release.wait(5)
        if not healthy:
            raise ConnectionError("refused")

    # (the check's own timeout: 10 s; reset_timeout 10; one probe slot)
    breaker = breaker_with(check, clock, half_open_max_calls=1, success_threshold=1)
    closed, reopened = closes(breaker), threading.Event()

    def hear(transition: Transition) -> None:
        if transition.reason == "health check failed":
            reopened.set()

    breaker.add_listener(hear)
    fail(breaker)
    clock.advance(10)
    caplog.set_level(logging.WARNING, logger="celery_breaker")
    try:
        with pytest.raises(CircuitOpenError) as info:
            breaker.enter_run(lambda exc: exc, check_within=0.02)
        assert info.value.retry_after is not None
        assert 9 < info.value.retry_after <= 10  # the check's time left
        snap = breaker.snapshot()
        assert (snap.state, snap.probes_in_flight, snap.rejections) == (State.HALF_OPEN, 1, 1)  # its slot: still taken
        with pytest.raises(CircuitOpenError):
            breaker.enter_run(lambda exc: exc, check_within=0.02)  # the next run starts no other check
        assert calls == [1]
    finally:
        release.set()
    assert (closed if healthy else reopened).wait(5), "the check's verdict was not recorded"
    assert state_of(breaker) is (State.CLOSED if healthy else State.OPEN)
    assert calls == [1]
    assert ("health check" in caplog.text) is not healthy  # a failed check is logged, as any


def test_a_check_going_on_when_its_process_stops_frees_its_slot_with_no_verdict(clock: FakeClock) -> None:
    release = threading.Event()
    breaker = breaker_with(functools.partial(release.wait, 5), clock)
    fail(breaker)
    clock.advance(10)
    with pytest.raises(CircuitOpenError):
        breaker.enter_run(lambda exc: exc, check_within=0.02)
    assert breaker.snapshot().probes_in_flight == 1
    assert abandon_pending_checks() == 1  # (the worker's child process stops)
    snap = breaker.snapshot()
    assert (snap.state, snap.probes_in_flight, snap.failures) == (State.HALF_OPEN, 0, 1)  # (the trip's failure)
    release.set()  # the check ends healthy afterwards: nothing more is recorded
    for thread in threading.enumerate():
        if thread.name.endswith(" verdict"):
            thread.join(5)
    assert breaker.snapshot().state is State.HALF_OPEN
    assert abandon_pending_checks() == 0


def test_a_process_leaving_in_order_records_the_verdict_of_a_check_going_on(clock: FakeClock) -> None:
    # (a pool process recycled by --max-tasks-per-child: the check its task stopped waiting
    # for still closes the breaker; abandoned, it never did with a process per task)
    release = threading.Event()
    breaker = breaker_with(functools.partial(release.wait, 5), clock, success_threshold=1)
    fail(breaker)
    clock.advance(10)
    with pytest.raises(CircuitOpenError):
        breaker.enter_run(lambda exc: exc, check_within=0.02)
    release.set()  # the check answers healthy while the process waits for it
    assert await_pending_checks() == 1
    assert breaker.snapshot().state is State.CLOSED
    assert await_pending_checks() == 0


def test_a_process_leaving_in_order_waits_for_its_checks_no_longer_than_await_at_most(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health_module, "AWAIT_AT_MOST", 0.0)
    release = threading.Event()
    breaker = breaker_with(functools.partial(release.wait, 5), clock)
    fail(breaker)
    clock.advance(10)
    with pytest.raises(CircuitOpenError):
        breaker.enter_run(lambda exc: exc, check_within=0.02)
    try:
        assert await_pending_checks() == 1  # (its time is not up: given up on, as at a cold exit)
        snap = breaker.snapshot()
        assert (snap.state, snap.probes_in_flight) == (State.HALF_OPEN, 0)
    finally:
        release.set()


def test_a_check_that_cannot_go_on_without_its_caller_gives_no_verdict(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # A HealthCheck subclass's own run() returns no pending check: cut short by the
    # caller's time, it says nothing of the downstream, and its slot is freed.
    class Slow(HealthCheck):
        def run(self, timeout: float | None = None) -> CheckResult:
            return CheckResult(False, ProbeTimeout(f"did not answer within {timeout:g} s"))

    breaker = breaker_with(Slow(lambda: None), clock)
    fail(breaker)
    clock.advance(10)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"), pytest.raises(CircuitOpenError):
        breaker.enter_run(lambda exc: exc, check_within=0.02)
    snap = breaker.snapshot()
    assert (snap.state, snap.probes_in_flight, snap.failures) == (State.HALF_OPEN, 0, 1)
    assert "health check" not in caplog.text  # no verdict logged


def test_check_health_waits_only_as_long_as_it_is_told(clock: FakeClock) -> None:
    # The worker's releaser waits a moment for a check, then goes on to other breakers;
    # the check's verdict counts when it comes, and no rejection is counted meanwhile.
    release = threading.Event()
    breaker = breaker_with(functools.partial(release.wait, 5), clock, half_open_max_calls=1, success_threshold=1)
    closed = closes(breaker)
    fail(breaker)
    clock.advance(10)
    try:
        assert breaker.check_health(wait=0.02) == (State.HALF_OPEN, None)
        snap = breaker.snapshot()
        assert (snap.probes_in_flight, snap.rejections) == (1, 0)
        assert breaker.check_health(wait=0.02) == (State.HALF_OPEN, None)  # its slot is taken: nothing runs
    finally:
        release.set()
    assert closed.wait(5)


class _TimedCheck(HealthCheck):
    """A healthy check that takes ``took`` seconds of the (patched) real clock, and notes
    the time limit each run was given."""

    def run(self, timeout: float | None = None) -> CheckResult:
        LIMITS.append(timeout)
        NOW[0] += 0.15
        return CheckResult(True)


LIMITS: list[float | None] = []
NOW = [1000.0]


@pytest.mark.parametrize(("within", "limits"), [(0.4, [0.4, 0.25, 0.1]), (0.3, [0.3, 0.15])])
def test_check_within_bounds_all_the_checks_of_an_admission_together(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch, within: float, limits: list[float]
) -> None:
    # Three checks of 0.15 s each close this breaker; a task's time limit that leaves 0.3 s
    # must not give each check 0.3 s (its process would be killed during the third).
    monkeypatch.setattr(checks_module, "time", types.SimpleNamespace(monotonic=lambda: NOW[0]))
    LIMITS.clear()
    breaker = breaker_with(_TimedCheck(lambda: None), clock, success_threshold=3, half_open_max_calls=3)
    fail(breaker)
    clock.advance(10)
    if len(limits) == 3:
        breaker.enter_run(lambda exc: exc, check_within=within).leave()  # closed by the checks: admitted
        assert state_of(breaker) is State.CLOSED
    else:
        with pytest.raises(CircuitOpenError):  # no time for the third: rejected, no slot left taken
            breaker.enter_run(lambda exc: exc, check_within=within)
        snap = breaker.snapshot()
        assert (snap.state, snap.probes_in_flight) == (State.HALF_OPEN, 0)
    assert pytest.approx(limits) == LIMITS


def test_a_check_going_on_gets_no_longer_than_its_probe_lease(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The check's own timeout (10 s) is longer than the lease of its slot (half_open_max_wait
    # 0.5 s): going on past the lease, it held a slot another check could have taken by
    # then, and its late verdict would have counted for that slot. It fails at the lease.
    release = threading.Event()
    breaker = breaker_with(
        functools.partial(release.wait, 10), clock, half_open_max_calls=1, success_threshold=1, half_open_max_wait=0.5
    )
    reopened = threading.Event()

    def hear(transition: Transition) -> None:
        if transition.reason == "health check failed":
            reopened.set()

    breaker.add_listener(hear)
    caplog.set_level(logging.WARNING, logger="celery_breaker")
    fail(breaker)
    clock.advance(10)
    try:
        with pytest.raises(CircuitOpenError) as info:
            breaker.enter_run(lambda exc: exc, check_within=0.02)
        assert info.value.retry_after is not None
        assert info.value.retry_after <= 0.5
        assert reopened.wait(5), "no verdict at the lease's end"
        assert state_of(breaker) is State.OPEN
        assert "health check" in caplog.text
        assert "did not answer within" in caplog.text  # (its lease, not its own 10 s: reopened within 5 s)
    finally:
        release.set()


@pytest.mark.parametrize("kind", ["sync", "async", "async, awaited by an async caller"])
def test_a_checks_own_guarded_call_on_its_breaker_passes(clock: FakeClock, kind: str) -> None:
    # A client library that guards its calls with a breaker of the same name (as a task's
    # calls share its run's admission): the check's call met the half-open breaker whose
    # only slot the check itself held, was rejected, and the breaker never closed.
    store = fresh_store()
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=10, half_open_max_calls=1, success_threshold=1)
    client = CircuitBreaker("partner", policy, storage=store, clock=clock)  # (the library's own object)
    calls: list[str] = []

    def ping() -> str:
        calls.append("ping")
        return "pong"

    def check() -> None:
        client.call(ping)

    async def acheck() -> None:
        async with client:
            ping()

    probe = check if kind == "sync" else acheck
    breaker = CircuitBreaker("partner", policy, storage=store, clock=clock, probe=probe)
    fail(breaker)
    clock.advance(10)
    if kind == "async, awaited by an async caller":

        async def aping() -> str:
            return ping()

        async def caller() -> None:
            await breaker.acall(aping)

        asyncio.run(caller())
        assert calls == ["ping", "ping"]  # the check's, then the caller's own
    else:
        assert breaker.check_health().state is State.CLOSED
        assert calls == ["ping"]
    assert state_of(breaker) is State.CLOSED
    assert client.call(ping) == "pong"  # and the library's own calls pass again


def test_a_check_of_another_breaker_has_no_pass_on_this_one(clock: FakeClock) -> None:
    store = fresh_store()
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=10, half_open_max_calls=1, success_threshold=1)
    other = CircuitBreaker("other", policy, storage=store, clock=clock)
    breaker = CircuitBreaker("partner", policy, storage=store, clock=clock, probe=lambda: other.call(int))
    fail(breaker)
    clock.advance(5)
    fail(other)  # open for 5 s more when partner's check runs: its call there is rejected as any is
    clock.advance(5)
    assert breaker.check_health().state is State.OPEN  # its check met other's open breaker


def test_a_check_that_takes_an_argument_is_given_the_key_of_the_breaker_it_checks(clock: FakeClock) -> None:
    # A check could not tell the per-key breakers of one name apart: one that answered for
    # any tenant closed every tenant's breaker, and a tenant still down then met real tasks.
    store = fresh_store()
    seen: list[str | None] = []

    def tenant_health(key: str | None) -> None:
        seen.append(key)
        if key == "tenant-1":
            raise ConnectionError("tenant-1 down")

    async def atenant_health(key: str | None) -> None:
        tenant_health(key)

    policy = BreakerPolicy(failure_threshold=1, reset_timeout=10, success_threshold=1)
    breakers = {
        key: CircuitBreaker("svc", policy, storage=store, clock=clock, key=key, probe=check)
        for key, check in (("tenant-1", tenant_health), ("tenant-2", tenant_health), ("tenant-3", atenant_health))
    }  # fmt: skip
    for breaker in breakers.values():
        fail(breaker)
    clock.advance(10)
    assert breakers["tenant-1"].check_health().state is State.OPEN
    assert breakers["tenant-2"].check_health().state is State.CLOSED

    async def caller() -> None:  # (an async check, awaited on the caller's loop)
        async with breakers["tenant-3"]:
            pass

    asyncio.run(caller())
    assert state_of(breakers["tenant-3"]) is State.CLOSED
    assert seen == ["tenant-1", "tenant-2", "tenant-3"]
    assert HealthCheck(tenant_health).takes_key
    assert HealthCheck(tenant_health).run().healthy  # (run outside any breaker: no key)
    assert seen[-1] is None
    keyless = CircuitBreaker("other", policy, storage=store, clock=clock, probe=tenant_health)
    fail(keyless)
    clock.advance(10)
    assert keyless.check_health().state is State.CLOSED
    assert seen[-1] is None


def test_a_check_whose_optional_argument_is_named_key_is_given_it_by_name(clock: FakeClock) -> None:
    # ``def tenant_health(key=None)`` was called with no argument, so a per-key breaker's
    # check could not tell its keys apart, though it was written to.
    store = fresh_store()
    seen: list[tuple[str, str | None]] = []

    def positional(key: str | None = None) -> None:
        seen.append(("positional", key))

    def after_another(timeout: float = 2.0, key: str | None = None) -> None:
        seen.append(("after_another", key))
        assert timeout == 2.0  # (the key went to ``key``, not to the first argument)

    def keyword_only(*, key: str | None = None) -> None:
        seen.append(("keyword_only", key))

    async def asynchronous(key: str | None = None) -> None:
        seen.append(("asynchronous", key))

    def other_option(timeout: float = 2.0) -> None:
        seen.append(("other_option", None))
        assert timeout == 2.0  # an optional argument not named key is the check's own

    def own_default(key: str = "healthcheck") -> None:
        seen.append(("own_default", key))  # (a key of its own: a cache key it probes, say)

    policy = BreakerPolicy(failure_threshold=1, reset_timeout=10, success_threshold=1)
    filled = functools.partial(after_another, key="filled-in")  # (a partial's key is its own)
    checks: tuple[Callable[..., object], ...] = (
        positional, after_another, keyword_only, asynchronous, other_option, own_default, filled,
    )  # fmt: skip
    breakers = [
        CircuitBreaker("svc", policy, storage=store, clock=clock, key=f"tenant-{n}", probe=check)
        for n, check in enumerate(checks)
    ]
    for breaker in breakers:
        fail(breaker)
    clock.advance(10)
    for breaker in breakers:
        assert breaker.check_health().state is State.CLOSED
    assert seen == [
        ("positional", "tenant-0"), ("after_another", "tenant-1"), ("keyword_only", "tenant-2"),
        ("asynchronous", "tenant-3"), ("other_option", None), ("own_default", "healthcheck"),
        ("after_another", "filled-in"),
    ]  # fmt: skip
    assert [HealthCheck(check).takes_key for check in checks] == [True, True, True, True, False, False, False]
    # Without a key (a breaker of none, or run outside one) its own default stands.
    seen.clear()
    assert HealthCheck(positional).run().healthy
    keyless = CircuitBreaker("other", policy, storage=store, clock=clock, probe=after_another)
    fail(keyless)
    clock.advance(10)
    assert keyless.check_health().state is State.CLOSED
    assert seen == [("positional", None), ("after_another", None)]


def test_a_check_that_needs_more_than_the_key_is_refused() -> None:
    def check(key: str, region: str) -> None:
        """Two arguments: every check would fail."""

    with pytest.raises(ConfigurationError, match="cannot be called without arguments, nor with the breaker's key"):
        HealthCheck(check)
    assert HealthCheck(functools.partial(check, region="eu")).takes_key  # (partial fills in the rest)


def half_open_with_its_slot_held(breaker: CircuitBreaker, clock: FakeClock) -> HeldCall:
    """``breaker`` tripped, its open time up, and its one probe slot held by a caller of its own context."""
    fail(breaker)
    clock.advance(10)
    return contextvars.Context().run(HeldCall, breaker)


def test_a_checks_pass_is_for_its_own_breaker_only(clock: FakeClock) -> None:
    # Nothing tested the comparison itself: every other breaker met in a check was still
    # open, rejected before it. The same name with another key, and the same key in
    # another store, each half-open with its slot held by another caller: rejected.
    store = fresh_store()
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=10, half_open_max_calls=1, success_threshold=1)
    other_key = CircuitBreaker("svc", policy, storage=store, clock=clock, key="k2")
    other_store = CircuitBreaker("svc", policy, storage=fresh_store(), clock=clock, key="k1")
    met: dict[str, str] = {}

    def check(key: str | None) -> None:
        for label, other in (("other key", other_key), ("other store", other_store)):
            try:
                other.call(int)
                met[label] = "passed"
            except CircuitOpenError:
                met[label] = "rejected"

    breaker = CircuitBreaker("svc", policy, storage=store, clock=clock, key="k1", probe=check)
    fail(breaker)
    held = [half_open_with_its_slot_held(other_key, clock), half_open_with_its_slot_held(other_store, clock)]
    assert breaker.check_health().state is State.CLOSED
    assert met == {"other key": "rejected", "other store": "rejected"}
    for call in held:
        call.succeed()


def leaky_breaker(clock: FakeClock, probe: Any) -> tuple[CircuitBreaker, CircuitBreaker]:
    """Breaker ``svc`` with ``probe``, and a probe-less object of it (another caller's)."""
    store = fresh_store()
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=10, half_open_max_calls=1, success_threshold=1)
    breaker = CircuitBreaker("svc", policy, storage=store, clock=clock, probe=probe, probe_timeout=0.05)
    return breaker, CircuitBreaker("svc", policy, storage=store, clock=clock)


def attempted(breaker: CircuitBreaker, met: list[str]) -> None:
    try:
        breaker.call(int)
        met.append("passed")
    except CircuitOpenError:
        met.append("rejected")


def test_a_checks_own_thread_gets_no_pass_once_the_check_timed_out(clock: FakeClock) -> None:
    # The check's context stayed with its thread after its timeout: woken in a later
    # half-open period, its call on the breaker passed without a probe slot.
    wake, woke = threading.Event(), threading.Event()
    met: list[str] = []

    def hangs() -> None:
        wake.wait(30)
        attempted(breaker, met)
        woke.set()

    breaker, other = leaky_breaker(clock, hangs)
    fail(breaker)
    clock.advance(10)
    assert breaker.check_health().state is State.OPEN  # (timed out: open again, for 20 s)
    clock.advance(20)
    held = contextvars.Context().run(HeldCall, other)  # another caller's probe holds the slot
    wake.set()
    assert woke.wait(10)
    held.succeed()
    assert met == ["rejected"]


def test_a_task_an_async_check_left_on_the_loop_gets_no_pass(clock: FakeClock) -> None:
    # A task the check started on the caller's loop kept its context: its calls on the
    # breaker passed, after the check, without a probe slot.
    met: list[str] = []
    left: list[asyncio.Task[None]] = []
    go = asyncio.Event()

    async def starts_a_sender() -> None:
        async def sender() -> None:
            await go.wait()
            attempted(breaker, met)

        left.append(asyncio.get_running_loop().create_task(sender()))

    breaker, other = leaky_breaker(clock, starts_a_sender)
    fail(breaker)
    clock.advance(10)

    async def caller() -> None:
        async with breaker:  # wins the slot, runs the check, which closes the breaker
            pass
        fail(breaker)  # open again
        clock.advance(20)
        held = HeldCall(other)  # (a context of its own: HeldCall copies this one, which is not the check's)
        go.set()
        await asyncio.gather(*left)
        held.succeed()

    asyncio.run(caller())
    assert met == ["rejected"]


def test_a_per_key_check_under_a_decorator_is_given_its_key() -> None:
    # Read through its wrapper (*args, **kwargs), a check taking the key was called with
    # none: every check failed, and nothing said so at start.
    def logged(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        return wrapper

    @logged
    def tenant_health(key: str | None) -> str | None:
        return key

    @logged
    def with_session(session: object) -> None:
        """A wrapper that may fill its argument in itself: left alone."""

    assert HealthCheck(tenant_health).takes_key
    assert not HealthCheck(with_session).takes_key


def test_a_killed_workers_check_holds_its_slot_for_its_timeout_not_half_open_max_wait(clock: FakeClock) -> None:
    # A check's slot was leased for half_open_max_wait (60 s here): a worker killed while
    # its check ran held every other process's check off that long. A check answers
    # within its timeout, so its slot is leased for that and CHECK_LEASE_MARGIN.
    store = fresh_store()
    policy = BreakerPolicy(
        failure_threshold=1, reset_timeout=10, success_threshold=1, half_open_max_calls=1, half_open_max_wait=60
    )
    killed = CircuitBreaker("svc", policy, storage=store, clock=clock, probe=HealthCheck(lambda: None, timeout=2))
    fail(killed)
    clock.advance(10)
    # What its check took as it began, before the worker died: the slot, as its breaker leases it.
    ticket, _ = killed._cell.acquire(killed.policy, clock.monotonic(), killed._check_lease())
    assert isinstance(ticket, Probe)
    other = CircuitBreaker("svc", policy, storage=store, clock=clock, probe=lambda: None)
    clock.advance(2 + breaker_module.CHECK_LEASE_MARGIN - 0.5)
    assert other.check_health().state is State.HALF_OPEN  # the slot is still the dead check's
    clock.advance(0.5)
    assert other.check_health().state is State.CLOSED  # 7 s, not 60
    assert CircuitBreaker("plain", policy, storage=store, clock=clock)._check_lease() is None


def test_a_check_that_exits_is_a_failed_check_on_the_callers_loop_too(clock: FakeClock) -> None:
    # Raised out of the check's task, asyncio raised its SystemExit out of the event loop:
    # the caller's loop, every other task on it and its process ended, where the same
    # check run in a thread is a failed check.
    async def check() -> None:
        sys.exit(3)

    assert HealthCheck(check).run().detail == "SystemExit: 3"
    others: list[int] = []

    async def other() -> None:
        for each in range(3):
            others.append(each)
            await asyncio.sleep(0)

    async def main() -> None:
        breaker = breaker_with(check, clock)
        fail(breaker)
        clock.advance(10)
        beside = asyncio.ensure_future(other())
        with pytest.raises(CircuitOpenError):
            async with breaker:
                pass
        assert state_of(breaker) is State.OPEN  # the check failed: reopened
        await beside
        result = await HealthCheck(check).arun()
        assert type(result.error) is SystemExit
        assert not result.healthy

    asyncio.run(main())
    assert others == [0, 1, 2]


def test_a_health_checks_repr_and_shown_probe_never_show_its_arguments() -> None:
    secret = functools.partial(ping, "https://ops:s3cret@crm.example.com/health")
    check = HealthCheck(secret, 2.0)
    assert repr(check) == f"HealthCheck(timeout=2.0, name='{__name__}:ping', takes_key=False, key_by_name=False)"
    shown = [shown_probe(each) for each in (secret, check, "https://ops:s3cret@crm.example.com/health", {"a": 1}, 42)]
    assert shown == [
        f"{__name__}:ping",
        f"HealthCheck('{__name__}:ping')",
        "'https://ops:***@crm.example.com/health'",
        "a dict",
        "42",
    ]
    with pytest.raises(ConfigurationError) as info:
        HealthCheck("https://ops:s3cret@crm.example.com/health")  # type: ignore[arg-type]
    assert "s3cret" not in str(info.value)


class _Interrupted(BaseException):
    """What a check's client may raise that is no ``Exception`` (gevent's ``Timeout``, a
    test framework's failure): the check's own failure, not its caller's."""


def test_a_check_raising_a_base_exception_of_its_own_is_a_failed_check_on_the_callers_loop_too(
    clock: FakeClock,
) -> None:
    # Run in a thread, such a check failed; awaited on the caller's loop it went through to
    # the caller, no verdict given: the breaker stayed HALF_OPEN for good, and every caller
    # that came ran the check again and was handed its error instead of a rejection.
    async def check() -> None:
        raise _Interrupted("probe")

    assert HealthCheck(check).run().detail == "_Interrupted: probe"

    async def main() -> None:
        result = await HealthCheck(check).arun()
        assert type(result.error) is _Interrupted
        assert not result.healthy
        breaker = breaker_with(check, clock)
        fail(breaker)
        clock.advance(10)
        with pytest.raises(CircuitOpenError):
            async with breaker:
                pass
        assert state_of(breaker) is State.OPEN  # the check failed: reopened

    asyncio.run(main())
