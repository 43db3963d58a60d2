"""The promise on every deployment: an outage under a real prefork worker, broker by store by deferral mode.

Brokers: Redis, RabbitMQ with classic queues, RabbitMQ with quorum queues (on a topic
exchange, as Celery's native delayed delivery needs). Stores: ``memory://`` (each pool
process has its own breaker) and Redis. Modes: ``park`` (``breaker_park="auto"``, the
default: parked in the store on a Redis broker with a Redis store, delayed in RabbitMQ
itself on RabbitMQ) and ``countdown`` (``breaker_park=False``: a countdown the receiving
worker holds). Every cell: 0 lost, 0 duplicated, failures only before the trip, downstream
calls while it is down within the probe bound, the worker never exits. The figures are
printed (``-s``); the closing table of the issue is made from them.

RabbitMQ runs with a ``consumer_timeout`` of ``CONSUMER_TIMEOUT_S`` (checked every
second), and the workers are told so (``breaker_consumer_timeout``); the cases around it
(a breaker open longer than it, quorum queues, expiry, serializers, a store restarted
under parked tasks, Celery's canvas) are in ``test_broker_cases.py``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import pytest
import redis

from tests.integration.backlog_proj import (
    TASK,
    deferred_key,
    executions_key,
    failed_ids_key,
    failures_key,
    transitions_key,
)
from tests.integration.deployments import deploy
from tests.integration.downstream import Downstream
from tests.integration.workers import wait_for
from tests.rabbitmq import RabbitMQServer
from tests.servers import RedisServer

pytestmark = pytest.mark.slow

CONCURRENCY = 2
THRESHOLD = 3
PROBES = 1
POLICY = {
    "failure_threshold": THRESHOLD, "reset_timeout": 1.0, "max_reset_timeout": 2.0,
    "half_open_max_calls": PROBES, "success_threshold": 1,
}  # fmt: skip
TASKS = 40
WARM = 6
BROKERS = ("redis", "rabbitmq-classic", "rabbitmq-quorum")
STORES = ("memory", "redis")
MODES = ("park", "countdown")


@dataclass
class Tally:
    executions: dict[str, int]
    deferred: set[str]
    failed: set[str]
    failures: dict[str, int]
    trips: Counter[str]
    """Per pool process (pid): how many times its breaker opened."""

    @classmethod
    def read(cls, client: redis.Redis, ns: str) -> Tally:
        trips: Counter[str] = Counter()
        for entry in client.lrange(transitions_key(ns), 0, -1):
            pid, _, move = str(entry).partition(":")
            if move.endswith(">open"):
                trips[pid] += 1
        return cls(
            {str(k): int(v) for k, v in client.hgetall(executions_key(ns)).items()},
            {str(m) for m in client.smembers(deferred_key(ns))},
            {str(m) for m in client.smembers(failed_ids_key(ns))},
            {str(k): int(v) for k, v in client.hgetall(failures_key(ns)).items()},
            trips,
        )


RESULTS: list[str] = []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("broker", BROKERS)
def test_an_outage_loses_nothing_on_every_deployment(
    broker: str, store: str, mode: str, rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    cell = deploy(broker, store, mode, rabbitmq=rabbitmq, redis_server=redis_server, policy=POLICY)
    client = redis.Redis.from_url(cell.counter_url, decode_responses=True)
    publisher = cell.publisher()
    try:
        with Downstream() as downstream, cell.worker(concurrency=CONCURRENCY) as started:

            def send(n: int) -> str:
                return str(publisher.send_task(TASK, args=(cell.ns, downstream.url, n)).id)

            ids = [send(n) for n in range(WARM)]
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= WARM, 60, "the warm-up tasks")

            downstream.outage(True)
            ids += [send(n) for n in range(WARM, TASKS)]
            began = time.monotonic()

            def backlog_built() -> bool:
                tally = Tally.read(client, cell.ns)
                waiting = set(ids) - set(tally.executions) - tally.failed
                return waiting <= tally.deferred and sum(tally.trips.values()) >= 2

            outage_s = wait_for(backlog_built, 90, "every waiting task deferred, and a failed probe")
            downstream.outage(False)
            recovered = time.monotonic()

            def drained() -> bool:
                return client.hlen(executions_key(cell.ns)) + client.scard(failed_ids_key(cell.ns)) >= TASKS

            drain_s = wait_for(drained, 120, "the backlog to drain")
            assert started.process.poll() is None, f"the worker exited:\n{started.log()}"
            log = started.log()
        tally = Tally.read(client, cell.ns)
    finally:
        publisher.close()
    counts = downstream.counts()
    outage_calls = counts.get("outage", {}).get("requests", 0)
    processes = max(1, len(tally.trips)) if store == "memory" else 1
    # Each breaker (one per process with memory://, one in all with Redis) lets THRESHOLD
    # failures through before it trips and one probe per trip; calls admitted before the
    # trip may still be running (one per other pool process).
    bound = processes * THRESHOLD + sum(tally.trips.values()) * PROBES + (CONCURRENCY - 1)
    lost = set(ids) - set(tally.executions) - tally.failed
    duplicated = {task_id: runs for task_id, runs in tally.executions.items() if runs > 1}
    strategies = next((line for line in log.splitlines() if "deferring tasks by" in line), "")
    RESULTS.append(
        f"| {cell.label} | {strategies.rpartition('deferring tasks by ')[2]} | {len(lost)} | {len(duplicated)} | "
        f"{len(tally.failed)} | {outage_calls} (bound {bound}) | {outage_s:.1f} | {drain_s:.1f} |"
    )
    print(f"\n[deployment] {RESULTS[-1]}  (recovered at +{recovered - began:.1f} s)")
    assert not lost, sorted(lost)
    assert not duplicated, duplicated
    assert set(tally.failures) <= {"DownstreamError"}, tally.failures
    # (a store that did not answer within its socket timeout, as on a starved machine, has a
    # breaker of each process stand in, which counts its failures from none: the log says so)
    assert len(tally.failed) <= processes * (THRESHOLD - 1), (tally.failures, _warnings(log))
    assert outage_calls <= bound, counts
    assert counts.get("outage", {}).get("ok", 0) == 0
    assert "Unrecoverable error" not in log
    assert "could not defer it by" not in log  # the first strategy took every deferral


def _warnings(log: str, most: int = 30) -> list[str]:
    """The worker log's WARNING and ERROR lines (the last ``most``): what a failed bound shows."""
    return [line for line in log.splitlines() if "WARNING/" in line or "ERROR/" in line][-most:]


def test_zz_print_the_deployment_table() -> None:
    """The matrix as a table (run with ``-s``)."""
    if RESULTS:
        print(
            "\n| deployment | deferred by | lost | duplicated | failed | downstream calls while down | "
            "outage s | drain s |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(RESULTS)
        )
