"""Stored metrics snapshots (``record_metrics``, ``metrics_history``, the periodic task), on real Redis."""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime, timedelta, timezone
from typing import Any, cast

import pytest
import redis
from celery import Celery

from celery_breaker import BreakerTask, CircuitBreaker, ConfigurationError
from celery_breaker.clock import SYSTEM_CLOCK
from celery_breaker.monitoring import (
    DEFAULT_METRICS_TTL,
    METRICS_TASK_NAME,
    install_metrics_task,
    metrics_history,
    record_metrics,
)
from celery_breaker.storage import store_from_url
from celery_breaker.storage.redis import RedisStore
from celery_breaker.testing import FakeClock, fresh_store

from ..unit.support import fail, ok
from .conftest import unique_prefix

POLICY = {"failure_threshold": 1, "reset_timeout": 10.0}


def admin(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


def throwaway_app(**settings: Any) -> Celery:
    app = Celery("history-test", set_as_current=False, broker="memory://")
    app.conf.update(**settings)
    return app


def test_snapshots_are_stored_per_breaker_and_read_back_in_time_order(url: str) -> None:
    clock = FakeClock()
    start = clock.time()
    crm = CircuitBreaker("crm", POLICY, storage=url, clock=clock)
    acme = CircuitBreaker("billing", POLICY, storage=url, clock=clock, key="acme")
    crm.call(ok)
    acme.call(ok)
    cast(RedisStore, store_from_url(url)).flush()  # the counts each process sends every second: now

    assert record_metrics(url, clock=clock) == 2
    clock.advance(60)
    fail(crm)
    assert record_metrics(url, clock=clock) == 2
    clock.advance(60)
    assert record_metrics(url, clock=clock) == 2

    history = metrics_history(url, "crm")
    assert [(r["at"], r["state"], r["trips"], r["failures"]) for r in history] == [
        (start, "closed", 0, 0),
        (start + 60, "open", 1, 1),
        (start + 120, "open", 1, 1),
    ]
    assert history[0]["successes"] == 1
    assert history[1]["open_until"] == pytest.approx(start + 70)
    assert {"v", "name", "key", "parked", "claimed", "failure_rate", "last_failure"} <= set(history[0])
    assert [(r["name"], r["key"], r["state"]) for r in metrics_history(url, "billing", "acme")] == [
        ("billing", "acme", "closed")
    ] * 3
    assert metrics_history(url, "billing") == []  # the unkeyed breaker of that name has no history
    assert metrics_history(url, "nobody") == []
    assert [r["at"] for r in metrics_history(url, "crm", since=start + 60)] == [start + 60, start + 120]
    assert [r["at"] for r in metrics_history(url, "crm", since=start + 1, until=start + 119)] == [start + 60]
    # An aware datetime reads as its epoch seconds; anything else is refused by name, not
    # reported as the store failing ("min or max is not a float").
    aware = datetime.fromtimestamp(start + 60, tz=timezone.utc)
    assert [r["at"] for r in metrics_history(url, "crm", since=aware)] == [start + 60, start + 120]
    for argument, value in [("since", datetime(2026, 1, 1)), ("until", "yesterday"), ("since", True),
                            ("until", math.nan), ("since", 10**400)]:  # fmt: skip
        with pytest.raises(ValueError, match=f"metrics_history: {argument}"):
            metrics_history(url, "crm", **cast(dict[str, Any], {argument: value}))


def test_entries_older_than_the_ttl_are_dropped_and_the_key_expires(url: str, redis_url: str) -> None:
    clock = FakeClock()
    start = clock.time()
    CircuitBreaker("crm", POLICY, storage=url, clock=clock).call(ok)
    for _ in range(4):  # at start, +40, +80, +120
        record_metrics(url, ttl=100, clock=clock)
        clock.advance(40)
    assert [r["at"] for r in metrics_history(url, "crm")] == [start + 40, start + 80, start + 120]

    key = RedisStore.from_url(url).history.key("crm", None)
    ttl_ms = admin(redis_url).pttl(key)
    assert 90_000 < ttl_ms <= 100_000  # an unrecorded breaker's history goes within the TTL

    record_metrics(url, ttl=timedelta(minutes=5), clock=clock)
    assert 290_000 < admin(redis_url).pttl(key) <= 300_000


def test_the_ttl_defaults_to_the_apps_setting_or_a_day(url: str, redis_url: str) -> None:
    CircuitBreaker("crm", POLICY, storage=url, clock=FakeClock()).call(ok)
    key = RedisStore.from_url(url).history.key("crm", None)

    record_metrics(url)
    assert DEFAULT_METRICS_TTL == 86_400.0
    assert 86_000_000 < admin(redis_url).pttl(key) <= 86_400_000

    record_metrics(throwaway_app(breaker_storage_url=url, breaker_metrics_ttl=120))
    assert 110_000 < admin(redis_url).pttl(key) <= 120_000

    with pytest.raises(ConfigurationError, match=r"record_metrics: ttl must be a number of seconds > 0.*got -1"):
        record_metrics(url, ttl=-1)


def test_without_the_test_seam_records_are_stamped_with_redis_time(redis_url: str) -> None:
    url = f"{redis_url}?key_prefix={unique_prefix()}"
    CircuitBreaker("crm", POLICY, storage=url).call(ok)
    before = time.time()
    record_metrics(url, clock=FakeClock())  # the fake clock is ignored: Redis's TIME decides
    (record,) = metrics_history(url, "crm")
    server_now = float(admin(redis_url).time()[0])
    assert abs(record["at"] - server_now) < 5
    assert abs(record["at"] - before) < 5


def test_history_keys_carry_the_breakers_hash_tag(url: str) -> None:
    store = RedisStore.from_url(url)
    prefix = store.key_prefix
    assert store.history.key("crm", None) == f"{{{prefix}:crm}}:h"
    assert store.history.key("billing", "acme/1") == f"{{{prefix}:billing:acme%2F1}}:h"
    assert store.history.key("crm", None)[: -len(":h")] == store.keys_for("crm", None)[0][: -len(":s")]


def test_history_on_redis_cluster(redis_cluster_url: str) -> None:
    url = f"{redis_cluster_url}?time=client&key_prefix={unique_prefix()}"
    clock = FakeClock()
    for name in ("crm", "billing", "mail"):  # spread over the cluster's slots
        CircuitBreaker(name, POLICY, storage=url, clock=clock).call(ok)
    assert record_metrics(url, clock=clock) == 3
    clock.advance(30)
    assert record_metrics(url, clock=clock) == 3
    for name in ("crm", "billing", "mail"):
        assert [r["name"] for r in metrics_history(url, name)] == [name, name]


def test_a_memory_store_has_no_history() -> None:
    store = fresh_store()
    CircuitBreaker("local", POLICY, storage=store).call(ok)
    with pytest.raises(ConfigurationError, match=r"metrics history needs a shared store.*'memory://test'.*redis://"):
        record_metrics(store)
    with pytest.raises(ConfigurationError, match="metrics history needs a shared store"):
        metrics_history(store, "local")
    with pytest.raises(ConfigurationError, match="set breaker_storage_url"):
        record_metrics(throwaway_app())  # the default store without a Redis broker: memory://


def test_unreadable_entries_are_skipped_and_a_foreign_value_is_replaced(
    url: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    CircuitBreaker("crm", POLICY, storage=url, clock=clock).call(ok)
    key = RedisStore.from_url(url).history.key("crm", None)
    server = admin(redis_url)
    server.set(key, "not a history")
    assert metrics_history(url, "crm") == []

    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        record_metrics(url, clock=clock)
    assert any("held a string, not a history; replaced it" in r.getMessage() for r in caplog.records)

    server.zadd(key, {"{broken": clock.time(), json.dumps([1, 2]): clock.time()})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        history = metrics_history(url, "crm")
    assert [r["name"] for r in history] == ["crm"]
    assert "skipped 2 unreadable entries in the metrics history of crm" in caplog.records[-1].getMessage()


def test_the_periodic_task_records_the_apps_breakers_and_is_scheduled(url: str) -> None:
    app = throwaway_app(breaker_storage_url=url, task_cls="celery_breaker:BreakerTask")
    task = install_metrics_task(app, interval=timedelta(seconds=30))
    assert install_metrics_task(app) is task  # idempotent
    assert app.conf.beat_schedule[METRICS_TASK_NAME] == {
        "schedule": 30.0,
        "task": METRICS_TASK_NAME,
        "args": (),
        "kwargs": {},
        "options": {"expires": 30.0},
    }
    # (The system clock: under time=client, what the reader below goes by. A fake clock's
    # times could read as far ahead of a machine booted minutes ago, and be reset.)
    fail(CircuitBreaker("crm", POLICY, storage=url, clock=SYSTEM_CLOCK))

    registered = app.tasks[METRICS_TASK_NAME]  # (``task`` is Celery's lazy proxy for it)
    assert registered.name == task.name == METRICS_TASK_NAME
    assert not isinstance(registered, BreakerTask)  # records while breakers are open, whatever task_cls says
    assert registered.apply().get() == 1
    (record,) = metrics_history(app, "crm")
    assert (record["state"], record["trips"]) == ("open", 1)


def test_the_task_interval_is_validated(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"install_metrics_task: interval must be .*got 0"):
        install_metrics_task(throwaway_app(breaker_storage_url=url), interval=0)
