"""Real ``celery worker`` processes on the gevent and threads pools, Redis broker and store.

Many tasks of one breaker run at once in one process, each in its own greenlet or thread:
each run's admission, its guarded block and its deferral must stay its own. An outage
defers every task without spending a retry, parked tasks are released in order, and
health checks alone close the breaker, as on prefork.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_breaker import CircuitBreaker, State
from tests.conftest import emptied
from tests.integration import parking_proj, probe_proj, proj
from tests.integration.workers import WorkerProcess, wait_for

from ..storage.conftest import unique_prefix

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker(proj_url: str) -> Iterator[str]:
    with emptied(proj_url) as url:
        yield url


CONCURRENCY = 20
# Kombu's Redis transport holds at most 10 connections per channel (``max_connections``),
# and every task of a late-acking worker acks through it: 20 acks at once, as a release of
# parked tasks makes them, met ``MaxConnectionsError`` ("Couldn't ack") on a busy machine.
# A gevent or threads worker is given a pool as large as its concurrency, as in production.
POOLED = {"broker_transport_options": {"max_connections": 2 * CONCURRENCY}}


def conf(**settings: Any) -> str:
    """``PROJ_EXTRA_CONF`` for a worker: ``POOLED`` and ``settings``."""
    return json.dumps({**POOLED, **settings})


def problems(worker: WorkerProcess) -> list[str]:
    """The worker's log lines at ERROR or above, and any traceback."""
    marks = ("ERROR/", "CRITICAL/", "Traceback")
    return [line for line in worker.log().splitlines() if any(mark in line for mark in marks)]


@pytest.mark.parametrize("pool", ["gevent", "threads"])
def test_an_outage_defers_every_concurrent_task_then_all_complete(
    pool: str, broker: str, downstream: redis.Redis
) -> None:
    with WorkerProcess(broker, pool=pool, concurrency=CONCURRENCY, extra_conf=conf(), name=f"{pool}-outage") as worker:
        worker.wait_ready()
        downstream.set(proj.DOWN_KEY, 1)
        results = [proj.call_partner.delay(n) for n in range(60)]
        wait_for(lambda: all(r.state == "RETRY" for r in results), 60, "all 60 tasks deferred")
        assert not [r for r in results if r.state == "FAILURE"]
        calls_during_outage = int(downstream.get(proj.CALLS_KEY) or 0)
        downstream.delete(proj.DOWN_KEY)
        values: list[dict[str, Any]] = [r.get(timeout=90) for r in results]
        assert worker.process.poll() is None
    assert [v["n"] for v in values] == list(range(60))
    assert [v["id"] for v in values] == [r.id for r in results]
    assert {v["retries"] for v in values} == {0}  # deferred, never retried
    # While open, only the trip and probes reached the downstream, not every task.
    assert calls_during_outage < 60
    assert problems(worker) == []


@pytest.mark.parametrize("pool", ["gevent"])
def test_parked_tasks_are_released_in_order_once_each(pool: str, redis_url: str) -> None:
    url = f"{redis_url}/6"
    parking_proj.app.conf.update(broker_url=url, result_backend=url)
    with emptied(url):
        store_url = f"{url}?key_prefix={unique_prefix()}"
        breaker = CircuitBreaker("partner", parking_proj.POLICY, storage=store_url)
        breaker.force_open()
        extra = conf(breaker_storage_url=store_url)
        with WorkerProcess(url, app="tests.integration.parking_proj", pool=pool, concurrency=CONCURRENCY,
                           extra_conf=extra, name=f"{pool}-park") as worker:  # fmt: skip
            worker.wait_ready()
            results = [parking_proj.job.delay(n) for n in range(40)]
            wait_for(lambda: all(r.state == "RETRY" for r in results), 60, "40 tasks parked")
            breaker.close()
            values = [r.get(timeout=60) for r in results]
        deferrals = breaker.snapshot().deferrals
        done_at = [r.date_done for r in results]
    assert [v["n"] for v in values] == list(range(40))
    assert all(v["retries"] == 0 for v in values)
    assert all(v["headers"]["x-breaker-deferrals"] == 1 for v in values)  # parked once, released once
    assert deferrals == 40
    assert max(done_at[:10]) <= min(done_at[30:])  # oldest first
    assert problems(worker) == []


@pytest.mark.parametrize("pool", ["gevent"])
def test_health_checks_alone_close_the_breaker(pool: str, redis_url: str) -> None:
    url = f"{redis_url}/7"
    probe_proj.app.conf.update(broker_url=url, result_backend=url)
    with emptied(url):
        prefix = unique_prefix()
        store_url = f"{url}?key_prefix={prefix}"
        keys = f"probe-{prefix}"
        client = redis.Redis.from_url(url)
        client.set(f"{keys}:down", 1)
        extra = conf(breaker_storage_url=store_url)
        breaker = CircuitBreaker("partner", probe_proj.POLICY, storage=store_url)
        with WorkerProcess(url, app="tests.integration.probe_proj", pool=pool, concurrency=CONCURRENCY,
                           extra_conf=extra, name=f"{pool}-probe", env={"PROBE_KEYS": keys}) as worker:  # fmt: skip
            worker.wait_ready()
            first = probe_proj.pay.delay(0)
            wait_for(lambda: breaker.state is not State.CLOSED, 30, "the first task to trip the breaker")
            results = [first] + [probe_proj.pay.delay(n) for n in range(1, 31)]
            wait_for(lambda: int(client.get(f"{keys}:checks") or 0) >= 3, 60, "three failing health checks")
            assert int(client.get(f"{keys}:calls") or 0) == 1  # only the trip reached the downstream
            client.delete(f"{keys}:down")
            values = [result.get(timeout=60) for result in results]
        calls = int(client.get(f"{keys}:calls") or 0)
    assert sorted(value["n"] for value in values) == list(range(31))
    assert all(value["retries"] == 0 for value in values)
    assert calls == 1 + 31  # the trip, then every task once
    log = worker.log()
    assert "breaker partner half_open -> closed (health check succeeded" in log
    assert problems(worker) == []
