"""What each broker does to a deferred task, tried with real prefork workers: RabbitMQ's consumer_timeout,
quorum queues with early acknowledgement, expiry, every serializer, a store restarted under
parked tasks, and Celery's canvas through an outage.

Most cases force the breaker open from here through the Redis store the workers share
(``breaker_storage_url``), so the outage lasts exactly as long as the test says.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import chain, chord, group
from celery.result import AsyncResult

from celery_breaker import CircuitBreaker
from celery_breaker.storage import close_stores
from tests.integration import routes_proj
from tests.integration.backlog_proj import (
    BREAKER,
    EARLY_ACK_TASK,
    HIDDEN_TASK,
    PLAIN_SLOW_TASK,
    RETRY_ELSEWHERE_TASK,
    RETRY_TO_ITS_QUEUE_TASK,
    SLOW_TASK,
    TASK,
    UNBOUNDED_SLOW_TASK,
    add,
    deferral_counts_key,
    deferred_key,
    executions_key,
    failed_ids_key,
    failures_key,
    finished_key,
    links_key,
    note,
    note_error,
    refuse,
    revoked_key,
    seen_key,
    shown_key,
    total,
)
from tests.integration.deployments import CONSUMER_TIMEOUT_S, Deployment, deploy
from tests.integration.downstream import Downstream
from tests.integration.event_capture import Events
from tests.integration.workers import WorkerProcess, wait_for
from tests.rabbitmq import RabbitMQServer
from tests.servers import RedisServer

pytestmark = pytest.mark.slow

#: The downstream of tasks that never reach it (their breaker is forced open until they expire).
NO_URL = "http://127.0.0.1:9/unused"


@contextlib.contextmanager
def held_open(cell: Deployment, policy: dict[str, Any]) -> Iterator[CircuitBreaker]:
    """The deployment's breaker, forced open from here until the block ends (then closed)."""
    breaker = CircuitBreaker(BREAKER, policy, storage=cell.store_url)
    breaker.force_open()
    try:
        yield breaker
    finally:
        breaker.close()


def counts(cell: Deployment) -> redis.Redis:
    return redis.Redis.from_url(cell.counter_url, decode_responses=True)


@pytest.fixture(autouse=True)
def _let_go() -> Iterator[None]:
    yield
    close_stores()  # this process's connections to the stores of the test's servers
    # AsyncResults in reference cycles (a chain's parents) are collected while their result
    # backend still answers: collected after the module's Redis stops, each __del__ raises.
    gc.collect()


# -- RabbitMQ's consumer_timeout ----------------------------------------------------


def test_a_breaker_open_longer_than_the_consumer_timeout_never_stops_the_worker(
    rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """Without the cap a deferral would wait a minute in the worker, and RabbitMQ would
    close its channel after CONSUMER_TIMEOUT_S: "Unrecoverable error", exit code 1."""
    policy = {"failure_threshold": 1, "reset_timeout": 60.0}
    cell = deploy("rabbitmq-classic", "redis", "countdown", rabbitmq=rabbitmq, redis_server=redis_server,
                  policy=policy, breaker_defer_spread=0)  # fmt: skip
    client = counts(cell)
    publisher = cell.publisher()
    try:
        with Downstream() as downstream, cell.worker() as started:
            with held_open(cell, policy):
                ids = [publisher.send_task(TASK, args=(cell.ns, downstream.url, n)).id for n in range(4)]

                def deferred_twice() -> bool:
                    found = client.hgetall(deferral_counts_key(cell.ns))
                    return all(int(found.get(task_id, 0)) >= 2 for task_id in ids)

                # Each deferral is held at most 0.9 x CONSUMER_TIMEOUT_S, then deferred again.
                waited = wait_for(deferred_twice, 60, "every task deferred twice")
                assert waited > 0.9 * CONSUMER_TIMEOUT_S - 1  # (a held deferral came back, and went again)
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= len(ids), 60, "the tasks after the close")
            assert started.process.poll() is None, started.log()
        assert "Unrecoverable error" not in started.log()
        assert client.hgetall(executions_key(cell.ns)) == dict.fromkeys(ids, "1")
    finally:
        publisher.close()


def test_a_broker_given_as_a_list_of_urls_is_rabbitmq_to_the_worker(
    rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """Celery takes a list of broker URLs (failover: ``broker_url=["amqp://a//",
    "amqp://b//"]``). celery-breaker read it as ``str(list)``, which named no broker: its
    tasks were deferred by countdowns capped by nothing, held by the worker past
    RabbitMQ's consumer_timeout, and RabbitMQ closed the channel ("Unrecoverable
    error: PreconditionFailed", the worker exited). Now it is RabbitMQ: broker-delay."""
    _outlives_the_consumer_timeout(rabbitmq, redis_server, broker_url=[rabbitmq.url])


def test_a_broker_given_by_host_and_port_alone_is_rabbitmq_to_the_worker(
    rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """A broker with no URL (``broker_host`` and ``broker_port``; or none at all, Celery's
    default ``amqp://guest@localhost//``) is RabbitMQ, kombu's default transport:
    celery-breaker found no scheme in it and took it for an unknown broker, with the
    same uncapped countdowns and the same exit."""
    _outlives_the_consumer_timeout(
        rabbitmq, redis_server, broker_url=None, broker_host="127.0.0.1", broker_port=rabbitmq.port
    )


def _outlives_the_consumer_timeout(rabbitmq: RabbitMQServer, redis_server: RedisServer, **broker: Any) -> None:
    """A breaker held open past RabbitMQ's consumer_timeout under a worker whose broker is
    given by ``broker`` (settings): it defers by broker-delay, stays up, and every task
    runs once after the close."""
    policy = {"failure_threshold": 1, "reset_timeout": 60.0}
    cell = deploy("rabbitmq-classic", "redis", "park", rabbitmq=rabbitmq, redis_server=redis_server,
                  policy=policy, breaker_defer_spread=0, **broker)  # fmt: skip
    client = counts(cell)
    publisher = cell.publisher()
    try:
        with Downstream() as downstream, cell.worker() as started:
            with held_open(cell, policy):
                ids = [publisher.send_task(TASK, args=(cell.ns, downstream.url, n)).id for n in range(4)]
                wait_for(lambda: client.hlen(deferral_counts_key(cell.ns)) >= len(ids), 30, "every task deferred")
                time.sleep(CONSUMER_TIMEOUT_S + 2)  # (observing: RabbitMQ checks each channel every second)
                assert started.process.poll() is None, started.log()
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= len(ids), 60, "the tasks after the close")
            log = started.log()
        assert "deferring tasks by broker-delay then countdown (broker amqp)" in log
        assert "Unrecoverable error" not in log
        assert client.hgetall(executions_key(cell.ns)) == dict.fromkeys(ids, "1")
    finally:
        publisher.close()


def test_a_task_run_after_a_held_countdown_has_the_whole_consumer_timeout(
    rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """A countdown deferral is held by the worker up to 0.9 x breaker_consumer_timeout,
    and RabbitMQ's consumer_timeout counts from the delivery to the acknowledgement (after
    the run, acks_late): a task without a time limit whose run takes half the window,
    fine undeferred, was run in the held delivery once the breaker closed, and RabbitMQ
    closed the channel: "Unrecoverable error: PreconditionFailed", the worker exited, and
    the task ran again on the next. A held delivery is now sent again (no countdown)
    before it runs, so the run has the whole window."""
    policy = {"failure_threshold": 1, "reset_timeout": 60.0}  # (capped at 0.9 x CONSUMER_TIMEOUT_S)
    cell = deploy("rabbitmq-classic", "redis", "countdown", rabbitmq=rabbitmq, redis_server=redis_server,
                  policy=policy, breaker_defer_spread=0)  # fmt: skip
    client = counts(cell)
    publisher = cell.publisher()
    run_for = CONSUMER_TIMEOUT_S / 2
    try:
        with cell.worker() as started:
            with held_open(cell, policy):
                ids = [publisher.send_task(UNBOUNDED_SLOW_TASK, args=(cell.ns, run_for)).id for _ in range(2)]
                wait_for(lambda: client.scard(deferred_key(cell.ns)) >= len(ids), 30, "every task deferred")
            wait_for(lambda: client.hlen(finished_key(cell.ns)) >= len(ids) or started.process.poll() is not None,
                     60, "the tasks after the close")  # fmt: skip
            time.sleep(CONSUMER_TIMEOUT_S / 2 + 2)  # (observing: RabbitMQ checks each channel every second)
            assert started.process.poll() is None, started.log()
        assert "Unrecoverable error" not in started.log()
        assert client.hgetall(finished_key(cell.ns)) == dict.fromkeys(ids, "1")
    finally:
        publisher.close()


def test_a_held_countdown_sent_again_reads_as_its_deferral_in_celery_events(
    rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """A countdown held longer than a tenth of the broker's window is sent again before it
    runs (the test above). Celery recorded that as a RETRY whose exception was ``None``:
    Flower showed "None" as the reason, a ``task_retry`` handler read it as a retry of the
    task's own, and ``BreakerTask.on_retry`` left its frames to the cyclic GC. It reads as
    the deferral it continues now."""
    policy = {"failure_threshold": 1, "reset_timeout": 2.0}  # (held 2 s: over a tenth of CONSUMER_TIMEOUT_S)
    cell = deploy("rabbitmq-classic", "redis", "countdown", rabbitmq=rabbitmq, redis_server=redis_server,
                  policy=policy, breaker_defer_spread=0)  # fmt: skip
    client = counts(cell)
    publisher = cell.publisher()
    try:
        with Events(publisher).running() as events, cell.worker():
            with held_open(cell, policy):
                task_id = publisher.send_task(TASK, args=(cell.ns, NO_URL, 0)).id

                def retried() -> list[str]:
                    return [str(e.get("exception")) for e in events.of("task-retried") if e.get("uuid") == task_id]

                wait_for(lambda: len(retried()) >= 3, 30, "the deferral, and its countdown sent again")
            reasons = retried()
        # (each deferral is followed by its copy sent again: every one of them a CircuitOpenError)
        assert all(reason.startswith("CircuitOpenError: breaker 'downstream'") for reason in reasons), reasons
        assert any("sent again" in reason for reason in reasons), reasons
        assert int(client.hget(deferral_counts_key(cell.ns), task_id) or 0) >= len(reasons)
    finally:
        publisher.close()


def test_held_countdowns_due_while_the_pool_is_busy_are_handed_back_not_held_past_the_window(
    rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """Countdown deferrals held by the worker came due while its one pool process ran a
    long task: they waited for it, unacknowledged, past RabbitMQ's consumer_timeout, and
    RabbitMQ closed the channel ("Unrecoverable error", the worker exited; an acceptance
    test stranded 7 of 18 tasks so). The main process now publishes each again to its
    queue (confirmed) and acknowledges the held delivery: it waits in the queue."""
    policy = {"failure_threshold": 1, "reset_timeout": 60.0}  # (held 0.9 x CONSUMER_TIMEOUT_S)
    cell = deploy("rabbitmq-classic", "redis", "countdown", rabbitmq=rabbitmq, redis_server=redis_server,
                  policy=policy, breaker_defer_spread=0)  # fmt: skip
    client = counts(cell)
    publisher = cell.publisher()
    busy_for = CONSUMER_TIMEOUT_S + 2  # (longer than what the window leaves a held deferral)
    try:
        with Downstream() as downstream, cell.worker(concurrency=1) as started:
            with held_open(cell, policy):
                # (one compressed: kombu gives the held body decompressed, and a copy that kept
                # its compression header could not be decoded, and was dropped)
                ids = [
                    publisher.send_task(TASK, args=(cell.ns, downstream.url, n), compression="zlib" if n else None).id
                    for n in range(3)
                ]
                wait_for(lambda: client.hlen(deferral_counts_key(cell.ns)) >= len(ids), 30, "every task deferred")
                publisher.send_task(PLAIN_SLOW_TASK, args=(cell.ns, busy_for))  # (the one process, taken)
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= len(ids) or started.process.poll() is not None,
                     60, "the tasks after the close")  # fmt: skip
            assert started.process.poll() is None, started.log()
            log = started.log()
        assert "Unrecoverable error" not in log
        assert log.count("handed back to queue") == len(ids)
        assert "Can't decode message body" not in log
        assert client.hgetall(executions_key(cell.ns)) == dict.fromkeys(ids, "1")
        assert client.hget(finished_key(cell.ns), "plain") == "1"
    finally:
        publisher.close()


def test_a_countdown_rabbitmq_refuses_is_never_counted_as_deferred(
    rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """A RabbitMQ user who may write to the app's (topic) exchanges but not to the default
    exchange, as Celery needs no more: a countdown copy goes back by its queue's name,
    through the default exchange, and RabbitMQ refused it. Published without confirms the
    refusal raised nothing (or only at the next publish): each delivery was acknowledged
    as deferred, and every task lost (0 of 4 ran). With confirms the refusal raises: the
    delivery is requeued (acks_late), and each task runs once after the outage."""
    policy = {"failure_threshold": 1, "reset_timeout": 1.0}
    cell = deploy("rabbitmq-classic", "redis", "countdown", rabbitmq=rabbitmq, redis_server=redis_server,
                  policy=policy, breaker_defer_spread=0, task_default_exchange_type="topic")  # fmt: skip
    user = f"u-{cell.ns}"
    rabbitmq.rabbitmqctl("add_vhost", cell.ns)
    rabbitmq.rabbitmqctl("add_user", user, "secret")
    rabbitmq.rabbitmqctl("set_permissions", "-p", cell.ns, user, ".*", r"^(?!amq\.default$).*", ".*")
    cell.broker_url = f"amqp://{user}:secret@127.0.0.1:{rabbitmq.port}/{cell.ns}"
    client = counts(cell)
    publisher = cell.publisher(task_default_exchange_type="topic")
    try:
        with Downstream() as downstream, cell.worker() as started:
            with held_open(cell, policy):
                ids = [publisher.send_task(TASK, args=(cell.ns, downstream.url, n)).id for n in range(4)]
                time.sleep(4)  # (an outage: each task tries to defer, and is refused)
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= len(ids), 30, "every task run (none lost)")
            assert started.process.poll() is None, started.log()
        assert client.hgetall(executions_key(cell.ns)) == dict.fromkeys(ids, "1")
        assert "ACCESS_REFUSED - access to exchange 'amq.default'" in started.log()
    finally:
        publisher.close()
        rabbitmq.rabbitmqctl("delete_vhost", cell.ns)
        rabbitmq.rabbitmqctl("delete_user", user)


def test_a_user_who_may_not_declare_the_delay_topology_defers_by_countdown_with_one_warning(
    rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """A RabbitMQ user whose configure permission leaves out celery-breaker's delay topology
    (a pattern written for the app's own queues): broker-delay cannot declare it, and each
    run goes by countdown instead. Every deferral logged a WARNING of its own (hundreds a
    minute in an outage); now one a minute, the others at DEBUG, and every task runs once."""
    policy = {"failure_threshold": 1, "reset_timeout": 1.0}
    cell = deploy("rabbitmq-classic", "redis", "park", rabbitmq=rabbitmq, redis_server=redis_server,
                  policy=policy, breaker_defer_spread=0)  # fmt: skip
    user = f"u-{cell.ns}"
    rabbitmq.rabbitmqctl("add_vhost", cell.ns)
    rabbitmq.rabbitmqctl("add_user", user, "secret")
    rabbitmq.rabbitmqctl("set_permissions", "-p", cell.ns, user, "^(?!celery_breaker_).*", ".*", ".*")
    cell.broker_url = f"amqp://{user}:secret@127.0.0.1:{rabbitmq.port}/{cell.ns}"
    client = counts(cell)
    publisher = cell.publisher()
    try:
        with Downstream() as downstream, cell.worker(concurrency=1) as started:
            with held_open(cell, policy):
                ids = [publisher.send_task(TASK, args=(cell.ns, downstream.url, n)).id for n in range(6)]
                wait_for(lambda: started.log().count("(deferral 3)") >= len(ids), 60, "each task deferred 3 times")
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= len(ids), 60, "every task run (none lost)")
            log = started.log()
        assert client.hgetall(executions_key(cell.ns)) == dict.fromkeys(ids, "1")
        assert "ACCESS_REFUSED" in log
        assert log.count("could not defer it by broker-delay") == 1, log
        assert log.count("declaring the delay topology again") == 1, log
    finally:
        publisher.close()
        rabbitmq.rabbitmqctl("delete_vhost", cell.ns)
        rabbitmq.rabbitmqctl("delete_user", user)


# -- Redis's visibility_timeout ----------------------------------------------------------


def test_a_countdown_leaves_room_for_the_tasks_own_time_limit_within_the_visibility_timeout(
    redis_server: RedisServer,
) -> None:
    """The countdown was capped below ``visibility_timeout`` by a margin of the message's
    hard time limit only. A limit set on the task (``@app.task(time_limit=5)``, or
    ``task_time_limit``, or ``--time-limit``) is not in the message: the margin was 10 %,
    the task was held 5.4 s of the 6, then ran 3 s, and Redis gave the unacknowledged
    message to the worker again while it ran: the task ran twice (the second copy is
    in the queue, or running, when the first ends)."""
    policy = {"failure_threshold": 1, "reset_timeout": 60.0}
    options = {"visibility_timeout": 6, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
    cell = deploy("redis", "redis", "countdown", redis_server=redis_server, policy=policy, breaker_defer_spread=0,
                  broker_transport_options=options)  # fmt: skip
    client = counts(cell)
    broker = redis.Redis.from_url(cell.broker_url)
    publisher = cell.publisher()
    try:
        with cell.worker(concurrency=1):
            with held_open(cell, policy):
                task_id = publisher.send_task(SLOW_TASK, args=(cell.ns, 3.0)).id
                wait_for(lambda: bool(client.sismember(deferred_key(cell.ns), task_id)), 60, "the task deferred")
            wait_for(lambda: client.hlen(finished_key(cell.ns)) >= 1, 60, "the task run after the close")
            # Nothing left unacknowledged nor queued: Redis has nothing more to give again.
            wait_for(lambda: broker.hlen("unacked") == 0 == broker.llen(cell.queue), 60, "the task acknowledged")
        assert client.hgetall(executions_key(cell.ns)) == {task_id: "1"}
    finally:
        publisher.close()
        broker.close()


# -- quorum queues ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["park", "countdown"])
def test_quorum_queues_with_early_acknowledgement_fail_no_task_by_deferral(
    mode: str, rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """Half-second deferrals: RabbitMQ's native delayed delivery takes whole seconds of at
    least one, and kombu refuses a shorter countdown: with early acknowledgement such a
    task failed (``ValueError('countdown must be a positive number')``)."""
    policy = {"failure_threshold": 1, "reset_timeout": 0.5}
    cell = deploy("rabbitmq-quorum", "redis", mode, rabbitmq=rabbitmq, redis_server=redis_server, policy=policy,
                  breaker_defer_spread=0)  # fmt: skip
    client = counts(cell)
    publisher = cell.publisher()
    try:
        with Downstream() as downstream, cell.worker() as started:
            with held_open(cell, policy):
                ids = [publisher.send_task(EARLY_ACK_TASK, args=(cell.ns, downstream.url, n)).id for n in range(12)]
                wait_for(lambda: client.scard(deferred_key(cell.ns)) >= len(ids), 60, "every task deferred")
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= len(ids), 60, "the tasks after the close")
            log = started.log()
        assert client.scard(failed_ids_key(cell.ns)) == 0, client.hgetall(failures_key(cell.ns))
        assert client.hgetall(executions_key(cell.ns)) == dict.fromkeys(ids, "1")
        assert "countdown must be a positive number" not in log
    finally:
        publisher.close()


# -- expiry ---------------------------------------------------------------------------------


#: Each way a task can wait: a countdown a worker holds (Redis), RabbitMQ's delay queues,
#: a Redis parking released at the task's expiry (RabbitMQ), Celery's own whole-second
#: delay on quorum queues.
EXPIRY_CASES = [
    ("redis", "countdown"),
    ("rabbitmq-classic", "park"),
    ("rabbitmq-classic", "store"),
    ("rabbitmq-quorum", "countdown"),
]


@pytest.mark.parametrize(("broker", "mode"), EXPIRY_CASES)
def test_a_task_that_expires_while_deferred_or_parked_ends_revoked(
    broker: str, mode: str, rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """On RabbitMQ a deferred copy used to carry its expiry as a message TTL: the broker
    dropped it unseen, and the task stayed RETRY for ever. Now a worker receives it and
    revokes it as expired: REVOKED in the result backend, ``task_revoked(expired=True)``.
    One task expires before the breaker could admit it (it comes back just after its
    expiry); the other would be admitted in time, but the breaker stays open."""
    policy = {"failure_threshold": 1, "reset_timeout": 30.0}
    cell = deploy(broker, "redis", mode, rabbitmq=rabbitmq, redis_server=redis_server, policy=policy, results=True,
                  breaker_defer_spread=0)  # fmt: skip
    client = counts(cell)
    publisher = cell.publisher()
    results: list[AsyncResult] = []
    try:
        with cell.worker() as started, held_open(cell, policy):
            results += [publisher.send_task(TASK, args=(cell.ns, NO_URL, n), expires=3) for n in range(2)]
            try:
                wait_for(lambda: all(r.state == "REVOKED" for r in results), 60, "both tasks revoked as expired")
            except AssertionError as timed_out:  # (what the worker did with them, to tell why)
                raise AssertionError(f"{timed_out}: {[r.state for r in results]}\n{started.log()[-6_000:]}") from None
            wait_for(lambda: client.scard(revoked_key(cell.ns)) >= 2, 30, "task_revoked(expired=True) twice")
        assert client.smembers(revoked_key(cell.ns)) == {r.id for r in results}
        assert client.hlen(executions_key(cell.ns)) == 0
    finally:
        for result in results:
            result.forget()
        publisher.close()


# -- serializers ------------------------------------------------------------------------------


#: Parked tasks are decoded on release (the same code whatever the broker); RabbitMQ's
#: delay queues hand the message back as it was published, never decoded.
SERIALIZER_CASES = [
    ("pickle", "redis", "park"),
    ("msgpack", "redis", "park"),
    ("yaml", "redis", "park"),
    ("msgpack", "rabbitmq-classic", "store"),
]


@pytest.mark.parametrize(("serializer", "broker", "mode"), SERIALIZER_CASES)
def test_tasks_in_every_serializer_the_app_accepts_are_parked_and_run_once(
    serializer: str, broker: str, mode: str, rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """Parked tasks kept their content type, but were decoded with kombu's defaults, which
    refuse pickle, msgpack and yaml: every one was dropped on release (ContentDisallowed).
    They are decoded with the app's ``accept_content`` now."""
    policy = {"failure_threshold": 1, "reset_timeout": 1.0}
    conf: dict[str, Any] = {"task_serializer": serializer, "accept_content": ["json", serializer]}
    cell = deploy(broker, "redis", mode, rabbitmq=rabbitmq, redis_server=redis_server, policy=policy, **conf)
    if serializer == "pickle":
        cell.env["C_FORCE_ROOT"] = "1"  # (tests run as root here; Celery refuses pickle to root workers)
    client = counts(cell)
    publisher = cell.publisher(**conf)
    try:
        with Downstream() as downstream, cell.worker() as started:
            with held_open(cell, policy) as breaker:
                ids = [publisher.send_task(TASK, args=(cell.ns, downstream.url, n)).id for n in range(5)]
                wait_for(lambda: breaker.snapshot().deferrals >= len(ids), 60, "every task deferred")
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= len(ids), 60, "every task run after the close")
            log = started.log()
        assert client.hgetall(executions_key(cell.ns)) == dict.fromkeys(ids, "1")
        assert "dropped parked entry" not in log
        assert "ContentDisallowed" not in log
    finally:
        publisher.close()


# -- arguments hidden by argsrepr ------------------------------------------------------------


@pytest.mark.parametrize(("broker", "mode"), [("redis", "park"), ("rabbitmq-classic", "park"), ("redis", "countdown")])
def test_arguments_their_sender_hid_stay_hidden_through_every_deferral(
    broker: str, mode: str, rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """``apply_async(argsrepr=..., kwargsrepr=...)`` keeps secrets out of a worker's events
    and logs. The deferred copy (parked, delayed in RabbitMQ or by countdown) was sent
    without them, so its run showed the real card number and token."""
    policy = {"failure_threshold": 1, "reset_timeout": 1.0}
    cell = deploy(broker, "redis", mode, rabbitmq=rabbitmq, redis_server=redis_server, policy=policy)
    client = counts(cell)
    publisher = cell.publisher()
    try:
        with cell.worker():
            with held_open(cell, policy):
                task_id = publisher.send_task(
                    HIDDEN_TASK, args=(cell.ns, "4111 1111 1111 1111"), kwargs={"token": "s3cr3t"},
                    argsrepr="('****',)", kwargsrepr="{'token': '***'}",
                ).id  # fmt: skip
                wait_for(lambda: bool(client.sismember(deferred_key(cell.ns), task_id)), 60, "the task deferred")
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= 1, 60, "the task run after the close")
        assert client.lrange(shown_key(cell.ns), 0, -1) == ["('****',) {'token': '***'}"]
    finally:
        publisher.close()


# -- parking less durable than the broker -------------------------------------------------------


def test_a_store_restarted_under_parked_tasks_is_an_error_naming_the_loss(rabbitmq: RabbitMQServer) -> None:
    """Parked in a Redis store that keeps nothing on disk, while RabbitMQ would have kept the
    queued tasks: the worker says so when it starts, and says what was lost when the
    store comes back empty: one worker of two, the one whose releaser held the lookout
    (each logged it, and each counted every parked breaker every second to know)."""
    policy = {"failure_threshold": 1, "reset_timeout": 30.0}
    with RedisServer() as store_server, RedisServer() as counter_server:
        store_server.start()
        counter_server.start()
        cell = deploy("rabbitmq-classic", "redis", "store", rabbitmq=rabbitmq, redis_server=counter_server,
                      policy=policy, breaker_storage_url=f"{store_server.url}/0")  # fmt: skip
        cell.store_url = f"{store_server.url}/0"
        publisher = cell.publisher()
        try:
            with cell.worker(name="a") as first, cell.worker(name="b") as second:
                workers = (first, second)
                assert all("parked tasks live in the breaker store" in started.log() for started in workers)
                breaker = CircuitBreaker(BREAKER, policy, storage=cell.store_url)
                breaker.force_open()
                for n in range(5):
                    publisher.send_task(TASK, args=(cell.ns, NO_URL, n))
                parking = breaker.store.parking
                assert parking is not None
                tag = parking.tag(BREAKER, None)
                wait_for(lambda: parking.count(tag)[0] == 5, 30, "all 5 parked")
                wait_for(
                    lambda: any("task(s) parked (downstream: " in started.log() for started in workers), 60,
                    "a releaser counting them",
                )  # fmt: skip
                close_stores()
                store_server.kill()  # no persistence: it comes back empty
                store_server.start()
                wait_for(lambda: any("lost its parked tasks" in w.log() for w in workers), 60, "the loss reported")
                time.sleep(3)  # (each releaser asks every second: before, both reported within one)
                reported = [started for started in workers if "lost its parked tasks" in started.log()]
                assert len(reported) == 1
                started = reported[0]
                line = next(line for line in started.log().splitlines() if "lost its parked tasks" in line)
                assert "ERROR" in line
                # As many as the releaser's last count knew of (it counts every WATCH_EVERY seconds).
                found = re.search(rf"(\d) task\(s\) were parked .*\({BREAKER}: (\d)\)", line)
                assert found is not None, line
                assert 1 <= int(found.group(1)) == int(found.group(2)) <= 5
        finally:
            publisher.close()


# -- Celery's canvas through an outage ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["park", "countdown"])
@pytest.mark.parametrize("broker", ["redis", "rabbitmq-classic"])
def test_chains_groups_chords_and_links_come_through_an_outage(
    broker: str, mode: str, rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    policy = {"failure_threshold": 1, "reset_timeout": 1.0}
    cell = deploy(broker, "redis", mode, rabbitmq=rabbitmq, redis_server=redis_server, policy=policy, results=True)
    client = counts(cell)
    app = cell.publisher()
    ns = cell.ns

    def sig(task: Any, *args: Any, **kwargs: Any) -> Any:
        """The project's task as a signature of this deployment's publisher."""
        return app.signature(task.name, args=args, kwargs=kwargs)

    try:
        with cell.worker(concurrency=3):
            with held_open(cell, policy) as breaker:
                results: dict[str, AsyncResult] = {
                    "chain": chain(sig(add, 1, 2, ns=ns), sig(add, 3, ns=ns)).apply_async(),
                    "group": group(sig(add, i, i, ns=ns) for i in range(3)).apply_async(),
                    "chord": chord([sig(add, i, 1, ns=ns) for i in range(3)], sig(total, ns=ns)).apply_async(),
                    "link": sig(add, 5, 5, ns=ns).apply_async(link=sig(note, "linked", ns=ns)),
                    "link_error": sig(refuse, ns).apply_async(link_error=sig(note_error, "errored", ns=ns)),
                }
                wait_for(lambda: breaker.snapshot().deferrals >= 8, 60, "the canvas's first tasks deferred")
            assert results["chain"].get(timeout=60) == 6
            assert results["group"].get(timeout=60) == [0, 2, 4]
            assert results["chord"].get(timeout=60) == 6
            assert results["link"].get(timeout=60) == 10
            with pytest.raises(ValueError, match="refused"):
                results["link_error"].get(timeout=60)
            wait_for(lambda: client.llen(links_key(ns)) >= 2, 30, "the link and the errback")
        assert sorted(client.lrange(links_key(ns), 0, -1)) == ["errored:ValueError", "linked:10"]
        runs = client.hgetall(executions_key(ns))
        assert set(runs.values()) == {"1"}  # every task ran once: 2 + 3 + 3 + 1 (chord body) + 1
        assert len(runs) == 10
    finally:
        app.close()


# -- a retry turned into a deferral goes where the retry asked ---------------------------


@pytest.mark.parametrize(
    ("broker", "mode"), [("redis", "park"), ("rabbitmq-classic", "park"), ("rabbitmq-classic", "countdown")]
)
def test_a_retry_deferred_instead_comes_back_where_and_as_the_retry_asked(
    broker: str, mode: str, rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    # self.retry(queue=..., priority=..., time_limit=...) whose failure trips the breaker is
    # deferred instead (no retry spent). The deferral dropped the retry's options: the run
    # came back to the queue it had been sent to, with its first priority and no time
    # limits, where Celery's retry sends it to the queue asked for, with them. Parked
    # (Redis), delayed in RabbitMQ (broker-delay) or by countdown, it now comes back as the
    # retry would have.
    policy = {"failure_threshold": 1, "reset_timeout": 1.0}
    cell = deploy(broker, "redis", mode, rabbitmq=rabbitmq, redis_server=redis_server, policy=policy,
                  breaker_defer_spread=0)  # fmt: skip
    client = counts(cell)
    elsewhere = f"{cell.queue}-elsewhere"
    publisher = cell.publisher()
    try:
        with cell.worker(queues=f"{cell.queue},{elsewhere}") as started:
            task_id = publisher.send_task(RETRY_ELSEWHERE_TASK, args=(cell.ns, elsewhere), priority=2).id
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= 1, 60, "the run after the deferral")
            log = started.log()
        seen = [json.loads(entry) for entry in client.lrange(seen_key(cell.ns), 0, -1)]
    finally:
        publisher.close()
    # Deferred, not retried: once; by countdown on RabbitMQ, a countdown held over a tenth
    # of the window is sent again before it runs, one more RETRY of that deferral.
    resent = {"2"} if (broker, mode) == ("rabbitmq-classic", "countdown") else set()
    assert client.hget(deferral_counts_key(cell.ns), task_id) in {"1", *resent}, log
    assert seen == [
        {"queue": cell.queue, "priority": 2, "timelimit": [None, None], "retries": 0},
        {"queue": elsewhere, "priority": 7, "timelimit": [40, 30], "retries": 0},
    ], log
    assert client.hgetall(executions_key(cell.ns)) == {task_id: "1"}


# -- broker-delay brings each run back to its own queue ---------------------------------


def test_a_run_back_from_broker_delay_names_its_queue_in_its_delivery(
    rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    # A run back from a broker-delay deferral saw the delay's exchange and key in
    # self.request.delivery_info (celery_breaker_delayed_delivery, 0.0.(...).1.celery-breaker.<digest>).
    # A task retrying itself to the queue it came from, by that key, was sent to a new queue
    # of that name, which Celery declared and no worker consumes: it never ran again.
    # The delay is 2 s: a run back from an even delay shows the level it left last
    # (celery_breaker_delayed_0), not the delivery exchange; only odd delays were told.
    policy = {"failure_threshold": 1, "reset_timeout": 2.0}
    cell = deploy("rabbitmq-classic", "redis", "park", rabbitmq=rabbitmq, redis_server=redis_server, policy=policy,
                  breaker_defer_spread=0)  # fmt: skip
    client = counts(cell)
    publisher = cell.publisher()
    try:
        with cell.worker() as started:
            with held_open(cell, policy):
                task_id = publisher.send_task(RETRY_TO_ITS_QUEUE_TASK, args=(cell.ns,)).id
                wait_for(lambda: client.hget(deferral_counts_key(cell.ns), task_id) == "1", 30, "the deferral")
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= 1, 30, "the run retried to its queue")
            log = started.log()
    finally:
        publisher.close()
    assert "by broker-delay" in log
    assert client.lrange(seen_key(cell.ns), 0, -1) == [f"{cell.queue} 0", f"{cell.queue} 1"]
    assert client.hgetall(executions_key(cell.ns)) == {task_id: "1"}


def test_broker_delay_brings_every_run_back_to_its_own_queue_once_however_it_was_routed(
    rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    # Routes Celery allows that a delayed run's key must survive: the default exchange to a
    # direct queue whose key is not its name, the queue's exchange and key, a queue with two
    # bindings, two queues whose names end alike (high-NS, emails.high-NS), a topic exchange
    # putting a copy of one task in each of two queues, a queue added at run time
    # (add_consumer), and an exchange the worker's app does not declare. The worker notes
    # each task's queue from its consumer tag, so each copy goes back to its own queue.
    ns = f"r{uuid.uuid4().hex[:8]}"
    counter = f"{redis_server.url}/2"
    store = f"{redis_server.url}/1?key_prefix={ns}"
    env = {"ROUTES_NS": ns, "ROUTES_COUNTER": counter, "ROUTES_STORE": store}
    consumed = f"{ns}-work,{ns}-media,high-{ns},emails.high-{ns},{ns}-audit,{ns}-mail"
    publisher = routes_proj.make_app(rabbitmq.url, ns)
    count = redis.Redis.from_url(counter, decode_responses=True)
    routes: dict[str, dict[str, Any]] = {
        "default queue": {},
        "exchange and key": {"exchange": f"{ns}-tasks", "routing_key": f"{ns}.work.rk"},
        "one of two bindings": {"exchange": f"{ns}-media", "routing_key": f"{ns}.media.video"},
        "name ending another's": {"queue": f"emails.high-{ns}"},
        "the other one": {"queue": f"high-{ns}"},
        "added at run time": {"queue": f"{ns}-extra"},
        "unknown exchange": {"exchange": f"{ns}-foreign", "routing_key": "fw"},
        "a copy in each of two queues": {"exchange": f"{ns}-events", "routing_key": "user.created"},
    }
    copies = {"a copy in each of two queues": "2"}
    with publisher.connection_for_write() as connection:  # a route the workers' app knows nothing of
        channel = connection.default_channel
        channel.exchange_declare(f"{ns}-foreign", "direct", durable=True)
        for queue in routes_proj.queues(ns):
            queue.bind(channel).declare()
        channel.queue_bind(queue=f"{ns}-work", exchange=f"{ns}-foreign", routing_key="fw")
    with WorkerProcess(rabbitmq.url, app="tests.integration.routes_proj", queues=consumed, name=ns, env=env) as worker:
        worker.wait_ready()
        replies = publisher.control.add_consumer(
            f"{ns}-extra", reply=True, destination=[f"{ns}@{socket.gethostname()}"]
        )
        assert [next(iter(reply.values())) for reply in replies] == [{"ok": f"add consumer {ns}-extra"}]
        count.set(f"{ns}:down", 1)
        publisher.send_task(routes_proj.TASK, args=[ns, 0])  # trips the breaker
        wait_for(lambda: count.hget(f"{ns}:calls", "0") is not None, 30, "the trip")
        sent: dict[int, str] = {}
        for route, options in routes.items():
            for _ in range(3):
                n = len(sent) + 1
                publisher.send_task(routes_proj.TASK, args=[ns, n], **options)
                sent[n] = route
        count.delete(f"{ns}:down")
        every = [0, *sent]
        wait_for(lambda: len(count.hgetall(f"{ns}:runs")) == len(every), 60, "every task run (none lost)")
        # A copy would have been delayed along with the run: give copies a delay's length.
        time.sleep(3)  # (observing that nothing more arrives)
        runs = count.hgetall(f"{ns}:runs")
        calls = count.hgetall(f"{ns}:calls")
        log = worker.log()
    wrong = {route for n, route in sent.items() if runs.get(str(n)) != copies.get(route, "1")}
    assert wrong == set(), f"runs per task: {runs}"
    assert runs.get("0") == "1"
    # Sent while the breaker was open: each waited (deferred), and reached the downstream once.
    assert {n: calls.get(str(n)) for n in sent} == {n: copies.get(route, "1") for n, route in sent.items()}
    assert log.count("deferred") >= len(sent)
    assert "not broker-delay" not in log  # every queue was told, the unknown exchange's too
