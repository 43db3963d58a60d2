"""``collect_metrics``: every breaker of a store, with its parked tasks (real Redis, and memory)."""

from __future__ import annotations

from celery import Celery

from celery_breaker import CircuitBreaker, State
from celery_breaker.monitoring import collect_metrics
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
