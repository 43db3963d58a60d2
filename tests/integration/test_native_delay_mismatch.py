"""Deferred tasks where neither broker-delay nor Celery's native delayed delivery can be set up for a queue.

On a vhost where another app (default settings) already declared the delay queues as
quorum queues, an app whose ``broker_native_delayed_delivery_queue_type`` is
``"classic"`` over quorum app queues meets a 406 on both topologies: Celery's worker
logs CRITICAL and never binds the app's queues to ``celery_delayed_delivery``, and
broker-delay's levels cannot be declared either. A countdown deferral then went through
Celery's delay queues (RabbitMQ confirmed it) and never came back. Real prefork workers
and a real RabbitMQ, a vhost of the test's own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from kombu.common import Broadcast
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.transport.native_delayed_delivery import (
    calculate_routing_key,
    declare_native_delayed_delivery_exchanges_and_queues,
)

from celery_breaker import CircuitBreaker
from celery_breaker.integration.deferral import broker_delay, native_delay
from celery_breaker.storage import close_stores
from tests.integration.backlog_proj import BREAKER, EARLY_ACK_TASK, TASK, executions_key, failed_ids_key
from tests.integration.deployments import Deployment, deploy
from tests.integration.downstream import Downstream
from tests.integration.workers import wait_for
from tests.rabbitmq import RabbitMQServer, own_vhost, taken_off
from tests.servers import RedisServer

pytestmark = pytest.mark.slow

#: Held open, tasks are deferred by a second at a time.
POLICY = {"failure_threshold": 1, "reset_timeout": 1.0}


@pytest.fixture(autouse=True)
def _let_go() -> Iterator[None]:
    yield
    close_stores()


@contextlib.contextmanager
def held_open(cell: Deployment) -> Iterator[None]:
    breaker = CircuitBreaker(BREAKER, POLICY, storage=cell.store_url)
    breaker.force_open()
    try:
        yield
    finally:
        breaker.close()


def deferred_while_open_then_run(cell: Deployment, task: str, client: redis.Redis) -> tuple[list[str], str]:
    """Four runs of ``task`` sent while the breaker is held open, each deferred and back
    three times; then the breaker closed and every run done (none lost, none failed): the
    runs' ids and the worker's log."""
    publisher = cell.publisher()
    try:
        with Downstream() as downstream, cell.worker() as started:
            with held_open(cell):
                ids = [publisher.send_task(task, args=(cell.ns, downstream.url, n)).id for n in range(4)]
                wait_for(lambda: started.log().count("retry: deferred") >= 3 * len(ids), 30, "runs back, open")
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= len(ids), 20, "every task run (none lost)")
            return ids, started.log()
    finally:
        publisher.close()


def _declare_both_topologies(url: str, queue_type: str, *, celery: bool = True) -> None:
    """What an app with these delay queue types leaves on the vhost: Celery's delay
    topology (unless not ``celery``) and broker-delay's."""
    with Connection(url) as connection:  # type: ignore[no-untyped-call]
        if celery:
            declare_native_delayed_delivery_exchanges_and_queues(connection, queue_type)
        channel = connection.channel()
        broker_delay._declare_levels(channel, queue_type)
        channel.close()


#: Each way neither delay can be set up for the app's quorum queue: the delay queues
#: exist as quorum queues and the app says classic (a 406 for both), or the app's user
#: may not configure them (a 403; an administrator declared broker-delay's). With broker-delay
#: (``park``, the default) and without it (``breaker_park=False``: the countdown alone).
CASES = [
    pytest.param("other-type", "park", TASK, id="other-type-late-ack"),
    pytest.param("other-type", "park", EARLY_ACK_TASK, id="other-type-early-ack"),
    pytest.param("other-type", "countdown", TASK, id="other-type-no-broker-delay"),
    pytest.param("no-configure", "park", TASK, id="no-configure-late-ack"),
]


@pytest.mark.parametrize(("case", "mode", "task"), CASES)
def test_a_deferral_neither_delay_can_take_is_never_lost(
    case: str, mode: str, task: str, rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """Every task deferred while neither broker-delay nor Celery's native delay is set up
    for its queue comes back while the breaker is open, runs once after it closes, and
    each pool process says at ERROR (once) which setting to change. Before, the
    countdown copies went into Celery's delay queues, were confirmed, and never came back."""
    cell = deploy("rabbitmq-quorum", "redis", mode, rabbitmq=rabbitmq, redis_server=redis_server, policy=POLICY,
                  breaker_defer_spread=0, broker_native_delayed_delivery_queue_type="classic")  # fmt: skip
    client = redis.Redis.from_url(cell.counter_url, decode_responses=True)
    user, password = ("guest", "guest") if case == "other-type" else (f"u-{cell.ns}", "secret")
    with own_vhost(rabbitmq, "nodelay", user=user, password=password) as vhost:
        if case == "other-type":
            _declare_both_topologies(vhost.url, "quorum")
        else:
            # (Celery's levels an administrator declared would serve: bound, they bring copies back)
            _declare_both_topologies(vhost.url.replace(f"{user}:{password}", "guest:guest"), "classic", celery=False)
            rabbitmq.rabbitmqctl("set_permissions", "--vhost", vhost.name, user,
                                 "^(?!celery_delayed_|celery_breaker_delayed_).*", ".*", ".*")  # fmt: skip
        cell.broker_url = vhost.url
        ids, log = deferred_while_open_then_run(cell, task, client)
    assert client.hgetall(executions_key(cell.ns)) == dict.fromkeys(ids, "1")
    errors = [line for line in log.splitlines() if "ERROR/ForkPoolWorker" in line]
    assert 1 <= len(errors) <= 2, errors  # (one per pool process, throttled)
    assert "broker_native_delayed_delivery_queue_type" in errors[0]
    assert cell.queue in errors[0]
    if case == "other-type" and mode == "park":  # (the worker says why broker-delay is not used, too)
        assert "ERROR/MainProcess] celery-breaker: broker-delay's delay queues exist" in log


def test_a_connection_that_found_the_native_delay_not_set_up_looks_again_a_minute_later(
    rabbitmq: RabbitMQServer,
) -> None:
    """Once the operator has deleted the delay queues of the other type, a connection that
    found them looks again after ``LOOK_AGAIN_AFTER`` (a manual clock here) and binds the
    queue: its countdowns go through Celery's delay again, without a worker restart."""
    now = [0.0]
    with own_vhost(rabbitmq, "lookagain") as vhost:
        _declare_both_topologies(vhost.url, "quorum")
        app = Celery("lookagain", broker=vhost.url, set_as_current=False)
        queue = Queue("work", Exchange("work", type="topic"), routing_key="work",  # type: ignore[no-untyped-call]
                      queue_arguments={"x-queue-type": "quorum"})  # fmt: skip
        app.conf.update(task_queues=[queue], broker_native_delayed_delivery_queue_type="classic")
        with Connection(vhost.url) as connection:  # type: ignore[no-untyped-call]
            queue.bind(connection.default_channel).declare()  # type: ignore[no-untyped-call]
            found = native_delay.NativeDelay(connection, app, clock=lambda: now[0])
            assert "PRECONDITION_FAILED" in repr(found.problem(queue))
            operator = connection.channel()
            for level in range(28):
                operator.queue_delete(f"celery_delayed_{level}")
            operator.close()
            now[0] += native_delay.LOOK_AGAIN_AFTER - 1
            assert found.problem(queue) is not None  # (not yet: once a minute)
            now[0] += 1
            assert found.problem(queue) is None
        bindings = rabbitmq.rabbitmqctl("list_bindings", "--vhost", vhost.name, "source_name", "destination_name")
        assert "celery_delayed_delivery\twork" in bindings


def test_a_countdown_refused_on_its_way_into_the_delay_queues_goes_straight_back(
    rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """A length policy of 0 on Celery's delay queues (with their ``x-overflow:
    reject-publish``): RabbitMQ refuses every countdown copy. An early-acknowledged task
    failed (``could not be deferred``); now it goes straight back to its queue, and runs
    once the breaker closes."""
    cell = deploy("rabbitmq-quorum", "redis", "countdown", rabbitmq=rabbitmq, redis_server=redis_server,
                  policy=POLICY, breaker_defer_spread=0)  # fmt: skip
    client = redis.Redis.from_url(cell.counter_url, decode_responses=True)
    with own_vhost(rabbitmq, "refused") as vhost:
        rabbitmq.rabbitmqctl("set_policy", "--vhost", vhost.name, "--apply-to", "queues", "full",
                             "^celery_delayed_", '{"max-length": 0}')  # fmt: skip
        cell.broker_url = vhost.url
        ids, log = deferred_while_open_then_run(cell, EARLY_ACK_TASK, client)
    assert client.hgetall(executions_key(cell.ns)) == dict.fromkeys(ids, "1")
    assert client.scard(failed_ids_key(cell.ns)) == 0
    assert "MessageNacked" in log
    assert "could not be deferred" not in log


def test_delay_queues_an_administrator_declared_serve_a_user_who_may_not_configure_them(
    rabbitmq: RabbitMQServer,
) -> None:
    """An administrator declared Celery's delay levels (the app's user may write to them
    and read them, not configure them, as a hardened vhost has it): they bring copies
    back once the queue is bound, which needs no configure permission. The countdown
    used them before; a 403 on declaring them sent every run straight back without its
    delay (an ERROR a minute) for as long as it lasted."""
    user = f"u-{time.monotonic_ns()}"
    with own_vhost(rabbitmq, "admin", user=user, password="secret") as vhost:
        admin_url = vhost.url.replace(f"{user}:secret", "guest:guest")
        with Connection(admin_url) as admin:  # type: ignore[no-untyped-call]
            declare_native_delayed_delivery_exchanges_and_queues(admin, "quorum")
        rabbitmq.rabbitmqctl("set_permissions", "--vhost", vhost.name, user, "^(?!celery_delayed_).*", ".*", ".*")
        app = Celery("hardened", broker=vhost.url, set_as_current=False)
        queue = Queue("work", Exchange("work", type="topic"), routing_key="work",  # type: ignore[no-untyped-call]
                      queue_arguments={"x-queue-type": "quorum"})  # fmt: skip
        app.conf.update(task_queues=[queue])
        with Connection(vhost.url) as connection:  # type: ignore[no-untyped-call]
            queue.bind(connection.default_channel).declare()  # type: ignore[no-untyped-call]
            found = native_delay.prepare(connection, app)
            assert found is not None
            assert found.problem(queue) is None
            producer = connection.Producer()
            producer.publish({"n": 1}, exchange="celery_delayed_27", routing_key=calculate_routing_key(1, "work"))
            back: list[Any] = []

            def came_back() -> bool:
                back.extend(taken_off(vhost.url, queue))
                return bool(back)

            wait_for(came_back, 10, "the copy back through the administrator's levels")
        assert [message.payload for message in back] == [{"n": 1}]


def test_a_broadcast_queue_is_not_bound_to_the_native_delay(rabbitmq: RabbitMQServer) -> None:
    """Celery's step binds every queue of the app but a ``Broadcast`` one; bound here, its
    fanout exchange took every delayed copy keyed ``...celery`` (its routing key, the
    app's default) from ``celery_delayed_delivery``, so a countdown for the default queue
    also reached each worker's broadcast queue: run once more per worker."""
    with own_vhost(rabbitmq, "broadcast") as vhost:
        app = Celery("broadcast", broker=vhost.url, set_as_current=False)
        default = Queue("celery", Exchange("celery", type="topic"), routing_key="celery",  # type: ignore[no-untyped-call]
                        queue_arguments={"x-queue-type": "quorum"})  # fmt: skip
        app.conf.update(task_queues=[default, Broadcast("broadcast_tasks")])  # type: ignore[no-untyped-call]
        broadcast = next(queue for queue in app.amqp.queues.values() if isinstance(queue, Broadcast))
        with Connection(vhost.url) as connection:  # type: ignore[no-untyped-call]
            for queue in (default, broadcast):
                queue.bind(connection.default_channel).declare()  # type: ignore[no-untyped-call]  # (as a worker does)
            assert native_delay.prepare(connection, app) is not None
            producer = connection.Producer()
            producer.publish({"n": 1}, exchange="celery_delayed_27", routing_key=calculate_routing_key(1, "celery"))
            back: list[Any] = []

            def came_back() -> bool:
                back.extend(taken_off(vhost.url, default))
                return bool(back)

            wait_for(came_back, 10, "the copy back to the default queue")
            assert taken_off(vhost.url, broadcast) == []
        bindings = rabbitmq.rabbitmqctl("list_bindings", "--vhost", vhost.name, "source_name", "destination_name")
        assert "celery_delayed_delivery\tbroadcast_tasks" not in bindings
