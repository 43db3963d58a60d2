"""Every form a task message takes comes back the same task through a deferral, on real brokers and workers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
import redis

from celery_breaker import CircuitBreaker
from celery_breaker.storage import close_stores
from tests.integration.backlog_proj import (
    BREAKER,
    MIRROR_TASK,
    PLAIN_SLOW_TASK,
    deferral_counts_key,
    executions_key,
    mirrored_key,
)
from tests.integration.deployments import deploy
from tests.integration.workers import wait_for
from tests.rabbitmq import RabbitMQServer
from tests.servers import RedisServer

pytestmark = pytest.mark.slow

POLICY = {"failure_threshold": 1, "reset_timeout": 1.0}


@pytest.fixture(autouse=True)
def _let_go() -> Iterator[None]:
    yield
    close_stores()


def test_a_held_countdown_handed_back_from_a_busy_pool_keeps_its_compression(
    rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """A countdown deferral that comes due while every pool process is busy is handed back
    to its queue (``handover.py``). kombu gives the held body decompressed, and the copy
    went out without its compression: a task sent compressed waited in RabbitMQ as large
    as it was uncompressed, and every later deferral of it too (its request named no
    compression any more)."""
    cell = deploy("rabbitmq-classic", "redis", "countdown", rabbitmq=rabbitmq, redis_server=redis_server,
                  policy=POLICY, breaker_defer_spread=0)  # fmt: skip
    client = redis.Redis.from_url(cell.counter_url)
    publisher = cell.publisher()
    breaker = CircuitBreaker(BREAKER, POLICY, storage=cell.store_url)
    breaker.force_open()
    try:
        with cell.worker(concurrency=1) as started:
            ids = [publisher.send_task(MIRROR_TASK, args=(cell.ns, "bzip2", "x" * 10_000), compression="bzip2").id
                   for _ in range(2)]  # fmt: skip
            wait_for(lambda: client.hlen(deferral_counts_key(cell.ns)) >= len(ids), 30, "every task deferred")
            publisher.send_task(PLAIN_SLOW_TASK, args=(cell.ns, 3.0))  # (the one process, taken while they come due)
            breaker.close()
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= len(ids), 30, "the tasks after the close")
            log = started.log()
    finally:
        with contextlib.suppress(Exception):
            breaker.close()
        publisher.close()
    assert "handed back to queue" in log
    runs = [json.loads(raw) for raw in client.lrange(mirrored_key(cell.ns), 0, -1)]
    assert [(run["compression"], run["args"]) for run in runs] == [
        ("application/x-bz2", repr(("bzip2", "x" * 10_000)))
    ] * len(ids)
