"""Deferred tasks through what RabbitMQ's definitions go through: a node reset, a plain restart, exchanges deleted.

broker-delay's runs wait in the ``celery_delayed_*`` queues and come back through
``celery_delayed_delivery``, bound to each queue by its token. Each case below lost
tasks silently before: the pool processes declared that topology once per process and
published without confirms, so a publish to an exchange that no longer existed vanished;
and a transient queue, deleted by a restart, came back bound to nothing. Countdowns on
quorum queues, routed by Celery through the default queue's key, are here too.

These tests restart their broker, so they have a RabbitMQ of their own (not the
session's). Real prefork workers; a handful of tasks each.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_breaker import CircuitBreaker
from celery_breaker.storage import close_stores
from tests.integration.backlog_proj import BREAKER, TASK, deferred_key, executions_key
from tests.integration.deployments import APP, Deployment, deploy
from tests.integration.downstream import Downstream
from tests.integration.workers import WorkerProcess, wait_for
from tests.rabbitmq import RabbitMQServer
from tests.servers import RedisServer

pytestmark = pytest.mark.slow

#: The breaker's policy: held open, tasks are deferred by a second at a time.
POLICY = {"failure_threshold": 1, "reset_timeout": 1.0}
#: Seconds a run deferred just before a restart waits: longer than the restart and the
#: worker's reconnection take (Celery's consumer reconnects 12 s after the loss).
DUE_AFTER_RESTART = 18.0


@pytest.fixture(scope="module")
def own_rabbitmq() -> Iterator[RabbitMQServer]:
    """A RabbitMQ for this module alone: its tests stop, reset and start it."""
    with RabbitMQServer() as server:
        server.start()
        yield server


@pytest.fixture(autouse=True)
def _let_go() -> Iterator[None]:
    yield
    close_stores()


@contextlib.contextmanager
def held_open(cell: Deployment, policy: dict[str, Any] = POLICY) -> Iterator[CircuitBreaker]:
    """The deployment's breaker, forced open from here until the block ends (then closed)."""
    breaker = CircuitBreaker(BREAKER, policy, storage=cell.store_url)
    breaker.force_open()
    try:
        yield breaker
    finally:
        breaker.close()


def reconnections(worker: WorkerProcess) -> int:
    return worker.log().count("Connected to amqp://")


def outage(cell: Deployment, publisher: Any, url: str, count: int, **options: Any) -> list[str]:
    """Send ``count`` tasks while the breaker is held open; return once each was deferred."""
    client = redis.Redis.from_url(cell.counter_url, decode_responses=True)
    before = client.scard(deferred_key(cell.ns))
    with held_open(cell):
        ids = [publisher.send_task(TASK, args=(cell.ns, url, n), **options).id for n in range(count)]
        wait_for(lambda: client.scard(deferred_key(cell.ns)) >= before + count, 60, f"{count} tasks deferred")
    return ids


def each_ran_once(cell: Deployment, ids: list[str], timeout: float = 30) -> None:
    client = redis.Redis.from_url(cell.counter_url, decode_responses=True)
    wait_for(lambda: set(ids) <= set(client.hkeys(executions_key(cell.ns))), timeout, "every task run (none lost)")
    runs = client.hgetall(executions_key(cell.ns))
    assert {task_id: runs[task_id] for task_id in ids} == dict.fromkeys(ids, "1")


def test_a_broker_reset_under_a_worker_loses_no_task_deferred_after_it(
    own_rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """RabbitMQ restarted without its data (a node reset, a container without a volume):
    every exchange and queue is gone. The pool processes had declared the delay topology
    once, and published into exchanges that no longer existed: 7 of 12 tasks lost."""
    cell = deploy("rabbitmq-classic", "redis", "park", rabbitmq=own_rabbitmq, redis_server=redis_server,
                  policy=POLICY, breaker_defer_spread=0)  # fmt: skip
    publisher = cell.publisher()
    try:
        with Downstream() as downstream, cell.worker() as worker:
            each_ran_once(cell, outage(cell, publisher, downstream.url, 2))  # (each pool process has published)
            own_rabbitmq.stop()
            shutil.rmtree(own_rabbitmq.workdir / "mnesia")
            own_rabbitmq.start()
            wait_for(lambda: reconnections(worker) >= 2, 60, "the worker connected again")
            publisher.close()
            publisher = cell.publisher()
            each_ran_once(cell, outage(cell, publisher, downstream.url, 6))
            assert worker.process.poll() is None, worker.log()
    finally:
        publisher.close()


def test_delay_exchanges_deleted_under_a_live_worker_lose_no_task(
    own_rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """The pool processes' first publish after the delay exchanges were deleted (no
    reconnection, so nothing told them): without publisher confirms RabbitMQ's 404
    closed the channel after the message was gone, and that task was lost."""
    cell = deploy("rabbitmq-classic", "redis", "park", rabbitmq=own_rabbitmq, redis_server=redis_server,
                  policy=POLICY, breaker_defer_spread=0)  # fmt: skip
    publisher = cell.publisher()
    try:
        with Downstream() as downstream, cell.worker() as worker:
            each_ran_once(cell, outage(cell, publisher, downstream.url, 2))
            with publisher.connection_for_write() as connection:
                channel = connection.channel()
                for exchange in ("celery_delayed_27", "celery_delayed_delivery"):
                    channel.exchange_delete(exchange)
            each_ran_once(cell, outage(cell, publisher, downstream.url, 4))
            assert reconnections(worker) == 1  # (the consumer did not restart: the pool processes found it)
    finally:
        publisher.close()


def test_a_transient_queue_gets_its_delayed_tasks_back_after_a_restart(
    own_rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """A plain restart deletes a transient (``durable=False``) queue with its binding to
    ``celery_delayed_delivery``; kombu declares the queue again, bound to nothing, and
    the pool processes still took it for bound. Runs waiting in the (durable) delay
    queues through the restart were dropped when they came due: 0 of 3 ran."""
    # Celery's consumer tries again 0, 2, 6 and 12 s after it lost the broker: the runs
    # must come due after it is back (before that their queue does not exist at all).
    policy = {"failure_threshold": 1, "reset_timeout": DUE_AFTER_RESTART}
    cell = deploy("rabbitmq-classic", "redis", "park", rabbitmq=own_rabbitmq, redis_server=redis_server,
                  policy=policy, breaker_defer_spread=0, breaker_consumer_timeout=60)  # fmt: skip
    transient = {"exchange": cell.queue, "routing_key": cell.queue, "queue_durable": False, "exchange_durable": False}
    cell.conf["task_queues"] = {cell.queue: transient}
    publisher = cell.publisher(task_queues={cell.queue: transient})
    client = redis.Redis.from_url(cell.counter_url, decode_responses=True)
    try:
        with Downstream() as downstream, cell.worker() as worker:
            with held_open(cell, policy):
                waiting = [publisher.send_task(TASK, args=(cell.ns, downstream.url, n)).id for n in range(3)]
                wait_for(lambda: client.scard(deferred_key(cell.ns)) >= 3, 30, "3 tasks deferred")
                deferred_at = time.monotonic()
                own_rabbitmq.stop()
                own_rabbitmq.start()
                wait_for(lambda: reconnections(worker) >= 2, 60, "the worker connected again")
                assert time.monotonic() - deferred_at < DUE_AFTER_RESTART - 1, "reconnected after they came due"
            each_ran_once(cell, waiting, timeout=DUE_AFTER_RESTART + 10)
            assert f"deferred {DUE_AFTER_RESTART:.1f} s" in worker.log()
    finally:
        publisher.close()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_countdown_deferral_comes_back_to_its_named_queue(
    queue_type: str, own_rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """A task sent to a queue of its own on a topic exchange (``queue=``), deferred by
    countdown. On quorum queues Celery delays a countdown in RabbitMQ by the routing key
    of the message's queue, which it took to be ``task_default_queue``: the task went to
    the default queue, which this worker does not consume (0 of 4 ran)."""
    cell = deploy(f"rabbitmq-{queue_type}", "redis", "countdown", rabbitmq=own_rabbitmq, redis_server=redis_server,
                  policy=POLICY, breaker_defer_spread=0)  # fmt: skip
    arguments = {"x-queue-type": "quorum"} if queue_type == "quorum" else {}
    named = f"named-{cell.ns}"
    queues = {
        cell.queue: {"exchange": cell.queue, "exchange_type": "topic", "routing_key": cell.queue,
                     "queue_arguments": arguments},
        named: {"exchange": f"ex-{cell.ns}", "exchange_type": "topic", "routing_key": f"named.{cell.ns}",
                "queue_arguments": arguments},
    }  # fmt: skip
    cell.conf["task_queues"] = queues
    publisher = cell.publisher(task_queues=queues)
    try:
        with publisher.connection_for_write() as connection:  # (both queues exist, as a deployment has them)
            for queue in publisher.amqp.queues.values():
                queue.bind(connection.default_channel).declare()
        with Downstream() as downstream, WorkerProcess(
            cell.broker_url, extra_conf=json.dumps(cell.conf), name=f"w-{cell.ns}", app=APP, env=cell.env,
            queues=named,
        ) as worker:  # fmt: skip
            worker.wait_ready()
            each_ran_once(cell, outage(cell, publisher, downstream.url, 4, queue=named))
        left = {row["name"]: row["messages"] for row in own_rabbitmq.queues("name", "messages")}
        assert left.get(cell.queue, 0) == 0  # nothing strayed into the default queue
        assert "cannot be told" not in worker.log()
    finally:
        publisher.close()


def test_a_deferral_rabbitmq_confirms_late_is_sent_once(
    own_rabbitmq: RabbitMQServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under a memory alarm RabbitMQ blocks publishers: the confirm does not come in time,
    # but the message is on the wire and routed once the alarm clears. Taking the timeout
    # for a failure published it again, then once more by countdown: three copies.
    from celery import Celery
    from kombu.connection import Connection

    from celery_breaker.integration.deferral import broker_delay
    from celery_breaker.integration.deferral.countdown import CountdownRepublish
    from celery_breaker.integration.deferral.defer import _deliver
    from celery_breaker.integration.deferral.plan import DeferralPlan

    monkeypatch.setattr(broker_delay, "CONFIRM_TIMEOUT", 2.0)
    app = Celery("confirm-late", broker=own_rabbitmq.url, set_as_current=False)
    app.conf.task_default_queue = queue = f"confirm-late-{time.monotonic_ns()}"

    @app.task(bind=True, name="confirm.late")
    def job(self: Any, n: int) -> int:
        return n

    app.finalize()
    with app.connection_for_write() as connection:
        app.amqp.queues[queue].bind(connection.default_channel).declare()
    strategies = (broker_delay.BrokerDelay(), CountdownRepublish(whole_seconds=True))

    def defer(task_id: str) -> str:
        job.push_request(id=task_id, args=(1,), kwargs={}, delivery_info={"exchange": "", "routing_key": queue})
        try:
            plan = DeferralPlan(delay=1.0, count=1, since=time.time())
            deferral = types.SimpleNamespace(task=job, args=(1,), kwargs={}, headers={}, plan=plan)
            strategy, _ = _deliver(deferral, strategies)  # type: ignore[arg-type]
            return str(strategy.name)
        finally:
            job.pop_request()

    assert defer("before") == "broker-delay"  # (the connection made, the topology declared)
    own_rabbitmq.rabbitmqctl("set_vm_memory_high_watermark", "absolute", "1")
    try:
        assert defer("blocked") == "broker-delay"  # (counted as deferred, not sent again)
    finally:
        own_rabbitmq.rabbitmqctl("set_vm_memory_high_watermark", "0.4")
    copies: dict[str, int] = {}
    with Connection(own_rabbitmq.url) as connection:  # type: ignore[no-untyped-call]
        simple = connection.SimpleQueue(queue)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(copies.values()) < 3:
            with contextlib.suppress(simple.Empty):
                message = simple.get(timeout=1)
                copies[message.headers["id"]] = copies.get(message.headers["id"], 0) + 1
                message.ack()
            if copies == {"before": 1, "blocked": 1}:
                time.sleep(3)  # (long enough for a second copy, if one was sent, to come due)
                with contextlib.suppress(simple.Empty):
                    extra = simple.get(timeout=1)
                    copies[extra.headers["id"]] += 1
                break
        simple.close()
    assert copies == {"before": 1, "blocked": 1}
