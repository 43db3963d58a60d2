"""``collect_metrics``: every breaker of a store, with its parked tasks (real Redis, and memory)."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_breaker import CircuitBreaker, State
from celery_breaker.monitoring import collect_metrics
from celery_breaker.ops.selection import breakers_selected
from celery_breaker.storage.redis import RedisStore
from celery_breaker.testing import FakeClock, fresh_store

from ..unit.support import fail, ok
from .conftest import unique_prefix

POLICY = {"failure_threshold": 1, "reset_timeout": 10.0}


def test_every_breaker_of_a_redis_store_with_its_parked_tasks(redis_url: str) -> None:
    url = f"{redis_url}?key_prefix={unique_prefix()}"
    store = RedisStore.from_url(url)
    clock = FakeClock()
    crm = CircuitBreaker("crm", POLICY, storage=store, clock=clock)
    fail(crm)
    CircuitBreaker("billing", POLICY, storage=store, clock=clock, key="acme").call(ok)
    for n in range(3):
        store.parking.park("crm", None, f"task-{n}:1", float(n), "payload", None)

    rows = collect_metrics(url)  # by URL: another process's view of the same breakers
    assert [(r.snapshot.name, r.snapshot.key, r.snapshot.state, r.parked) for r in rows] == [
        ("billing", "acme", State.CLOSED, 0),
        ("crm", None, State.OPEN, 3),
    ]
    assert rows[1].as_dict()["parked"] == 3
    assert rows[1].as_dict()["state"] == "open"
    assert rows[1].snapshot.trips == 1


def test_a_breaker_with_parked_tasks_but_no_state_is_listed_as_a_new_one(redis_url: str) -> None:
    """Its state gone (idle TTL, an operator's or a listing's reset) while tasks stay
    parked behind it: listed closed, generation 0, with its parked tasks, until it is
    used again; a breaker whose parking is empty is not."""
    url = f"{redis_url}?key_prefix={unique_prefix()}"
    store = RedisStore.from_url(url)
    client = store.client()
    tenant = CircuitBreaker("crm", POLICY, storage=store, key="tenant 7")
    fail(tenant)
    for n in range(2):
        store.parking.park("crm", "tenant 7", f"task-{n}:1", float(n), "payload", None)
    store.parking.park("drained", None, "d:1", 1.0, "payload", None)
    store.parking.purge(store.parking.tag("drained", None))  # (still indexed, nothing parked)
    client.delete(*store.keys_for("crm", "tenant 7"))

    rows = collect_metrics(url)
    assert [(r.snapshot.name, r.snapshot.key, r.snapshot.state, r.snapshot.generation, r.parked) for r in rows] == [
        ("crm", "tenant 7", State.CLOSED, 0, 2),
    ]
    # (what a breaker of that name shows when it is new)
    assert rows[0].snapshot == CircuitBreaker("crm", POLICY, storage=fresh_store(), key="tenant 7").snapshot()
    # Used again (by another process: this one's view still holds it open), it is listed
    # from its state, once.
    other = RedisStore.from_url(url)
    CircuitBreaker("crm", POLICY, storage=other, key="tenant 7").call(ok)
    other.flush()  # (its successes reach Redis in batches)
    rows = collect_metrics(url)
    assert [(r.snapshot.key, r.snapshot.successes, r.parked) for r in rows] == [("tenant 7", 1, 2)]


def test_a_memory_store_and_an_app(redis_url: str) -> None:
    store = fresh_store()
    CircuitBreaker("local", POLICY, storage=store).call(ok)
    assert [(r.snapshot.name, r.parked, r.claimed) for r in collect_metrics(store)] == [("local", 0, 0)]

    url = f"{redis_url}?key_prefix={unique_prefix()}"
    app = Celery("monitoring-test", set_as_current=False)
    app.conf.update(breaker_storage_url=url)
    assert collect_metrics(app) == []
    fail(CircuitBreaker("svc", POLICY, storage=url))
    assert [r.snapshot.state for r in collect_metrics(app)] == [State.OPEN]


def test_a_glob_reads_only_the_breakers_it_picks(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # ``inspect breakers 'partner*'`` read every breaker of the store (10,000 in an
    # acceptance test: 1.7-3.8 s in the worker's main process, past the command's 1 s
    # timeout) for its one row.
    url = f"{redis_url}?key_prefix={unique_prefix()}"
    store = RedisStore.from_url(url)
    for n in range(40):
        CircuitBreaker("crm", POLICY, storage=store, key=f"tenant-{n}").call(ok)
    fail(CircuitBreaker("partner-api", POLICY, storage=store))
    store.parking.park("partner-api", None, "task-1:1", 1.0, "payload", None)
    store.flush()
    read: list[int] = []
    run_many = store.run_many

    def counted(script: str, calls: Any) -> Any:
        if script == "snapshot":
            read.append(len(calls))
        return run_many(script, calls)

    monkeypatch.setattr(store, "run_many", counted)
    rows = breakers_selected(store, ["partner*"])
    assert [(r.snapshot.name, r.snapshot.state, r.parked) for r in rows] == [("partner-api", State.OPEN, 1)]
    assert sum(read) == 1
    read.clear()
    assert len(breakers_selected(store, ["crm[tenant-1*]"])) == 11  # tenant-1, tenant-10..19
    assert sum(read) == 11
    read.clear()
    assert len(breakers_selected(store, [])) == 41  # (no pattern: every one)
    assert sum(read) == 41
    # Tasks parked behind a breaker with no state: listed by a pattern that picks it only.
    store.parking.park("zz-orphan", None, "task-9:1", 9.0, "payload", None)
    assert [r.snapshot.name for r in breakers_selected(store, ["partner*"])] == ["partner-api"]
    assert [(r.snapshot.name, r.parked) for r in breakers_selected(store, ["zz*"])] == [("zz-orphan", 1)]
