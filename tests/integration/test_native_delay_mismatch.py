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
import json
import secrets
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
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
from celery_breaker.errors import CircuitOpenError
from celery_breaker.integration.deferral import broker_delay, countdown, native_delay
from celery_breaker.integration.deferral.defer import _deliver
from celery_breaker.integration.deferral.parking import ParkInStore, decode_message
from celery_breaker.integration.deferral.plan import DEFERRALS_HEADER, DeferralPlan
from celery_breaker.integration.deferral.strategy import publish
from celery_breaker.integration.events import DEFERRED_EVENT
from celery_breaker.monitoring.status import collect_metrics
from celery_breaker.storage import close_stores, resolve_store
from tests.integration.backlog_proj import (
    BREAKER,
    EARLY_ACK_TASK,
    PLAIN_SLOW_TASK,
    TASK,
    deferral_counts_key,
    executions_key,
    failed_ids_key,
    finished_key,
)
from tests.integration.deployments import Deployment, deploy
from tests.integration.downstream import Downstream
from tests.integration.event_capture import Events
from tests.integration.workers import wait_for
from tests.proxies import ReplyDropper
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


def deferred_while_open_then_run(
    cell: Deployment, task: str, client: redis.Redis, *, parked: bool = False, store: RedisServer | None = None
) -> tuple[list[str], str]:
    """Four runs of ``task`` sent while the breaker is held open, each ``parked`` in the
    store (counted where ``celery breaker status``, the page and the metrics count parked
    tasks; no run back while it is open) or else deferred and back three times; a plain
    task's latency on the same worker meanwhile (printed: the figure is the report's); then
    the breaker closed and every run done (none lost, none failed): the runs' ids and the
    worker's log. ``store``: the breaker store's own server, stopped while the runs are
    deferred (``breaker_on_storage_error="deny"`` holds the breaker open then) and started
    again, empty, to close it."""
    publisher = cell.publisher()
    try:
        with Downstream() as downstream, cell.worker() as started:
            with contextlib.nullcontext() if store is not None else held_open(cell):
                if store is not None:
                    store.stop()
                ids = [publisher.send_task(task, args=(cell.ns, downstream.url, n)).id for n in range(4)]
                if parked:
                    wait_for(lambda: _parked(cell) == len(ids), 30, "every run parked in the store")
                else:
                    wait_for(lambda: started.log().count("retry: deferred") >= 3 * len(ids), 30, "runs back, open")
                publisher.send_task(PLAIN_SLOW_TASK, args=(cell.ns, 0))
                latency = wait_for(lambda: client.hget(finished_key(cell.ns), "plain") == "1", 30, "the plain task")
                print(f"\n{cell.mode} {task}: a plain task's latency beside the deferred runs {latency:.2f} s")
                if parked:
                    # (a run logs its retry after it parked: the last may not have yet)
                    wait_for(lambda: started.log().count("retry: deferred") >= len(ids), 30, "every retry logged")
                    assert started.log().count("retry: deferred") == len(ids)  # (none back while open)
                    _assert_kept(cell, ids)
                if store is not None:
                    store.start()  # (empty: the breaker is closed, as the stand-ins find within 5 s)
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= len(ids), 20, "every task run (none lost)")
            return ids, started.log()
    finally:
        publisher.close()


def _parked(cell: Deployment) -> int:
    """The tasks parked behind the breaker, as ``celery breaker status`` (and the page, and the metrics) count them."""
    return sum(row.parked for row in collect_metrics(cell.store_url) if row.snapshot.name == BREAKER)


def _assert_kept(cell: Deployment, ids: list[str]) -> None:
    """Each parked entry is its run, counted as one deferral and released to the queue it came from, by name."""
    parking = resolve_store(cell.store_url).parking
    assert parking is not None
    client = redis.Redis.from_url(cell.store_url.split("?")[0], decode_responses=True)
    stored = [
        decode_message(str(payload).split("\n", 1)[-1], None)
        for payload in client.hvals(parking.tag(BREAKER, None) + ":m")
    ]
    client.close()
    assert sorted(body["options"]["task_id"] for body in stored) == sorted(ids)
    for body in stored:
        assert body["options"]["queue"] == cell.queue
        assert body["options"]["headers"][DEFERRALS_HEADER] == 1
        assert "countdown" not in body["options"]


def _with_a_password(redis_server: RedisServer, cell: Deployment) -> str:
    """The deployment's store reached as a Redis user of its own, whose password (returned)
    is in the store URL: no event, no log line may show it."""
    password = f"store-pw-{secrets.token_hex(8)}"
    redis_server.admin().acl_setuser(
        cell.ns, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"], categories=["+@all"]
    )
    cell.store_url = cell.conf["breaker_storage_url"] = cell.store_url.replace(
        "redis://", f"redis://{cell.ns}:{password}@"
    )
    return password


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
#: (``park``, the default) the countdown's runs are parked in the Redis store (decision 95),
#: or go straight back while it is stopped (``store-down``); without it
#: (``breaker_park=False``: the countdown alone) they go straight back.
CASES = [
    pytest.param("other-type", "park", TASK, id="other-type-parked"),
    pytest.param("other-type", "store-down", EARLY_ACK_TASK, id="other-type-store-down-early-ack"),
    pytest.param("other-type", "countdown", TASK, id="other-type-no-broker-delay"),
    pytest.param("no-configure", "park", TASK, id="no-configure-parked"),
]


@pytest.mark.parametrize(("case", "mode", "task"), CASES)
def test_a_deferral_neither_delay_can_take_is_never_lost(
    case: str, mode: str, task: str, rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """Every task deferred while neither broker-delay nor Celery's native delay is set up
    for its queue runs once after the breaker closes, and each pool process says at ERROR
    (once) which setting to change and where the tasks wait. Before, the countdown copies
    went into Celery's delay queues, were confirmed, and never came back. With a Redis
    store they are parked there, counted once, and leave the pool free; before decision
    95 each came back to its queue every second, and took a pool process for a second
    each time; while that store is down, and without parking, they still go that way.
    Each deferral's ``task-breaker-deferred`` event (captured as Flower does) names the way
    it took: ``mechanism: park`` and ``parked: true`` for a parked run, which the countdown
    hands to the store (``strategy.Handed``), and never shows the store URL's password."""
    parked = mode == "park"
    with RedisServer() as store:
        conf: dict[str, Any] = {"breaker_defer_spread": 0, "broker_native_delayed_delivery_queue_type": "classic"}
        if mode == "store-down":
            store.start()
            conf.update(breaker_on_storage_error="deny")
        cell = deploy("rabbitmq-quorum", "redis", "park" if mode == "store-down" else mode, rabbitmq=rabbitmq,
                      redis_server=redis_server, policy=POLICY, **conf)  # fmt: skip
        if mode == "store-down":
            cell.store_url = cell.conf["breaker_storage_url"] = f"{store.url}/1?key_prefix={cell.ns}"
            cell.mode = mode
        secret = _with_a_password(redis_server, cell) if parked else None
        client = redis.Redis.from_url(cell.counter_url, decode_responses=True)
        user, password = ("guest", "guest") if case == "other-type" else (f"u-{cell.ns}", "secret")
        with own_vhost(rabbitmq, "nodelay", user=user, password=password) as vhost:
            if case == "other-type":
                _declare_both_topologies(vhost.url, "quorum")
            else:
                # (Celery's levels an administrator declared would serve: bound, they bring copies back)
                _declare_both_topologies(vhost.url.replace(f"{user}:{password}", "guest:guest"), "classic",
                                         celery=False)  # fmt: skip
                rabbitmq.rabbitmqctl("set_permissions", "--vhost", vhost.name, user,
                                     "^(?!celery_delayed_|celery_breaker_delayed_).*", ".*", ".*")  # fmt: skip
            cell.broker_url = vhost.url
            with Events(Celery("events", broker=vhost.url, set_as_current=False)).running() as events:
                ids, log = deferred_while_open_then_run(
                    cell, task, client, parked=parked, store=store if mode == "store-down" else None
                )
                wait_for(lambda: {e["uuid"] for e in events.of(DEFERRED_EVENT)} >= set(ids), 10, "each run's event")
    assert client.hgetall(executions_key(cell.ns)) == dict.fromkeys(ids, "1")
    deferred = events.of(DEFERRED_EVENT)
    assert {event["uuid"] for event in deferred} == set(ids)
    for event in deferred:  # (parked: the store's; straight back: the countdown's, which parks nothing)
        assert (event["mechanism"], event["parked"]) == (("park", True) if parked else ("countdown", False)), event
        assert (event["breaker"], event["key"]) == (BREAKER, None)
        assert event["hostname"].startswith(f"w-{cell.ns}@")
    if parked:  # (once each, behind the operator's open; no secret in any event, nor in the log)
        assert sorted(event["uuid"] for event in deferred) == sorted(ids)
        assert {(event["state"], event["deferral"]) for event in deferred} == {("forced_open", 1)}
        assert secret is not None
        assert secret not in json.dumps(events.seen)
        assert secret not in log
        # (each counted as one deferral: parked once, released once; said as parked)
        assert client.hgetall(deferral_counts_key(cell.ns)) == dict.fromkeys(ids, "1")
        assert log.count("forced_open, parked until an operator closes it (deferral 1)") == len(ids)
    errors = [line for line in log.splitlines() if "ERROR/ForkPoolWorker" in line and "native delayed" in line]
    back = [line for line in errors if "goes straight back to its queue after a 1 s pause" in line]
    told = [line for line in errors if "is parked in the breaker store redis://" in line] if parked else back
    assert 1 <= len(told) <= 2, errors  # (one per pool process, throttled)
    assert "broker_native_delayed_delivery_queue_type" in told[0]
    assert cell.queue in told[0]
    if parked:
        assert back == [], back
    else:  # (while the store is down, the ERROR says why the runs are not parked)
        assert ("not parked: its breaker store is down" in told[0]) == (mode == "store-down")
    if case == "other-type" and mode != "countdown":  # (the worker says why broker-delay is not used, too)
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


def _work_app(url: str, name: str, queue: Any = None, **conf: Any) -> tuple[Celery, Any]:
    """An app on ``url`` whose tasks go to the queue ``work`` (``queue``, else the default
    one), declared, with ``conf`` set; and its one task, ``job(n)``, returning ``n``."""
    app = Celery(name, broker=url, set_as_current=False)
    app.conf.update(task_default_queue="work", **conf)
    if queue is not None:
        app.conf.task_queues = [queue]

    @app.task(bind=True, name=f"{name}.job")
    def job(self: Any, n: int) -> int:
        return n

    app.finalize()
    with app.connection_for_write() as connection:
        (app.amqp.queues["work"] if queue is None else queue).bind(connection.default_channel).declare()
    return app, job


def _connections_opened(app: Any) -> list[str]:
    """A list that grows by one for each connection a publisher of ``app`` opens from now
    on (its own: with ``transport_options``; Celery's disabled event dispatcher opens none)."""
    opened: list[str] = []
    connect = app.connection_for_write

    def counted(*args: Any, **kwargs: Any) -> Any:
        if "transport_options" in kwargs:
            opened.append("connection")
        return connect(*args, **kwargs)

    app.connection_for_write = counted
    return opened


def _deferred_by(
    job: Any, task_id: str, strategies: tuple[Any, ...], *, exchange: str, delay: float = 1.0, **fields: Any
) -> str:
    """The name of the strategy that takes a deferral of ``job`` by ``delay`` seconds,
    delivered on ``exchange`` with the routing key ``work`` (``fields``: more of the
    deferral's, its ``breaker``)."""
    job.push_request(id=task_id, args=(1,), kwargs={}, delivery_info={"exchange": exchange, "routing_key": "work"})
    try:
        plan = DeferralPlan(delay=delay, count=1, since=time.time())
        deferral = SimpleNamespace(task=job, args=(1,), kwargs={}, headers={}, plan=plan, options={}, **fields)
        by, _ = _deliver(deferral, strategies)  # type: ignore[arg-type]
        return str(by.name)
    finally:
        job.pop_request()


class _Last:
    """The next strategy after broker-delay: takes every run (a countdown would, here)."""

    name, parks = "last", False

    def deliver(self, deferral: Any) -> float:
        return 1.0


def test_broker_delay_refused_its_topology_opens_no_connection_per_run_for_a_minute(rabbitmq: RabbitMQServer) -> None:
    """Broker-delay's delay queues exist with the other type (a 406 on declaring them):
    each run opened two connections (its publish and the retry), declaring the topology
    on each, to meet the same refusal before going to the next strategy; with decision
    95 parking such runs at once, a backlog opened two connections per run in a burst.
    Now a process remembers the refusal for ``LOOK_AGAIN_AFTER`` (a manual clock here):
    the next runs go on without a connection, and a minute later, the queues deleted by
    the operator, broker-delay declares them again and takes the run (decision 96)."""
    now = [0.0]
    with own_vhost(rabbitmq, "refusedtopology") as vhost:
        _declare_both_topologies(vhost.url, "quorum", celery=False)
        app, job = _work_app(vhost.url, "refused", broker_native_delayed_delivery_queue_type="classic")
        opened = _connections_opened(app)

        strategies = (broker_delay.BrokerDelay(clock=lambda: now[0]), _Last())

        def deferred_by(task_id: str) -> str:
            return _deferred_by(job, task_id, strategies, exchange="")

        assert [deferred_by(f"t{n}") for n in range(4)] == ["last"] * 4
        assert len(opened) == 2  # (the first run's publish and its retry; before: 8, two for each run)
        now[0] += native_delay.LOOK_AGAIN_AFTER - 1
        assert deferred_by("t4") == "last"
        assert len(opened) == 2
        with Connection(vhost.url) as operator:  # type: ignore[no-untyped-call]
            channel = operator.channel()
            for level in range(broker_delay.LEVELS):
                channel.queue_delete(broker_delay.level_name(level))
            channel.queue_delete(broker_delay.UNROUTABLE)
            channel.close()
        now[0] += 1
        assert deferred_by("t5") == "broker-delay"  # (declared again, the other type gone)
        assert len(opened) == 3


def test_broker_delay_refused_by_a_length_policy_publishes_once_a_minute_per_level(
    rabbitmq: RabbitMQServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``max-length`` 0 policy on broker-delay's delay queues (declared with ``x-overflow:
    reject-publish``): RabbitMQ nacks every copy. Each run published its copy, met the
    nack and went to the next strategy: one refused publish per run (4 for 4 runs), on
    the path decision 95 made fast. Now a process remembers the nack of a level (the one
    a run of that delay enters first) for ``LOOK_AGAIN_AFTER`` (a manual clock here): the
    next runs of that level go on without publishing, another level's still publish, and
    a minute later, the policy gone, broker-delay takes the run (decision 98)."""
    now = [0.0]
    with own_vhost(rabbitmq, "fulllevels") as vhost:
        rabbitmq.rabbitmqctl("set_policy", "--vhost", vhost.name, "--apply-to", "queues", "full",
                             "^celery_breaker_delayed_[0-9]", '{"max-length": 0}')  # fmt: skip
        app, job = _work_app(vhost.url, "full", broker_native_delayed_delivery_queue_type="classic")
        opened = _connections_opened(app)
        published: list[str] = []

        def counted(task: Any, signature: Any, **options: Any) -> None:
            published.append(options["routing_key"])
            publish(task, signature, **options)

        monkeypatch.setattr(broker_delay, "publish", counted)
        strategies = (broker_delay.BrokerDelay(clock=lambda: now[0]), _Last())

        def deferred_by(task_id: str, delay: float = 1.0) -> str:
            return _deferred_by(job, task_id, strategies, exchange="", delay=delay)

        assert [deferred_by(f"t{n}") for n in range(4)] == ["last"] * 4
        assert len(published) == 1  # (the first run's, nacked; before: 4, one for each run)
        assert deferred_by("t4", delay=5.0) == "last"  # (5 s enters level 2, not level 0: published, nacked)
        assert len(published) == 2
        assert deferred_by("t5", delay=4.0) == "last"  # (level 2 again)
        assert len(published) == 2
        now[0] += native_delay.LOOK_AGAIN_AFTER - 1
        assert deferred_by("t6") == "last"
        assert len(published) == 2
        rabbitmq.rabbitmqctl("clear_policy", "--vhost", vhost.name, "full")
        now[0] += 1
        assert deferred_by("t7") == "broker-delay"  # (the policy gone and the minute up)
        assert len(published) == 3
        assert len(opened) == 1  # (a nack closes nothing: one connection all along)


def test_a_countdown_refused_on_its_way_into_the_delay_queues_is_parked_without_publishing_for_a_minute(
    rabbitmq: RabbitMQServer,
) -> None:
    """Celery's levels an administrator declared, and a user who may not write to
    ``celery_delayed_27``: RabbitMQ closes the channel on each countdown copy. Each run
    parked in its place (decision 95) had published it first, over its connection and
    again over a new one (the retry): two connections per run, the burst as large as the
    backlog. Now the refusal is remembered per queue for ``LOOK_AGAIN_AFTER`` (a manual
    clock here): the next runs are parked without a publish, and a minute later, the
    permission granted, the copy goes through Celery's delay again (decision 96)."""
    now = [0.0]
    user = f"u-{time.monotonic_ns()}"
    with own_vhost(rabbitmq, "nowrite", user=user, password="secret") as vhost:
        with Connection(vhost.url.replace(f"{user}:secret", "guest:guest")) as admin:  # type: ignore[no-untyped-call]
            declare_native_delayed_delivery_exchanges_and_queues(admin, "quorum")
        rabbitmq.rabbitmqctl("set_permissions", "--vhost", vhost.name, user,
                             "^(?!celery_delayed_).*", "^(?!celery_delayed_27$).*", ".*")  # fmt: skip
        queue = Queue("work", Exchange("work", type="topic"), routing_key="work",  # type: ignore[no-untyped-call]
                      queue_arguments={"x-queue-type": "quorum"})  # fmt: skip
        app, job = _work_app(vhost.url, "nowrite", queue)
        opened = _connections_opened(app)

        class Park:
            """The store, taking every run."""

            name, parks = "park", True

            def park(self, deferral: Any, route: Any) -> float:
                return 1.0

        strategy = countdown.CountdownRepublish(whole_seconds=True, park=Park(), clock=lambda: now[0])  # type: ignore[arg-type]
        store = SimpleNamespace(store=SimpleNamespace(url="redis://127.0.0.1:6379/1"))

        def deferred_by(task_id: str) -> str:
            return _deferred_by(job, task_id, (strategy,), exchange="work", breaker=store)

        assert [deferred_by(f"t{n}") for n in range(4)] == ["park"] * 4
        assert len(opened) == 2  # (the first run's publish and its retry; before: 8, two for each run)
        now[0] += native_delay.LOOK_AGAIN_AFTER - 1
        assert deferred_by("t4") == "park"
        assert len(opened) == 2
        rabbitmq.rabbitmqctl("set_permissions", "--vhost", vhost.name, user, "^(?!celery_delayed_).*", ".*", ".*")
        now[0] += 1
        assert deferred_by("t5") == "countdown"  # (through Celery's delay again)
        back: list[Any] = []

        def came_back() -> bool:
            back.extend(taken_off(vhost.url, queue))
            return bool(back)

        wait_for(came_back, 10, "the copy back through Celery's delay")
        assert [message.headers["id"] for message in back] == ["t5"]


@pytest.mark.parametrize("lost", ["closed", "timed-out"])
def test_a_park_whose_reply_is_lost_sends_the_run_straight_back_as_well_never_nowhere(
    lost: str, rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """A countdown Celery's native delay would not bring back (its levels of the other
    type) is parked in a real Redis store, through a proxy that loses the park's reply:
    Redis parks the entry, then the connection closes before the reply reaches the
    worker (``closed``: redis-py retries once, lost again), or stays silent past the
    store's ``socket_timeout`` (``timed-out``: the store asks again once, lost again).
    The store cannot tell the countdown it took the run, so ``ParkInStore`` declines it
    and the countdown sends it straight back to its queue as well (decision 95): the run
    waits in both, so it runs once or twice, never zero times. Taken for parked instead
    (the store's failure read as a park), the queue would stay empty, and a lost entry
    (the store restarted empty) would lose the task."""
    with (
        own_vhost(rabbitmq, "lostreply") as vhost,
        ReplyDropper(redis_server.address, close=lost == "closed") as proxy,
    ):
        _declare_both_topologies(vhost.url, "quorum")  # (the app says classic: Celery's delay is not set up)
        queue = Queue("work", Exchange("work", type="topic"), routing_key="work",  # type: ignore[no-untyped-call]
                      queue_arguments={"x-queue-type": "quorum"})  # fmt: skip
        _app, job = _work_app(
            vhost.url, f"lostreply.{lost}", queue, broker_native_delayed_delivery_queue_type="classic"
        )
        ns = f"lost-{secrets.token_hex(4)}"
        breaker = CircuitBreaker(
            BREAKER, POLICY, storage=f"redis://127.0.0.1:{proxy.port}/1?key_prefix={ns}&socket_timeout=1"
        )
        breaker.force_open()
        strategy = countdown.CountdownRepublish(whole_seconds=True, park=ParkInStore())

        def deferred_by(task_id: str) -> str:
            rejected = CircuitOpenError("forced open", name=BREAKER, state=breaker.state)
            return _deferred_by(job, task_id, (strategy,), exchange="work", breaker=breaker, rejected=rejected,
                                expires_in=None, max_defer_age=None, now=time.time(), failed=False)  # fmt: skip

        parking = resolve_store(breaker.store.url).parking
        assert parking is not None
        entries = parking.tag(BREAKER, None) + ":m"
        assert deferred_by("t-kept") == "park"  # (the proxy passing replies on: parked, nothing published)
        assert taken_off(vhost.url, queue) == []
        proxy.marker = b"t-lost:0:1"  # (the entry's id: only the park of that run carries it)
        assert deferred_by("t-lost") == "countdown"  # (straight back, after the pause)
        assert proxy.dropped == 2  # (the park, and the one retry: redis-py's, or the store's own after a timeout)
        store = redis.Redis.from_url(f"{redis_server.url}/1", decode_responses=True)
        parked = sorted(store.hkeys(entries))
        assert parked == ["t-kept:0:1", "t-lost:0:1"]  # (Redis parked it: its reply alone was lost)
        store.close()
        back: list[Any] = []

        def came_back() -> bool:
            back.extend(taken_off(vhost.url, queue))
            return bool(back)

        wait_for(came_back, 10, "the run straight back to its queue")
        assert [message.headers["id"] for message in back] == ["t-lost"]
        assert back[0].headers.get("eta") is None  # (no countdown: straight back)
        breaker.close()


@pytest.mark.parametrize("mode", ["countdown", "park"])
def test_a_countdown_refused_on_its_way_into_the_delay_queues_goes_straight_back_or_is_parked(
    mode: str, rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """A length policy of 0 on the delay queues (with their ``x-overflow:
    reject-publish``): RabbitMQ refuses every countdown copy. An early-acknowledged task
    failed (``could not be deferred``); now it goes straight back to its queue
    (``breaker_park=False``), or is parked in the Redis store (``park``: broker-delay's
    copies are refused too, so the runs reach the countdown), and runs once the breaker
    closes. (Parked, with classic delay queues: quorum ones took a copy now and then
    despite the limit, which came back delayed, as it should, and was not parked.)"""
    classic: dict[str, Any] = {"broker_native_delayed_delivery_queue_type": "classic"} if mode == "park" else {}
    cell = deploy("rabbitmq-quorum", "redis", mode, rabbitmq=rabbitmq, redis_server=redis_server,
                  policy=POLICY, breaker_defer_spread=0, **classic)  # fmt: skip
    client = redis.Redis.from_url(cell.counter_url, decode_responses=True)
    with own_vhost(rabbitmq, "refused") as vhost:
        rabbitmq.rabbitmqctl("set_policy", "--vhost", vhost.name, "--apply-to", "queues", "full",
                             "^celery_(breaker_)?delayed_", '{"max-length": 0}')  # fmt: skip
        cell.broker_url = vhost.url
        ids, log = deferred_while_open_then_run(cell, EARLY_ACK_TASK, client, parked=mode == "park")
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


def test_an_early_acknowledged_run_deferred_while_rabbitmq_is_down_is_parked_not_failed(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """RabbitMQ down (restarted, or the connection dropped) while a run is deferred, its
    delivery acknowledged on receipt (Celery's default): broker-delay could not publish,
    nor the countdown, and the run failed for good (``could not be deferred``), though
    the app had a Redis breaker store that could hold it. It is parked there now, and
    released once RabbitMQ and its breaker take it again."""
    with socket.socket() as closed:  # (a port nothing listens on: RabbitMQ down)
        closed.bind(("127.0.0.1", 0))
        down = f"amqp://guest:secret@127.0.0.1:{closed.getsockname()[1]}//"
    app = Celery("down.early", broker=down, set_as_current=False)
    app.conf.update(task_default_queue="work", broker_connection_timeout=0.5)

    @app.task(bind=True, name="down.early.job")
    def job(self: Any, n: int) -> int:
        return n

    app.finalize()
    ns = f"down-{secrets.token_hex(4)}"
    breaker = CircuitBreaker(BREAKER, POLICY, storage=f"{redis_server.url}/1?key_prefix={ns}")
    breaker.force_open()
    strategies = (broker_delay.BrokerDelay(), countdown.CountdownRepublish(whole_seconds=False, park=ParkInStore()))
    rejected = CircuitOpenError("forced open", name=BREAKER, state=breaker.state)
    by = _deferred_by(job, "t-down", strategies, exchange="", breaker=breaker, rejected=rejected,
                      state="forced_open", expires_in=None, max_defer_age=None, now=time.time(),
                      failed=False)  # fmt: skip
    assert by == "park"
    parking = resolve_store(breaker.store.url).parking
    assert parking is not None
    store = redis.Redis.from_url(f"{redis_server.url}/1", decode_responses=True)
    assert store.hkeys(parking.tag(BREAKER, None) + ":m") == ["t-down:0:1"]
    store.close()
    breaker.close()
    assert "parked in the breaker store" in caplog.text
    assert "secret" not in caplog.text
