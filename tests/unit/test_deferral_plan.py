"""Deferral arithmetic: headers, delay, budget, expiry and the broker's redelivery window."""

from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from amqp.exceptions import (  # type: ignore[import-untyped]
    AccessRefused,
    MessageNacked,
    NotFound,
    PreconditionFailed,
    RecoverableConnectionError,
)
from celery import Celery
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu.exceptions import OperationalError

from celery_breaker import BreakerTask, CircuitOpenError
from celery_breaker.integration.broker import broker_kind, broker_url, redelivery_window
from celery_breaker.integration.deferral import countdown
from celery_breaker.integration.deferral.countdown import RECEIVED_KEY, CountdownRepublish
from celery_breaker.integration.deferral.defer import _retry_options, refreshed
from celery_breaker.integration.deferral.plan import (
    CLOCK_SKEW,
    DEFERRALS_HEADER,
    EARLIEST_SINCE,
    EXPIRY_MARGIN,
    EXPIRY_OVERSHOOT,
    MINIMUM_DELAY,
    MOST_DEFERRALS,
    SINCE_HEADER,
    WORKER_TIME_LIMIT_ATTR,
    DeferralHeaders,
    hard_time_limit,
    park_deadline,
    plan_deferral,
    read_headers,
    run_time_limit,
    seconds_until,
)
from celery_breaker.integration.deferral.selection import deferral_strategies
from celery_breaker.integration.settings import build_settings
from celery_breaker.storage.urls import describe_url

NOW = 1_700_000_000.0


def plan(**overrides: Any) -> Any:
    options: dict[str, Any] = {
        "label": "crm",
        "retry_after": 10.0,
        "spread": 0.0,
        "past": DeferralHeaders(0, None),
        "now": NOW,
        "max_deferrals": None,
        "max_defer_age": None,
        "expires_in": None,
        "cap": None,
    }
    options.update(overrides)
    return plan_deferral(**options)


def test_first_deferral_waits_until_the_next_probe_and_starts_the_clock() -> None:
    result = plan()
    assert result.delay == 10.0
    assert result.count == 1
    assert result.since == NOW
    assert result.give_up is None
    assert not result.expires_first


def test_spread_adds_a_random_share_within_bounds() -> None:
    seen: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        seen.append((low, high))
        return high * 0.25

    result = plan(spread=8.0, uniform=uniform)
    assert seen == [(0.0, 8.0)]
    assert result.delay == 12.0


def test_delay_never_drops_below_the_minimum_so_nothing_busy_loops() -> None:
    assert plan(retry_after=0.0).delay == MINIMUM_DELAY
    assert plan(retry_after=-3.0).delay == MINIMUM_DELAY


def test_broker_redelivery_window_caps_the_delay() -> None:
    assert plan(retry_after=5000.0, cap=3240.0).delay == 3240.0


def test_a_task_that_expires_first_arrives_just_after_its_expiry() -> None:
    result = plan(retry_after=30.0, expires_in=4.0)
    assert result.expires_first
    assert result.delay == 4.0 + EXPIRY_OVERSHOOT
    assert result.count == 1


def test_a_task_behind_a_forced_open_breaker_looks_again_before_its_expiry() -> None:
    """A forced open breaker admits when an operator closes it: the reset_timeout its
    retry_after gives is a guess. An expiring task sent after its expiry was revoked
    even when the operator closed the breaker long before it (an acceptance run: expires
    28 s, reset_timeout 30 s, closed after 10 s: REVOKED, never run)."""
    result = plan(state="forced_open", retry_after=30.0, expires_in=28.0, spread=30.0)
    assert not result.expires_first
    assert result.delay == 28.0 - EXPIRY_MARGIN
    # Back just before its expiry, still forced open: now it arrives after it, to be revoked.
    again = plan(state="forced_open", retry_after=30.0, expires_in=1.2, past=DeferralHeaders(1, NOW))
    assert again.expires_first
    assert again.delay == pytest.approx(1.2 + EXPIRY_OVERSHOOT)
    # A tripped breaker's retry_after is when it may half-open: it cannot admit before.
    assert plan(state="open", retry_after=30.0, expires_in=28.0).expires_first


def test_an_already_expired_task_is_not_held_back() -> None:
    result = plan(expires_in=-2.0)
    assert result.expires_first
    assert result.delay == EXPIRY_OVERSHOOT


def test_deferral_count_budget_gives_up_with_a_clear_reason() -> None:
    past = DeferralHeaders(3, NOW - 100)
    result = plan(past=past, max_deferrals=3)
    assert result.give_up is not None
    assert "breaker 'crm' still open after 3 deferral(s) over 100 s" in result.give_up
    assert "breaker_max_deferrals=3" in result.give_up
    assert plan(past=past, max_deferrals=4).give_up is None


def test_deferral_age_budget_gives_up_with_a_clear_reason() -> None:
    result = plan(past=DeferralHeaders(2, NOW - 601), max_defer_age=600.0)
    assert result.give_up is not None
    assert "breaker_max_defer_age=600 s" in result.give_up
    assert plan(past=DeferralHeaders(2, NOW - 599), max_defer_age=600.0).give_up is None


def test_a_deferral_comes_back_when_its_age_budget_runs_out_at_the_latest() -> None:
    """Deferred at 595 s of a 600 s budget, with 10 s until the next probe: back in 5 s
    (to run, or to fail on time), not 10 s, 5 s past its budget."""
    assert plan(past=DeferralHeaders(2, NOW - 595), max_defer_age=600.0).delay == pytest.approx(5.0)
    assert plan(past=DeferralHeaders(2, NOW - 100), max_defer_age=600.0).delay == pytest.approx(10.0)
    # (never sooner than the least delay)
    assert plan(past=DeferralHeaders(2, NOW - 599.99), max_defer_age=600.0).delay == MINIMUM_DELAY


def test_later_deferrals_keep_the_first_deferral_time() -> None:
    result = plan(past=DeferralHeaders(4, NOW - 50))
    assert result.count == 5
    assert result.since == NOW - 50


@pytest.mark.parametrize(
    ("headers", "count", "since"),
    [
        (None, 0, None),
        ({}, 0, None),
        ({DEFERRALS_HEADER: 3, SINCE_HEADER: NOW - 5}, 3, NOW - 5),
        ({DEFERRALS_HEADER: "7", SINCE_HEADER: str(NOW - 5)}, 7, NOW - 5),
        ({DEFERRALS_HEADER: 2.0}, 2, None),
    ],
)
def test_headers_are_read(headers: dict[str, Any] | None, count: int, since: float | None) -> None:
    parsed = read_headers(headers, now=NOW)
    assert (parsed.count, parsed.since, parsed.problems) == (count, since, ())


@pytest.mark.parametrize("bad", ["abc", -1, True, 2.5, [1], {"n": 1}, "1e3x"])
def test_a_malformed_deferral_count_restarts_from_zero_and_says_so(bad: Any) -> None:
    parsed = read_headers({DEFERRALS_HEADER: bad}, now=NOW)
    assert parsed.count == 0
    assert len(parsed.problems) == 1
    assert f"header {DEFERRALS_HEADER}={bad!r} is not a whole number" in parsed.problems[0]


@pytest.mark.parametrize("bad", ["yesterday", True, float("nan"), float("inf"), NOW + 10 * 86400, [1]])
def test_a_malformed_since_header_restarts_the_age_and_says_so(bad: Any) -> None:
    parsed = read_headers({SINCE_HEADER: bad}, now=NOW)
    assert parsed.since is None
    assert len(parsed.problems) == 1
    assert SINCE_HEADER in parsed.problems[0]


@pytest.mark.parametrize(
    ("broker", "options", "expected"),
    [
        ("redis://localhost:6379/0", {}, 3600.0),
        ("rediss://localhost:6379/0", {"visibility_timeout": 600}, 600.0),
        ("sentinel://localhost:26379", {"visibility_timeout": 7200}, 7200.0),
        ("sqs://", {}, 1800.0),  # kombu's SQS default
        ("amqp://guest@localhost//", {"visibility_timeout": 10}, None),
        ("memory://", {}, None),
        # No number of seconds > 0: the broker's default (10**400 raised OverflowError at
        # the worker's start; NaN capped every countdown at 1 s).
        ("redis://localhost:6379/0", {"visibility_timeout": 10**400}, 3600.0),
        ("redis://localhost:6379/0", {"visibility_timeout": float("nan")}, 3600.0),
        ("redis://localhost:6379/0", {"visibility_timeout": "soon"}, 3600.0),
        ("redis://localhost:6379/0", {"visibility_timeout": -5}, 3600.0),
    ],
)
def test_visibility_timeout_applies_only_to_brokers_that_redeliver(
    broker: str, options: dict[str, Any], expected: float | None
) -> None:
    app = Celery(broker=broker)
    app.conf.broker_transport_options = options
    assert redelivery_window(app.conf) == expected


def test_defer_cap_keeps_a_margin_for_the_task_runtime() -> None:
    app = Celery(broker="redis://localhost:6379/0")
    app.conf.broker_transport_options = {"visibility_timeout": 1000}
    settings = build_settings(app.conf)
    assert settings.defer_cap(None) == 900.0  # 10 % margin
    assert settings.defer_cap(300.0) == 700.0  # the hard time limit is the margin
    # A limit that leaves less than a tenth: a tenth, not a countdown of one second that
    # would send the task round the broker every second of the outage.
    assert settings.defer_cap(950.0) == 100.0
    assert settings.defer_cap(5000.0) == 100.0
    app.conf.broker_transport_options = {"visibility_timeout": 6}
    assert build_settings(app.conf).defer_cap(5.0) == 1.0  # never under a second
    assert build_settings(Celery(broker="memory://").conf).defer_cap(None) is None


def test_a_held_countdown_is_sent_again_only_when_its_run_would_be_in_the_window() -> None:
    # The window runs until the acknowledgement: after the run only for a task that acks
    # late. One acknowledged as its run starts (Celery's default) runs where it is, as does
    # one held briefly; neither is published again (nothing here could publish it).
    app = Celery(broker="redis://localhost:6379/0", set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": 1000}
    now = datetime.now(timezone.utc).timestamp()

    def held_for(seconds: float, *, acks_late: bool) -> Any:
        request = SimpleNamespace(delivery_info={RECEIVED_KEY: now - seconds}, headers={DEFERRALS_HEADER: 1})
        return SimpleNamespace(app=app, acks_late=acks_late, request=request)

    assert refreshed(held_for(500.0, acks_late=False), (), {}) is None  # (acknowledged at its start)
    assert refreshed(held_for(50.0, acks_late=True), (), {}) is None  # (a tenth of the window at most)


def test_a_held_countdown_sent_again_names_its_breaker_key_and_deferral(monkeypatch: pytest.MonkeyPatch) -> None:
    # Celery records the send as a RETRY: its reason is the deferral's error, naming the
    # breaker (with the key breaker_key makes) and the deferral, not None. (The publish
    # is stubbed: the integration test sends it through RabbitMQ.)
    app = Celery(broker="redis://localhost:6379/0", set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": 1000}

    @app.task(base=BreakerTask, bind=True, shared=False, name="held.job", breaker="crm", acks_late=True,
              breaker_key=lambda args, kwargs: args[0])  # fmt: skip
    def job(self: Any, tenant: Any) -> None: ...

    sent: list[Any] = []
    monkeypatch.setattr(CountdownRepublish, "send", lambda self, task, signature, **kw: sent.append(signature))
    now = datetime.now(timezone.utc).timestamp()
    for tenant, label in (("tenant-7", "crm[tenant-7]"), (7, "crm[7]"), (None, "crm")):
        job.push_request(id=f"id-{tenant}", args=[tenant], kwargs={}, delivery_info={RECEIVED_KEY: now - 500},
                         headers={DEFERRALS_HEADER: 3}, eta=now)  # fmt: skip
        try:
            retry = refreshed(job, (tenant,), {})
        finally:
            job.pop_request()
        assert retry is not None
        assert isinstance(retry.exc, CircuitOpenError)
        assert (retry.exc.name, retry.exc.key) == ("crm", None if tenant is None else str(tenant))
        assert repr(retry.exc).startswith(f"CircuitOpenError: breaker {label!r}, deferral 3 held 500.")
        assert "sent again to run in a fresh delivery" in str(retry.exc)
    assert len(sent) == 3


def test_the_margin_is_the_runs_time_limit_wherever_it_is_set() -> None:
    # Only a limit sent with the message reaches the request: the task's own, the worker's
    # --time-limit and task_time_limit did not count, and a countdown held 90 % of the
    # visibility timeout left a long run too little of it (redelivered: run twice).
    app = Celery(broker="redis://localhost:6379/0")
    app.conf.broker_transport_options = {"visibility_timeout": 1000}
    cap = build_settings(app.conf).defer_cap
    task = SimpleNamespace(app=app, time_limit=None)
    none = SimpleNamespace(timelimit=(None, None))
    assert run_time_limit(task, none) is None
    app.conf.task_time_limit = 400
    assert run_time_limit(task, none) == 400.0
    setattr(app, WORKER_TIME_LIMIT_ATTR, 350)  # (the worker's --time-limit)
    assert run_time_limit(task, none) == 350.0
    task.time_limit = 300  # @app.task(time_limit=300)
    assert run_time_limit(task, none) == 300.0
    assert cap(run_time_limit(task, none)) == 700.0
    assert run_time_limit(task, SimpleNamespace(timelimit=(200, 100))) == 200.0  # the message's first


def test_the_spread_never_pushes_a_task_that_could_run_past_its_expiry() -> None:
    result = plan(retry_after=5.0, spread=30.0, expires_in=20.0, uniform=lambda low, high: high * 0.8)
    assert not result.expires_first
    assert 5.0 <= result.delay <= 20.0 - 1.0  # due before it expires, after the breaker can admit


def test_an_expiring_task_still_respects_the_redelivery_cap() -> None:
    result = plan(retry_after=100.0, expires_in=50.0, cap=30.0)
    assert result.expires_first
    assert result.delay == 30.0


@pytest.mark.parametrize("bad", [-1, -1e308, 0, 946_684_799, "1e308", NOW + 301, "-inf", 10**30])
def test_a_negative_future_or_absurd_since_is_ignored_and_said(bad: Any) -> None:
    """A negative ``x-breaker-deferred-since`` used to be taken as the first deferral's time:
    under ``breaker_max_defer_age`` the task failed at once, "over 1796302800 s" (with
    ``-1e308``, a 309-digit age)."""
    parsed = read_headers({SINCE_HEADER: bad}, now=NOW)
    assert parsed.since is None
    assert [problem.split("=")[0] for problem in parsed.problems] == [f"header {SINCE_HEADER}"]
    assert len(parsed.problems[0]) < 200  # (the value shown, not 309 digits of it)
    plan = plan_deferral(
        label="crm", retry_after=1.0, spread=0.0, past=parsed, now=NOW, max_deferrals=None,
        max_defer_age=600.0, expires_in=None, cap=None,
    )  # fmt: skip
    assert plan.give_up is None
    assert plan.since == NOW  # the age counts from this deferral


def test_a_since_a_little_ahead_of_this_clock_is_another_hosts_clock() -> None:
    assert read_headers({SINCE_HEADER: NOW + 60}, now=NOW).since == NOW + 60


@pytest.mark.parametrize("bad", [10**7, 2**63, "99999999999999999999", float(2**53)])
def test_an_absurd_deferral_count_restarts_from_zero_and_says_so(bad: Any) -> None:
    parsed = read_headers({DEFERRALS_HEADER: bad}, now=NOW)
    assert parsed.count == 0
    assert len(parsed.problems) == 1


HEADER_VALUES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)
)


@settings(max_examples=400, deadline=None)
@given(HEADER_VALUES, HEADER_VALUES)
def test_any_header_values_give_a_usable_reading(count: Any, since: Any) -> None:
    parsed = read_headers({DEFERRALS_HEADER: count, SINCE_HEADER: since}, now=NOW)
    assert 0 <= parsed.count <= MOST_DEFERRALS
    assert parsed.since is None or EARLIEST_SINCE <= parsed.since <= NOW + CLOCK_SKEW
    plan = plan_deferral(
        label="crm", retry_after=1.0, spread=0.0, past=parsed, now=NOW, max_deferrals=None,
        max_defer_age=3600.0, expires_in=None, cap=None,
    )  # fmt: skip
    assert plan.give_up is None or "over" in plan.give_up


def test_a_huge_since_header_is_reported_not_raised() -> None:
    parsed = read_headers({SINCE_HEADER: 10**400, DEFERRALS_HEADER: 1e400}, now=NOW)
    assert (parsed.count, parsed.since) == (0, None)
    assert len(parsed.problems) == 2


def test_the_broker_url_from_the_environment_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://localhost:6379/0")
    app = Celery()
    assert redelivery_window(app.conf) == 3600.0


@pytest.mark.parametrize(
    ("broker", "kind", "strategies", "hold", "store"),
    [
        (["amqp://u:p@rabbit-a//", "amqp://u:p@rabbit-b//"], "amqp", ["broker-delay", "countdown"], 1800.0, "memory://"),
        (("redis://cache-a:6379/0", "redis://cache-b:6379/0"), "redis", ["park", "countdown"], 3600.0,
         "redis://cache-a:6379/0"),
    ],
)  # fmt: skip
def test_a_broker_given_as_a_list_of_urls_is_read_as_its_first(
    broker: list[str] | tuple[str, ...], kind: str, strategies: list[str], hold: float, store: str
) -> None:
    # Celery takes a list of broker URLs (failover). Read as str(list), it named no
    # broker: RabbitMQ was deferred by uncapped countdowns (no broker-delay, no
    # consumer_timeout cap: a worker held a deferral past consumer_timeout, and RabbitMQ's
    # PRECONDITION_FAILED stopped it), a Redis broker kept its breakers in memory.
    app = Celery(broker=broker, set_as_current=False)
    assert broker_url(app.conf) == ";".join(broker)
    assert broker_kind(app.conf) == kind
    assert [strategy.name for strategy in deferral_strategies(app)] == strategies
    read = build_settings(app.conf)
    assert read.hold_limit == hold
    assert read.storage_url == store
    assert describe_url(broker_url(app.conf)) == ";".join(describe_url(url) for url in broker)


@pytest.mark.parametrize(
    ("conf", "kind"),
    [
        ({}, "amqp"),  # (Celery's default broker: amqp://guest@localhost//)
        ({"broker_host": "rabbit", "broker_port": 5673}, "amqp"),
        ({"broker_transport": "redis", "broker_host": "cache"}, "redis"),
        ({"broker_write_url": "amqp://u:p@rabbit-primary//"}, "amqp"),
        ({"broker_url": "memory://"}, "memory"),
    ],
)
def test_a_broker_given_without_a_url_is_the_one_kombu_connects_to(conf: dict[str, Any], kind: str) -> None:
    # No URL, only a host, or only broker_write_url: the kind was read from the text of
    # broker_url alone, which named no scheme, so RabbitMQ was an unknown broker (no
    # broker-delay, no consumer_timeout cap) where kombu connects to it all the same.
    app = Celery("no-url", set_as_current=False)
    app.conf.update(conf)
    assert broker_kind(app.conf) == kind
    assert app.connection_for_write().transport_cls == kind
    assert (build_settings(app.conf).hold_limit == 1800.0) == (kind == "amqp")
    assert (deferral_strategies(app)[0].name == "broker-delay") == (kind == "amqp")


def test_seconds_until_reads_iso_text_and_datetimes() -> None:
    assert seconds_until(None, NOW) is None
    assert seconds_until("", NOW) is None
    when = datetime.fromtimestamp(NOW + 90, tz=timezone.utc)
    assert seconds_until(when, NOW) == pytest.approx(90)
    assert seconds_until(when.isoformat(), NOW) == pytest.approx(90)
    assert seconds_until((when - timedelta(seconds=120)).isoformat(), NOW) == pytest.approx(-30)


def test_an_unreadable_expires_is_ignored_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert seconds_until("next tuesday", NOW) is None
    assert [record.getMessage() for record in caplog.records] == [
        "celery_breaker: ignoring unreadable expires='next tuesday'"
    ]


@pytest.mark.parametrize(
    ("timelimit", "expected"),
    [
        (None, None),
        ((None, None), None),
        ((30, 25), 30.0),
        (("12.5", None), 12.5),
        (("soon", None), None),
        ((), None),
        # a header no Celery wrote: none of these may stop a deferral
        ((10**400, None), None),
        ((math.nan, None), None),
        ((-5, None), None),
        ({"a": 1}, None),
    ],
)
def test_hard_time_limit_reads_the_requests_first_limit(timelimit: Any, expected: float | None) -> None:
    request = SimpleNamespace(timelimit=timelimit)
    assert hard_time_limit(request) == expected
    assert hard_time_limit(SimpleNamespace()) is None


def test_a_parked_task_is_due_at_its_expiry_or_its_age_budget_whichever_is_first() -> None:
    since = NOW - 100
    assert park_deadline(None, since, None, NOW) is None
    assert park_deadline(60.0, since, None, NOW) == NOW + 60 + EXPIRY_OVERSHOOT
    assert park_deadline(None, since, 300.0, NOW) == since + 300
    assert park_deadline(60.0, since, 300.0, NOW) == NOW + 60 + EXPIRY_OVERSHOOT
    assert park_deadline(600.0, since, 300.0, NOW) == since + 300


def test_a_retry_replaced_by_a_deferral_lends_it_its_options_but_not_its_timing() -> None:
    # An expires in seconds counts from the retry, not from when the parking publishes the
    # run: it becomes a time. The deferral plans its own delay and keeps the task's id and
    # retry count.
    now = 1_800_000_000.0
    asked = {"queue": "slow", "priority": 7, "time_limit": 40, "expires": 60, "countdown": 5, "eta": None,
             "retries": 3, "task_id": "other", "headers": {"trace": "t"}, "link": None}  # fmt: skip
    found = _retry_options(asked, now)
    assert found == {
        "queue": "slow", "priority": 7, "time_limit": 40, "headers": {"trace": "t"},
        "expires": datetime.fromtimestamp(now + 60, tz=timezone.utc),
    }  # fmt: skip
    when = datetime.fromtimestamp(now + 5, tz=timezone.utc)
    assert _retry_options({"expires": when}, now) == {"expires": when}  # (a time stays that time)


@pytest.mark.parametrize(
    ("exc", "refused"),
    [
        (MessageNacked("RabbitMQ refused the message (basic.nack)"), True),
        (AccessRefused("no write permission on celery_delayed_27", reply_code=403), True),
        (PreconditionFailed("inequivalent arg 'x-queue-type'", reply_code=406), True),
        (NotFound("no exchange 'celery_delayed_delivery'", reply_code=404), True),
        (ConnectionRefusedError(111, "Connection refused"), False),
        (OperationalError("[Errno 104] Connection reset by peer"), False),
        (RecoverableConnectionError("connection already closed"), False),
    ],
)
def test_only_a_refusal_blames_the_native_delay_setting(exc: BaseException, refused: bool) -> None:
    # A run sent straight back because its connection failed twice was logged at ERROR
    # blaming broker_native_delayed_delivery_queue_type; only RabbitMQ's refusals do now.
    assert countdown._refusal(exc) is refused


@pytest.mark.parametrize("headers", [{DEFERRALS_HEADER: "many"}, {SINCE_HEADER: "yesterday"}])
def test_a_malformed_deferral_header_is_told_with_its_fix(headers: dict[str, Any]) -> None:
    # A producer (or a replay tool copying a delivered task's headers) set it: the
    # WARNING named the header and what was done, not how to stop it coming.
    (problem,) = read_headers(headers, now=NOW).problems
    assert problem.endswith("(celery-breaker sets it; do not send it)")
