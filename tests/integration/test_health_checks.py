"""Health-check probes with a real ``celery worker -P prefork``, on every broker.

Redis broker and store, tasks parked: during the outage only health checks reach the
downstream after the trip; once it is back, the checks close the breaker (nobody calls
it: every task is parked, the worker's releaser runs the checks) and every parked task
runs once, none failed, no retry spent. RabbitMQ (classic and quorum queues), Redis or
memory store: the same, with the tasks waiting in RabbitMQ's delay queues and the checks
run by the deferred tasks that come back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_breaker import CircuitBreaker, State
from tests.integration import probe_proj
from tests.integration.workers import WorkerProcess, wait_for
from tests.rabbitmq import RabbitMQServer

from ..storage.conftest import unique_prefix

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker(redis_url: str) -> Iterator[str]:
    url = f"{redis_url}/7"
    client = redis.Redis.from_url(url)
    client.flushdb()
    probe_proj.app.conf.update(broker_url=url, result_backend=url)
    yield url
    client.flushdb()


def test_only_health_checks_reach_the_downstream_and_they_alone_close_the_breaker(broker: str) -> None:
    prefix = unique_prefix()
    store_url = f"{broker}?key_prefix={prefix}"
    keys = f"probe-{prefix}"
    client = redis.Redis.from_url(broker)
    client.set(f"{keys}:down", 1)
    extra = json.dumps({"breaker_storage_url": store_url})
    worker = WorkerProcess(broker, app="tests.integration.probe_proj", extra_conf=extra, name="probe",
                           env={"PROBE_KEYS": keys})  # fmt: skip
    worker.wait_ready()
    breaker = CircuitBreaker("partner", probe_proj.POLICY, storage=store_url)
    try:
        first = probe_proj.pay.delay(0)
        wait_for(lambda: breaker.state is not State.CLOSED, 30, "the first task to trip the breaker")
        results = [first] + [probe_proj.pay.delay(n) for n in range(1, 21)]
        wait_for(lambda: int(client.get(f"{keys}:checks") or 0) >= 3, 60, "three failing health checks")
        assert int(client.get(f"{keys}:calls") or 0) == 1  # only the trip reached the downstream
        assert all(result.state in ("PENDING", "RETRY") for result in results)
        client.delete(f"{keys}:down")
        values = [result.get(timeout=60) for result in results]
    finally:
        worker.stop()
    assert sorted(value["n"] for value in values) == list(range(21))
    assert all(value["retries"] == 0 for value in values)  # deferred, never retried
    assert all(result.state == "SUCCESS" for result in results)
    assert int(client.get(f"{keys}:calls") or 0) == 1 + 21  # the trip, then every task once
    log = worker.log()
    assert "breaker partner half_open -> open (health check failed" in log
    assert "breaker partner half_open -> closed (health check succeeded" in log
    # Every task was parked, so the worker's releaser (in its main process) ran the checks.
    assert "MainProcess] breaker partner: health check tests.integration.probe_proj:check failed" in log


def test_a_slow_health_check_closes_the_breaker_from_pool_processes_recycled_after_each_task(broker: str) -> None:
    # --max-tasks-per-child 1 (or worker_max_memory_per_child): the pool process whose task
    # started the check leaves as soon as the task is deferred. A healthy check slower than
    # the second a task's admission waits for it was abandoned at that exit, its verdict
    # lost: the next task's process began another, and the breaker never closed.
    prefix = unique_prefix()
    store_url = f"{broker}?key_prefix={prefix}"
    keys = f"probe-{prefix}"
    client = redis.Redis.from_url(broker)
    client.set(f"{keys}:down", 1)
    extra = json.dumps({"breaker_storage_url": store_url, "breaker_park": False, "worker_max_tasks_per_child": 1})
    worker = WorkerProcess(broker, app="tests.integration.probe_proj", extra_conf=extra, name="recycled",
                           env={"PROBE_KEYS": keys, "PROBE_SLEEP": "1.4"})  # fmt: skip
    worker.wait_ready()
    breaker = CircuitBreaker("partner", probe_proj.POLICY, storage=store_url)
    try:
        first = probe_proj.pay.delay(0)
        wait_for(lambda: breaker.state is not State.CLOSED, 30, "the first task to trip the breaker")
        client.delete(f"{keys}:down")
        results = [first] + [probe_proj.pay.delay(n) for n in range(1, 4)]
        values = [result.get(timeout=30) for result in results]
    finally:
        worker.stop()
    assert sorted(value["n"] for value in values) == [0, 1, 2, 3]
    assert "breaker partner half_open -> closed (health check succeeded" in worker.log()


@pytest.mark.parametrize(("queues", "store"), [("classic", "redis"), ("classic", "memory"), ("quorum", "redis")])
def test_health_checks_alone_close_the_breaker_on_rabbitmq(
    rabbitmq: RabbitMQServer, redis_url: str, queues: str, store: str
) -> None:
    # On RabbitMQ nothing is parked: a rejected task waits in RabbitMQ's delay queues
    # (broker-delay), so the health checks are run by the deferred tasks coming back, in
    # the pool process that wins the probe slot, not by a releaser. With a memory store the
    # pool process's own breaker decides (one process, so one trip).
    prefix = unique_prefix()
    counter = f"{redis_url}/7"
    store_url = f"{redis_url}/7?key_prefix={prefix}" if store == "redis" else "memory://"
    keys = f"probe-{prefix}"
    queue = f"q-{prefix}"
    client = redis.Redis.from_url(counter)
    client.set(f"{keys}:down", 1)
    routing: dict[str, Any] = {"task_default_queue": queue}
    if queues == "quorum":  # (Celery delays a quorum queue's countdowns through a topic exchange)
        routing.update(task_default_queue_type="quorum", task_default_exchange_type="topic")
    conf = {"breaker_storage_url": store_url, "broker_heartbeat": 2, **routing}
    worker = WorkerProcess(
        rabbitmq.url, app="tests.integration.probe_proj", extra_conf=json.dumps(conf), name=f"probe-{queues}-{store}",
        concurrency=1, env={"PROBE_KEYS": keys, "PROJ_COUNTER": counter},
    )  # fmt: skip
    worker.wait_ready()
    publisher = Celery(f"publisher-{prefix}", broker=rabbitmq.url, backend=counter, set_as_current=False)
    publisher.conf.update(result_expires=600, **routing)
    task = "tests.integration.probe_proj.pay"
    try:
        first = publisher.send_task(task, args=[0])
        wait_for(lambda: int(client.get(f"{keys}:calls") or 0) >= 1, 30, "the first task to trip the breaker")
        results = [first] + [publisher.send_task(task, args=[n]) for n in range(1, 21)]
        wait_for(lambda: int(client.get(f"{keys}:checks") or 0) >= 3, 60, "three failing health checks")
        assert int(client.get(f"{keys}:calls") or 0) == 1  # only the trip reached the downstream
        assert all(result.state in ("PENDING", "RETRY") for result in results)
        client.delete(f"{keys}:down")
        values = [result.get(timeout=60) for result in results]
        states = [result.state for result in results]
    finally:
        worker.stop()
        publisher.close()
    assert sorted(value["n"] for value in values) == list(range(21))
    assert all(value["retries"] == 0 for value in values)  # deferred, never retried
    assert states == ["SUCCESS"] * 21
    assert int(client.get(f"{keys}:calls") or 0) == 1 + 21  # the trip, then every task once
    log = worker.log()
    assert "breaker partner half_open -> open (health check failed" in log
    assert "breaker partner half_open -> closed (health check succeeded" in log
    assert "ForkPoolWorker-1] breaker partner: health check tests.integration.probe_proj:check failed" in log
    assert "parking deferred tasks in" not in log  # (nothing is: they wait in RabbitMQ)
    if store == "redis":
        assert "releasing any tasks parked in" in log
        assert "(this worker defers in the broker)" in log
