"""Parking with a real ``celery worker -P prefork``: Redis broker and breaker store.

While the breaker is open, deferred tasks wait in Redis next to it (no worker holds
them); the worker's releaser publishes them again, oldest first, when it closes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_breaker import CircuitBreaker
from celery_breaker.monitoring import ReleasePace, collect_metrics
from tests.integration import parking_proj
from tests.integration.workers import WorkerProcess, wait_for

from ..storage.conftest import unique_prefix

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker(redis_url: str) -> Iterator[str]:
    url = f"{redis_url}/6"
    client = redis.Redis.from_url(url)
    client.flushdb()
    parking_proj.app.conf.update(broker_url=url, result_backend=url)
    yield url
    client.flushdb()


@pytest.fixture
def store_url(broker: str) -> str:
    return f"{broker}?key_prefix={unique_prefix()}"


def start_worker(broker: str, store_url: str, env: dict[str, str] | None = None, **conf: Any) -> WorkerProcess:
    extra = json.dumps({"breaker_storage_url": store_url, **conf})
    worker = WorkerProcess(broker, app="tests.integration.parking_proj", extra_conf=extra, name="park", env=env)
    worker.wait_ready()
    return worker


def parked(store_url: str) -> int:
    breaker = CircuitBreaker("partner", parking_proj.POLICY, storage=store_url)
    parking = breaker.store.primary.parking  # type: ignore[attr-defined]
    return int(parking.count(parking.tag("partner", None))[0])


def test_deferred_tasks_are_parked_then_run_in_order_when_the_breaker_closes(broker: str, store_url: str) -> None:
    breaker = CircuitBreaker("partner", parking_proj.POLICY, storage=store_url)
    breaker.force_open()
    worker = start_worker(broker, store_url)
    try:
        results = [parking_proj.job.delay(n) for n in range(30)]
        wait_for(lambda: parked(store_url) == 30, 60, "30 parked tasks")
        wait_for(lambda: all(r.state == "RETRY" for r in results), 30, "30 tasks in RETRY")
        assert "breaker 'partner' forced_open, parked until an operator closes it (deferral 1)" in str(results[0].info)
        breaker.close()
        values = [r.get(timeout=60) for r in results]
    finally:
        worker.stop()
    assert [v["n"] for v in values] == list(range(30))
    assert all(v["retries"] == 0 for v in values)  # no retry spent
    assert all(v["headers"]["x-breaker-deferrals"] == 1 for v in values)
    assert parked(store_url) == 0
    assert breaker.snapshot().deferrals == 30
    done_at = [r.date_done for r in results]
    # Released oldest first: the first ten finished before the last ten began.
    assert max(done_at[:10]) <= min(done_at[20:])
    assert "parking deferred tasks in" in worker.log()


def test_released_tasks_the_downstream_refuses_are_parked_again_and_the_breaker_stays_closed(
    broker: str, store_url: str
) -> None:
    """A 429 met by a released task: no trip, no failure, no retry spent; the task waits
    in the parking again (the adaptive pace cuts and waits) and runs once."""
    breaker = CircuitBreaker("partner", parking_proj.POLICY, storage=store_url)
    breaker.force_open()
    worker = start_worker(broker, store_url, breaker_release_pace="adaptive")
    client = redis.Redis.from_url(broker)
    try:
        results = [parking_proj.refused_once.delay(n) for n in range(20)]
        wait_for(lambda: parked(store_url) == 20, 60, "20 parked tasks")
        refused = (2, 5, 11, 17)
        client.mset({f"refuse:{n}": 1 for n in refused})
        paces: list[ReleasePace] = []
        watching = threading.Event()

        def watch() -> None:  # the release, as an operator sees it (`celery breaker status`)
            while not watching.wait(0.02):
                paces.extend(row.release for row in collect_metrics(store_url) if row.release is not None)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        breaker.close()
        try:
            values = [r.get(timeout=60) for r in results]
        finally:
            watching.set()
            watcher.join(10)
        snapshot = breaker.snapshot()
    finally:
        worker.stop()
    assert [v["n"] for v in values] == list(range(20))
    assert all(v["retries"] == 0 for v in values)  # no retry spent
    assert [n for n, v in enumerate(values) if v["headers"]["x-breaker-deferrals"] == 2] == list(refused)
    assert not client.exists(*(f"refuse:{n}" for n in refused))  # each refused once
    assert snapshot.state.value == "closed"
    assert snapshot.trips == 0  # a refusal opens nothing (force_open is no trip)
    assert snapshot.failures == len(refused)
    # A released task's success is sent before the task returns (the release grows on it),
    # not with the process's next flush: every one is in the store by the time its result is.
    assert snapshot.successes == 20
    assert parked(store_url) == 0
    # The pace was seen while it released: from 10/s (x1.4 a judgement while tasks
    # succeed), and once refused, with a limit and the wait the refusal asked for (0.5 s).
    assert paces, "no release pace seen while the parked tasks were released"
    assert paces[0].rate < 20.0
    assert any(pace.limit is not None for pace in paces)
    assert any(pace.held_for is not None and 0 < pace.held_for <= 0.5 for pace in paces)


def test_a_fresh_task_refused_while_the_release_is_under_way_waits_and_opens_nothing(
    broker: str, store_url: str
) -> None:
    """A 429 met by a task that was never parked while the parked backlog is released (a
    fixed pace of 5/s: 20 tasks take 4 s) is a refusal: the breaker stays CLOSED and the
    task is parked, no retry spent. Once nothing is parked, a fresh task's 429 opens the
    breaker for its Retry-After, as before (and the task waits that out: it failed while
    open)."""
    breaker = CircuitBreaker("partner", parking_proj.POLICY, storage=store_url)
    breaker.force_open()
    worker = start_worker(broker, store_url, breaker_release_rate=5.0)
    client = redis.Redis.from_url(broker)
    try:
        backlog = [parking_proj.job.delay(n) for n in range(20)]
        wait_for(lambda: parked(store_url) == 20, 60, "20 parked tasks")
        breaker.close()
        backlog[0].get(timeout=30)  # (the worker has heard the close: the release is under way)
        client.set("refuse:100", 1)
        during = parking_proj.refused_once.delay(100).get(timeout=60)  # (parked last: run after the backlog)
        snapshot = breaker.snapshot()
        [r.get(timeout=60) for r in backlog]
        wait_for(lambda: parked(store_url) == 0, 30, "the backlog released")
        client.set("refuse:200", 1)
        after = parking_proj.refused_once.delay(200).get(timeout=60)
        later = breaker.snapshot()
    finally:
        worker.stop()
    assert (during["retries"], during["headers"]["x-breaker-deferrals"]) == (0, 1)  # parked once, no retry
    assert (snapshot.state.value, snapshot.trips) == ("closed", 0)  # (force_open is no trip)
    assert (after["retries"], after["headers"]["x-breaker-deferrals"]) == (0, 1)
    assert later.trips == 1  # nothing being released: the 429 opened the breaker


def test_an_expiring_parked_task_is_released_at_its_expiry_and_revoked(broker: str, store_url: str) -> None:
    CircuitBreaker("partner", parking_proj.POLICY, storage=store_url).force_open()
    worker = start_worker(broker, store_url)
    try:
        result = parking_proj.job.apply_async((1,), expires=3.0)
        wait_for(lambda: parked(store_url) == 1, 30, "a parked task")
        wait_for(lambda: result.state == "REVOKED", 30, "the expired task revoked")
    finally:
        worker.stop()
    assert parked(store_url) == 0
    assert "has an expiration date in the past" not in worker.log()  # (released at its expiry on purpose)


def test_an_expiring_task_behind_a_forced_open_breaker_runs_if_it_is_closed_in_time(
    broker: str, store_url: str
) -> None:
    """A forced open breaker gives its reset_timeout as retry_after, a guess: an operator
    closes it when they choose. A task expiring before that guess was sent by countdown to
    arrive after its expiry, and revoked, though the breaker closed with 10 s of its life
    left. Now it is parked, and runs at the close."""
    policy = {**parking_proj.POLICY, "reset_timeout": 30.0}
    breaker = CircuitBreaker("partner", policy, storage=store_url)
    breaker.force_open()
    worker = start_worker(broker, store_url, breaker_default_policy=policy)
    try:
        result = parking_proj.job.apply_async((1,), expires=25.0)
        wait_for(lambda: parked(store_url) == 1, 15, "the expiring task parked")
        breaker.close()
        value = result.get(timeout=20)
    finally:
        worker.stop()
    assert value["n"] == 1
    assert value["retries"] == 0
    assert parked(store_url) == 0


def test_parked_tasks_survive_a_worker_restart(broker: str, store_url: str) -> None:
    breaker = CircuitBreaker("partner", parking_proj.POLICY, storage=store_url)
    breaker.force_open()
    worker = start_worker(broker, store_url)
    try:
        results = [parking_proj.job.delay(n) for n in range(10)]
        wait_for(lambda: parked(store_url) == 10, 60, "10 parked tasks")
    finally:
        worker.stop()
    worker = start_worker(broker, store_url)  # a new worker finds them in Redis
    try:
        breaker.close()
        values = [r.get(timeout=60) for r in results]
    finally:
        worker.stop()
    assert sorted(v["n"] for v in values) == list(range(10))


def test_parked_tasks_are_released_after_their_index_is_deleted(broker: str, store_url: str) -> None:
    """The set naming the breakers with parked tasks deleted while they wait (``DEL``,
    or an ``allkeys-*`` eviction): the releaser rebuilds it from the entries."""
    breaker = CircuitBreaker("partner", parking_proj.POLICY, storage=store_url)
    breaker.force_open()
    parking = breaker.store.primary.parking  # type: ignore[attr-defined]
    client = redis.Redis.from_url(broker)
    worker = start_worker(broker, store_url)
    try:
        results = [parking_proj.job.delay(n) for n in range(10)]
        wait_for(lambda: parked(store_url) == 10, 60, "10 parked tasks")
        assert parking.tags() == [parking.tag("partner", None)]  # (the index is whole)
        client.delete(parking.index)
        breaker.close()
        values = [r.get(timeout=60) for r in results]
    finally:
        worker.stop()
        client.close()
    assert sorted(v["n"] for v in values) == list(range(10))
    assert parked(store_url) == 0
    assert "did not name 1 breaker(s) with parked tasks (partner)" in worker.log()


def test_a_task_rejected_by_a_nested_breaker_waits_for_that_breaker(broker: str, store_url: str) -> None:
    """Its own breaker is CLOSED: parked behind it, the task was released at once, rejected
    again, and spent its 10 deferrals in well under a second (FAILURE). It is deferred by a
    countdown instead, timed by the breaker that rejected it, and runs once that one closes."""
    dependency = CircuitBreaker("dependency", storage=store_url)
    dependency.force_open()
    worker = start_worker(broker, store_url, breaker_max_deferrals=10)
    try:
        result = parking_proj.through_dependency.delay(1)
        wait_for(lambda: result.state == "RETRY", 30, "the task deferred")
        time.sleep(3.0)  # (what a loop would do meanwhile: be released, rejected, deferred again)
        assert result.state == "RETRY"
        assert "breaker 'dependency' forced_open" in str(result.info)
        dependency.close()
        value = result.get(timeout=60)
    finally:
        worker.stop()
    assert value["n"] == 1
    assert 1 <= value["deferrals"] < 10
    assert parked(store_url) == 0


@pytest.mark.parametrize("park", [True, False])
def test_a_task_sent_with_a_serializer_of_its_own_is_deferred_in_it(broker: str, store_url: str, park: bool) -> None:
    """Sent with apply_async(serializer="pickle") to a task whose default is JSON: parked,
    or published again with a countdown, it is deferred in pickle, and runs once with its
    own arguments. With a set (JSON cannot carry it) it was FAILURE ("could not be
    deferred"); with integer keys and a tuple (JSON encodes them, as strings and a list)
    it ran with other arguments than it was sent with."""
    breaker = CircuitBreaker("partner", parking_proj.POLICY, storage=store_url)
    breaker.force_open()
    # (tests run as root here; Celery refuses pickle to root workers unless told)
    root = {"C_FORCE_ROOT": "1"}
    worker = start_worker(broker, store_url, root, accept_content=["json", "pickle"], breaker_park=park)
    try:
        result = parking_proj.count_of.apply_async(args=({1, 2, 3},), serializer="pickle")
        shape = parking_proj.shape_of.apply_async(args=({1: "one"}, (4, 5)), serializer="pickle")
        wait_for(lambda: {result.state, shape.state} <= {"RETRY", "FAILURE"}, 30, "both tasks deferred")
        assert result.state == "RETRY", result.info
        assert shape.state == "RETRY", shape.info
        assert parked(store_url) == (2 if park else 0)
        breaker.close()
        value = result.get(timeout=60)
        shaped = shape.get(timeout=60)
    finally:
        worker.stop()
    assert value == {"count": 3, "retries": 0}
    assert shaped == {"keys": ["int"], "pair": "tuple"}


def test_breaker_park_false_defers_with_a_countdown(broker: str, store_url: str) -> None:
    breaker = CircuitBreaker("partner", parking_proj.POLICY, storage=store_url)
    breaker.force_open()
    worker = start_worker(broker, store_url, breaker_park=False)
    try:
        result = parking_proj.job.delay(1)
        wait_for(lambda: result.state == "RETRY", 30, "a deferral")
        assert parked(store_url) == 0
        breaker.close()
        assert result.get(timeout=60)["headers"]["x-breaker-deferrals"] >= 1
    finally:
        worker.stop()
    assert "parking deferred tasks" not in worker.log()
