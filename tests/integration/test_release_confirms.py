"""A parked task released to RabbitMQ is forgotten only once RabbitMQ took it (real RabbitMQ and Redis).

The releaser published a parked task (``breaker_park=True`` on RabbitMQ, or a Redis
store another worker parks in) as Celery publishes any task: without publisher
confirms. A publish RabbitMQ refuses, here a full queue whose ``x-overflow`` is
``reject-publish``, raised nothing; the entry was forgotten and the task was gone.
"""

from __future__ import annotations

import logging
import uuid

import pytest
from celery import Celery
from kombu.connection import Connection
from kombu.entity import Exchange, Queue

from celery_breaker.integration.deferral import release
from celery_breaker.integration.deferral.parking import encode_message
from celery_breaker.integration.deferral.release import Releaser
from celery_breaker.storage import close_stores
from celery_breaker.storage.redis import RedisStore
from celery_breaker.storage.redis.parking import RedisParking
from tests.rabbitmq import RabbitMQServer, taken_off
from tests.servers import RedisServer

pytestmark = pytest.mark.slow


def _messages(url: str, queue: Queue) -> list[str]:
    """The task ids waiting in ``queue`` (taken off it)."""
    return [message.headers["id"] for message in taken_off(url, queue)]


def _releasing_to(
    queue: Queue, ns: str, rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> tuple[Celery, RedisParking]:
    """An app whose tasks go to ``queue`` on RabbitMQ, and a Redis parking of its own."""
    app = Celery(f"release-{ns}", broker=rabbitmq.url, set_as_current=False)
    app.conf.update(task_queues=[queue], task_default_queue=queue.name, broker_connection_retry_on_startup=True)
    parking = RedisStore.from_url(f"{redis_server.url}/1?key_prefix={ns}").parking
    assert parking is not None
    return app, parking


def test_a_parked_task_rabbitmq_refuses_stays_parked_until_it_takes_it(
    rabbitmq: RabbitMQServer, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(release, "LEASE", 0.2)  # (seconds a claim holds an entry: shortened)
    ns = uuid.uuid4().hex[:8]
    arguments = {"x-max-length": 1, "x-overflow": "reject-publish"}
    queue = Queue(f"full-{ns}", queue_arguments=arguments)  # type: ignore[no-untyped-call]
    app, parking = _releasing_to(queue, ns, rabbitmq, redis_server)
    try:
        filler = app.send_task("proj.filler").id  # (the queue is full: RabbitMQ refuses the next message)
        parked = app.signature("proj.charge", args=(1,)).freeze().id
        body = dict(app.signature("proj.charge", args=(1,), task_id=parked, queue=queue.name))
        parking.park("crm", None, f"{parked}:0:1", 1.0, encode_message(body, "json"), None)
        tag = parking.tag("crm", None)
        releaser = Releaser(app, parking, rate=1000.0, ramp=0.0)

        for _ in range(50):  # (until the releaser has claimed it and tried to publish it)
            releaser.release_once()
            if parking.count(tag) != (1, 0) or releaser.released:
                break
        assert releaser.released == 0  # (refused: not counted as released)
        assert sum(parking.count(tag)) == 1  # (still parked or claimed: not forgotten)
        assert _messages(rabbitmq.url, queue) == [filler]  # (the queue is free again)

        for _ in range(50):  # (claimed again once its lease has run out)
            if releaser.release_once():
                break
        assert releaser.released == 1
        assert parking.count(tag) == (0, 0)
        assert _messages(rabbitmq.url, queue) == [parked]  # (once)
    finally:
        close_stores()
        with Connection(rabbitmq.url) as connection:  # type: ignore[no-untyped-call]
            queue.bind(connection.default_channel).delete()  # type: ignore[no-untyped-call]


def test_an_entry_celery_can_never_publish_is_dropped_and_the_rest_confirmed(
    rabbitmq: RabbitMQServer, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # With publisher confirms, Celery's TypeError for arguments that are no list (an
    # entry another writer parked) came back as the message's error: left claimed, and
    # claimed again after every lease for ever. It is dropped, with an ERROR; the task
    # beside it is published and confirmed.
    ns = uuid.uuid4().hex[:8]
    queue = Queue(f"poison-{ns}")  # type: ignore[no-untyped-call]
    app, parking = _releasing_to(queue, ns, rabbitmq, redis_server)
    try:
        good = app.signature("proj.charge", args=(1,)).freeze().id
        body = dict(app.signature("proj.charge", args=(1,), task_id=good, queue=queue.name))
        parking.park("crm", None, "bad:0:1", 1.0, encode_message({**body, "args": 5}, "json"), None)
        parking.park("crm", None, f"{good}:0:1", 2.0, encode_message(body, "json"), None)
        tag = parking.tag("crm", None)
        releaser = Releaser(app, parking, rate=1000.0, ramp=0.0)
        with caplog.at_level(logging.WARNING, logger="celery_breaker"):
            for _ in range(50):
                releaser.release_once()
                if parking.count(tag) == (0, 0):
                    break
        assert parking.count(tag) == (0, 0)
        assert _messages(rabbitmq.url, queue) == [good]
        (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert "dropped parked entry bad:0:1 of crm: it can never be published (TypeError" in error
        assert "could not publish" not in caplog.text
    finally:
        close_stores()
        with Connection(rabbitmq.url) as connection:  # type: ignore[no-untyped-call]
            queue.bind(connection.default_channel).delete()  # type: ignore[no-untyped-call]


def test_a_parked_task_whose_queue_is_gone_stays_parked_not_routed_nowhere(
    rabbitmq: RabbitMQServer,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A task parked from a queue of its own (delivered through exchange "gone-...", so
    # parked with that exchange and routing key) whose queue was deleted before the
    # release (an auto_delete queue whose consumers left, an x-expires queue, an
    # operator's delete): RabbitMQ routed the release nowhere and confirmed it, and the
    # entry was forgotten: the task was gone, with no word of it. It stays parked now,
    # and goes once a queue takes it again.
    monkeypatch.setattr(release, "LEASE", 0.2)  # (seconds a claim holds an entry: shortened)
    ns = uuid.uuid4().hex[:8]
    queue = Queue(f"default-{ns}")  # type: ignore[no-untyped-call]
    app, parking = _releasing_to(queue, ns, rabbitmq, redis_server)
    gone = f"gone-{ns}"
    try:
        with Connection(rabbitmq.url) as connection:  # type: ignore[no-untyped-call]
            connection.default_channel.exchange_declare(
                gone, "direct", durable=True, auto_delete=False
            )  # (its queue: deleted)
        parked = app.signature("proj.charge", args=(1,)).freeze().id
        body = dict(app.signature("proj.charge", args=(1,), task_id=parked, exchange=gone, routing_key=gone))
        parking.park("crm", None, f"{parked}:0:1", 1.0, encode_message(body, "json"), None)
        tag = parking.tag("crm", None)
        releaser = Releaser(app, parking, rate=1000.0, ramp=0.0)
        with caplog.at_level(logging.WARNING, logger="celery_breaker"):
            for _ in range(20):
                releaser.release_once()
        assert releaser.released == 0
        assert sum(parking.count(tag)) == 1  # (still parked or claimed: not forgotten)
        assert _messages(rabbitmq.url, queue) == []
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert f"routed parked task {parked}:0:1 of crm to no queue (exchange {gone!r}, routing key {gone!r}" in warning
        assert "Declare the queue again" in warning

        back = Queue(gone, Exchange(gone, "direct"), routing_key=gone)  # type: ignore[no-untyped-call]
        with Connection(rabbitmq.url) as connection:  # type: ignore[no-untyped-call]
            back.bind(connection.default_channel).declare()  # type: ignore[no-untyped-call]
        for _ in range(50):  # (claimed again once its lease has run out)
            if releaser.release_once():
                break
        assert releaser.released == 1
        assert parking.count(tag) == (0, 0)
        assert _messages(rabbitmq.url, back) == [parked]  # (once)
    finally:
        close_stores()
        with Connection(rabbitmq.url) as connection:  # type: ignore[no-untyped-call]
            queue.bind(connection.default_channel).delete()  # type: ignore[no-untyped-call]
            connection.default_channel.queue_delete(gone)
            connection.default_channel.exchange_delete(gone)
